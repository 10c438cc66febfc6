"""Rank bodies and shared helpers for the model / TP / HF tests (spawned ranks import this module)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

TINY_HF = dict(vocab_size=150, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)


def tiny_hf_model(seed: int = 0):
    """A randomly initialised tiny HF XLMRobertaForMaskedLM (no download), eval mode."""
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
    torch.manual_seed(seed)
    model = XLMRobertaForMaskedLM(XLMRobertaConfig(**TINY_HF)).eval()
    with torch.no_grad():  # HF inits the biases and LayerNorms to constants; make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_batch(seed: int = 0, vocab: int = 150, B: int = 3, S: int = 12):
    """input_ids with right padding, attention_mask, and ~25% masked labels (at least one each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    ids[:, 0] = 0
    lengths = [S, S - 4, S - 7][:B]
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = 2
        ids[b, n:] = 1
        mask[b, :n] = 1
    labels = torch.full((B, S), -100, dtype=torch.long)
    pick = (torch.rand(B, S, generator=g) < 0.25) & mask.bool()
    pick[:, 1] = True
    labels[pick] = torch.randint(3, vocab, (int(pick.sum()),), generator=g)
    return ids, mask, labels


class blockwise_init:
    """Force the block-wise (large tensor) initialisation path with small, odd blocks."""

    def __enter__(self):
        from xlmr_mp.model.xlmr import XLMRModel
        self.saved = XLMRModel.BLOCK_INIT_MIN_NUMEL, XLMRModel.INIT_BLOCK_ROWS
        XLMRModel.BLOCK_INIT_MIN_NUMEL, XLMRModel.INIT_BLOCK_ROWS = 0, 7

    def __exit__(self, *exc):
        from xlmr_mp.model.xlmr import XLMRModel
        XLMRModel.BLOCK_INIT_MIN_NUMEL, XLMRModel.INIT_BLOCK_ROWS = self.saved


def build_tp_model(cfg, full, tp_group, **kw):
    from xlmr_mp.checkpoint.model_io import local_state_for
    from xlmr_mp.model.xlmr import XLMRModel
    model = XLMRModel(cfg, tp_group=tp_group, init_seed=0, **kw)
    model.load_state_dict(local_state_for(model, full), strict=True)
    return model


def _gather_vocab(logits_local, group):
    parts = [torch.empty_like(logits_local) for _ in range(group.size())]
    dist.all_gather(parts, logits_local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def tp_rank_checks(rank, world_size, cfg, full, batch, ce_case):
    """Everything the TP tests compare against single-process references, from one TP group:
    all-position logits (gathered, padding stripped), loss, local grads, vocab-parallel CE value and
    grad shard, replicated-region dropout agreement, and recompute-with-dropout gradients."""
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel, seed_parallel_rng
    from xlmr_mp.parallel.vocab import vocab_parallel_cross_entropy, vocab_range
    groups = init_parallel(tp=world_size, pp=1)
    tp = groups.tp_group
    ids, mask, labels = batch
    out = {}

    model = build_tp_model(cfg, full, tp).eval()
    with torch.no_grad():
        out["logits"] = _gather_vocab(model(ids, mask), tp)[..., : cfg.vocab_size]
        out["logits_nomask"] = _gather_vocab(model(ids), tp)[..., : cfg.vocab_size]

    model.train()  # dropout is 0 in cfg: train mode only exercises the training path
    loss = model(ids, mask, labels)
    loss.backward()
    out["loss"] = loss.item()
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_sum, count = model.loss_and_count(ids, mask, labels)
    out["loss_sum"], out["count"] = loss_sum.item(), count.item()

    # vocab-parallel CE on a shard of given full logits
    full_logits, target = ce_case
    per = full_logits.shape[1] // world_size
    start, end = vocab_range(full_logits.shape[1], groups.tp_rank, world_size)
    local = full_logits[:, start:end].clone().requires_grad_(True)
    ce = vocab_parallel_cross_entropy(local, target, tp, vocab_start=start)
    (ce * torch.arange(1, ce.numel() + 1, dtype=ce.dtype)).sum().backward()
    out["ce"], out["ce_grad"] = ce.detach(), local.grad.clone()
    assert per == end - start

    # dropout: replicated hidden must agree across TP ranks; recompute must replay the same masks
    import dataclasses
    dcfg = dataclasses.replace(cfg, dropout=0.2, attention_dropout=0.2)
    dmodel = build_tp_model(dcfg, full, tp).train()
    seed_parallel_rng(7, groups)
    hidden = dmodel.encode(ids, mask)
    gathered = [torch.empty_like(hidden) for _ in range(world_size)]
    dist.all_gather(gathered, hidden.detach().contiguous(), group=tp)
    out["dropout_hidden_agree"] = all(torch.equal(gathered[0], h) for h in gathered)
    grads = {}
    for mode in ("none", "full", "selective"):
        dmodel.zero_grad()
        dmodel.set_recompute(mode)
        seed_parallel_rng(11, groups)
        dmodel(ids, mask, labels).backward()
        grads[mode] = {n: p.grad.clone() for n, p in dmodel.named_parameters()}
    out["recompute_max_diff"] = max((grads[m][n] - grads["none"][n]).abs().max().item()
                                    for m in ("full", "selective") for n in grads["none"])
    # sequence parallelism: same logits, loss and (after the SP grad sync) gradients
    from xlmr_mp.parallel.grads import sync_sequence_parallel_grads
    sp = build_tp_model(cfg, full, tp, sequence_parallel=True).eval()
    with torch.no_grad():
        out["sp_logits"] = _gather_vocab(sp(ids, mask), tp)[..., : cfg.vocab_size]
        out["sp_hidden_shape"] = tuple(sp.encode(ids, mask).shape)
    sp.train()
    loss = sp(ids, mask, labels)
    loss.backward()
    sync_sequence_parallel_grads(sp, tp)
    out["sp_loss"] = loss.item()
    out["sp_grads"] = {n: p.grad.clone() for n, p in sp.named_parameters()}
    dsp = build_tp_model(dcfg, full, tp, sequence_parallel=True).train()
    grads = {}
    for mode in ("none", "full"):
        dsp.zero_grad()
        dsp.set_recompute(mode)
        seed_parallel_rng(13, groups)
        dsp(ids, mask, labels).backward()
        grads[mode] = {n: p.grad.clone() for n, p in dsp.named_parameters()}
    out["sp_recompute_max_diff"] = max((grads["full"][n] - grads["none"][n]).abs().max().item()
                                       for n in grads["none"])

    # initialisation is the same full model at every TP size
    from xlmr_mp.model.xlmr import XLMRModel
    out["init_state"] = XLMRModel(cfg, tp_group=tp, init_seed=3).state_dict()
    with blockwise_init():
        out["init_state_blockwise"] = XLMRModel(cfg, tp_group=tp, init_seed=3).state_dict()

    # sizes that do not split over this TP group fail with the option's name
    from xlmr_mp.config import ConfigError
    out["divisibility_errors"] = []
    for bad in (dict(num_heads=world_size + 1, hidden_size=8 * (world_size + 1)),
                dict(ffn_size=cfg.ffn_size + 1)):
        try:
            XLMRModel(dataclasses.replace(cfg, **bad), tp_group=tp)
            out["divisibility_errors"].append(None)
        except ConfigError as e:
            out["divisibility_errors"].append(str(e))

    # RNG streams: the default generator agrees across TP ranks, the tensor-parallel one differs
    from xlmr_mp.parallel.state import get_rng_tracker
    seed_parallel_rng(21, groups)
    with get_rng_tracker().fork():
        forked = torch.rand(4)
    draws = torch.stack([torch.rand(4), forked])
    gathered = [torch.empty_like(draws) for _ in range(world_size)]
    dist.all_gather(gathered, draws, group=tp)
    out["default_rng_agrees"] = all(torch.equal(g[0], gathered[0][0]) for g in gathered)
    out["tp_rng_differs"] = len({tuple(g[1].tolist()) for g in gathered}) == world_size
    destroy_parallel()

    if world_size == 4:  # Megatron rank order: TP fastest, then DP, then PP
        g = init_parallel(tp=2, pp=2)
        out["layout"] = dict(tp=dist.get_process_group_ranks(g.tp_group), pp=list(g.pp_ranks),
                             dp=dist.get_process_group_ranks(g.dp_group), emb=list(g.embedding_ranks),
                             coords=(g.tp_rank, g.dp_rank, g.pp_rank), first=g.is_first_stage,
                             last=g.is_last_stage)
        destroy_parallel()
        g = init_parallel(tp=2, pp=1)
        out["layout_dp"] = dict(tp=dist.get_process_group_ranks(g.tp_group),
                                dp=dist.get_process_group_ranks(g.dp_group), dp_size=g.dp_size)
        destroy_parallel()
    return out


def divisibility_rank(rank, world_size, cfg):
    """Build a model that cannot be split over this TP group; return the error message."""
    from xlmr_mp.config import ConfigError
    from xlmr_mp.model.xlmr import XLMRModel
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    groups = init_parallel(tp=world_size)
    try:
        XLMRModel(cfg, tp_group=groups.tp_group)
    except ConfigError as e:
        return str(e)
    finally:
        destroy_parallel()
    return None
