"""Where a cell's time goes: seconds per phase, recorded by the runner in `<cell>/timing.json`.

Phases (wall seconds, every sitting of a resumed cell added):
    prepare    the cell's tokenizer and dataset: built by this cell (`built` lists what it built and
               how long each took) or made by another cell and waited for / reused (`shared`)
    train      the trainer's process (interpreter start, model build, steps, its validation, saves)
    <task>     each evaluation task's process on the final checkpoint (mbpc, retrieval, sib200, udpos, ...)
    curve      the evaluate_at checkpoints before the last step (mbpc and retrieval on each)
Timings never enter results.csv (whose rows are bit-for-bit reproducible); `status` and the report
show them, one column per phase.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from xlmr_mp.study.prepare import _atomic_json

TIMING_FILE = "timing.json"


def phases(evaluate: List[str], curves: bool) -> List[str]:
    """The phase columns of a study: prepare, train, its tasks, curve (with evaluate_at)."""
    return ["prepare", "train"] + list(evaluate) + (["curve"] if curves else [])


class CellTiming:
    """The timing record of one cell (written by the runner thread that holds the cell's lock)."""

    def __init__(self, cell_dir: str):
        self.path = os.path.join(cell_dir, TIMING_FILE)
        self.data = read_timing(cell_dir) or {"seconds": {}, "built": [], "shared": False, "sittings": 0}

    def add(self, phase: str, seconds: float) -> None:
        s = self.data["seconds"]
        s[phase] = round(s.get(phase, 0.0) + float(seconds), 3)
        self.save()

    def prepared(self, seconds: float, built: List[dict]) -> None:
        """A sitting's preparation: `built` = the artefacts this call built (kind, key, seconds)."""
        self.data["sittings"] = self.data.get("sittings", 0) + 1
        self.data["built"] = self.data.get("built", []) + list(built)
        self.data["shared"] = not self.data["built"]
        self.add("prepare", seconds)

    def save(self) -> None:
        _atomic_json(self.path, self.data)


def read_timing(cell_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(cell_dir, TIMING_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def total(rec: Optional[dict]) -> Optional[float]:
    """Seconds over every phase (None without a record)."""
    if not rec:
        return None
    return sum(v for k, v in rec.get("seconds", {}).items() if "/" not in k)


def shares(rec: dict, cols: List[str]) -> Dict[str, float]:
    """Each phase's share of the cell's total (0..1)."""
    t = total(rec) or 0.0
    s = rec.get("seconds", {})
    return {c: (s.get(c, 0.0) / t if t > 0 else 0.0) for c in cols}


def largest(rec: dict, cols: List[str]) -> Optional[str]:
    s = rec.get("seconds", {})
    present = [c for c in cols if c in s]
    return max(present, key=lambda c: s[c]) if present else None


def timing_table(names: List[str], recs: List[Optional[dict]], cols: List[str], fmt) -> List[str]:
    """Markdown: one row per cell, seconds (share) per phase, total and the largest phase."""
    lines = ["| cell | " + " | ".join(cols) + " | total | largest |", "|---" * (len(cols) + 3) + "|"]
    for name, rec in zip(names, recs):
        if not rec:
            lines.append(f"| {name} | " + " | ".join("-" for _ in cols) + " | - | - |")
            continue
        sec, sh = rec.get("seconds", {}), shares(rec, cols)
        cells = []
        for c in cols:
            if c not in sec:
                cells.append("-")
                continue
            flag = (" (built)" if rec.get("built") else " (shared)") if c == "prepare" else ""
            cells.append(f"{fmt(sec[c])} {100 * sh[c]:.0f}%{flag}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(total(rec))} | {largest(rec, cols) or '-'} |")
    return lines
