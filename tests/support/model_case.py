"""A tiny XLMRModel with the CPU fast paths applied (kernels.apply) and a padded masked-LM batch,
for the tests that run the whole model through a CPU kernel path and through
XLMR_MP_KERNELS=reference (test_attention_cpu, test_encoder_layer_cpu)."""
import torch


def tiny_model(dropout: float = 0.1):
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp import kernels
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = ModelConfig(vocab_size=200, hidden_size=48, num_layers=2, num_heads=4, ffn_size=96, max_positions=40,
                      dropout=dropout, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    model = XLMRModel(cfg, init_seed=0)
    kernels.apply(model, "cpu")
    return model


def padded_batch():
    """(ids [3, 32], attention_mask, labels): sequence 0 padded from position 20, ~20% labelled."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 200, (3, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    ids[0, 20:] = 1
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    labels[1, 3] = ids[1, 3]
    return ids, mask, labels


def loss_and_grads(model, batch, monkeypatch, mode: str, seed: int = 7):
    """(loss, {name: grad}) of one forward + backward under XLMR_MP_KERNELS=mode, the RNG at seed
    (so the hidden-dropout masks are the same in every call)."""
    ids, mask, labels = batch
    monkeypatch.setenv("XLMR_MP_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(ids, attention_mask=mask, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
