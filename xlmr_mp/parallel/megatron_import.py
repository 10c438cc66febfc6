"""The one way this package imports megatron-core (parallel/ only, and only at TP or PP > 1).

Which megatron-core calls we make, their signatures in 0.16 and 0.19 and how each difference is
handled: docs/megatron_core_compat.md. The one difference that needs code here: from 0.19 on,
`import megatron.core` imports triton (its MoE kernels, megatron/core/transformer/moe/ops/
paged_stash.py, through megatron.core.distributed -> pipeline_parallel.schedules), and a CPU-only
torch does not install triton; the import then fails with a bare "No module named 'triton'".
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def megatron_module(name: str) -> ModuleType:
    """`importlib.import_module(name)` for a megatron-core module, its import-time warnings (no
    Transformer Engine / Apex) silenced; a missing triton becomes an ImportError naming the cause
    and the fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "triton":
                raise
            try:
                from importlib.metadata import version
                have = f"megatron-core {version('megatron-core')}"
            except Exception:  # noqa: BLE001 - the version is only for the message
                have = "this megatron-core"
            raise ImportError(
                f"{have} imports triton when megatron.core is imported (needed here for parallel.tensor > 1 or "
                f"parallel.pipeline > 1), and triton is not installed (a CPU-only torch does not bring it): "
                f"pip install triton, or pip install 'megatron-core>=0.16,<0.19' (see docs/megatron_core_compat.md)"
            ) from e
