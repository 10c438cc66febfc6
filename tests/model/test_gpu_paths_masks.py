"""Attention masks on the device path (issue 26, defect 5): an all-ones mask is dropped on any device,
decided on the host copy before the batch moves (so SDPA gets no bias and may take its flash kernel,
with no host sync), and the padding bias is finite in every dtype and built in the compute dtype,
so that a fully padded sample gives finite outputs under bf16 and fp16 autocast."""
import pytest
import torch

from tests.support.model_case import padded_batch, tiny_model


def _mb(padded: bool):
    ids, mask, labels = padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_all_ones_mask_is_dropped_before_the_batch_moves():
    """The micro-batch handed to a forward on a device (meta stands for cuda: it has no data to
    read back, so a decision taken after the move could not be made without a sync): no mask when
    the host copy has no padding, the mask moved when it has; the labels stay on the host."""
    from xlmr_mp.parallel.schedule import device_micro_batch
    dev = torch.device("meta")
    mb = _mb(padded=False)
    ids, mask, labels = device_micro_batch(mb, dev)
    assert mask is None and ids.device == dev and labels is mb["labels"]
    mb = _mb(padded=True)
    ids, mask, labels = device_micro_batch(mb, dev)
    assert mask is not None and mask.device == dev and mask.shape == mb["attention_mask"].shape
    assert labels is mb["labels"]


def test_schedule_hands_no_mask_for_an_unpadded_batch():
    """The training step (PP 1): the loss function receives no mask for unpadded micro-batches and
    the padded one's mask; the encoder builds a bias for the padded one only."""
    from xlmr_mp.config import ParallelConfig
    from xlmr_mp.parallel.stages import masked_lm_loss_sum
    from xlmr_mp.parallel.schedule import PipelineSchedule
    model = tiny_model(dropout=0.0)
    seen = []

    def loss_fn(chunk, x, attention_mask, labels):
        seen.append(attention_mask)
        return masked_lm_loss_sum(chunk, x, attention_mask, labels)
    pipe = PipelineSchedule([model], None, ParallelConfig(), 3, loss_fn)
    mbs = [_mb(False), _mb(True), _mb(False)]
    pipe.step(mbs, global_num_masked=float(sum(int((mb["labels"] != -100).sum()) for mb in mbs)))
    assert seen[0] is None and seen[2] is None and seen[1] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padding_bias_is_finite_in_every_dtype(dtype):
    """The bias is finite, stays finite with a score added in the dtype itself, and a row of
    padding keys only (plus scores) softmaxes to finite values; real keys get exactly 0."""
    from xlmr_mp.model.encoder import attention_bias
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    bias = attention_bias(mask, dtype)
    assert bias.dtype == dtype and torch.isfinite(bias).all()
    assert (bias[0, 0, 0, :2] == 0).all() and (bias[..., 2:] < -1000).all()
    scores = torch.tensor([-1000.0, -3.0, 5.0, 1000.0], dtype=dtype)
    logits = bias + scores
    assert torch.isfinite(logits).all(), logits
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.isfinite(probs).all()
    assert probs[0, 0, 0, 2:].max() < 1e-6            # padding keys of a real row get nothing


def test_bias_is_built_in_the_compute_dtype_under_autocast():
    model = tiny_model(dropout=0.0).eval()
    ids, mask, _ = padded_batch()
    dtypes = []
    hs = [layer.register_forward_pre_hook(lambda mod, args: dtypes.append(args[1].dtype))
          for layer in model.layers.values()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode(ids, mask)
    for h in hs:
        h.remove()
    assert dtypes == [torch.bfloat16] * len(model.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked_softmax", [False, True])
def test_fully_padded_sample_gives_finite_outputs(monkeypatch, dtype, masked_softmax):
    """A sample of padding only, under bf16 / fp16 autocast, through SDPA and through the explicit
    masked-softmax attention (what fp16 on sm_70 takes): finite hidden states, logits and loss."""
    from xlmr_mp.kernels import ops
    if masked_softmax:
        monkeypatch.setattr(ops, "attention_uses_masked_softmax", lambda q: True)
    model = tiny_model(dropout=0.0).eval()
    ids, mask, labels = padded_batch()
    mask[2] = 0
    ids[2] = model.cfg.pad_id
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        hidden = model.encode(ids, mask)
        logits = model(ids, attention_mask=mask)[..., : model.cfg.vocab_size]
        loss = model(ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(hidden).all() and torch.isfinite(logits).all() and torch.isfinite(loss)
