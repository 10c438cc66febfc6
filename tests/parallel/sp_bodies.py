"""Rank bodies for test_sequence_parallel_train.py: sequence-parallel training steps through
`PipelineSchedule` (TP x PP x DP, gloo) against the single-process TP=1 model trained in the same
rank on the same global batches."""
import torch
import torch.distributed as dist

from xlmr_mp.config import ParallelConfig
from tests.parallel.pipeline_bodies import make_micro_batches, tiny_model_cfg

TIED = "lm_head.decoder_weight"
EMB = "embeddings.word_embeddings.weight"
SEED = 1234
LR = 1e-2

# How the sequence-parallel gradient sum is done in a run:
#   "hooks"          the hooks of build_pipeline_stages, armed by PipelineSchedule.step, finalize_grads
#   "none"           hooks removed, no sum at all (negative control: must differ)
#   "after_dp"       hooks removed; sync_sequence_parallel_grads after the DP reduction (SUMs commute)
SYNC_MODES = ("hooks", "none", "after_dp")


def _errors(mine: dict, ref: dict, cfg, tp_size: int, tp_rank: int) -> dict:
    """{name: (max |mine - ref shard|, max |ref shard|)}; the reference is the TP=1 tensor cut for
    this TP rank (the tied decoder copy is compared with the word embedding)."""
    from xlmr_mp.model.sharding import shard_tensor
    out = {}
    for k, t in mine.items():
        r = shard_tensor(EMB if k == TIED else k, ref[EMB if k == TIED else k].detach(), cfg, tp_size, tp_rank)
        assert t.shape == r.shape, f"{k}: shape {tuple(t.shape)} vs reference shard {tuple(r.shape)}"
        out[k] = ((t.detach() - r).abs().max().item(), r.abs().max().item())
    return out


def sp_train_vs_single(rank, world_size, tp, pp, n_micro, steps, sync="hooks", bucket_mb=25.0, recompute="none"):
    """`steps` AdamW steps of the tiny model with sequence parallelism at TP x PP x DP (DP = the
    rest of the world; gradients DP-summed by the trainer's overlapped `GradReducer`), and of the
    single-process TP=1 model over the whole global batch (n_micro x DP micro-batches). Returns
    the step losses of both, errors of the first-step gradients and final parameters (keyed by
    global name), the shape of the hidden states the first stage sends, and this rank's coords.
    `recompute`: activation checkpointing mode of the sequence-parallel chunks."""
    from xlmr_mp.model.xlmr import XLMRModel
    from xlmr_mp.parallel.stages import build_pipeline_stages, masked_lm_loss_sum
    from xlmr_mp.parallel.grads import finalize_grads, sync_tied_embedding_grads, sync_tied_embedding_weight
    from xlmr_mp.parallel.layout import stage_hidden_shape
    from xlmr_mp.parallel.schedule import PipelineSchedule, broadcast_step_loss
    from xlmr_mp.parallel.data_parallel import GradReducer
    from xlmr_mp.parallel.grads import sync_sequence_parallel_grads
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    assert sync in SYNC_MODES
    groups = init_parallel(tp, pp, seed=SEED)
    dp = groups.dp_size
    cfg = tiny_model_cfg()
    pcfg = ParallelConfig(tensor=tp, pipeline=pp, sequence_parallel=True)
    chunks = build_pipeline_stages(cfg, groups, pcfg, init_seed=SEED, model_cls=XLMRModel)
    sync_tied_embedding_weight(chunks, groups)
    assert all(c.sequence_parallel for c in chunks) == (tp > 1)
    if sync != "hooks":
        for c in chunks:
            c.sequence_parallel_grad_sync.remove()
    for c in chunks:
        c.set_recompute(recompute)
    named = {k: p for c in chunks for k, p in c.named_parameters()}
    params = list(named.values())
    reducer = GradReducer(params, groups.dp_group, bucket_mb=bucket_mb)   # after the chunks, as the trainer
    sched = PipelineSchedule(chunks, groups, pcfg, n_micro, masked_lm_loss_sum)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)

    ref = XLMRModel(cfg, tp_group=None, init_seed=SEED)
    ref_named = dict(ref.named_parameters())
    ref_sched = PipelineSchedule([ref], None, ParallelConfig(), n_micro * dp, masked_lm_loss_sum)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)

    losses, ref_losses, grad_err, hidden_shape, evals = [], [], None, None, None
    for step in range(steps):
        global_mbs = make_micro_batches(n_micro * dp, vocab=cfg.vocab_size, seed=step)
        mbs = global_mbs[groups.dp_rank * n_micro:(groups.dp_rank + 1) * n_micro]
        n_masked = float(sum(int((m["labels"] != -100).sum()) for m in global_mbs))
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        reducer.start_step(n_micro)
        part = sched.step(mbs, n_masked)
        if sync == "hooks":
            finalize_grads(chunks, groups, reducer)      # as the trainer: SP, DP, tied embedding
        else:
            reducer.finish()
            if sync == "after_dp":
                for c in chunks:
                    sync_sequence_parallel_grads(c, groups.tp_group)
            sync_tied_embedding_grads(chunks, groups)
        if part is not None and dp > 1:
            t = torch.tensor([part], dtype=torch.float64)
            dist.all_reduce(t, group=groups.dp_group)
            part = t.item()
        losses.append(broadcast_step_loss(part, groups))
        ref_losses.append(ref_sched.step(global_mbs, n_masked))
        if step == 0:
            grad_err = _errors({k: p.grad for k, p in named.items()}, {k: p.grad for k, p in ref_named.items()},
                               cfg, groups.tp_size, groups.tp_rank)
            if sched.has_first_stage and not sched.has_last_stage:
                with torch.no_grad():
                    first = [c for c in chunks if c.has_embeddings][0]
                    hidden_shape = tuple(first(mbs[0]["input_ids"], attention_mask=mbs[0]["attention_mask"]).shape)
                assert hidden_shape == stage_hidden_shape(*mbs[0]["input_ids"].shape, cfg, pcfg)
            # forward-only evaluation between steps: other batch size, count and length
            eval_mbs = make_micro_batches(3, batch=3, seq=12, vocab=cfg.vocab_size, seed=99)
            evals = (sched.evaluate(eval_mbs), ref_sched.evaluate(eval_mbs))
        opt.step()
        ref_opt.step()
    param_err = _errors(named, ref_named, cfg, groups.tp_size, groups.tp_rank)
    sp_names = sorted(k for c in chunks for k, p in c.named_parameters() if getattr(p, "sequence_parallel", False))
    out = dict(losses=losses, ref_losses=ref_losses, grad_err=grad_err, param_err=param_err,
               hidden_shape=hidden_shape, evals=evals, sp_names=sp_names, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank,
               dp_rank=groups.dp_rank, n_buckets=len(reducer.buckets))
    reducer.remove()
    destroy_parallel()
    return out


def bad_seq_length(rank, world_size):
    """TP=2 with sequence parallelism: a micro-batch whose length is not divisible by TP is refused
    by the schedule before any forward; returns the error message."""
    from xlmr_mp.config import ConfigError
    from xlmr_mp.model.xlmr import XLMRModel
    from xlmr_mp.parallel.stages import build_pipeline_stages, masked_lm_loss_sum
    from xlmr_mp.parallel.schedule import PipelineSchedule
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    groups = init_parallel(2, 1, seed=SEED)
    cfg = tiny_model_cfg()
    pcfg = ParallelConfig(tensor=2, sequence_parallel=True)
    chunks = build_pipeline_stages(cfg, groups, pcfg, init_seed=SEED, model_cls=XLMRModel)
    sched = PipelineSchedule(chunks, groups, pcfg, 1, masked_lm_loss_sum)
    mbs = make_micro_batches(1, seq=15, vocab=cfg.vocab_size)
    try:
        sched.step(mbs, 1.0)
        msg = None
    except ConfigError as e:
        msg = str(e)
    untouched = all(p.grad is None for c in chunks for p in c.parameters())
    destroy_parallel()
    return dict(msg=msg, untouched=untouched)
