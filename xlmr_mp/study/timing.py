"""Where a cell's time goes: seconds per phase, recorded by the runner in `<cell>/timing.json`.

Phases (wall seconds, every sitting of a resumed cell added):
    prepare    the cell's tokenizer and dataset: built by this cell (`built` lists what it built and
               how long each took) or made by another cell and waited for / reused (`shared`)
    train      the trainer's process (interpreter start, model build, steps, its validation, saves)
    <task>     each evaluation task's process on the final checkpoint (mbpc, retrieval, sib200, udpos, ...)
    curve      the evaluate_at checkpoints before the last step (mbpc and retrieval on each)
    eval_start the evaluation process's start: interpreter, imports (all evaluations of a cell
               run in one process, study/evaluate_batch.py)
Beside the wall seconds, `cpu` holds the CPU seconds (user + system) of each phase's child
processes (os.wait4): at one thread a cell, what a phase costs on a quiet machine, whatever the load
of the shared one while it ran. Timings never enter results.csv (whose rows are bit-for-bit reproducible); `status` and the report
show them, one column per phase.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from xlmr_mp.atomic import atomic_write_text


def _atomic_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))

TIMING_FILE = "timing.json"


def wait_cpu(p) -> tuple:
    """Wait for Popen `p`: (exit code, CPU seconds of the child and its waited-for descendants)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_utime + ru.ru_stime


def phases(evaluate: List[str], curves: bool) -> List[str]:
    """The phase columns of a study: prepare, train, its tasks, curve (with evaluate_at), eval_start."""
    return ["prepare", "train"] + list(evaluate) + (["curve"] if curves else []) + (["eval_start"] if evaluate or curves else [])


class CellTiming:
    """The timing record of one cell (written by the runner thread that holds the cell's lock)."""

    def __init__(self, cell_dir: str):
        self.path = os.path.join(cell_dir, TIMING_FILE)
        self.data = read_timing(cell_dir) or {"seconds": {}, "built": [], "shared": False, "sittings": 0}

    def add(self, phase: str, seconds: float, cpu: Optional[float] = None) -> None:
        for k, v in (("seconds", seconds), ("cpu", cpu)):
            if v is not None:
                d = self.data.setdefault(k, {})
                d[phase] = round(d.get(phase, 0.0) + float(v), 3)
        self.save()

    def prepared(self, seconds: float, built: List[dict]) -> None:
        """A sitting's preparation: `built` = the artefacts this call built (kind, key, seconds, cpu)."""
        self.data["sittings"] = self.data.get("sittings", 0) + 1
        self.data["built"] = self.data.get("built", []) + list(built)
        self.data["shared"] = not self.data["built"]
        self.add("prepare", seconds, sum(b.get("cpu", 0.0) for b in built))

    def save(self) -> None:
        _atomic_json(self.path, self.data)


def read_timing(cell_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(cell_dir, TIMING_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def total(rec: Optional[dict], key: str = "seconds") -> Optional[float]:
    """Seconds over every phase (key: "seconds" wall, "cpu" CPU; None without a record)."""
    if not rec or key not in rec:
        return None
    return sum(v for k, v in rec[key].items() if "/" not in k)


def shares(rec: dict, cols: List[str], key: str = "seconds") -> Dict[str, float]:
    """Each phase's share of the cell's total (0..1)."""
    t = total(rec, key) or 0.0
    s = rec.get(key, {})
    return {c: (s.get(c, 0.0) / t if t > 0 else 0.0) for c in cols}


def largest(rec: dict, cols: List[str], key: str = "seconds") -> Optional[str]:
    s = rec.get(key, {})
    present = [c for c in cols if c in s]
    return max(present, key=lambda c: s[c]) if present else None


def timing_table(names: List[str], recs: List[Optional[dict]], cols: List[str], fmt, key: str = "seconds") -> List[str]:
    """Markdown: one row per cell, seconds (share) per phase, total and the largest phase."""
    lines = ["| cell | " + " | ".join(cols) + " | total | largest |", "|---" * (len(cols) + 3) + "|"]
    for name, rec in zip(names, recs):
        if not rec or key not in rec:
            lines.append(f"| {name} | " + " | ".join("-" for _ in cols) + " | - | - |")
            continue
        sec, sh = rec[key], shares(rec, cols, key)
        cells = []
        for c in cols:
            if c not in sec:
                cells.append("-")
                continue
            flag = (" (built)" if rec.get("built") else " (shared)") if c == "prepare" else ""
            cells.append(f"{fmt(sec[c])} {100 * sh[c]:.0f}%{flag}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(total(rec, key))} | {largest(rec, cols, key) or '-'} |")
    return lines
