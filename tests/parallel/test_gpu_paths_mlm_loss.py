"""The chunked masked-LM loss on its accelerator plan (parallel/vocab.py: mlm_loss_plan), run on CPU
tensors by asking the plan for "cuda": one decoder-gradient product per micro-batch however many
chunks, the decoder copied to the compute dtype once, no host sync (no item(), no nonzero, no
boolean index), chunks sized for the device; values and gradients equal to the host plan (today's
path) at TP 1 (fp32 and bf16 autocast) and TP 2 (gloo, two processes). The head finds its masked
rows on the host and hands the device only copies (model/xlmr.py: masked_rows)."""
import pytest
import torch

from tests.support.harness import run_distributed
from tests.support.host_syncs import OpCounter

from tests.parallel.test_chunked_loss import H, M, V, VP, _inputs   # 37 masked tokens, H 16, V 50 real of 56

CHUNK = 8                             # 5 chunks


def _on_device_plan(monkeypatch):
    """Every call of the loss takes the plan the code would take on a CUDA tensor."""
    from xlmr_mp.parallel import vocab
    real = vocab.mlm_loss_plan
    monkeypatch.setattr(vocab, "mlm_loss_plan", lambda device_type, *a: real("cuda", *a))


def _grads(h, w, b, t, chunk=CHUNK, group=None, start=0, scale=0.37):
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    h, w, b = (x.clone().requires_grad_(True) for x in (h, w, b))
    loss = vocab_parallel_masked_lm_loss(h, w, b, t, group, start, vocab_size=V, chunk_rows=chunk)
    gh, gw, gb = torch.autograd.grad(loss * scale, [h, w, b])
    return loss.detach(), gh, gw, gb


def _ctx(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)


def test_plan_is_a_function_of_the_device_type():
    from xlmr_mp.parallel.vocab import MLM_LOSS_CHUNK_BYTES, mlm_loss_chunk_rows, mlm_loss_plan
    host = mlm_loss_plan("cpu", 250002)
    assert host == (mlm_loss_chunk_rows(250002), 0) and host.chunk_rows == 268   # 256 MiB, a product per chunk
    dev = mlm_loss_plan("cuda", 250002, torch.bfloat16)
    assert dev.chunk_rows * 4 * 250002 > 3 * MLM_LOSS_CHUNK_BYTES                   # larger chunks on a device
    # a 16 x 512 micro-batch masks ~15% = 1229 tokens: all of them in one decoder-gradient product
    assert dev.product_rows >= 16 * 512 // 4
    assert mlm_loss_plan("cuda", 250002 // 8, torch.float32).product_rows >= dev.product_rows   # TP 8, fp32


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_device_plan_one_decoder_gradient_product_no_host_sync(monkeypatch, dtype):
    """5 chunks: the host plan multiplies 5 times into the [V, H] decoder gradient (and uses a
    boolean index per chunk); the device plan once, with no host sync, the decoder cast once."""
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")      # the torch rows (what a GPU runs by default)
    h, w, b, t = _inputs()
    decoder_grad = lambda name, shapes: name in ("aten.mm", "aten.addmm", "aten.addmm_") and (V, H) in shapes  # noqa: E731
    decoder_cast = lambda name, shapes: name == "aten._to_copy" and (V, H) in shapes  # noqa: E731
    with _ctx(dtype), OpCounter() as host_ops:
        host = _grads(h, w, b, t)
    assert host_ops.count(decoder_grad) == -(-M // CHUNK)           # what the device plan replaces
    _on_device_plan(monkeypatch)
    with _ctx(dtype), OpCounter() as dev_ops:
        dev = _grads(h, w, b, t)
    assert dev_ops.count(decoder_grad) == 1
    assert dev_ops.count(decoder_cast) == (1 if dtype == "bf16" else 0)
    assert dev_ops.syncs == [], dev_ops.syncs
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for a, e, what in zip(dev, host, ("loss", "d hidden", "d weight", "d bias")):
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m: f"{what}: {m}")
    assert dev[2][V:].abs().max() == 0 and dev[3][V:].abs().max() == 0    # padding rows get nothing


def test_device_plan_groups_when_the_gradient_buffer_is_full(monkeypatch):
    """More masked rows than one gradient buffer holds: one product per buffer, same values."""
    from xlmr_mp.parallel import vocab
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    h, w, b, t = _inputs(2)
    host = _grads(h, w, b, t)
    monkeypatch.setattr(vocab, "MLM_DEVICE_CHUNK_BYTES", CHUNK * 4 * V)     # 8-row chunks
    monkeypatch.setattr(vocab, "MLM_DEVICE_GRAD_BYTES", 16 * 4 * V)         # 16 rows a product
    _on_device_plan(monkeypatch)
    with OpCounter() as ops:
        dev = _grads(h, w, b, t)
    assert ops.count(lambda n, s: n in ("aten.mm", "aten.addmm", "aten.addmm_") and (V, H) in s) == 3
    for a, e in zip(dev, host):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _tp2_body(rank, world_size):
    import torch.distributed as dist
    from xlmr_mp.parallel import vocab
    import os
    os.environ["XLMR_MP_KERNELS"] = "reference"
    group = dist.new_group([0, 1])
    h, w, b, t = _inputs(3)
    per = VP // 2
    lo = rank * per
    ws, bs = w[lo:lo + per].clone(), b[lo:lo + per].clone()
    host = _grads(h, ws, bs, t, group=group, start=lo)
    real = vocab.mlm_loss_plan
    vocab.mlm_loss_plan = lambda device_type, *a: real("cuda", *a)
    with OpCounter() as ops:
        dev = _grads(h, ws, bs, t, group=group, start=lo)
    vocab.mlm_loss_plan = real
    n_real = vocab.real_rows(per, V, lo)
    products = ops.count(lambda n, s: n in ("aten.mm", "aten.addmm", "aten.addmm_") and (n_real, H) in s)
    return host, dev, products, ops.syncs


def test_device_plan_tp2_equals_host_plan():
    res = run_distributed(_tp2_body, 2, timeout=120)
    for rank, (host, dev, products, syncs) in enumerate(res):
        assert products == 1 and syncs == [], (rank, products, syncs)
        for a, e in zip(dev, host):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_head_finds_masked_rows_on_the_host():
    """Host labels, rows wanted on a device (meta stands for it: any data-dependent op on it
    raises): the rows are found on the host and only copies reach the device."""
    from xlmr_mp.model.xlmr import masked_rows
    labels = torch.full((24,), -100)
    labels[[2, 5, 17]] = torch.tensor([7, 8, 9])
    sel, target, count = masked_rows(labels, torch.device("meta"))
    assert sel.device.type == target.device.type == count.device.type == "meta"
    assert sel.shape == target.shape == (3,) and count.shape == ()
    sel, target, count = masked_rows(labels, torch.device("cpu"))
    assert sel.tolist() == [2, 5, 17] and target.tolist() == [7, 8, 9] and count.item() == 3.0
