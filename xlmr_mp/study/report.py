"""Study report: results.csv, the paper's figures (figures.py) and report.md with run cards.

results.csv: one row per (grid membership of a) finished cell x language x metric, with every
axis value as a column and the seed; values printed with repr, so a cell trained twice from
scratch gives the same bytes. Metrics: `valid_bpc` (the trainer's held-out bits per character of
the masked pieces at the last step; its validation split is the same documents for every
tokenizer) and each evaluated task's headline metric (tools/evaluate.py --out JSON).
Each row has the step and tokens seen of its checkpoint: with evaluate_at, mbpc and retrieval rows
of the earlier checkpoints too (learning curves); tables and group figures use each cell's last step.
Groups (../shared/STUDY.md): High = en fr, Low = sw ur, All = en fr de ru zh sw ur; mean and 95%
confidence interval (Student t) over seeds (stats.py). The time split per cell (timing.py) is in
report.md only, with training's share of each cell's CPU seconds.
report.md also holds, for a study registered in expectations.py, the expectation table (its verdict
rule is that module's docstring); per grid over languages x width the capacity figure (Figure 4);
per grid the learning curves against tokens seen; for a fixed_params grid the solver's shapes.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

from xlmr_mp.study.expectations import REGISTERED, section as expectations_section
from xlmr_mp.study.runner import cell_dir, cell_state, read_json
from xlmr_mp.study.spec import Study
from xlmr_mp.study.stats import (GROUPS, LOWER_IS_BETTER, aggregate, ci95, group_value,  # noqa: F401 (re-exported)
                                  row_axes)

CAVEATS = """\
- Corpus: ../shared/corpus, 129 languages of 0.2-5 MB each (about 26M tokens with a 16k vocabulary;
  sw and ur about 0.2M tokens, en about 1.7M). The imbalance is 10-20x, against about 190x for
  en/sw in the paper's CC-100: effects that depend on scarcity are weaker here.
- Much of the text is translations of the same news (NTREX, TICO-19): cross-lingual transfer and
  retrieval look better than on independent text. Every figure is subject to this.
- Models are tiny (4 layers, width 64-168, 0.5-3M parameters) and trained for a few million tokens:
  the paper's ablations use BERT-Base with a 150k vocabulary. Trends, not magnitudes, are compared.
- mBPC and valid_bpc are tokenizer-independent (bits per character), so they compare vocabularies;
  SIB-200 differences under 3 points are noise (204 test rows a language).
"""


def _memberships(rec: dict) -> List[tuple]:
    return [(rec["grid"], rec["axis_values"])] + [(g, av) for g, av in rec.get("aliases", [])]


def cell_metrics(out: str, rec: dict) -> List[tuple]:
    """(language, metric, value, step) of one finished cell."""
    d = cell_dir(out, rec["name"])
    rows = []
    last = None
    p = os.path.join(d, "run", "valid.jsonl")
    if os.path.exists(p):
        for line in open(p):
            try:
                last = json.loads(line)
            except ValueError:
                pass
    if last:
        for l in rec["languages"]:
            if f"bpc_{l}" in last:
                rows.append((l, "valid_bpc", float(last[f"bpc_{l}"]), int(last["step"])))
    for ev in (os.path.join(d, "eval", "curve"), os.path.join(d, "eval")):     # curve points, then the last
        for name in sorted(os.listdir(ev)) if os.path.isdir(ev) else []:
            if not name.endswith(".json") or ".partial" in name:
                continue
            j = read_json(os.path.join(ev, name))
            if not isinstance(j, dict):
                continue
            task = j.get("task") or name[:-5].split("-step")[0]
            for l, v in sorted((j.get("languages") or {}).items()):
                if isinstance(v, (int, float)) and v == v:
                    rows.append((l, task, float(v), int(j.get("step") or rec["steps"])))
    return rows


def tokens_at(rec: dict, step: int) -> int:
    """Tokens seen by a cell at `step` (global batch x sequence length per step)."""
    return int(step) * int(rec["shape"]["global_batch"]) * int(rec["shape"]["seq_length"])


def collect(study: Study, out: str) -> tuple:
    """(rows of results.csv as dicts, cell records of the finished cells, states)."""
    rows, recs, states = [], [], {}
    axes = list(study.axes)
    for c in study.cells:
        states[c.name] = cell_state(out, c)
        if states[c.name] != "done":
            continue
        rec = read_json(os.path.join(cell_dir(out, c.name), "cell.json"))
        if rec is None:
            continue
        recs.append(rec)
        metrics = cell_metrics(out, rec)
        for grid, av in _memberships(rec):
            for lang, metric, value, step in metrics:
                r = {"study": study.name, "grid": grid, "cell": rec["name"]}
                r.update({a: av.get(a, "") for a in axes})
                r.update({"seed": rec["seed"], "n_languages": len(rec["languages"]), "language": lang,
                          "metric": metric, "value": repr(value), "step": step, "tokens": tokens_at(rec, step)})
                rows.append(r)
    return rows, recs, states


def failure_reason(out: str, name: str) -> str:
    """One line of why a failed cell stopped: its stage and the first 'error:' line of its record
    (else the record's first line)."""
    rec = read_json(os.path.join(cell_dir(out, name), "failed.json")) or {}
    why = str(rec.get("why") or "")
    lines = [l.strip() for l in why.splitlines() if l.strip()]
    err = next((l for l in lines if l.startswith("error:")), lines[0] if lines else "no reason recorded")
    return f"{rec.get('stage', '?')}: {err}"


def unfinished_section(study: Study, out: str, states: Dict[str, str]) -> List[str]:
    """report.md's list of the spec's cells that have not finished: state, and for a failed cell the
    reason from its failed.json (e.g. a vocabulary its language's text cannot support)."""
    rest = [c.name for c in study.cells if states.get(c.name) != "done"]
    if not rest:
        return []
    md = ["## Cells not finished", "", "| cell | state | reason |", "|---|---|---|"]
    for n in rest:
        reason = failure_reason(out, n) if states[n] == "failed" else ""
        md.append(f"| {n} | {states[n]} | {reason.replace('|', '/')} |")
    return md + [""]


def write_csv(rows: List[dict], path: str, axes: List[str]) -> None:
    cols = ["study", "grid", "cell"] + [a for a in axes if a != "seed"] + ["seed", "n_languages", "language",
                                                                           "metric", "value", "step", "tokens"]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def _fmt_ci(t: Optional[tuple]) -> str:
    if not t:
        return "-"
    m, h, n = t
    return f"{m:.4f}" + (f" ± {h:.4f}" if h == h else "") + (f" (n={n})" if n > 1 else "")


def write_report(study: Study, out: str) -> List[str]:
    """results.csv, figures/*.png, report.md under `out`; returns their paths."""
    from xlmr_mp.study import figures as F
    rows, recs, states = collect(study, out)
    axes = list(study.axes)
    csv_path = os.path.join(out, "results.csv")
    write_csv(rows, csv_path, axes)
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    paths = [csv_path]
    md = [f"# Study {study.name}", "", study.description.strip(), "",
          f"Spec `{os.path.relpath(study.path, os.getcwd()) if study.path.startswith(os.getcwd()) else study.path}`; "
          f"corpus `{study.corpus}`; evaluation: {', '.join(study.evaluate) or 'none (valid_bpc only)'}.", "",
          f"Cells: {sum(1 for s in states.values() if s == 'done')} of {len(states)} finished "
          f"({', '.join(f'{n} {s}' for s, n in sorted(_count(states).items()))}). Only finished cells are reported.", "",
          "## Corpus caveats", "", CAVEATS]
    md += unfinished_section(study, out, states)
    reg = REGISTERED.get(study.name)
    if reg:
        md += expectations_section(list(reg.rules), rows, memberships(study))
    metrics = sorted({r["metric"] for r in rows}, key=lambda m: (m != "mbpc", m != "valid_bpc", m))

    def link(ps):
        paths.extend(ps)
        return [line for p in ps for line in (f"![{os.path.basename(p)}](figures/{os.path.basename(p)})", "")]
    for grid in study.grids:
        g_recs = [r for r in recs if any(g == grid for g, _ in _memberships(r))]
        md += [f"## Grid {grid}", ""]
        md += fixed_params_note(study, grid, reg.listed_widths.get(grid) if reg else None)
        if not g_recs:
            md += ["No finished cell.", ""]
            continue
        md += run_card(g_recs, grid)
        if varying_axes(study, grid) == {"languages", "width"}:
            md += ["### Capacity against languages (Figure 4 analogue)", "",
                   "High, Low and All against the number of languages, one line per width, error bars the 95% CI "
                   "over seeds (figures/<grid>_capacity_<metric>.png). Figure 4 of the paper asks whether more "
                   "capacity relieves the curse of multilinguality: here, whether the wider model's line rises "
                   "less with languages (expectations A.2 and H.6). Tiny models on mostly translated text: trends, "
                   "not magnitudes; nothing here is a GPU-scale claim.", ""]
            for metric in metrics:
                md += link(F.capacity_figure(grid, metric, F.capacity_points(rows, grid, metric),
                                             os.path.join(fig_dir, f"{grid}_capacity_{metric}.png")))
        curves = F.learning_curves(study, out, grid, g_recs, fig_dir)
        for metric in metrics:
            curves += F.metric_curves(grid, metric, curve_points(rows, grid, metric, g_recs), fig_dir)
        if curves:
            md += ["### Learning curves", "", "Per language, the metric against tokens seen, one line per cell "
                   "(colour: the cell's axis values, line style: its seed): the trainer's validation bits per "
                   "character at each validation step, and each evaluate_at metric on the kept checkpoints.", ""]
            md += link(curves)
        for metric in metrics:
            agg = aggregate(rows, grid, metric)
            if not agg:
                continue
            md += [f"### {metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better), "
                   f"mean ± 95% CI over seeds", ""]
            md += link(F.grid_figures(study, grid, metric, agg, fig_dir))
            md += ["| cell | High | Low | All | " + " | ".join(sorted({l for d in agg.values() for l in d
                                                                     if l not in GROUPS})) + " |"]
            langs = sorted({l for d in agg.values() for l in d if l not in GROUPS})
            md.append("|" + "---|" * (4 + len(langs)))
            for k, d in agg.items():
                md.append(f"| {' '.join(v for _, v in k)} | {_fmt_ci(d.get('High'))} | {_fmt_ci(d.get('Low'))} | "
                          f"{_fmt_ci(d.get('All'))} | " + " | ".join(_fmt_ci(d.get(l)) for l in langs) + " |")
            md.append("")
    md += time_split(study, out)
    md_path = os.path.join(out, "report.md")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(md_path + ".tmp", md_path)
    paths.append(md_path)
    return paths


def memberships(study: Study) -> List[tuple]:
    """(grid, axis values) of every cell of the study, finished or not, aliases included."""
    return [(c.grid, c.axis_values) for c in study.cells] + [(g, av) for c in study.cells for g, av in c.aliases]


def varying_axes(study: Study, grid: str) -> set:
    """The axes (seed left out) that take more than one value among the grid's cells in the spec."""
    vals: Dict[str, set] = {}
    for g, av in memberships(study):
        if g == grid:
            for a, v in av.items():
                vals.setdefault(a, set()).add(v)
    return {a for a, vs in vals.items() if len(vs) > 1 and a != "seed"}


def fixed_params_note(study: Study, grid: str, listed: Optional[Dict[int, int]]) -> List[str]:
    """report.md lines for a grid sized by fixed_params: per vocabulary the width and FFN the spec's
    solver chose (plan.solve_width, as `plan` and `run` use it) and their parameters; with `listed`
    (the widths the design lists per vocabulary, FFN 4 x width) those too, and the deviation."""
    from xlmr_mp.config import load_config
    from xlmr_mp.study.plan import count_params, solve_width
    cells = [c for c in study.cells if c.grid == grid and c.fixed_params]
    if not cells:
        return []
    lines = ["| vocabulary | target parameters | the spec's solver: width / FFN, parameters |"
             + (" listed in STUDY.md: width / FFN, parameters |" if listed else ""),
             "|---|---|---|" + ("---|" if listed else "")]
    differ = []
    for c in sorted(cells, key=lambda c: c.vocab):
        m = load_config(study.base_config, c.run_overrides + [f"model.vocab_size={c.vocab + 2}"], validate=False).model
        h, f, p = solve_width(m, c.fixed_params)
        row = f"| {c.vocab} | {c.fixed_params:,.0f} | {h} / {f}, {p:,} |"
        if listed and c.vocab in listed:
            lh = listed[c.vocab]
            object.__setattr__(m, "hidden_size", lh)
            object.__setattr__(m, "ffn_size", 4 * lh)
            lp = sum(count_params(m))
            row += f" {lh} / {4 * lh}, {lp:,} |"
            if (lh, 4 * lh) != (h, f):
                differ.append(f"{c.vocab} ({lh} listed, {h} / {f} solved; {lp / 1e6:.2f}M against {p / 1e6:.2f}M)")
        lines.append(row)
    note = ["### Sizing at fixed parameters", "",
            f"`fixed_params` sizes each cell: the width whose parameter count is nearest the target, then the FFN "
            f"trimmed to land within a few hundred parameters of it (`plan.solve_width`).", ""] + lines + [""]
    if differ:
        note += [f"**Documented deviation from STUDY.md**: the design lists (vocabulary, width) pairs which, with "
                 f"the recipe's FFN of 4 x width (STUDY.md names none), are not at one parameter count; the cells "
                 f"are sized by the spec's solver instead (`fixed_params` {cells[0].fixed_params:,.0f}), which holds "
                 f"the count at {cells[0].fixed_params / 1e6:.1f}M, the design's stated intent (\"about 2.0M params "
                 f"fixed\"). Where the solver keeps the listed width it trims the FFN, so such a cell is not the "
                 f"shape of a fixed-shape cell of the same width. Vocabularies whose shape differs: "
                 + "; ".join(differ) + ".", ""]
    return note


def curve_points(rows: List[dict], grid: str, metric: str, recs: List[dict]) -> Dict[tuple, Dict[str, list]]:
    """(seed-less cell key, seed) -> {language: [(tokens, value)] by tokens}, for the cells of `grid`
    with more than one step of `metric` (evaluate_at); {} when none has."""
    by_cell: Dict[str, Dict[str, list]] = {}
    keys: Dict[str, tuple] = {}
    for r in rows:
        if r["grid"] != grid or r["metric"] != metric:
            continue
        by_cell.setdefault(r["cell"], {}).setdefault(r["language"], []).append((int(r["tokens"]), float(r["value"])))
        keys[r["cell"]] = (tuple(row_axes(r).items()), r["seed"])
    out = {}
    for cell, langs in by_cell.items():
        if any(len(v) > 1 for v in langs.values()):
            out[keys[cell]] = {l: sorted(v) for l, v in langs.items()}
    return out


def time_split(study: Study, out: str) -> List[str]:
    """report.md section: seconds and share of each phase per cell (from the runner's timing.json)."""
    from xlmr_mp.study.plan import _fmt_time
    from xlmr_mp.study.timing import largest, phases, read_timing, timing_table
    names = [c.name for c in study.cells if cell_state(out, c) == "done"]
    recs = [read_timing(cell_dir(out, n)) for n in names]
    if not any(recs):
        return []
    cols = phases(study.evaluate, any(c.evaluate_at for c in study.cells))
    lines = ["## Where a cell's time goes", "",
             "Wall seconds per phase and share of the cell's total, every sitting added (the runner's "
             "`cells/<name>/timing.json`). prepare = tokenizer and dataset: (built) by this cell, or (shared): "
             "made by another cell and waited for or reused; train = the trainer's process; one column per "
             "evaluation task on the last checkpoint" + ("; curve = mbpc and retrieval on the evaluate_at "
                                                         "checkpoints" if "curve" in cols else "") + ". "
             "Cells run two at a time on a shared machine: absolute times depend on its load, shares less so.", ""]
    lines += timing_table(names, recs, cols, _fmt_time)
    if any(r and "cpu" in r for r in recs):
        lines += ["", "CPU seconds (user + system) of each phase's processes, one thread a cell: what the phase "
                      "costs on a quiet machine, whatever the load while it ran (prepare: only what the cell "
                      "built itself).", ""]
        lines += timing_table(names, recs, cols, _fmt_time, key="cpu")
        big: Dict[str, int] = {}
        for r in recs:
            if r and "cpu" in r:
                k = largest(r, cols, "cpu")
                big[k] = big.get(k, 0) + 1
        n = sum(big.values())
        lines += ["", f"Largest phase by CPU seconds: " + ", ".join(f"{k} in {v} of {n} cells"
                                                               for k, v in sorted(big.items(), key=lambda kv: -kv[1])) + "."]
        lines += train_share(names, recs)
    builds = _builds(out)
    if builds:
        users: Dict[str, List[str]] = {}
        for n in names:
            rec = read_json(os.path.join(cell_dir(out, n), "cell.json")) or {}
            for k in (rec.get("tokenizer"), rec.get("dataset")):
                users.setdefault(k, []).append(n)
        lines += ["", "Shared preparation (prep/builds.jsonl): each artefact is built once and used by every cell "
                      "listed.", "", "| artefact | wall | CPU | used by |", "|---|---|---|---|"]
        for b in builds:
            u = users.get(b["key"], [])
            lines.append(f"| {b['kind']} {b['key']} | {_fmt_time(b['seconds'])} | "
                         f"{_fmt_time(b['cpu']) if 'cpu' in b else '-'} | {len(u)} finished cell(s)"
                         f"{': ' + ', '.join(u) if len(u) <= 6 else ''} |")
    return lines + [""]


def train_share(names: List[str], recs: List[Optional[dict]]) -> List[str]:
    """The summary line: training's share of each cell's CPU seconds (timing.shares), its range and median."""
    from xlmr_mp.study.timing import shares
    sh = [(n, shares(r, ["train"], "cpu")["train"]) for n, r in zip(names, recs) if r and "cpu" in r]
    if not sh:
        return []
    vals = sorted(v for _, v in sh)
    k = len(vals)
    med = vals[k // 2] if k % 2 else (vals[k // 2 - 1] + vals[k // 2]) / 2
    lo, hi = min(sh, key=lambda x: x[1]), max(sh, key=lambda x: x[1])
    return ["", f"Training's share of each cell's CPU seconds: {100 * lo[1]:.0f}% ({lo[0]}) to {100 * hi[1]:.0f}% "
                f"({hi[0]}), median {100 * med:.0f}% over {k} cell(s): "
                + ", ".join(f"{n} {100 * v:.0f}%" for n, v in sh) + "."]


def _builds(out: str) -> List[dict]:
    p = os.path.join(out, "prep", "builds.jsonl")
    rows = []
    for line in open(p) if os.path.exists(p) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _count(states: Dict[str, str]) -> Dict[str, int]:
    c: Dict[str, int] = {}
    for s in states.values():
        c[s] = c.get(s, 0) + 1
    return c


def run_card(recs: List[dict], grid: str) -> List[str]:
    """The run card table of a grid's finished cells."""
    lines = ["| cell | shape H/L/A/F/V | params embedding + rest | tokens | steps | epochs per language | "
             "tokenizer | budget | seed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        s = r["shape"]
        ep = ", ".join(f"{l} {r['epochs'][l]:.2f}" for l in r["languages"])
        b = r.get("budget") or {}
        budget = (f"{b.get('mode')} {b.get('tokens', b.get('characters', '')):g}"
                  f"{' chars' if 'characters' in b else ''}") if b else "config"
        lines.append(f"| {r['name']} | {s['hidden_size']}/{s['num_layers']}/{s['num_heads']}/{s['ffn_size']}/"
                     f"{s['vocab_size']} | {r['params_embedding']:,} + {r['params_rest']:,} | {r['tokens']:,} | "
                     f"{r['steps']} | {ep} | {r['tokenizer_mode']} ({len(r['tokenizer_languages'])} langs) | "
                     f"{budget} | {r['seed']} |")
    return lines + [""]
