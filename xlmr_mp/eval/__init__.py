"""Evaluation tasks: `TASKS` names each one's module; `task_module(name)` imports it on demand.

Every module has `run(em: EvalModel, opts: EvalOptions) -> TaskResult` (see xlmr_mp/eval/api.py);
`tools/evaluate.py` is the command line over them.
"""
from __future__ import annotations

import importlib

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult

TASKS = {name: f"xlmr_mp.eval.{name}" for name in ("mbpc", "retrieval", "sib200", "xnli", "udpos", "ner")}

__all__ = ["TASKS", "task_module", "EvalError", "EvalModel", "EvalOptions", "TaskResult"]


def task_module(name: str):
    """The module of task `name` (imported now); EvalError for an unknown or missing task."""
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    try:
        return importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name == TASKS[name]:
            raise EvalError(f"task {name!r} is not available in this installation ({TASKS[name]} is missing)") from None
        raise
