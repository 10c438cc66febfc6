"""Pipeline parallelism on `torch.distributed.pipelining`: stage layout, stage construction, and
one optimizer step's forward+backward over all micro-batches (1F1B, interleaved 1F1B, GPipe).

    validate_pipeline_config(cfg.model, cfg.parallel, n_microbatches)   # before allocating anything
    chunks = build_pipeline_stages(cfg.model, groups, cfg.parallel, init_seed=cfg.train.seed)
    sync_tied_embedding_weight(chunks, groups)           # after init and after every load
    pipe = PipelineSchedule(chunks, groups, cfg.parallel, n_microbatches, device=dev, autocast=ctx)
    loss = pipe.step(micro_batches, global_num_masked, loss_scale=scale)  # last stage: float, else None
    loss = broadcast_step_loss(loss, groups)             # the same float on every PP rank
    sync_tied_embedding_grads(chunks, groups)            # before unscaling / clipping / optimizer step
    loss_sum, n_masked = pipe.evaluate(valid_batches)    # forward only, on every PP rank

The same calls work at PP=1 (a plain loop over the micro-batches, no communication), so the
training loop does not depend on the layout.

Sequence parallelism (`parallel.sequence_parallel`, TP > 1; a no-op at TP 1): the stages are
built with sequence-sharded activations, so the hidden states between stages are this TP rank's
sequence shard [B, S/TP, H] (S divisible by TP). Parameters used on sequence shards (LayerNorms,
row-parallel biases, position embeddings) get partial gradients that must be summed over the TP
group. `build_pipeline_stages` registers that sum as a gradient hook on those parameters, armed by
`PipelineSchedule.step` for its last accumulation into each of them: the gradient is complete
(TP-summed) before any later hook reads it, in particular a data-parallel reducer that copies
gradients into buckets during backward and writes the DP sums back afterwards (a sync after
`step()` would be overwritten by that write-back). Build the chunks before such a reducer, so
the SP hooks run first.

A stage is a contiguous range of encoder layers (global indices) plus the embeddings on global
stage 0 and the masked-LM head on the last global stage. With `virtual_stages` V > 1 each rank
holds V chunks; chunk v of pipeline rank r is global stage v * PP + r (Megatron's interleaving,
the order `ScheduleInterleaved1F1B` expects).

Between stages only the hidden states travel ([B, S, H] float, the only tensor with a
gradient; `stage_hidden_shape` gives it, [B, S/TP, H] under sequence parallelism); the attention mask and the labels are passed to every stage as keyword arguments
from the micro-batch dicts, so every rank of a pipeline group must call `step()` with the same
micro-batches (each rank of one DP replica reads the same data). The last stage's output is the
micro-batch's masked-LM loss sum; the schedule's loss function divides it by the step's global
number of masked tokens (the loss normalisation contract), so gradients accumulate exactly as in
a single-process loop over the same micro-batches.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from xlmr_mp.config import ConfigError

SCHEDULES = ("1f1b", "interleaved", "gpipe")


# ----------------------------------------------------------------------------- stage layout

def stage_layer_counts(num_layers: int, num_stages: int, stage_layers: Optional[Sequence[int]] = None,
                       first_last_fewer: int = 0) -> list[int]:
    """Encoder layers per global stage: `stage_layers` when given (validated), else an even split
    in which the first and last stage count as carrying `first_last_fewer` extra layers (the
    250k-row embedding and the masked-LM head), so they get that many fewer when it balances."""
    if num_stages < 1:
        raise ConfigError(f"pipeline stages = {num_stages}; parallel.pipeline and parallel.virtual_stages must be >= 1")
    if stage_layers is not None:
        counts = list(stage_layers)
        if len(counts) != num_stages:
            raise ConfigError(
                f"parallel.stage_layers={counts} has {len(counts)} entries; it needs one per pipeline stage, "
                f"parallel.pipeline x parallel.virtual_stages = {num_stages}")
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ConfigError(f"parallel.stage_layers[{i}]={c!r} must be an integer >= 0")
            if c == 0 and 0 < i < num_stages - 1:
                raise ConfigError(
                    f"parallel.stage_layers[{i}]=0: a middle stage without layers holds nothing; "
                    f"give it at least one layer or use fewer stages")
        if sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.stage_layers={counts} sums to {sum(counts)} but model.num_layers={num_layers}; "
                f"make the entries add up to the layer count")
        return counts
    if first_last_fewer < 0:
        raise ConfigError(f"parallel.first_last_fewer={first_last_fewer} must be >= 0")
    if num_layers < num_stages:
        raise ConfigError(
            f"model.num_layers={num_layers} < {num_stages} pipeline stages (parallel.pipeline x "
            f"parallel.virtual_stages); use fewer stages or set parallel.stage_layers explicitly")
    ends = {0, num_stages - 1}
    extra = [first_last_fewer if (s in ends and num_stages > 1) else 0 for s in range(num_stages)]
    counts = [0] * num_stages
    for _ in range(num_layers):
        # water-filling: the next layer goes to the stage with the least work; ties prefer middle
        # stages (the ends carry the embedding / head), then the lower index.
        s = min(range(num_stages), key=lambda i: (counts[i] + extra[i], i in ends, i))
        counts[s] += 1
    return counts


def stage_layer_ids(num_layers: int, pp_size: int, virtual_stages: int = 1,
                    stage_layers: Optional[Sequence[int]] = None, first_last_fewer: int = 0) -> list[list[int]]:
    """Global encoder-layer indices of every global pipeline stage (PP x V stages, in model
    order). Chunk v of pipeline rank r is global stage v * pp_size + r."""
    counts = stage_layer_counts(num_layers, pp_size * virtual_stages, stage_layers, first_last_fewer)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def local_stage_indices(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """Global stage indices of the chunks held by pipeline rank `pp_rank`, chunk order."""
    return [v * pp_size + pp_rank for v in range(virtual_stages)]


def _layout_from_config(model_cfg, parallel_cfg) -> list[list[int]]:
    return stage_layer_ids(model_cfg.num_layers, parallel_cfg.pipeline, parallel_cfg.virtual_stages,
                           parallel_cfg.stage_layers, parallel_cfg.first_last_fewer)


def validate_pipeline_config(model_cfg, parallel_cfg, n_microbatches: Optional[int] = None,
                             seq_length: Optional[int] = None) -> None:
    """Check the pipeline options against the model, the number of micro-batches per step and
    (with sequence parallelism) the sequence length `data.seq_length`; errors name the option to
    change."""
    pp, v = parallel_cfg.pipeline, parallel_cfg.virtual_stages
    check_sequence_parallel(parallel_cfg, seq_length)
    if parallel_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={parallel_cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if v > 1 and pp < 2:
        raise ConfigError(
            f"parallel.virtual_stages={v} needs parallel.pipeline >= 2 (interleaving spreads chunks over "
            f"pipeline ranks); set parallel.virtual_stages=1")
    if v > 1 and parallel_cfg.schedule == "gpipe":
        raise ConfigError("parallel.schedule=gpipe supports one chunk per rank; set parallel.virtual_stages=1 "
                          "or parallel.schedule=interleaved")
    _layout_from_config(model_cfg, parallel_cfg)
    if n_microbatches is not None:
        check_micro_batch_count(schedule_kind(parallel_cfg), pp, n_microbatches)


def sequence_parallel_active(parallel_cfg) -> bool:
    """Whether the stages shard activations along the sequence: parallel.sequence_parallel with
    parallel.tensor > 1 (at TP 1 the option changes nothing)."""
    return bool(getattr(parallel_cfg, "sequence_parallel", False)) and parallel_cfg.tensor > 1


def check_sequence_parallel(parallel_cfg, seq_length: Optional[int]) -> None:
    """Sequence parallelism splits every sequence into parallel.tensor equal shards."""
    if not sequence_parallel_active(parallel_cfg) or seq_length is None:
        return
    tp = parallel_cfg.tensor
    if seq_length % tp:
        lo, hi = seq_length - seq_length % tp, seq_length - seq_length % tp + tp
        raise ConfigError(
            f"data.seq_length={seq_length} is not divisible by parallel.tensor={tp}, which "
            f"parallel.sequence_parallel=true needs (each TP rank holds seq_length / tensor positions); "
            f"use data.seq_length={lo} or {hi}, or set parallel.sequence_parallel=false")


def stage_hidden_shape(batch: int, seq_length: int, model_cfg, parallel_cfg) -> tuple:
    """Shape of the hidden states one stage sends to the next for a [batch, seq_length] batch:
    [B, S, H], or this TP rank's sequence shard [B, S / TP, H] under sequence parallelism."""
    if sequence_parallel_active(parallel_cfg):
        check_sequence_parallel(parallel_cfg, seq_length)
        seq_length //= parallel_cfg.tensor
    return (batch, seq_length, model_cfg.hidden_size)


def check_micro_batch_count(kind: str, pp: int, n: int) -> None:
    """Whether schedule `kind` can run `n` micro-batches per step over `pp` pipeline ranks."""
    if n < 1:
        raise ConfigError(f"{n} micro-batches per step; train.global_batch must be >= train.micro_batch x DP")
    if pp == 1:
        return
    if kind == "1f1b" and n < pp:
        raise ConfigError(
            f"1F1B needs at least parallel.pipeline={pp} micro-batches per step but gets {n} "
            f"(train.global_batch / (train.micro_batch x DP)); raise train.global_batch or lower train.micro_batch")
    if kind == "interleaved" and n % max(1, n // pp):
        raise ConfigError(
            f"interleaved 1F1B needs the micro-batches per step ({n}) to be a multiple of {max(1, n // pp)} "
            f"(= micro-batches // parallel.pipeline); use a multiple of parallel.pipeline={pp}")


def schedule_kind(parallel_cfg) -> str:
    """'1f1b', 'interleaved' or 'gpipe' (virtual_stages > 1 always means interleaved)."""
    if parallel_cfg.virtual_stages > 1:
        return "interleaved"
    return "1f1b" if parallel_cfg.schedule == "interleaved" else parallel_cfg.schedule


# ----------------------------------------------------------------------------- building stages

def build_pipeline_stages(model_cfg, groups, parallel_cfg, init_seed: Optional[int] = None,
                          model_cls=None) -> list[nn.Module]:
    """This rank's model chunks (one per virtual stage, chunk order), each an `XLMRModel` holding
    its global stage's layers, the embeddings on global stage 0 and the head on the last one.
    Parameters keep global names and are drawn from per-parameter generators seeded by
    (`init_seed`, global name), so they equal the single-process model built with the same seed
    (the tied decoder copy starts equal to the embedding; `sync_tied_embedding_weight` re-asserts
    it after loading). Pass the run's seed explicitly: the default, `torch.initial_seed()`,
    differs between pipeline stages once `seed_parallel_rng` has run.

    With `parallel_cfg.sequence_parallel` (and TP > 1) the chunks are built sequence-parallel and
    get the TP gradient-sum hooks `PipelineSchedule.step` arms (see the module docstring)."""
    if model_cls is None:
        from xlmr_mp.model.xlmr import XLMRModel as model_cls
    validate_pipeline_config(model_cfg, parallel_cfg)
    pp_size = groups.pp_size if groups is not None else 1
    pp_rank = groups.pp_rank if groups is not None else 0
    if pp_size != parallel_cfg.pipeline:
        raise ConfigError(f"parallel.pipeline={parallel_cfg.pipeline} but the pipeline group has {pp_size} ranks")
    layout = _layout_from_config(model_cfg, parallel_cfg)
    last = len(layout) - 1
    tp_group = groups.tp_group if groups is not None else None
    tp_size = groups.tp_size if groups is not None else 1
    if tp_size != parallel_cfg.tensor:
        raise ConfigError(f"parallel.tensor={parallel_cfg.tensor} but the tensor-parallel group has {tp_size} ranks")
    sp = {"sequence_parallel": True} if sequence_parallel_active(parallel_cfg) else {}
    chunks = []
    for g in local_stage_indices(pp_rank, pp_size, parallel_cfg.virtual_stages):
        chunk = model_cls(model_cfg, tp_group=tp_group, layer_ids=layout[g], has_embeddings=(g == 0),
                          has_head=(g == last), init_seed=init_seed, **sp)
        chunk.pipeline_stage_index = g
        if sp:
            chunk.sequence_parallel_grad_sync = SequenceParallelGradSync(chunk, tp_group)
        chunks.append(chunk)
    return chunks


class SequenceParallelGradSync:
    """Sums over the TP group the gradients of one chunk's parameters marked `sequence_parallel`
    (used on sequence shards, so each TP rank holds a partial gradient), from a post-accumulate
    gradient hook on each of them: while armed for n backward passes, the n-th accumulation into
    a parameter all-reduces its (then complete) local gradient in place. Disarmed, the hooks do
    nothing (forward/backward outside a training step, e.g. a test's own backward)."""

    def __init__(self, chunk: nn.Module, tp_group):
        self.tp_group = tp_group
        self.params = [p for p in chunk.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]
        self.n_backward: Optional[int] = None
        self._count: dict = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def arm(self, n_backward: int) -> None:
        """Sum each parameter's gradient at its `n_backward`-th accumulation from now on."""
        self.n_backward, self._count = int(n_backward), {}

    def finish(self) -> None:
        """Disarm; a parameter whose gradient was accumulated fewer times than armed for (unused in
        some micro-batch: the same on every TP rank, which run the same graph) is summed now."""
        n, self.n_backward = self.n_backward, None
        late = [p for p in self.params if p.grad is not None and 0 < self._count.get(id(p), 0) < (n or 0)]
        self._count = {}
        if late:
            flat = torch.cat([p.grad.reshape(-1) for p in late])
            dist.all_reduce(flat, group=self.tp_group)
            off = 0
            for p in late:
                p.grad.copy_(flat[off: off + p.numel()].view_as(p.grad))
                off += p.numel()

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.n_backward is None:
            return
        c = self._count.get(id(p), 0) + 1
        self._count[id(p)] = c
        if c == self.n_backward:
            dist.all_reduce(p.grad, group=self.tp_group)

    def remove(self) -> None:
        """Unregister the hooks (the chunk's SP gradients are then left partial)."""
        for h in self._handles:
            h.remove()
        self._handles = []


# ----------------------------------------------------------------------------- tied embedding

def _tied_weight(chunks: Sequence[nn.Module]) -> Optional[torch.Tensor]:
    """The word-embedding weight (first stage) or the tied decoder copy (last stage) of this rank,
    None on ranks that hold neither. A rank holding both (PP=1) shares one tensor: nothing to sync."""
    first = [c for c in chunks if getattr(c, "has_embeddings", False)]
    last = [c for c in chunks if getattr(c, "has_head", False)]
    if first and last:
        return None
    if first:
        return _embedding_weight(first[0])
    if last:
        return _decoder_weight(last[0])
    return None


def _embedding_weight(model: nn.Module) -> torch.Tensor:
    return model.embeddings.word_embeddings.weight


def _decoder_weight(model: nn.Module) -> torch.Tensor:
    return model.lm_head.decoder_weight


def _embedding_group_active(groups) -> bool:
    return groups is not None and groups.pp_size > 1 and groups.embedding_group is not None \
        and dist.get_world_size(groups.embedding_group) > 1


def sync_tied_embedding_weight(chunks: Sequence[nn.Module], groups) -> None:
    """Copy the first stage's word embedding into the last stage's tied decoder weight
    (broadcast over the embedding group); no-op without pipeline parallelism."""
    if not _embedding_group_active(groups):
        return
    w = _tied_weight(chunks)
    if w is None:
        return
    with torch.no_grad():
        dist.broadcast(w.data, group=groups.embedding_group, group_src=0)


def sync_tied_embedding_grads(chunks: Sequence[nn.Module], groups) -> None:
    """Sum the gradients of the word embedding (first stage) and its tied decoder copy (last
    stage) over the embedding group, so both copies take the same optimizer step. Call after
    `step()` (and after the DP all-reduce or before it: both are sums), before clipping."""
    if not _embedding_group_active(groups):
        return
    w = _tied_weight(chunks)
    if w is None:
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=groups.embedding_group)


def _comm_device(group) -> torch.device:
    """Where a small tensor must live to be sent over `group` (NCCL only moves CUDA tensors)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_step_loss(loss: Optional[float], groups) -> float:
    """The step loss computed on the last pipeline stage, as a float on every rank of the
    pipeline group (identity without pipeline parallelism)."""
    if groups is None or groups.pp_size == 1:
        return float(loss)
    t = torch.tensor([float(loss) if loss is not None else 0.0], dtype=torch.float64,
                     device=_comm_device(groups.pp_group))
    dist.broadcast(t, group=groups.pp_group, group_src=groups.pp_size - 1)
    return t.item()


# ----------------------------------------------------------------------------- stage modules

def masked_lm_loss_sum(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """Sum of the masked-token cross entropy of one micro-batch (a 0-d tensor), from the model's
    `loss_and_count` (x: input_ids on the first stage, hidden states elsewhere)."""
    loss_sum, _ = model.loss_and_count(x, attention_mask=attention_mask, labels=labels)
    return loss_sum


class _StageModule(nn.Module):
    """What `PipelineStage` runs for one chunk: hidden states in, hidden states out; the last
    stage returns the micro-batch's masked-LM loss sum instead. `attention_mask` and `labels`
    arrive as keyword arguments on every stage (they never travel between stages). `autocast`
    (a zero-argument callable returning a context manager, or None) wraps the forward."""

    def __init__(self, model: nn.Module, is_last: bool, autocast=None):
        super().__init__()
        self.model = model
        self.is_last = is_last
        self.autocast = autocast

    def forward(self, x, attention_mask=None, labels=None):
        with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
            if self.is_last:
                # [] float: sum of masked-token CE of this micro-batch
                return masked_lm_loss_sum(self.model, x, attention_mask, labels)
            # [B, S, H] float: hidden states sent to the next stage
            return self.model(x, attention_mask=attention_mask)


def _make_stage(module: nn.Module, stage_index: int, num_stages: int, device, group):
    """A `PipelineStage` whose shape-inference forward (run once, on the first micro-batch of the
    first step) leaves the tensor-parallel RNG stream untouched: torch forks only the default
    generators around it, and an extra draw from the stream would shift every later dropout mask
    of the TP-sharded regions (and break bitwise resume)."""
    from torch.distributed.pipelining import PipelineStage
    from xlmr_mp.parallel.state import get_rng_tracker

    class _Stage(PipelineStage):
        def _compute_outputs(self, *args, module, **kwargs):
            tracker = get_rng_tracker()
            saved = tracker.get_states()
            try:
                return super()._compute_outputs(*args, module=module, **kwargs)
            finally:
                tracker.set_states(saved)

    return _Stage(module, stage_index, num_stages, device, group=group)


# ----------------------------------------------------------------------------- schedule

class PipelineSchedule:
    """Forward and backward of all micro-batches of one optimizer step on this rank's chunks,
    with gradients accumulated into the chunks' parameters (not zeroed here, not DP-reduced).
    PP=1 runs a plain loop over the micro-batches with the same loss normalisation, so the
    training loop is the same at every layout.

    `autocast`: optional zero-argument callable returning the forward's autocast context (bf16 /
    fp16); the backward runs outside it. `device`: where the stages' tensors live (default: the
    chunks' parameter device)."""

    def __init__(self, chunks: Sequence[nn.Module], groups, parallel_cfg, n_microbatches: int,
                 device: Optional[torch.device] = None, autocast=None):
        self.chunks = list(chunks)
        self.groups = groups
        self.n_microbatches = n_microbatches
        self.pp_size = groups.pp_size if groups is not None else 1
        self.kind = schedule_kind(parallel_cfg)
        self.autocast = autocast
        self.device = device or _chunk_device(self.chunks[0])
        self._global_num_masked = 1.0
        self._loss_scale = 1.0
        self._eval_schedules: dict = {}
        self.parallel_cfg = parallel_cfg
        check_micro_batch_count(self.kind, self.pp_size, n_microbatches)
        self._sp_syncs = []
        for c in self.chunks:
            if getattr(c, "sequence_parallel", False):
                if getattr(c, "sequence_parallel_grad_sync", None) is None:
                    raise ConfigError("a sequence-parallel chunk without the TP gradient-sum hooks: build the chunks "
                                      "with build_pipeline_stages(..., parallel_cfg with sequence_parallel=true)")
                self._sp_syncs.append(c.sequence_parallel_grad_sync)
        if self.pp_size > 1:
            if len(self.chunks) != parallel_cfg.virtual_stages:
                raise ConfigError(f"this rank holds {len(self.chunks)} chunks but parallel.virtual_stages="
                                  f"{parallel_cfg.virtual_stages}; build them with build_pipeline_stages")
            self._stages, self._schedule = self._build_schedule(self.kind, n_microbatches)
        elif len(self.chunks) != 1:
            raise ConfigError("without pipeline parallelism a rank holds exactly one model chunk")

    def _build_schedule(self, kind: str, n_microbatches: int):
        from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                  ScheduleLoopedBFS)
        num_stages = self.pp_size * len(self.chunks)
        stages = [_make_stage(_StageModule(c, c.pipeline_stage_index == num_stages - 1, self.autocast),
                              c.pipeline_stage_index, num_stages, self.device, self.groups.pp_group)
                  for c in self.chunks]
        kw = dict(n_microbatches=n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        if kind == "interleaved":
            return stages, ScheduleInterleaved1F1B(stages, **kw)
        if kind == "looped_bfs":
            return stages, ScheduleLoopedBFS(stages, **kw)
        return stages, (ScheduleGPipe if kind == "gpipe" else Schedule1F1B)(stages[0], **kw)

    def _loss_fn(self, loss_sum: torch.Tensor, target) -> torch.Tensor:
        # what backward starts from: loss_sum_mb / global_num_masked, times the fp16 loss scale
        return loss_sum / self._global_num_masked * self._loss_scale

    @property
    def has_last_stage(self) -> bool:
        return any(getattr(c, "has_head", False) for c in self.chunks)

    @property
    def has_first_stage(self) -> bool:
        return any(getattr(c, "has_embeddings", False) for c in self.chunks)

    def _check_batches(self, micro_batches, n: int) -> None:
        if len(micro_batches) != n:
            raise ValueError(f"expected {n} micro-batches (train.global_batch / (train.micro_batch x DP)), "
                             f"got {len(micro_batches)}")
        shape = tuple(micro_batches[0]["input_ids"].shape)
        if self._sp_syncs and len(shape) == 2:
            check_sequence_parallel(self.parallel_cfg, shape[1])
        for i, mb in enumerate(micro_batches):
            for key in ("input_ids", "attention_mask", "labels"):
                if key not in mb:
                    raise KeyError(f"micro-batch {i} has no {key!r} (keys: {sorted(mb)})")
                if tuple(mb[key].shape) != shape:
                    raise ValueError(f"micro-batch {i} {key} has shape {tuple(mb[key].shape)}, micro-batch 0 "
                                     f"input_ids {shape}: pipeline micro-batches must all have one shape")

    def step(self, micro_batches: Sequence[dict], global_num_masked: float,
             loss_scale: float = 1.0) -> Optional[float]:
        """Run forward+backward of every micro-batch (dicts with `input_ids`, `attention_mask`,
        `labels` [B, S] int64; the same on every rank of the pipeline group); backward starts
        from loss_sum_mb / global_num_masked * loss_scale. Returns the (unscaled) sum of
        loss_sum_mb / global_num_masked on the rank holding the last stage, None elsewhere.
        Under sequence parallelism the gradients of sequence-sharded parameters are summed over
        the TP group by the time it returns (and before any later gradient hook reads them)."""
        self._check_batches(micro_batches, self.n_microbatches)
        if not global_num_masked or global_num_masked <= 0:
            raise ValueError(f"global_num_masked={global_num_masked}: a step needs at least one masked token")
        self._global_num_masked = float(global_num_masked)
        self._loss_scale = float(loss_scale)
        for sync in self._sp_syncs:      # TP-sum of sequence-parallel grads at their last accumulation
            sync.arm(self.n_microbatches)
        try:
            if self.pp_size == 1:
                loss = self._step_no_pipeline(micro_batches)
            else:
                loss = self._run(self._schedule, micro_batches, train=True)
            for sync in self._sp_syncs:
                sync.finish()
            return loss
        finally:
            for sync in self._sp_syncs:
                sync.n_backward = None
            self._global_num_masked, self._loss_scale = 1.0, 1.0

    def _step_no_pipeline(self, micro_batches) -> float:
        model = self.chunks[0]
        total = 0.0
        for mb in micro_batches:
            with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
                loss = masked_lm_loss_sum(model, mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device),
                                          mb["labels"].to(self.device)) / self._global_num_masked
            (loss * self._loss_scale).backward()
            total += loss.item()
        return total

    def _run(self, schedule, micro_batches, train: bool) -> Optional[float]:
        dev = self.device
        cat = lambda key: torch.cat([mb[key] for mb in micro_batches]).to(dev)  # noqa: E731
        kwargs = dict(attention_mask=cat("attention_mask"), labels=cat("labels"))
        args = (cat("input_ids"),) if self.has_first_stage else ()
        target = kwargs["labels"] if self.has_last_stage else None
        losses: list = []
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self.has_last_stage:
            return None
        total = 0.0
        for loss in losses:
            total += loss.item() / self._loss_scale
        return total

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence[dict]) -> tuple[float, int]:
        """Forward only: (sum of masked-token CE, number of masked tokens) over the micro-batches,
        on every rank of the pipeline group (e.g. one language's validation batches). Any count
        and shapes (consecutive micro-batches of one shape run as one pipelined group); every rank
        of the group must pass the same micro-batches. Gradients are not touched."""
        groups, start = [], 0
        for i in range(1, len(micro_batches) + 1):
            if i == len(micro_batches) or micro_batches[i]["input_ids"].shape != micro_batches[start]["input_ids"].shape:
                groups.append(list(micro_batches[start:i]))
                start = i
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        total, num_masked = 0.0, 0
        try:
            for group in groups:
                self._check_batches(group, len(group))
                num_masked += int(sum(int((mb["labels"] != -100).sum()) for mb in group))
                total += self._evaluate_group(group)
        finally:
            for c, t in zip(self.chunks, was_training):
                c.train(t)
        return total, num_masked

    def _evaluate_group(self, micro_batches) -> float:
        if self.pp_size == 1:
            total = 0.0
            for mb in micro_batches:
                with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
                    total += masked_lm_loss_sum(self.chunks[0], mb["input_ids"].to(self.device),
                                                mb["attention_mask"].to(self.device),
                                                mb["labels"].to(self.device)).item()
            return total
        key = (len(micro_batches), tuple(micro_batches[0]["input_ids"].shape))
        if key not in self._eval_schedules:
            kind = "looped_bfs" if len(self.chunks) > 1 else "gpipe"
            self._eval_schedules[key] = self._build_schedule(kind, len(micro_batches))[1]
        return broadcast_step_loss(self._run(self._eval_schedules[key], micro_batches, train=False), self.groups)


def _chunk_device(chunk: nn.Module) -> torch.device:
    for p in chunk.parameters():
        return p.device
    return torch.device("cpu")
