"""The paper's figures from a study's aggregated results (matplotlib PNG).

Per grid and metric: the curse curve (x = number of languages, High / Low / All, one panel per
value of the other axes: Figures 2 and 4), alpha (Figure 5), vocabulary (Figure 6), any other
varying axis as a categorical plot, a language x cell heatmap of the change against the grid's
first cell; the capacity figure of a grid over languages and width (Figure 4: one panel per group,
one line per width, x = number of languages: capacity_points is its data); learning curves per
language against tokens seen, one line per cell (valid bits per character from the trainer; each
evaluate_at metric). Error bars are 95% confidence intervals over seeds where there are several.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from xlmr_mp.plotting import pyplot, save_figure
from xlmr_mp.study.spec import Study
from xlmr_mp.study.stats import LOWER_IS_BETTER, aggregate, row_axes, seedless

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


def _natural(x) -> tuple:
    """Sort key that orders L7 before L15 and H64 before H96 (digit runs compared as numbers)."""
    import re
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", str(x)))


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
    """The trainer's validation bits per character per language against tokens seen, one line per
    cell (colour: its axis values, line style: its seed), from each cell's run/valid.jsonl."""
    points: Dict[tuple, Dict[str, list]] = {}
    for r in recs:
        av = next((av for g, av in [(r["grid"], r["axis_values"])] + [tuple(x) for x in r.get("aliases", [])]
                   if g == grid), r["axis_values"])
        key = tuple((a, av[a]) for a in study.axes if a in av and a != "seed")
        p = os.path.join(out, "cells", r["name"], "run", "valid.jsonl")
        per_token = int(r["shape"]["global_batch"]) * int(r["shape"]["seq_length"])
        for line in open(p) if os.path.exists(p) else []:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            for k, v in e.items():
                if k.startswith("bpc_"):
                    points.setdefault((key, str(av.get("seed", r["seed"]))), {}).setdefault(k[4:], []).append(
                        (int(e["step"]) * per_token, float(v)))
    for by_lang in points.values():
        for l in by_lang:
            by_lang[l].sort()
    return _facets(grid, points, "valid bits/char", f"{grid}: validation bits per character against tokens seen, "
                   "one line per cell", os.path.join(fig_dir, f"{grid}_learning_curves.png"))


def metric_curves(grid: str, metric: str, points: Dict[tuple, Dict[str, list]], fig_dir: str) -> List[str]:
    """Learning curves of an evaluated metric (evaluate_at): per language, the metric against tokens
    seen, one line per cell (colour: the cell's axis values, line style: its seed); [] without points."""
    return _facets(grid, points, metric, f"{grid}: {metric} against tokens seen (evaluate_at checkpoints), "
                   "one line per cell", os.path.join(fig_dir, f"{grid}_curve_{metric}.png"), marker="o")


def _facets(grid: str, points: Dict[tuple, Dict[str, list]], ylabel: str, title: str, path: str,
            marker: str = "") -> List[str]:
    """One panel per language, one line per (cell key, seed) of `points` {(key, seed): {lang: [(x, y)]}},
    the legend in its own panel after the last language; [] without points or matplotlib."""
    plt = _plt() if points else None
    if plt is None:
        return []
    keys = sorted({k for k, _ in points}, key=_natural)
    var = _varying({k: None for k in keys})
    seeds = sorted({sd for _, sd in points}, key=_natural)
    styles = ["-", "--", ":", "-."]
    colours = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    langs = sorted({l for d in points.values() for l in d})
    cols = min(4, len(langs) + 1)
    rows = (len(langs) + 1 + cols - 1) // cols
    fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    handles: Dict[str, object] = {}
    for ax, l in zip(axs.flat, langs):
        for (k, sd), by_lang in sorted(points.items(), key=lambda kv: (_natural(kv[0][0]), _natural(kv[0][1]))):
            if l not in by_lang:
                continue
            xs, ys = zip(*by_lang[l])
            label = f"{_label(k, var)} seed {sd}" if len(seeds) > 1 else _label(k, var)
            (h,) = ax.plot(xs, ys, marker=marker or None, ms=3, lw=1, color=colours[k],
                           ls=styles[seeds.index(sd) % len(styles)])
            handles.setdefault(label, h)
        ax.set_title(l, fontsize=9)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x / 1e6:g}"))
        ax.set_xlabel("tokens seen (millions)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    rest = list(axs.flat)[len(langs):]
    for ax in rest:
        ax.axis("off")
    rest[0].legend(list(handles.values()), list(handles), loc="center", fontsize=7, title="cell", title_fontsize=8,
                   ncol=1 if len(handles) <= 14 else 2, frameon=False)
    fig.suptitle(f"{title}\n(corpus: much of it translated news)", fontsize=10)
    return [save_figure(fig, path, dpi=100)]


def capacity_points(rows: List[dict], grid: str, metric: str, line_axis: str = "width") -> Dict[str, Dict[str, list]]:
    """The capacity figure's data: line value (e.g. H64) -> group (High, Low, All) -> [(number of
    languages, mean, 95% half-width, seeds)] by number of languages; the mean and interval are
    stats.aggregate's (a group's value per seed, then the interval over seeds)."""
    n_of = {seedless(row_axes(r)): int(r["n_languages"]) for r in rows if r["grid"] == grid}
    out: Dict[str, Dict[str, list]] = {}
    for k, d in aggregate(rows, grid, metric).items():
        for g in LINES:
            if g in d:
                out.setdefault(dict(k).get(line_axis, ""), {}).setdefault(g, []).append((n_of[k],) + tuple(d[g]))
    for by_g in out.values():
        for g in by_g:
            by_g[g].sort()
    return out


def capacity_figure(grid: str, metric: str, points: Dict[str, Dict[str, list]], out_path: str) -> List[str]:
    """Figure 4's form: one panel per group (High, Low, All), x = number of languages, one line per
    width, error bars = 95% CI over seeds; [] without points or matplotlib."""
    plt = _plt() if points else None
    if plt is None:
        return []
    fig, axs = plt.subplots(1, len(LINES), figsize=(12.0, 3.8), squeeze=False)
    lines = sorted(points, key=_natural)
    xs_all = sorted({p[0] for by_g in points.values() for ps in by_g.values() for p in ps})
    for ax, g in zip(axs[0], LINES):
        for i, line in enumerate(lines):
            ps = points[line].get(g, [])
            if not ps:
                continue
            shift = 1.0 + 0.02 * (i - (len(lines) - 1) / 2)           # side by side: bars do not hide each other
            _errorbar(ax, [p[0] * shift for p in ps], [(p[1], p[2]) for p in ps], line)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(xs_all) / 1.3, max(xs_all) * 1.3)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.minorticks_off()
        ax.set_xlabel("number of languages")
        ax.set_title(g, fontsize=10)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    axs[0][-1].legend(fontsize=8, title="width", title_fontsize=8)
    n = sorted({p[3] for by_g in points.values() for ps in by_g.values() for p in ps})
    fig.suptitle(f"Capacity against languages (Figure 4 analogue), grid {grid}: {metric}, mean and 95% CI over "
                 f"{'/'.join(map(str, n))} seed(s)\n(tiny models on mostly translated news: trends, not magnitudes)",
                 fontsize=9)
    return [save_figure(fig, out_path)]
