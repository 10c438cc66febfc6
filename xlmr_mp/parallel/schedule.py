"""One optimizer step's forward+backward over all micro-batches on `torch.distributed.pipelining`
(1F1B, interleaved 1F1B, GPipe), and forward-only evaluation; the same calls at PP=1 (a plain loop
over the micro-batches, no communication), so the training loop does not depend on the layout.

    pipe = PipelineSchedule(chunks, groups, cfg.parallel, n_microbatches, loss_fn, device=dev, autocast=ctx)
    loss = pipe.step(micro_batches, global_num_masked, loss_scale=scale)  # last stage: float, else None
    loss = step_loss(loss, groups)                       # DP-summed, the same float on every rank
    loss_sum, n_masked = pipe.evaluate(valid_batches)    # forward only, on every PP rank

The schedule knows no model: `chunks` are this rank's stage modules (chunk order, each with a
`pipeline_stage_index`, `has_embeddings` / `has_head` flags; `xlmr_mp/parallel/stages.py` builds
them) and `loss_fn(chunk, x, attention_mask, labels)` is the last stage's output, the 0-d sum of
the micro-batch's masked-token loss (as torchtitan's schedules receive their loss function).

Between stages only the hidden states travel ([B, S, H] float, the only tensor with a gradient;
[B, S/TP, H] under sequence parallelism, `layout.stage_hidden_shape`); the attention mask and the
labels are passed to every stage as keyword arguments from the micro-batch dicts, so every rank
of a pipeline group must call `step()` with the same micro-batches (each rank of one DP replica
reads the same data). Nothing in a step waits for the device but the one read of its loss: an
all-ones mask is dropped on its host copy and the labels stay on the host (`device_micro_batch`),
the micro-batch losses are summed on the device. Backward starts from loss_sum_mb / global_num_masked (the loss normalisation
contract), so gradients accumulate exactly as in a single-process loop over the same micro-batches.
Gradients are accumulated, not zeroed and not reduced: `parallel/grads.finalize_grads` does that;
`step()` arms the sequence-parallel gradient hooks it relies on.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from xlmr_mp.distributed import all_reduce_floats
from xlmr_mp.errors import ConfigError
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.parallel.grads import sequence_parallel_syncs
from xlmr_mp.parallel.layout import check_micro_batch_count, check_sequence_parallel, schedule_kind
from xlmr_mp.parallel.state import get_rng_tracker

# loss_fn(chunk, x, attention_mask, labels) -> 0-d tensor: sum of the masked-token loss of one
# micro-batch (x: input_ids [B, S] on the first stage, hidden states elsewhere)
StageLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def device_micro_batch(mb: dict, device) -> tuple:
    """(input_ids, attention_mask or None, labels) of micro-batch `mb` (host tensors from the data
    loader) for a forward on `device`, without a host sync: the mask is dropped when its host copy
    has no padding (decided before the copy, so no device read; SDPA then gets no bias and may take
    its flash kernel, as HF drops an all-ones mask), input_ids and the mask are copied without
    blocking, and the labels stay on the host: the head finds its masked rows there and copies
    them without blocking (model/xlmr.py: masked_rows), where searching device labels would wait
    for the forward."""
    mask = mb["attention_mask"]
    if mask is not None and mask.device.type == "cpu" and bool(mask.numpy().all()):   # read on the host
        mask = None
    move = lambda t: None if t is None else t.to(device, non_blocking=True)   # noqa: E731
    return move(mb["input_ids"]), move(mask), mb["labels"]


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


def step_loss(part: Optional[float], groups) -> float:
    """The step loss on every rank: the last stage's `step()` result (this DP rank's share of
    the global loss sum / global masked count) summed over DP, then sent to every pipeline rank."""
    if part is not None and groups is not None:
        part = all_reduce_floats([part], groups.dp_group)[0]
    return broadcast_step_loss(part, groups)


class _StageModule(nn.Module):
    """What `PipelineStage` runs for one chunk: hidden states in, hidden states out; the last
    stage returns `loss_fn`'s masked-LM loss sum of the micro-batch instead. `attention_mask` and
    `labels` arrive as keyword arguments on every stage (they never travel between stages).
    `autocast` (a zero-argument callable returning a context manager, or None) wraps the forward."""

    def __init__(self, chunk: nn.Module, loss_fn: Optional[StageLoss], autocast=None):
        super().__init__()
        self.chunk = chunk
        self.loss_fn = loss_fn
        self.autocast = autocast

    def forward(self, x, attention_mask=None, labels=None):
        with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
            if self.loss_fn is not None:
                # [] float: sum of masked-token CE of this micro-batch
                return self.loss_fn(self.chunk, x, attention_mask, labels)
            # [B, S, H] float: hidden states sent to the next stage
            return self.chunk(x, attention_mask=attention_mask)


def _make_stage(module: nn.Module, stage_index: int, num_stages: int, device, group):
    """A `PipelineStage` whose shape-inference forward (run once, on the first micro-batch of the
    first step) leaves the tensor-parallel RNG stream untouched: torch forks only the default
    generators around it, and an extra draw from the stream would shift every later dropout mask
    of the TP-sharded regions (and break bitwise resume)."""
    from torch.distributed.pipelining import PipelineStage

    class _Stage(PipelineStage):
        def _compute_outputs(self, *args, module, **kwargs):
            tracker = get_rng_tracker()
            saved = tracker.get_states()
            try:
                return super()._compute_outputs(*args, module=module, **kwargs)
            finally:
                tracker.set_states(saved)

    return _Stage(module, stage_index, num_stages, device, group=group)


class PipelineSchedule:
    """Forward and backward of all micro-batches of one optimizer step on this rank's chunks,
    with gradients accumulated into the chunks' parameters (not zeroed here, not DP-reduced).
    PP=1 runs a plain loop over the micro-batches with the same loss normalisation, so the
    training loop is the same at every layout.

    `loss_fn`: the last stage's loss (module docstring). `autocast`: optional zero-argument
    callable returning the forward's autocast context (bf16 / fp16); the backward runs outside it.
    `micro_batch`: optional zero-argument callable returning the context each micro-batch's
    forward runs in at PP=1, its backward being Tensor.backward() of its loss right after (what
    `kernels.apply`'s result offers as `micro_batch`; None: no context).
    `device`: where the stages' tensors live (default: the chunks' parameter device)."""

    def __init__(self, chunks: Sequence[nn.Module], groups, parallel_cfg, n_microbatches: int,
                 loss_fn: StageLoss, device: Optional[torch.device] = None, autocast=None,
                 variable_micro_batches: bool = False, micro_batch=None):
        if not callable(loss_fn):
            raise TypeError(f"PipelineSchedule needs loss_fn(chunk, x, attention_mask, labels), got {loss_fn!r}")
        self.chunks = list(chunks)
        self.groups = groups
        self.n_microbatches = n_microbatches
        self.variable_micro_batches = variable_micro_batches    # train.batch_warmup: counts vary per step
        self.pp_size = groups.pp_size if groups is not None else 1
        self.kind = schedule_kind(parallel_cfg)
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.micro_batch = micro_batch
        self.device = device or _chunk_device(self.chunks[0])
        self._global_num_masked = 1.0
        self._loss_scale = 1.0
        self._eval_schedules: dict = {}
        self._train_schedules: dict = {}     # micro-batch count -> torch schedule (batch warmup)
        self.parallel_cfg = parallel_cfg
        check_micro_batch_count(self.kind, self.pp_size, n_microbatches)
        for c in self.chunks:
            if getattr(c, "sequence_parallel", False) and getattr(c, "sequence_parallel_grad_sync", None) is None:
                raise ConfigError("a sequence-parallel chunk without the TP gradient-sum hooks: build the chunks "
                                  "with build_pipeline_stages(..., parallel_cfg with sequence_parallel=true)")
        self._sp_syncs = sequence_parallel_syncs([c for c in self.chunks if getattr(c, "sequence_parallel", False)])
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
        stages = [_make_stage(_StageModule(c, self.loss_fn if c.pipeline_stage_index == num_stages - 1 else None,
                                           self.autocast),
                              c.pipeline_stage_index, num_stages, self.device, self.groups.pp_group)
                  for c in self.chunks]
        kw = dict(n_microbatches=n_microbatches, loss_fn=self._normalise, scale_grads=False)
        if kind == "interleaved":
            return stages, ScheduleInterleaved1F1B(stages, **kw)
        if kind == "looped_bfs":
            return stages, ScheduleLoopedBFS(stages, **kw)
        return stages, (ScheduleGPipe if kind == "gpipe" else Schedule1F1B)(stages[0], **kw)

    def _normalise(self, loss_sum: torch.Tensor, target) -> torch.Tensor:
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
        the TP group at their last accumulation (before any later gradient hook reads them);
        `finalize_grads` completes the rest. With `variable_micro_batches` (train.batch_warmup)
        the count may differ from n_microbatches from step to step and PP>1 builds (once) a
        schedule for each count; otherwise any other count is an error."""
        n = len(micro_batches)
        if n != self.n_microbatches and not self.variable_micro_batches:
            raise ValueError(f"expected {self.n_microbatches} micro-batches (train.global_batch / "
                             f"(train.micro_batch x DP)), got {n}")
        schedule = self._train_schedule(n)
        self._check_batches(micro_batches, n)
        if not global_num_masked or global_num_masked <= 0:
            raise ValueError(f"global_num_masked={global_num_masked}: a step needs at least one masked token")
        self._global_num_masked = float(global_num_masked)
        self._loss_scale = float(loss_scale)
        for sync in self._sp_syncs:      # TP-sum of sequence-parallel grads at their last accumulation
            sync.arm(n)
        try:
            if self.pp_size == 1:
                return self._step_no_pipeline(micro_batches)
            return self._run(schedule, micro_batches, train=True)
        except BaseException:
            for sync in self._sp_syncs:
                sync.disarm()
            raise
        finally:
            self._global_num_masked, self._loss_scale = 1.0, 1.0

    def _train_schedule(self, n: int):
        """The training schedule for n micro-batches (None at PP=1); ConfigError if `kind` cannot run n."""
        if n == self.n_microbatches:
            return self._schedule if self.pp_size > 1 else None
        check_micro_batch_count(self.kind, self.pp_size, n)
        if self.pp_size == 1:
            return None
        if n not in self._train_schedules:
            self._train_schedules[n] = self._build_schedule(self.kind, n)[1]
        return self._train_schedules[n]

    def _loss_sum(self, mb: dict) -> torch.Tensor:
        ids, mask, labels = device_micro_batch(mb, self.device)
        with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
            return self.loss_fn(self.chunks[0], ids, mask, labels)

    def _step_no_pipeline(self, micro_batches) -> float:
        total = None
        for mb in micro_batches:
            # each backward below is Tensor.backward() right after its forward (`micro_batch`'s promise)
            with (self.micro_batch() if self.micro_batch is not None else contextlib.nullcontext()):
                loss_sum = self._loss_sum(mb)
            loss = loss_sum / self._global_num_masked
            (loss * self._loss_scale).backward()
            total = _accumulate(total, loss)
        return _host_value(total)

    def _run(self, schedule, micro_batches, train: bool) -> Optional[float]:
        # one concatenated micro-batch for the whole step, moved as device_micro_batch moves one
        ids, mask, labels = device_micro_batch({key: torch.cat([mb[key] for mb in micro_batches])
                                                for key in ("input_ids", "attention_mask", "labels")}, self.device)
        kwargs = dict(labels=labels) if mask is None else dict(attention_mask=mask, labels=labels)
        args = (ids,) if self.has_first_stage else ()
        target = kwargs["labels"] if self.has_last_stage else None
        losses: list = []
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self.has_last_stage:
            return None
        total = None
        for loss in losses:
            total = _accumulate(total, loss, self._loss_scale)
        return _host_value(total)

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
                num_masked += int(sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in group))
                total += self._evaluate_group(group)
        finally:
            for c, t in zip(self.chunks, was_training):
                c.train(t)
        return total, num_masked

    def _evaluate_group(self, micro_batches) -> float:
        if self.pp_size == 1:
            total = None
            for mb in micro_batches:
                total = _accumulate(total, self._loss_sum(mb))
            return _host_value(total)
        key = (len(micro_batches), tuple(micro_batches[0]["input_ids"].shape))
        if key not in self._eval_schedules:
            kind = "looped_bfs" if len(self.chunks) > 1 else "gpipe"
            self._eval_schedules[key] = self._build_schedule(kind, len(micro_batches))[1]
        return broadcast_step_loss(self._run(self._eval_schedules[key], micro_batches, train=False), self.groups)


def _accumulate(total: Optional[torch.Tensor], loss: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
    """total + loss / divisor in fp64 on the loss's device: a step's losses are summed there and read
    once (_host_value), not with a host sync per micro-batch. The same float64 operations, in the
    same order, as summing loss.item() / divisor on the host, so the same bits."""
    v = loss.detach().to(torch.float64) / divisor
    return v if total is None else total + v


def _host_value(total: Optional[torch.Tensor]) -> float:
    """The step's summed loss as a float: its one host sync (0.0 for no micro-batch)."""
    return 0.0 if total is None else total.item()


def _chunk_device(chunk: nn.Module) -> torch.device:
    for p in chunk.parameters():
        return p.device
    return torch.device("cpu")
