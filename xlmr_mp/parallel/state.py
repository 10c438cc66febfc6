"""Process groups for tensor, pipeline and data parallelism, and the RNG streams that dropout
under tensor parallelism needs.

    dist.init_process_group(...)                 # done by the launcher (xlmr_mp.distributed)
    groups = init_parallel(tp=2, pp=2)           # builds the groups once, returns them explicitly
    seed_parallel_rng(1234, groups)              # default + tensor-parallel RNG streams
    model = XLMRModel(cfg, tp_group=groups.tp_group, ...)
    ...
    destroy_parallel()

Rank order is Megatron's: TP fastest, then DP, then PP (`grid_ranks`). Where megatron-core's TP / PP
layers run (TP > 1 or PP > 1) its `parallel_state.initialize_model_parallel` builds the groups and
we read them back; at TP = PP = 1 they are built here and megatron-core is never imported.
With world 8, TP 2, PP 2: TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6] [5,7];
PP groups [0,4] [1,5] [2,6] [3,7].

RNG: megatron-core's `CudaRNGStatesTracker` only knows CUDA generators, so `RNGStatesTracker`
here keeps named (CPU, and CUDA when present) states and forks the default generators into them.
Regions replicated across TP ranks (hidden dropout after a row-parallel all-reduce) draw from the
default generator, seeded identically on every TP rank; regions sharded across TP ranks
(attention-probability dropout over the local heads) draw from the `TP_RNG` stream, seeded
differently per TP rank.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from xlmr_mp.parallel.layout import data_parallel_size

TP_RNG = "tensor-parallel-rng"


@dataclass
class ParallelGroups:
    """The process groups of one rank and its coordinates in the TP x DP x PP grid."""
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    embedding_group: Optional[dist.ProcessGroup]   # first + last pipeline stage (tied embedding grads)
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pp_ranks: tuple = ()           # global ranks of this rank's pipeline group, stage order
    embedding_ranks: tuple = ()    # global ranks of the embedding group

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_GROUPS: Optional[ParallelGroups] = None


def grid_ranks(world: int, tp: int, pp: int) -> dict:
    """The global ranks of every TP, DP and PP group of a world x tp x pp grid, in Megatron's order
    (TP fastest, then DP, then PP): {"tp": [[...], ...], "dp": [...], "pp": [...]} (a pure function)."""
    dp = data_parallel_size(world, tp, pp, 0)
    at = lambda t, d, p: t + tp * d + tp * dp * p          # noqa: E731 - rank of (tp, dp, pp) coordinates
    return {"tp": [[at(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
            "dp": [[at(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
            "pp": [[at(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]}


def uses_megatron(tp: int, pp: int) -> bool:
    """Whether `init_parallel` builds the groups through megatron-core: only where its TP / PP layers
    run (TP > 1 or PP > 1). At TP = PP = 1 the groups are built here, so a machine without
    megatron-core (a stock GPU image) trains data-parallel."""
    return tp > 1 or pp > 1


def init_parallel(tp: int, pp: int = 1, dp: Optional[int] = None, backend: Optional[str] = None,
                  seed: Optional[int] = None) -> ParallelGroups:
    """Build the TP/PP/DP groups after `torch.distributed` is initialised and return them.

    `dp` (None or 0 = infer) must equal world_size / (tp * pp) when given. `backend` is accepted
    for symmetry with the launcher; the groups use the default process group's backend.
    When `seed` is given, `seed_parallel_rng(seed, groups)` is called as well.
    """
    global _GROUPS
    if not dist.is_initialized():
        raise RuntimeError("init_parallel: call torch.distributed.init_process_group first")
    data_parallel_size(dist.get_world_size(), tp, pp, dp or 0)
    _GROUPS = _megatron_groups(tp, pp) if uses_megatron(tp, pp) else _local_groups(tp, pp)
    if seed is not None:
        seed_parallel_rng(seed, _GROUPS)
    return _GROUPS


def _local_groups(tp: int, pp: int) -> ParallelGroups:
    """The groups of `grid_ranks`, made with `dist.new_group` by every rank in the same order (no
    megatron-core); at PP = 1 the embedding group is the one-rank pipeline group, as Megatron's."""
    rank = dist.get_rank()
    mine = {}
    for kind, lists in grid_ranks(dist.get_world_size(), tp, pp).items():
        for ranks in lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = (group, ranks)
    (tpg, tpr), (dpg, dpr), (ppg, ppr) = mine["tp"], mine["dp"], mine["pp"]
    return ParallelGroups(tp_group=tpg, pp_group=ppg, dp_group=dpg, embedding_group=ppg,
                          tp_rank=tpr.index(rank), tp_size=tp, pp_rank=ppr.index(rank), pp_size=pp,
                          dp_rank=dpr.index(rank), dp_size=len(dpr), pp_ranks=tuple(ppr), embedding_ranks=tuple(ppr))


def _megatron_groups(tp: int, pp: int) -> ParallelGroups:
    from xlmr_mp.parallel.megatron_import import megatron_module
    ps = megatron_module("megatron.core.parallel_state")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # gloo side groups only on a real backend: torch's fake backend (the dry run, xlmr_mp/dry_run.py)
    # cannot build gloo groups, and nothing here uses them
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=dist.get_backend() != "fake")
    eg = ps.get_embedding_group(check_initialized=False)
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        embedding_group=eg,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp,
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        pp_ranks=tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
        embedding_ranks=tuple(dist.get_process_group_ranks(eg)) if eg is not None else (),
    )


def get_parallel_groups() -> Optional[ParallelGroups]:
    """The groups built by the last `init_parallel` (None before); prefer passing them explicitly."""
    return _GROUPS


def destroy_parallel() -> None:
    """Tear down the groups built by `init_parallel` and forget the RNG streams (megatron-core's
    state only where it was imported: a TP = PP = 1 run never needs it)."""
    global _GROUPS
    _GROUPS = None
    _TRACKER.reset()
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- RNG streams

def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGStatesTracker:
    """Named RNG streams: `with tracker.fork(name):` runs its body on that stream's state (CPU and,
    when CUDA is in use, the current CUDA device), then saves the advanced state and restores the
    default generators. A CPU-safe equivalent of megatron-core's CudaRNGStatesTracker."""

    def __init__(self):
        self.states: dict = {}
        self.seeds: dict = {}

    def reset(self) -> None:
        self.states = {}
        self.seeds = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` seeded with `seed` (the default generators are left unchanged).
        Its CUDA state is created now when CUDA is in use, else on the first fork that needs it."""
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state() if _cuda_ready() else None
        torch.manual_seed(seed)
        self.states[name] = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda is not None else None)
        self.seeds[name] = seed
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    def _cuda_state_for(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The stream's CUDA state, seeded from its seed when CUDA came into use after `add`."""
        state = self.states[name][1]
        if state is None:
            torch.cuda.manual_seed(self.seeds.get(name, 0))
            state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(current)
        return state

    def has(self, name: str) -> bool:
        return name in self.states

    def get_states(self) -> dict:
        """A copy of every stream's state (for checkpointing and activation recompute)."""
        return {k: (c.clone(), g.clone() if g is not None else None) for k, (c, g) in self.states.items()}

    def set_states(self, states: dict) -> None:
        self.states = {k: (c.clone(), g.clone() if g is not None else None) for k, (c, g) in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG):
        if name not in self.states:
            raise RuntimeError(f"RNG stream {name!r} was never added; call seed_parallel_rng first")
        cpu_state, cuda_state = self.states[name]
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state() if _cuda_ready() else None
        torch.set_rng_state(cpu_state)
        if cuda is not None:
            torch.cuda.set_rng_state(self._cuda_state_for(name, cuda))
        try:
            yield
        finally:
            new_cuda = torch.cuda.get_rng_state() if cuda is not None else cuda_state
            self.states[name] = (torch.get_rng_state(), new_cuda)
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide RNG stream tracker (like torch's default generator, one per process)."""
    return _TRACKER


def seed_parallel_rng(seed: int, groups: Optional[ParallelGroups] = None) -> None:
    """Seed the default generators (same on every TP rank of a pipeline stage, different across
    stages and DP ranks) and the tensor-parallel stream (different on every TP rank), as
    Megatron's `model_parallel_cuda_manual_seed` does: default = seed + 100 * pp_rank +
    1009 * dp_rank, tensor-parallel = default + 2718 + tp_rank. Model initialisation does not use
    these streams (see XLMRModel: per-parameter generators), so weights stay identical across DP."""
    g = groups or ParallelGroups(None, None, None, None)
    base = seed + 100 * g.pp_rank + 1009 * g.dp_rank
    torch.manual_seed(base)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(base)
    _TRACKER.reset()
    _TRACKER.add(TP_RNG, base + 2718 + g.tp_rank)


def tp_rng_context(tp_size: int):
    """Context for dropout inside TP-sharded regions: the tensor-parallel stream when TP > 1 and
    it was seeded, else the default generator."""
    if tp_size > 1 and _TRACKER.has(TP_RNG):
        return _TRACKER.fork(TP_RNG)
    return contextlib.nullcontext()


class RecomputeRNG:
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant): the recompute replays the
    tracker's streams from where the original forward found them, so dropout masks inside forked
    regions are identical in the recompute (torch restores only the default generators)."""

    def __call__(self):
        holder = {}

        @contextlib.contextmanager
        def forward_ctx():
            holder["states"] = _TRACKER.get_states()
            yield

        @contextlib.contextmanager
        def recompute_ctx():
            current = _TRACKER.get_states()
            _TRACKER.set_states(holder.get("states", current))
            try:
                yield
            finally:
                _TRACKER.set_states(current)

        return forward_ctx(), recompute_ctx()
