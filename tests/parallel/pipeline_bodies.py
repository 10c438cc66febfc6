"""Rank bodies for test_pipeline.py: pipeline-parallel steps against a single-process reference
computed in the same rank (same micro-batches, same initial weights, plain loop)."""
import torch
import torch.distributed as dist

from xlmr_mp.config import ParallelConfig
from xlmr_mp.model.config import ModelConfig

TIED = "lm_head.decoder_weight"
EMB = "embeddings.word_embeddings.weight"
SEED = 1234


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=120, hidden_size=32, num_layers=4, num_heads=4, ffn_size=64, max_positions=18,
                       dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)


def make_micro_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = 120, seed: int = 0) -> list:
    """Deterministic micro-batches in the trainer's batch format: `<s>` first, some padding,
    ~20% of the real tokens (never `<s>`) masked as labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab - 1, (batch, seq), generator=g)
        ids[:, 0] = 0
        mask = torch.ones(batch, seq, dtype=torch.long)
        cut = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        ids[-1, cut:] = 1
        mask[-1, cut:] = 0
        pick = (torch.rand(batch, seq, generator=g) < 0.2) & (mask == 1)
        pick[:, 0] = False
        pick[0, 1] = True
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels, lang=torch.zeros(batch, dtype=torch.long)))
    return out


def _model_cls():
    from xlmr_mp.model.xlmr import XLMRModel
    return XLMRModel


def _named_params(chunks):
    out = {}
    for c in chunks:
        for k, p in c.named_parameters():
            out[k] = p
    return out


def _ref_name(name: str) -> str:
    return EMB if name == TIED else name


def _max_abs_diff(mine: dict, ref: dict, what: str) -> dict:
    """{name: (max |mine - ref|, max |ref|)} for every local tensor (the tied decoder copy is
    compared with the reference's word embedding)."""
    out = {}
    for k, t in mine.items():
        r = ref[_ref_name(k)]
        assert t.shape == r.shape, f"{what} {k}: shape {tuple(t.shape)} vs reference {tuple(r.shape)}"
        out[k] = ((t.detach() - r.detach()).abs().max().item(), r.detach().abs().max().item())
    return out


def pipeline_vs_reference(rank, world_size, tp, pp, virtual_stages, schedule, n_micro, steps, stage_layers=None,
                          options=None):
    """Train `steps` AdamW steps with TP x PP (and the given schedule) and, in the same process,
    the TP-only full-depth model on the same micro-batches; return losses and errors of initial
    parameters, first-step gradients and final parameters, keyed by global name, and forward-only
    evaluations (after step 0) of both. `options`: recompute ('none'|'full'|'selective'),
    loss_scale (backward scale, grads unscaled before the optimizer), bf16 (autocast)."""
    opts = dict(recompute="none", loss_scale=1.0, bf16=False)
    opts.update(options or {})
    from xlmr_mp.parallel.stages import build_pipeline_stages, masked_lm_loss_sum
    from xlmr_mp.parallel.grads import finalize_grads, sync_tied_embedding_weight, tied_embedding_weight
    from xlmr_mp.parallel.schedule import PipelineSchedule, broadcast_step_loss
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    groups = init_parallel(tp, pp, seed=SEED)   # different default RNG per stage, as in training
    cfg = tiny_model_cfg()
    pcfg = ParallelConfig(tensor=tp, pipeline=pp, virtual_stages=virtual_stages, schedule=schedule,
                          stage_layers=stage_layers)
    cls = _model_cls()
    chunks = build_pipeline_stages(cfg, groups, pcfg, init_seed=SEED, model_cls=_model_cls())
    sync_tied_embedding_weight(chunks, groups)
    ref = cls(cfg, tp_group=groups.tp_group, init_seed=SEED)
    mine, theirs = _named_params(chunks), dict(ref.named_parameters())
    init_err = _max_abs_diff(mine, theirs, "initial parameter")

    for m in chunks + [ref]:
        m.set_recompute(opts["recompute"])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if opts["bf16"] else None
    scale = opts["loss_scale"]
    sched = PipelineSchedule(chunks, groups, pcfg, n_micro, masked_lm_loss_sum, autocast=autocast)
    ref_sched = PipelineSchedule([ref], None, ParallelConfig(tensor=tp), n_micro, masked_lm_loss_sum,
                                 autocast=autocast)
    # validation-like batches: two shapes (a short last batch), run as two pipelined groups
    eval_mbs = (make_micro_batches(3, batch=3, seq=12, vocab=cfg.vocab_size, seed=99)
                + make_micro_batches(1, batch=1, seq=12, vocab=cfg.vocab_size, seed=98))
    opt = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    losses, ref_losses, grad_err = [], [], None
    for step in range(steps):
        mbs = make_micro_batches(n_micro, vocab=cfg.vocab_size, seed=step)
        n_masked = float(sum(int((m["labels"] != -100).sum()) for m in mbs))
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        loss = sched.step(mbs, n_masked, loss_scale=scale)
        assert (loss is not None) == sched.has_last_stage
        finalize_grads(chunks, groups)
        losses.append(broadcast_step_loss(loss, groups))
        ref_losses.append(ref_sched.step(mbs, n_masked, loss_scale=scale))
        for p in list(mine.values()) + list(theirs.values()):
            if p.grad is not None:
                p.grad.div_(scale)
        if step == 0:
            # forward-only evaluation between training steps (other shapes and count)
            evals = (sched.evaluate(eval_mbs), ref_sched.evaluate(eval_mbs))
            grad_err = _max_abs_diff({k: p.grad for k, p in mine.items()},
                                     {k: p.grad for k, p in theirs.items()}, "gradient")
        opt.step()
        ref_opt.step()
    param_err = _max_abs_diff(mine, theirs, "final parameter")

    tied_diff = None                         # tied copy vs first-stage embedding, after training
    w = tied_embedding_weight(chunks)
    if w is not None:
        other = w.detach().clone()
        dist.broadcast(other, group=groups.embedding_group, group_src=0)
        tied_diff = (other - w.detach()).abs().max().item()
    layers = sorted(int(k.split(".")[1]) for k in mine if k.startswith("layers."))
    destroy_parallel()
    return dict(losses=losses, ref_losses=ref_losses, evals=evals, init_err=init_err, grad_err=grad_err, param_err=param_err,
                tied_diff=tied_diff, names=sorted(mine), layers=sorted(set(layers)),
                stage_indices=[c.pipeline_stage_index for c in chunks])


def shape_inference_keeps_rng(rank, world_size, tp, pp):
    """With dropout on, the first step (which runs torch's shape inference) and a repeat of it
    from the same RNG states (no inference any more) must draw the same dropout masks: same
    loss, bitwise-same gradients, same RNG states afterwards. A third step from the advanced
    states must differ (dropout is really active)."""
    from xlmr_mp.parallel.stages import build_pipeline_stages, masked_lm_loss_sum
    from xlmr_mp.parallel.schedule import PipelineSchedule, broadcast_step_loss
    from xlmr_mp.parallel.state import destroy_parallel, get_rng_tracker, init_parallel
    groups = init_parallel(tp, pp, seed=SEED)
    cfg = tiny_model_cfg()
    cfg.dropout, cfg.attention_dropout = 0.1, 0.3
    pcfg = ParallelConfig(tensor=tp, pipeline=pp)
    chunks = build_pipeline_stages(cfg, groups, pcfg, init_seed=SEED, model_cls=_model_cls())
    sched = PipelineSchedule(chunks, groups, pcfg, 2, masked_lm_loss_sum)
    mbs = make_micro_batches(2, vocab=cfg.vocab_size, seed=5)
    n_masked = float(sum(int((m["labels"] != -100).sum()) for m in mbs))
    tracker = get_rng_tracker()
    params = _named_params(chunks)

    def run():
        for p in params.values():
            p.grad = None
        loss = broadcast_step_loss(sched.step(mbs, n_masked), groups)
        return loss, {k: p.grad.clone() for k, p in params.items()}, tracker.get_states(), torch.get_rng_state()

    t0, c0 = tracker.get_states(), torch.get_rng_state()
    first = run()
    tracker.set_states(t0)
    torch.set_rng_state(c0)
    repeat = run()
    advanced = run()
    same_grads = all(torch.equal(first[1][k], repeat[1][k]) for k in params)
    same_tracker = all(torch.equal(first[2][k][0], repeat[2][k][0]) for k in first[2])
    destroy_parallel()
    return dict(same_loss=first[0] == repeat[0], same_grads=same_grads, same_tracker=same_tracker,
                same_default_rng=torch.equal(first[3], repeat[3]), dropout_active=advanced[0] != first[0],
                losses=(first[0], repeat[0], advanced[0]))
