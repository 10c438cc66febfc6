"""Host syncs of a training step on the device path (issue 26, defect 10): one per optimizer step
(the step's summed loss, read where the trainer logs it), none per micro-batch: no loss.item() in
the schedule, no nonzero in the masked head, no boolean index in the chunked loss. Counted on CPU
tensors with a TorchDispatchMode (tests/support/host_syncs.py), the loss taking the plan it takes
on a CUDA tensor; the same step's loss and gradients as the host plan."""
import torch

from tests.support.host_syncs import OpCounter
from tests.support.model_case import padded_batch, tiny_model

N_MICRO = 4


def _micro_batches():
    ids, _, labels = padded_batch()
    out = []
    for i in range(N_MICRO):
        lab = labels.roll(i, dims=1)
        out.append({"input_ids": ids.roll(i, dims=1), "attention_mask": torch.ones_like(ids), "labels": lab})
    return out


def _step(device_plan: bool, monkeypatch):
    from xlmr_mp.config import ParallelConfig
    from xlmr_mp.parallel.stages import masked_lm_loss_sum
    from xlmr_mp.parallel import vocab
    from xlmr_mp.parallel.schedule import PipelineSchedule
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")     # the torch ops a GPU runs, not the CPU kernels
    if device_plan:
        real = vocab.mlm_loss_plan
        monkeypatch.setattr(vocab, "mlm_loss_plan", lambda device_type, *a: real("cuda", *a))
    model = tiny_model(dropout=0.0)
    pipe = PipelineSchedule([model], None, ParallelConfig(), N_MICRO, masked_lm_loss_sum)
    mbs = _micro_batches()
    n = float(sum(int((mb["labels"] != -100).sum()) for mb in mbs))
    with OpCounter() as ops:
        loss = pipe.step(mbs, global_num_masked=n)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}, ops


def test_one_host_sync_per_step(monkeypatch):
    loss, grads, ops = _step(True, monkeypatch)
    assert ops.syncs == [("aten._local_scalar_dense", ())], ops.syncs     # the step's loss, read once
    assert isinstance(loss, float) and loss > 0
    host_loss, host_grads, _ = _step(False, monkeypatch)
    assert abs(loss - host_loss) <= 1e-6 * host_loss
    for k in grads:
        torch.testing.assert_close(grads[k], host_grads[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_step_loss_sums_like_the_host():
    """The on-device fp64 sum reads back the same float as summing item() on the host."""
    from xlmr_mp.parallel.schedule import _accumulate, _host_value
    vals = torch.rand(7, dtype=torch.float32) * 3
    total = None
    for v in vals:
        total = _accumulate(total, v, 3.0)
    expect = 0.0
    for v in vals:
        expect += v.item() / 3.0
    assert _host_value(total) == expect
