"""The paper's figures from a study's aggregated results (matplotlib PNG).

Per grid and metric: the curse curve (x = number of languages, High / Low / All, one panel per
value of the other axes: Figures 2 and 4), alpha (Figure 5), vocabulary (Figure 6), any other
varying axis as a categorical plot, a language x cell heatmap of the change against the grid's
first cell, and learning curves per language (valid bits per character against step).
Error bars are 95% confidence intervals over seeds where there are several.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from xlmr_mp.plotting import pyplot, save_figure
from xlmr_mp.study.spec import Study

LINES = ("High", "Low", "All")


def _plt():
    return pyplot()


def _axis_numeric(study: Study, grid: str, axis: str, value: str):
    """x position of an axis value: number of languages, alpha, vocabulary size; else None."""
    cell = next((c for c in study.cells if (c.grid == grid and c.axis_values.get(axis) == value)
                 or any(g == grid and av.get(axis) == value for g, av in c.aliases)), None)
    if cell is None:
        return None
    return {"languages": len(cell.languages), "alpha": cell.alpha, "vocab": cell.vocab}.get(axis)


def _varying(agg: Dict[tuple, dict]) -> Dict[str, List[str]]:
    vals: Dict[str, List[str]] = {}
    for k in agg:
        for a, v in k:
            vals.setdefault(a, [])
            if v not in vals[a]:
                vals[a].append(v)
    return {a: v for a, v in vals.items() if len(v) > 1}


def _label(k: tuple, var: Dict[str, List[str]]) -> str:
    """A cell key named by the axes that vary in the figure."""
    return " ".join(v for a, v in k if a in var) or " ".join(v for _, v in k)


def _errorbar(ax, xs, ts, label, **kw):
    ys = [t[0] for t in ts]
    es = [t[1] if t[1] == t[1] else 0.0 for t in ts]
    ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", capsize=3, label=label, **kw)


def axis_figure(study: Study, grid: str, metric: str, agg: Dict[tuple, dict], axis: str, out_path: str,
                title: str) -> str:
    """x = the axis (numeric where it has a size), High / Low / All lines, one panel per other-axes value."""
    plt = _plt()
    var = _varying(agg)
    others = [a for a in var if a != axis]
    panels: Dict[tuple, Dict[str, dict]] = {}
    for k, d in agg.items():
        kd = dict(k)
        pk = tuple((a, kd.get(a)) for a in others)
        panels.setdefault(pk, {})[kd.get(axis)] = d
    n = len(panels)
    fig, axs = plt.subplots(1, n, figsize=(max(6.0, 4.2 * n), 3.8), squeeze=False, sharey=True)
    for ax, (pk, by_v) in zip(axs[0], sorted(panels.items())):
        order = var.get(axis) or list(by_v)
        vs = [v for v in order if v in by_v]
        nums = [_axis_numeric(study, grid, axis, v) for v in vs]
        numeric = all(x is not None for x in nums) and len(set(nums)) == len(nums)
        xs = nums if numeric else list(range(len(vs)))
        if numeric:
            pairs = sorted(zip(xs, vs))
            xs, vs = [p[0] for p in pairs], [p[1] for p in pairs]
        for g in LINES:
            pts = [(x, by_v[v][g]) for x, v in zip(xs, vs) if g in by_v[v]]
            if pts:
                _errorbar(ax, [p[0] for p in pts], [p[1] for p in pts], g)
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels(vs, rotation=30, ha="right")
        elif axis == "vocab":
            ax.set_xscale("log", base=2)
        ax.set_xlabel({"languages": "number of languages", "alpha": "alpha", "vocab": "vocabulary size"}.get(axis, axis))
        ax.set_title(", ".join(f"{a}={v}" for a, v in pk) or grid, fontsize=9)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel(metric)
    axs[0][-1].legend(fontsize=8)
    fig.suptitle(f"{title}, grid {grid}\n(corpus: much of it translated news; mean and 95% CI over seeds)",
                 fontsize=9)
    return save_figure(fig, out_path)


def language_bars(grid: str, metric: str, agg: Dict[tuple, dict], out_path: str) -> str:
    """Per language, one bar per cell (Table 5's form: monolingual models against the multilingual one)."""
    plt = _plt()
    keys = list(agg)
    langs = sorted({l for d in agg.values() for l in d if l not in LINES})
    width = 0.8 / max(1, len(keys))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(langs) + 2), 3.8))
    for j, k in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i, l in enumerate(langs) if l in agg[k]]
        ts = [agg[k][l] for l in langs if l in agg[k]]
        es = [t[1] if t[1] == t[1] else 0.0 for t in ts]
        ax.bar(xs, [t[0] for t in ts], width, yerr=es if any(es) else None, capsize=3,
               label=_label(k, _varying(agg)))
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{grid}: {metric} per language and cell (mean and 95% CI over seeds)", fontsize=9)
    return save_figure(fig, out_path)


def heatmap(grid: str, metric: str, agg: Dict[tuple, dict], out_path: str) -> str:
    """language x cell: metric of the cell minus that of the grid's first cell (seed means)."""
    plt = _plt()
    import numpy as np
    keys = list(agg)
    base = agg[keys[0]]
    langs = sorted({l for d in agg.values() for l in d if l not in LINES})
    m = np.full((len(langs), len(keys)), np.nan)
    for j, k in enumerate(keys):
        for i, l in enumerate(langs):
            if l in agg[k] and l in base:
                m[i, j] = agg[k][l][0] - base[l][0]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.9 * len(keys)), max(3.0, 1.5 + 0.35 * len(langs))))
    lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() and np.nanmax(np.abs(m)) > 0 else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_label(k, _varying(agg)) for k in keys], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(langs)))
    ax.set_yticklabels(langs, fontsize=8)
    for i in range(len(langs)):
        for j in range(len(keys)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.3f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label=f"{metric} change")
    ax.set_title(f"{grid}: {metric} per language minus the base cell\n({_label(keys[0], _varying(agg))}; "
                 f"seed means)", fontsize=9)
    return save_figure(fig, out_path)


def grid_figures(study: Study, grid: str, metric: str, agg: Dict[tuple, dict], fig_dir: str) -> List[str]:
    """Every figure of one grid and metric that its varying axes allow (none without matplotlib)."""
    if _plt() is None:
        return []
    var = _varying(agg)
    out = []
    names = {"languages": ("curse", "Curse of multilinguality (Fig. 2/4)"), "alpha": ("alpha", "Sampling alpha (Fig. 5)"),
             "vocab": ("vocab", "Vocabulary size (Fig. 6)")}
    for axis in var:
        nums = [_axis_numeric(study, grid, axis, v) for v in var[axis]]
        if axis == "languages" and len(set(nums)) < len(nums):      # e.g. monolingual sets: per-language bars
            out.append(language_bars(grid, metric, agg, os.path.join(fig_dir, f"{grid}_languages_{metric}.png")))
            continue
        stem, title = names.get(axis, (axis.replace(".", "_"), f"Effect of {axis}"))
        out.append(axis_figure(study, grid, metric, agg, axis,
                               os.path.join(fig_dir, f"{grid}_{stem}_{metric}.png"), title))
    if len(agg) > 1:
        out.append(heatmap(grid, metric, agg, os.path.join(fig_dir, f"{grid}_heatmap_{metric}.png")))
    return out


def learning_curves(study: Study, out: str, grid: str, recs: List[dict], fig_dir: str) -> List[str]:
    """valid bits per character per language against step, one line per cell (mean over seeds)."""
    plt = _plt()
    if plt is None:
        return []
    curves: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    avs = [next((av for g, av in [(r["grid"], r["axis_values"])] + [tuple(x) for x in r.get("aliases", [])]
                 if g == grid), r["axis_values"]) for r in recs]
    var = _varying({tuple((a, v) for a, v in av.items() if a != "seed"): None for av in avs})
    for r, av in zip(recs, avs):
        label = _label(tuple((a, v) for a, v in av.items() if a != "seed"), var)
        p = os.path.join(out, "cells", r["name"], "run", "valid.jsonl")
        if not os.path.exists(p):
            continue
        for line in open(p):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            for k, v in e.items():
                if k.startswith("bpc_"):
                    curves.setdefault(k[4:], {}).setdefault(label, {}).setdefault(int(e["step"]), []).append(v)
    if not curves:
        return []
    langs = sorted(curves)
    n = len(langs)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, l in zip(axs.flat, langs):
        for label, by_step in sorted(curves[l].items()):
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=label, lw=1)
        ax.set_title(l, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("valid bits/char", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[n:]:
        ax.axis("off")
    axs[0][0].legend(fontsize=6)
    fig.suptitle(f"{grid}: learning curves (mean over seeds)", fontsize=10)
    return [save_figure(fig, os.path.join(fig_dir, f"{grid}_learning_curves.png"), dpi=100)]


def metric_curves(grid: str, metric: str, points: Dict[tuple, Dict[str, list]], fig_dir: str) -> List[str]:
    """Learning curves of an evaluated metric (evaluate_at): per language, the metric against tokens
    seen, one line per cell (colour: the cell's axis values, line style: its seed); [] without points."""
    plt = _plt() if points else None
    if plt is None:
        return []
    keys = sorted({k for k, _ in points})
    var = _varying({k: None for k in keys})
    seeds = sorted({sd for _, sd in points}, key=str)
    styles = ["-", "--", ":", "-."]
    colours = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    langs = sorted({l for d in points.values() for l in d})
    cols = min(4, len(langs))
    rows = (len(langs) + cols - 1) // cols
    fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, l in zip(axs.flat, langs):
        for (k, sd), by_lang in sorted(points.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if l not in by_lang:
                continue
            xs, ys = zip(*by_lang[l])
            ax.plot(xs, ys, marker="o", ms=3, lw=1, color=colours[k], ls=styles[seeds.index(sd) % len(styles)],
                    label=f"{_label(k, var)} s{sd}" if len(seeds) > 1 else _label(k, var))
        ax.set_title(l, fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[len(langs):]:
        ax.axis("off")
    axs[0][0].legend(fontsize=6)
    fig.suptitle(f"{grid}: {metric} against tokens seen (evaluate_at checkpoints), one line per cell\n"
                 f"(corpus: much of it translated news)", fontsize=10)
    return [save_figure(fig, os.path.join(fig_dir, f"{grid}_curve_{metric}.png"), dpi=100)]
