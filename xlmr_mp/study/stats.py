"""Statistics over a study's results rows (the dicts of results.csv, report.collect): the groups of
../shared/STUDY.md, the 95% interval over seeds, and each cell's values per seed.

Contracts:
- GROUPS: High = en fr, Low = sw ur, All = en fr de ru zh sw ur; a group's value in one cell and
  seed is the mean of the members present (group_value), None when none is.
- ci95(values) = (mean, t_{0.975, n-1} x sd / sqrt(n), n), sd with n - 1; the half-width is nan for
  one value; degrees of freedom beyond the table take the nearest tabulated one below (wider).
- per_seed(rows, grid, metric): each seed-less cell of a grid -> seed -> language -> value at the
  cell's last step (earlier evaluate_at steps are learning-curve points only); cells and seeds in
  the order of the rows, so every mean is summed in the same order on every run.
- aggregate(rows, grid, metric): each seed-less cell -> language or group -> ci95 over its seeds
  (a group's value is taken per seed first, then the interval over seeds).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

GROUPS = {"High": ["en", "fr"], "Low": ["sw", "ur"], "All": ["en", "fr", "de", "ru", "zh", "sw", "ur"]}
LOWER_IS_BETTER = {"valid_bpc", "mbpc", "bpc", "bits_per_char"}
# columns of results.csv that are not axes
ROW_FIELDS = ("study", "grid", "cell", "seed", "n_languages", "language", "metric", "value", "step", "tokens")
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def ci95(values: List[float]) -> tuple:
    """(mean, half-width of the 95% CI, n); half-width nan for one value."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(values) / n
    if n == 1:
        return m, float("nan"), 1
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]
    return m, t * sd / math.sqrt(n), n


def group_value(values: Dict[str, float], group: str) -> Optional[float]:
    vs = [values[l] for l in GROUPS[group] if l in values]
    return sum(vs) / len(vs) if vs else None


def value_of(values: Dict[str, float], what: str) -> Optional[float]:
    """A language's value, or a group's (GROUPS) mean of the members present."""
    return group_value(values, what) if what in GROUPS else values.get(what)


def seedless(av: dict) -> tuple:
    return tuple((a, v) for a, v in av.items() if a != "seed")


def row_axes(r: dict) -> dict:
    """The axis values of a results row (its non-empty axis columns)."""
    return {k: r[k] for k in r if k not in ROW_FIELDS and r[k] != ""}


def per_seed(rows: List[dict], grid: str, metric: str) -> Dict[tuple, Dict[str, Dict[str, float]]]:
    """seed-less cell key -> seed -> language -> value of `metric` in `grid` at each cell's last step."""
    rows = [r for r in rows if r["grid"] == grid and r["metric"] == metric]
    last: Dict[str, int] = {}
    for r in rows:
        last[r["cell"]] = max(last.get(r["cell"], 0), int(r["step"]))
    per: Dict[tuple, Dict[str, Dict[str, float]]] = {}
    for r in rows:
        if int(r["step"]) != last[r["cell"]]:          # an evaluate_at point: learning curves only
            continue
        per.setdefault(seedless(row_axes(r)), {}).setdefault(r["seed"], {})[r["language"]] = float(r["value"])
    return per


def aggregate(rows: List[dict], grid: str, metric: str) -> Dict[tuple, Dict[str, tuple]]:
    """seed-less cell key -> {language or group: (mean, ci, n)} over seeds (per_seed)."""
    out = {}
    for k, by_seed in per_seed(rows, grid, metric).items():
        d = {}
        langs = sorted({l for v in by_seed.values() for l in v})
        for l in langs:
            d[l] = ci95([v[l] for v in by_seed.values() if l in v])
        for g in GROUPS:
            vals = [group_value(v, g) for v in by_seed.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                d[g] = ci95(vals)
        out[k] = d
    return out
