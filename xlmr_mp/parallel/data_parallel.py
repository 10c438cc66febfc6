"""Data parallelism: contiguous parameter / gradient buckets, the overlapped in-place DP reduction,
and the AdamW step, optionally sharded by element range over the DP group (ZeRO-1).

`FlatBuffers` puts every trainable parameter into contiguous per-bucket tensors (buckets filled
in reverse parameter order, as backward produces their gradients; within a bucket the decayed
parameters first, then the undecayed, so AdamW updates two flat runs of it): `bucket.data` holds the values and each
`param.data` is a view into it, `bucket.grad` holds the gradients and each `param.grad` is a view
into it (Megatron's main_grad), so autograd accumulates in place and a bucket is reduced with one
collective on its buffer: no pack, no unpack. Each bucket is padded to a multiple of the DP size;
DP rank r owns the element range [r, r + 1) * numel / DP of every bucket (`bucket.shard`), so a
parameter may straddle two ranks' ranges and every rank owns the same number of elements.

`GradReducer` registers a post-accumulate-grad hook on every parameter. During the step's last
accumulation pass (each parameter's hook has fired `n_accum` times) a bucket whose parameters are
all ready is reduced asynchronously with SUM while backward continues; buckets are launched in a
fixed order, as torch DDP does, so every DP rank issues the same collectives. SUM (not mean)
because every micro-batch already backpropagates loss_sum / global_num_masked, the masked-token
count of the whole global batch (see train.py). Two modes:
  all-reduce      every rank ends with the full summed gradient (plain DP, and ZeRO-1 where the
                  backend lacks reduce-scatter or a later sum needs full gradients: tied embedding
                  grads across pipeline stages are summed after the DP reduction);
  reduce-scatter  (ZeRO-1 where the backend has it: NCCL, and gloo in recent torch) each rank ends
                  with the summed gradient of its own range only (`bucket.grad[shard]`).

`DistributedAdamW` runs torch's fused (else foreach) AdamW over 1-D views of the flat buffers:
maximal runs of adjacent parameters with the same weight decay (`_Run`), not one per parameter.
With `shard=False` those are whole parameters; with `shard=True` (parallel.distributed_optimizer)
they are the pieces of this rank's element ranges, so Adam state (exp_avg, exp_avg_sq) exists
for 1/DP of the elements on each rank; after the update each bucket's parameter values are
all-gathered in place from the owners. Parameters are fp32 (precision.py: they are the master
weights), so the range's master weights are the flat parameter buffer's own slice: no extra copy.
The optimizer state stays addressable by parameter name (`state_by_name`: a straddling
parameter's pieces are sent to the rank owning its first element), which is what checkpoint
resharding works with.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from xlmr_mp.optim import build_adamw, no_decay


def _dp_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _dp_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def backend_has_reduce_scatter(group) -> bool:
    """Whether `group`'s backend implements reduce_scatter_tensor / all_gather_into_tensor (NCCL;
    gloo in the torch this project is tested with, 2.13: older versions get the all-reduce path)."""
    if not dist.is_initialized():
        return False
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return True
    if backend == "gloo":
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 13)
    return False


def _all_gather(out: torch.Tensor, part: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in torch 2.13
    gather(out, part, group=group)


def _reduce_scatter(out: torch.Tensor, full: torch.Tensor, group):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, full, op=dist.ReduceOp.SUM, group=group, async_op=True)


class Bucket:
    """One contiguous bucket: parameters `params` (names `names`) at [start, end) of `data` and
    `grad` (1-D, `numel` elements, padded to a multiple of the DP size); `shard` is this DP rank's
    [lo, hi) element range."""

    def __init__(self, index: int, names: List[str], params: List[torch.nn.Parameter], dp_size: int, dp_rank: int):
        self.index, self.names, self.params = index, names, params
        self.offsets: List[Tuple[int, int]] = []
        off = 0
        for p in params:
            self.offsets.append((off, off + p.numel()))
            off += p.numel()
        self.used = off
        self.numel = -(-off // dp_size) * dp_size
        per = self.numel // dp_size
        self.shard = (dp_rank * per, (dp_rank + 1) * per)
        p0 = params[0]
        self.data = torch.zeros(self.numel, dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros(self.numel, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, (s, e) in zip(params, self.offsets):
                self.data[s:e].copy_(p.data.reshape(-1))
                p.data = self.data[s:e].view_as(p)
                p.grad = self.grad[s:e].view_as(p)
        self._grad_views = [p.grad for p in params]   # made once: rebinding checks identity, not pointers

    def grad_view(self, i: int) -> torch.Tensor:
        """Parameter i's gradient: its view into `grad` (the same tensor object every call)."""
        return self._grad_views[i]

    def owner_of(self, element: int, dp_size: int) -> int:
        """DP rank whose range holds bucket element `element`."""
        return element // (self.numel // dp_size)


class FlatBuffers:
    """Trainable parameters and their gradients in contiguous per-bucket tensors (module doc)."""

    def __init__(self, named_params: Sequence[Tuple[str, torch.nn.Parameter]],
                 dp_group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        taken = [n for n, p in named if getattr(p, "_flat_buffers", None) is not None]
        if taken:
            raise ValueError(f"parameters {taken[:3]} already live in another FlatBuffers; build one FlatBuffers "
                             f"and pass it to both GradReducer and DistributedAdamW")
        self.group = dp_group
        self.dp_size, self.dp_rank = _dp_size(dp_group), _dp_rank(dp_group)
        self.buckets: List[Bucket] = []
        self._runs: Dict[Tuple[frozenset, bool], List[torch.Tensor]] = {}   # grad_runs, per (names, owned_only)
        limit = max(1, int(bucket_mb * 2 ** 20))
        cur: List[Tuple[str, torch.nn.Parameter]] = []
        size = 0
        for n, p in reversed(named):        # backward produces the last layers' grads first
            if cur and (p.dtype != cur[0][1].dtype or p.device != cur[0][1].device):
                self._add(cur)
                cur, size = [], 0
            cur.append((n, p))
            size += p.numel() * p.element_size()
            if size >= limit:
                self._add(cur)
                cur, size = [], 0
        if cur:
            self._add(cur)
        self.where = {id(p): (b.index, i) for b in self.buckets for i, p in enumerate(b.params)}
        for p in self.params():
            p._flat_buffers = self

    def _add(self, named: List[Tuple[str, torch.nn.Parameter]]) -> None:
        # decayed parameters first, then the undecayed ones (stable): AdamW then runs over two
        # contiguous runs of a bucket, not one tensor per parameter (the order within a bucket
        # changes nothing else: a bucket is reduced when all of its parameters are ready)
        named = sorted(named, key=lambda np_: no_decay(*np_))
        self.buckets.append(Bucket(len(self.buckets), [n for n, _ in named], [p for _, p in named],
                                   self.dp_size, self.dp_rank))

    def params(self) -> List[torch.nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero every gradient buffer (parameters keep their views)."""
        torch._foreach_zero_([b.grad for b in self.buckets])

    @torch.no_grad()
    def rebind_grads(self) -> None:
        """Make every `param.grad` the view into its bucket again after outside code replaced it
        (e.g. `optimizer.zero_grad(set_to_none=True)`: the view is zeroed; another tensor: copied in)."""
        for b in self.buckets:
            for i, p in enumerate(b.params):
                view = b.grad_view(i)
                g = p.grad
                if g is view:               # the usual case: nothing replaced it
                    continue
                if g is None:
                    view.zero_()
                elif g.data_ptr() != view.data_ptr():
                    view.copy_(g)
                else:
                    continue
                p.grad = view

    def grad_tensors(self, owned_only: bool) -> List[torch.Tensor]:
        """The gradient buffers (whole, or this rank's range of each)."""
        if owned_only:
            return [b.grad[b.shard[0]:b.shard[1]] for b in self.buckets]
        return [b.grad for b in self.buckets]

    def grad_runs(self, counted: set, owned_only: bool) -> List[torch.Tensor]:
        """Views of the gradients of the parameters named in `counted` (restricted to this rank's
        ranges with owned_only), contiguous runs merged into one view each (computed once per
        (counted, owned_only): the buffers never move)."""
        key = (frozenset(counted), bool(owned_only))
        if key not in self._runs:
            self._runs[key] = self._grad_runs(*key)
        return list(self._runs[key])

    def _grad_runs(self, counted: frozenset, owned_only: bool) -> List[torch.Tensor]:
        out = []
        for b in self.buckets:
            lo, hi = b.shard if owned_only else (0, b.numel)
            run = None
            for n, (s, e) in zip(b.names, b.offsets):
                s, e = max(s, lo), min(e, hi)
                if s < e and n in counted and run is not None and run[1] == s:
                    run = (run[0], e)
                    continue
                if run is not None:
                    out.append(b.grad[run[0]:run[1]])
                run = (s, e) if s < e and n in counted else None
            if run is not None:
                out.append(b.grad[run[0]:run[1]])
        return out


class GradReducer:
    """SUM reduction of the gradient buckets over `dp_group`, in place, overlapped with the last
    backward. `buffers`: a FlatBuffers, or a list of parameters (then buckets are built here).
    `reduce_scatter`: each rank gets only its range's sum (see module doc)."""

    def __init__(self, buffers, dp_group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0,
                 reduce_scatter: bool = False):
        if not isinstance(buffers, FlatBuffers):
            buffers = FlatBuffers([(str(i), p) for i, p in enumerate(buffers)], dp_group, bucket_mb)
        self.flat = buffers
        self.group = buffers.group if dp_group is None else dp_group
        self.enabled = _dp_size(self.group) > 1
        self.reduce_scatter = bool(reduce_scatter) and self.enabled
        self.buckets = [b.params for b in buffers.buckets]
        self._hooks = []
        if self.enabled:
            for p in buffers.params():
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self.start_step(1)

    def start_step(self, n_accum: int) -> None:
        """Reset for an optimizer step whose backward passes each parameter `n_accum` times."""
        self.flat.rebind_grads()
        self.n_accum = n_accum
        self._count: Dict[int, int] = {}
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._pending: List[object] = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        b, i = self.flat.where[id(p)]
        view = self.flat.buckets[b].grad_view(i)
        if p.grad is not view and p.grad.data_ptr() != view.data_ptr():   # a new tensor: keep the buffer
            with torch.no_grad():
                view.copy_(p.grad)
            p.grad = view
        c = self._count.get(id(p), 0) + 1
        self._count[id(p)] = c
        if c == self.n_accum:
            self._ready[b] += 1
            while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
                self._launch(self._next)

    def _launch(self, b: int) -> None:
        bucket = self.flat.buckets[b]
        if self.reduce_scatter:
            lo, hi = bucket.shard
            work = _reduce_scatter(bucket.grad[lo:hi], bucket.grad, self.group)
        else:
            work = dist.all_reduce(bucket.grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._pending.append(work)
        self._next = b + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch buckets not yet launched (unused parameters), wait for every reduction."""
        if not self.enabled:
            return
        while self._next < len(self.buckets):
            self._launch(self._next)
        for work in self._pending:
            work.wait()
        self._pending = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class _Piece:
    """A 1-D slice [a, b) of parameter `name` (flattened) that this rank updates: elements
    [lo, lo + b - a) of its bucket."""

    def __init__(self, name: str, bucket: Bucket, index: int, a: int, b: int):
        self.name, self.bucket, self.index, self.a, self.b = name, bucket, index, a, b
        self.lo = bucket.offsets[index][0] + a


class _Run:
    """Adjacent pieces of one bucket with the same weight decay, updated as one flat tensor:
    `data` / `data.grad` are views of the bucket's buffers; piece i starts at `starts[i]`."""

    def __init__(self, pc: _Piece, decay: bool):
        self.bucket, self.decay = pc.bucket, decay
        self.pieces, self.starts = [pc], [0]
        self.lo, self.hi = pc.lo, pc.lo + (pc.b - pc.a)

    def extends(self, pc: _Piece) -> bool:
        return pc.bucket is self.bucket and pc.lo == self.hi

    def add(self, pc: _Piece) -> None:
        self.pieces.append(pc)
        self.starts.append(self.hi - self.lo)
        self.hi += pc.b - pc.a

    def finish(self) -> None:
        self.data = self.bucket.data[self.lo:self.hi]
        self.data.grad = self.bucket.grad[self.lo:self.hi]


class DistributedAdamW:
    """AdamW over the flat buffers; with shard=True its state is split by element range across the
    DP group (ZeRO-1, module doc). `buffers`: a FlatBuffers, or named parameters (then built here)."""

    def __init__(self, buffers, ocfg, dp_group: Optional[dist.ProcessGroup] = None, shard: bool = False,
                 impl: str = "fused"):
        if not isinstance(buffers, FlatBuffers):
            buffers = FlatBuffers(list(buffers), dp_group)
        self.flat = buffers
        self.group = buffers.group if dp_group is None else dp_group
        self.dp_size = _dp_size(self.group)
        self.shard = bool(shard) and self.dp_size > 1
        self.dp_rank = _dp_rank(self.group) if self.shard else 0
        self.pieces: List[_Piece] = []
        for b in buffers.buckets:
            lo, hi = b.shard if self.shard else (0, b.numel)
            for i, (n, (s, e)) in enumerate(zip(b.names, b.offsets)):
                if max(s, lo) < min(e, hi):
                    self.pieces.append(_Piece(n, b, i, max(s, lo) - s, min(e, hi) - s))
        self.ocfg, self.impl = ocfg, impl
        self._build(merge=True)
        self.owned_names = sorted({pc.name for pc in self.pieces})
        self.lr = ocfg.lr

    def _build(self, merge: bool) -> None:
        """The torch AdamW over `_Run`s: with merge, each run is a maximal stretch of adjacent pieces
        of one bucket with the same weight decay (FlatBuffers puts them side by side), so the update
        touches a few flat tensors instead of one per parameter (same elementwise update, same bits);
        without, one run per piece."""
        self.runs: List[_Run] = []
        for pc in self.pieces:
            decay = not no_decay(pc.name, pc.bucket.params[pc.index])
            last = self.runs[-1] if self.runs else None
            if merge and last is not None and last.decay == decay and last.extends(pc):
                last.add(pc)
            else:
                self.runs.append(_Run(pc, decay))
        for r in self.runs:
            r.finish()
        self.run_of = {id(pc): (r, o) for r in self.runs for pc, o in zip(r.pieces, r.starts)}
        groups = [g for g in ({"params": [r.data for r in self.runs if r.decay], "weight_decay": self.ocfg.weight_decay},
                              {"params": [r.data for r in self.runs if not r.decay], "weight_decay": 0.0})
                  if g["params"]]
        self.inner = build_adamw(groups, self.ocfg, self.impl) if groups else None

    @property
    def param_groups(self) -> List[dict]:
        return self.inner.param_groups if self.inner is not None else []

    def zero_grad(self) -> None:
        self.flat.zero_grad()

    def grad_tensors(self) -> List[torch.Tensor]:
        """The gradient memory the update reads (what unscaling and clipping must scale)."""
        return self.flat.grad_tensors(owned_only=self.shard)

    def norm_grads(self, counted: Iterable[str]) -> List[torch.Tensor]:
        """Gradient views entering the global norm on this rank: parameters in `counted`, this
        rank's ranges only under ZeRO-1 (then the norm is also summed over DP: `norm_group`)."""
        return self.flat.grad_runs(set(counted), owned_only=self.shard)

    @property
    def norm_group(self) -> Optional[dist.ProcessGroup]:
        """The DP group when the norm's partial sums differ per DP rank (ZeRO-1), else None."""
        return self.group if self.shard else None

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's pieces; under ZeRO-1 all-gather each bucket's values in place."""
        if self.inner is not None:
            self.inner.step()
        if not self.shard:
            return
        for b in self.flat.buckets:
            lo, hi = b.shard
            _all_gather(b.data, b.data[lo:hi].clone(), self.group)

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held by this rank."""
        if self.inner is None:
            return 0
        return sum(v.numel() * v.element_size() for st in self.inner.state.values() for v in st.values()
                   if torch.is_tensor(v))

    def _piece_state(self, pc: _Piece) -> Optional[dict]:
        """The piece's Adam state: views of its run's state tensors (the run's step)."""
        if self.inner is None:
            return None
        run, o = self.run_of[id(pc)]
        st = self.inner.state.get(run.data)
        if not st:
            return None
        n = pc.b - pc.a
        return {k: (v[o:o + n] if torch.is_tensor(v) and v.ndim else v) for k, v in st.items()}

    def state_by_name(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{param name: {'exp_avg', 'exp_avg_sq', 'step'}} (full parameter shape) for the parameters
        this rank writes: all of its own without ZeRO-1; with it, those whose first element is in
        this rank's range (the other owners' pieces are sent here). Collective under ZeRO-1."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        if not self.shard:
            for pc in self.pieces:
                st = self._piece_state(pc)
                if st:
                    shape = pc.bucket.params[pc.index].shape
                    out[pc.name] = {k: (v.detach().clone().view(shape) if torch.is_tensor(v) and v.ndim else
                                        (v.detach().clone() if torch.is_tensor(v) else v)) for k, v in st.items()}
            return out
        have = {(pc.bucket.index, pc.index): pc for pc in self.pieces}
        for b in self.flat.buckets:
            for i, (n, (s, e)) in enumerate(zip(b.names, b.offsets)):
                ranks = range(b.owner_of(s, self.dp_size), b.owner_of(e - 1, self.dp_size) + 1)
                if self.dp_rank not in ranks:
                    continue
                pc = have[(b.index, i)]
                st = self._piece_state(pc)
                if not st:
                    continue
                writer = ranks[0]
                if self.dp_rank != writer:
                    for k in ("exp_avg", "exp_avg_sq"):
                        dist.send(st[k].contiguous(), group=self.group, group_dst=writer)
                    continue
                full = {k: torch.empty(e - s, dtype=st[k].dtype, device=st[k].device) for k in ("exp_avg", "exp_avg_sq")}
                for r in ranks:
                    lo, hi = max(s, r * (b.numel // self.dp_size)), min(e, (r + 1) * (b.numel // self.dp_size))
                    for k in ("exp_avg", "exp_avg_sq"):
                        if r == self.dp_rank:
                            full[k][pc.a:pc.b].copy_(st[k])
                        else:
                            dist.recv(full[k][lo - s:hi - s], group=self.group, group_src=r)
                shape = b.params[i].shape
                out[n] = {k: v.view(shape) for k, v in full.items()}
                out[n]["step"] = st["step"].detach().clone()
        return out

    def load_state_by_name(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Load Adam state from a by-name map of full-shape tensors (missing names start fresh)."""
        if self.inner is None:
            return

        def step_of(st):
            return float(st["step"]) if st and "step" in st else None

        # a merged run has one step count: where its pieces disagree (a name missing, another step),
        # fall back to one run per piece so that each keeps its own
        if any(len({step_of(states.get(pc.name)) for pc in r.pieces}) > 1 for r in self.runs):
            self._build(merge=False)
        for r in self.runs:
            sts = [states.get(pc.name) for pc in r.pieces]
            if not sts[0]:
                continue
            new = {}
            for k, v in sts[0].items():
                if torch.is_tensor(v) and v.ndim > 0:
                    new[k] = torch.cat([st[k].reshape(-1)[pc.a:pc.b] for pc, st in zip(r.pieces, sts)]).to(
                        r.data.device, r.data.dtype)
                else:
                    new[k] = torch.tensor(float(v), dtype=torch.float32,
                                          device=r.data.device if self._fused_step_on_device() else "cpu")
            self.inner.state[r.data] = new

    def _fused_step_on_device(self) -> bool:
        d = self.inner.defaults
        return bool(d.get("fused") or d.get("capturable"))
