"""What `tools/evaluate.py` makes of a TaskResult: the --out JSON, the --predictions JSONL, the
per-language table on stdout and the bar plot PNG beside the JSON.

JSON fields: task, metric, higher_is_better, languages {lang: value}, groups {High, Low, All, mean}
(High = mean of en, fr; Low = sw, ur; All = en fr de ru zh sw ur; each over the members present, null
when none is; mean = every language evaluated), std, seeds {seed: {lang: value}}, baselines
{name: {lang: value}}, baseline_groups, extra, model {source, kind, tokenizer}, step, config
{task: settings, model: shape, run: training config}, seconds, command.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from xlmr_mp.atomic import atomic_write
from xlmr_mp.plotting import pyplot, save_figure
from xlmr_mp.eval.api import EvalModel, EvalOptions, TaskResult

GROUPS = {"High": ("en", "fr"), "Low": ("sw", "ur"), "All": ("en", "fr", "de", "ru", "zh", "sw", "ur")}


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def group_means(per_lang: Dict[str, float]) -> Dict[str, Optional[float]]:
    """High / Low / All over the members present, and the mean over every language."""
    out = {name: _mean([per_lang[l] for l in members if l in per_lang]) for name, members in GROUPS.items()}
    out["mean"] = _mean(list(per_lang.values()))
    return out


def build_report(result: TaskResult, em: EvalModel, opts: EvalOptions, seconds: float,
                 command: Optional[List[str]] = None) -> dict:
    """The --out JSON document of one evaluation."""
    tok = getattr(em.tokenizer, "model_path", None)
    return {
        "task": result.task, "metric": result.metric, "higher_is_better": result.higher_is_better,
        "languages": dict(result.languages), "groups": group_means(result.languages),
        "std": dict(result.std), "seeds": {str(k): dict(v) for k, v in result.seeds.items()},
        "baselines": {k: dict(v) for k, v in result.baselines.items()},
        "baseline_groups": {k: group_means(v) for k, v in result.baselines.items()},
        "extra": result.extra,
        "model": {"source": em.source, "kind": em.kind, "tokenizer": tok, "step_dir": em.step_dir},
        "step": em.step,
        "config": {"task": result.config, "data": opts.data, "languages": opts.languages,
                   "train_language": opts.train_language, "seeds": opts.seeds, "model": em.config,
                   "run": em.run_config},
        "seconds": round(float(seconds), 3),
        "command": list(command) if command else None,
    }


def _atomic_text(path: str, text: str) -> None:
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, report: dict) -> None:
    """The report at `path` (temporary name, renamed when complete)."""
    _atomic_text(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def write_predictions(path: str, predictions: Sequence[dict]) -> None:
    """One JSON object per line (lang, id, pred, gold, ...), written under a temporary name first."""
    _atomic_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def format_table(report: dict) -> str:
    """Per-language table: value (± std over seeds), every baseline; then the groups."""
    langs = list(report["languages"])
    bases = list(report["baselines"])
    std = report.get("std") or {}
    head = ["lang", report["metric"]] + (["std"] if std else []) + bases
    rows = []
    for l in langs:
        rows.append([l, _fmt(report["languages"][l])] + ([_fmt(std.get(l))] if std else [])
                    + [_fmt(report["baselines"][b].get(l)) for b in bases])
    rows.append(["-" * 4] + [""] * (len(head) - 1))
    for g, v in report["groups"].items():
        rows.append([g, _fmt(v)] + ([""] if std else []) + [_fmt(report["baseline_groups"][b].get(g)) for b in bases])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    better = "higher" if report["higher_is_better"] else "lower"
    title = f"{report['task']}: {report['metric']} ({better} is better), model {report['model']['source']}" + \
            (f" step {report['step']}" if report.get("step") is not None else "") + f", {report['seconds']:.1f} s"
    return "\n".join([title] + lines)


def plot_path_for(json_path: str) -> str:
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    return base + ".png"


def write_plot(path: str, report: dict) -> Optional[str]:
    """Bar per language (error bars: std over seeds), a marker per baseline; PNG, atomic. Returns
    the path, or None when matplotlib is missing (plotting.pyplot notes it once)."""
    plt = pyplot()
    if plt is None:
        return None
    langs = list(report["languages"])
    vals = [report["languages"][l] for l in langs]
    std = [report.get("std", {}).get(l, 0.0) for l in langs]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(langs) + 1.5), 3.6))
    xs = list(range(len(langs)))
    ax.bar(xs, vals, yerr=std if any(std) else None, color="#4c72b0", capsize=2, label=report["metric"])
    for (name, per), marker in zip(report["baselines"].items(), "_x+.*"):
        ax.scatter([x for x, l in zip(xs, langs) if l in per], [per[l] for l in langs if l in per],
                   marker=marker, s=120, color="#c44e52" if marker == "_" else "#555555", zorder=3, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(langs, rotation=90 if len(langs) > 20 else 0, fontsize=8 if len(langs) > 20 else 10)
    ax.set_ylabel(report["metric"] + (" (higher is better)" if report["higher_is_better"] else " (lower is better)"))
    step = f" step {report['step']}" if report.get("step") is not None else ""
    ax.set_title(f"{report['task']}: {os.path.basename(str(report['model']['source']).rstrip('/'))}{step}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
