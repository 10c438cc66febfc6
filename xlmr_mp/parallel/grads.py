"""Gradient finalisation after the last backward of a step, in one call the trainer makes once:

    finalize_grads(chunks, groups, dp_reducer)     # before unscaling / clipping / the optimizer step

in a fixed order (megatron-core's `finalize_model_grads`):
  1. sequence-parallel: gradients of parameters used on sequence shards (LayerNorms, row-parallel
     biases, position embeddings; marked `sequence_parallel`) summed over the TP group;
  2. data-parallel: the DP reducer's in-place bucket reductions completed (`parallel/data_parallel.py`);
  3. tied embedding: the word embedding (first stage) and its decoder copy (last stage) summed
     over the embedding group, so both copies take the same optimizer step.

The sequence-parallel sum must be complete before the DP reducer launches the reduction of the
parameter's bucket: each `.grad` is a view of its bucket and the reductions run in place on it,
overlapped with backward, so a sum done while one is in flight races with it. It therefore runs from
gradient hooks (`SequenceParallelGradSync`), armed by `PipelineSchedule.step` for each parameter's
last accumulation of the step; step 1 only sums what was accumulated fewer times than armed for.
Attach the hooks when building the chunks, before the reducer's, so they run first.

The tied weight of a chunk comes from its `tied_embedding_weight()` (None where the chunk holds
neither copy or both); nothing here knows the model's parameter names.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from xlmr_mp.parallel.mappings import tp_size_of


# ----------------------------------------------------------------------------- sequence parallel

def _sum_over_tp(grads: list, tp_group) -> None:
    """All-reduce the tensors of `grads` in place over `tp_group`, as one flat tensor."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_sequence_parallel_grads(model: nn.Module, tp_group) -> None:
    """All-reduce, over the TP group, the gradients of parameters marked `sequence_parallel`
    (one flat all-reduce). For a model without `SequenceParallelGradSync` hooks, after backward."""
    if tp_size_of(tp_group) == 1:
        return
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:
        _sum_over_tp(grads, tp_group)


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

    def disarm(self) -> None:
        self.n_backward, self._count = None, {}

    def finish(self) -> None:
        """Disarm; a parameter whose gradient was accumulated fewer times than armed for (unused in
        some micro-batch: the same on every TP rank, which run the same graph) is summed now."""
        n = self.n_backward
        late = [p for p in self.params if p.grad is not None and 0 < self._count.get(id(p), 0) < (n or 0)]
        self.disarm()
        if late:
            _sum_over_tp([p.grad for p in late], self.tp_group)

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


def attach_sequence_parallel_grad_sync(chunk: nn.Module, tp_group) -> SequenceParallelGradSync:
    """Register the TP gradient-sum hooks on `chunk` (as `chunk.sequence_parallel_grad_sync`)."""
    chunk.sequence_parallel_grad_sync = SequenceParallelGradSync(chunk, tp_group)
    return chunk.sequence_parallel_grad_sync


def sequence_parallel_syncs(chunks: Sequence[nn.Module]) -> list:
    """The `SequenceParallelGradSync` of every chunk that has one."""
    return [s for s in (getattr(c, "sequence_parallel_grad_sync", None) for c in chunks) if s is not None]


# ----------------------------------------------------------------------------- tied embedding

def tied_embedding_weight(chunks: Sequence[nn.Module]) -> Optional[torch.Tensor]:
    """This rank's copy of the tied word embedding (first stage) or decoder weight (last stage),
    None on ranks that hold neither or both (PP=1 shares one tensor: nothing to sync)."""
    for c in chunks:
        w = c.tied_embedding_weight() if hasattr(c, "tied_embedding_weight") else None
        if w is not None:
            return w
    return None


def _embedding_group_active(groups) -> bool:
    return groups is not None and groups.pp_size > 1 and groups.embedding_group is not None \
        and dist.get_world_size(groups.embedding_group) > 1


def sync_tied_embedding_weight(chunks: Sequence[nn.Module], groups) -> None:
    """Copy the first stage's word embedding into the last stage's tied decoder weight
    (broadcast over the embedding group); no-op without pipeline parallelism. After building the
    chunks and after every load."""
    if not _embedding_group_active(groups):
        return
    w = tied_embedding_weight(chunks)
    if w is None:
        return
    with torch.no_grad():
        dist.broadcast(w.data, group=groups.embedding_group, group_src=0)


def sync_tied_embedding_grads(chunks: Sequence[nn.Module], groups) -> None:
    """Sum the gradients of the word embedding (first stage) and its tied decoder copy (last
    stage) over the embedding group (step 3 of `finalize_grads`)."""
    if not _embedding_group_active(groups):
        return
    w = tied_embedding_weight(chunks)
    if w is None:
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=groups.embedding_group)


# ----------------------------------------------------------------------------- all of it

def finalize_grads(chunks: Sequence[nn.Module], groups, dp_reducer=None) -> None:
    """Complete this step's gradients after its last backward: sequence-parallel TP sums, then
    the data-parallel reduction (`dp_reducer.finish()`, when one is given), then the tied
    embedding sum (see the module docstring)."""
    for sync in sequence_parallel_syncs(chunks):
        sync.finish()
    if dp_reducer is not None:
        dp_reducer.finish()
    sync_tied_embedding_grads(chunks, groups)
