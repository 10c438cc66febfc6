"""Count, on CPU tensors, the aten ops that would make the host wait for an accelerator.

    with OpCounter() as ops:
        ...
    ops.syncs          # [(op name, shapes)] of data-dependent ops: item() / bool() / float() of a
                       # tensor (_local_scalar_dense), nonzero, masked_select, boolean indexing
    ops.count(pred)    # how many recorded ops satisfy pred(name, out_shapes)

On a CPU these ops cost nothing special, which is why the tests count them: on a GPU each one
blocks the host until every queued kernel has finished. The counter is a TorchDispatchMode, so it
sees the ops below autograd and autocast (what a device would run), forward and backward.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
                   "aten.equal", "aten.unique_consecutive", "aten._unique2", "aten.repeat_interleave"}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


def _shapes(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))


def _bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in a):
            return True
    return False


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []          # (op name without overload, output shapes, output dtypes)
        self.syncs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        shapes = _shapes(out)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((name, shapes, tuple(o.dtype for o in outs if isinstance(o, torch.Tensor))))
        if name in _DATA_DEPENDENT or (name in _INDEXING and _bool_index(args)):
            self.syncs.append((name, shapes))
        return out

    def count(self, pred) -> int:
        return sum(1 for name, shapes, _ in self.ops if pred(name, shapes))
