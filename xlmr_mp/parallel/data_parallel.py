"""Data parallelism: bucketed gradient all-reduce overlapped with backward, and ZeRO-1.

`GradReducer` registers a post-accumulate-grad hook on every parameter. During the step's last
accumulation pass (each parameter's hook has fired `n_accum` times) a bucket whose parameters are
all ready is flattened and all-reduced asynchronously with SUM while backward continues; buckets
are launched in a fixed order, as torch DDP does, so every DP rank issues the same collectives.
SUM (not mean) because every micro-batch already backpropagates loss_sum / global_num_masked,
the masked-token count of the whole global batch (see train.py).

`DistributedAdamW` is the optimizer for both modes. With `shard=False` every DP rank updates
every parameter. With `shard=True` (parallel.distributed_optimizer, ZeRO-1) each parameter is
owned by one DP rank (greedy balance by size, same on every rank): only the owner keeps its Adam
state and updates it, then each owner broadcasts its updated parameters to the DP group. Gradients
are all-reduced in full (gloo has no reduce-scatter) so the clipping norm needs no extra
collective. Parameter-granular ownership makes optimizer state addressable by parameter name,
which is what the checkpoint resharding works with.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from xlmr_mp.optim import build_adamw, param_groups


def _dp_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


class GradReducer:
    """SUM all-reduce of gradients over `dp_group` in buckets, overlapped with the last backward."""

    def __init__(self, params: Sequence[torch.nn.Parameter], dp_group: Optional[dist.ProcessGroup],
                 bucket_mb: float = 25.0):
        self.group = dp_group
        self.params = [p for p in params if p.requires_grad]
        self.enabled = _dp_size(dp_group) > 1
        self.buckets: List[List[torch.nn.Parameter]] = []
        limit = max(1, int(bucket_mb * 2 ** 20))
        cur, size = [], 0
        for p in reversed(self.params):     # backward produces the last layers' grads first
            cur.append(p)
            size += p.numel() * 4
            if size >= limit:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._hooks = []
        if self.enabled:
            for p in self.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self.start_step(1)

    def start_step(self, n_accum: int) -> None:
        """Reset for an optimizer step whose backward passes each parameter `n_accum` times."""
        self.n_accum = n_accum
        self._count: Dict[int, int] = {}
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._pending: List[Tuple[int, torch.Tensor, object]] = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        c = self._count.get(id(p), 0) + 1
        self._count[id(p)] = c
        if c == self.n_accum:
            b = self._bucket_of[id(p)]
            self._ready[b] += 1
            while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
                self._launch(self._next)

    def _launch(self, b: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[b]])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._pending.append((b, flat, work))
        self._next = b + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch buckets not yet launched (unused parameters), wait, write the sums back."""
        if not self.enabled:
            return
        while self._next < len(self.buckets):
            self._launch(self._next)
        for b, flat, work in self._pending:
            work.wait()
            off = 0
            for p in self.buckets[b]:
                n = p.numel()
                g = flat[off:off + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                off += n
        self._pending = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def assign_owners(numels: Sequence[int], n: int) -> List[int]:
    """Owner DP rank of each parameter: largest first onto the least-loaded rank (ties: lowest)."""
    load = [0] * n
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(n), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += numels[i]
    return owner


class DistributedAdamW:
    """AdamW over named parameters; with shard=True its state is split across the DP group (ZeRO-1)."""

    def __init__(self, named_params: Sequence[Tuple[str, torch.nn.Parameter]], ocfg,
                 dp_group: Optional[dist.ProcessGroup] = None, shard: bool = False):
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self.group = dp_group
        self.shard = shard and _dp_size(dp_group) > 1
        n = _dp_size(dp_group) if self.shard else 1
        self.dp_rank = dist.get_rank(dp_group) if self.shard else 0
        self.owner = assign_owners([p.numel() for _, p in self.named], n)
        owned = [(nm, p) for (nm, p), o in zip(self.named, self.owner) if o == self.dp_rank]
        self.owned_names = [nm for nm, _ in owned]
        self._groups = param_groups(owned, ocfg.weight_decay)
        self.inner = build_adamw(self._groups, ocfg) if self._groups else None
        self.lr = ocfg.lr

    @property
    def param_groups(self) -> List[dict]:
        return self.inner.param_groups if self.inner is not None else []

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Update owned parameters, then (ZeRO-1) broadcast each owner's parameters to the DP group."""
        if self.inner is not None:
            self.inner.step()
        if not self.shard:
            return
        for r in range(dist.get_world_size(self.group)):
            ps = [p for (_, p), o in zip(self.named, self.owner) if o == r]
            if not ps:
                continue
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            src = r if self.group is None else dist.get_global_rank(self.group, r)
            dist.broadcast(flat, src=src, group=self.group)
            if r != self.dp_rank:
                off = 0
                for p in ps:
                    p.copy_(flat[off:off + p.numel()].view_as(p))
                    off += p.numel()

    def state_by_name(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{param name: {'exp_avg', 'exp_avg_sq', 'step'}} for the parameters this rank owns."""
        out = {}
        if self.inner is None:
            return out
        for g in self.inner.param_groups:
            for nm, p in zip(g["names"], g["params"]):
                st = self.inner.state.get(p)
                if st:
                    out[nm] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        return out

    def load_state_by_name(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Load Adam state for owned parameters from a by-name map (missing names start fresh)."""
        if self.inner is None:
            return
        for g in self.inner.param_groups:
            for nm, p in zip(g["names"], g["params"]):
                if nm in states:
                    st = states[nm]
                    self.inner.state[p] = {k: (v.clone().to(p.device) if torch.is_tensor(v) and v.ndim > 0
                                               else (v.clone() if torch.is_tensor(v) else torch.tensor(float(v))))
                                           for k, v in st.items()}
