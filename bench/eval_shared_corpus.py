"""Run every evaluation task available on ../shared/corpus/eval for one model and write one summary:
bench/results/eval_shared_corpus.{json,md,png}.

    python bench/eval_shared_corpus.py --model RUN/checkpoints --work WORKDIR [--languages en,fr,...]
        [--seeds 1,2,3] [--tasks mbpc,retrieval,sib200,udpos] [--set sib200:lr=3e-4 ...] [--note TEXT]

Each task is one `tools/evaluate.py` command (printed, and recorded in the .md) writing
WORKDIR/<task>.json (+ .png, predictions); the summary gathers them: mBPC and retrieval per language,
SIB-200 zero-shot accuracy against the majority class, UD POS accuracy against the majority tag,
groups High / Low / All. xnli and ner need data the shared corpus does not carry (listed as such).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from xlmr_mp.plotting import pyplot, save_figure

EVAL = os.path.normpath(os.path.join(ROOT, "..", "shared", "corpus", "eval"))
DATA = {"mbpc": "flores200_devtest", "retrieval": "flores200_devtest", "sib200": "sib200", "udpos": "ud"}
FINE_TUNING = ("sib200", "udpos")


def task_command(task, model, work, languages, seeds, settings):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), task, "--model", model,
           "--data", os.path.join(EVAL, DATA[task]), "--out", os.path.join(work, f"{task}.json"),
           "--predictions", os.path.join(work, f"{task}.predictions.jsonl"), "--no-progress"]
    if task != "udpos" and languages:
        cmd += ["--languages", ",".join(languages)]
    if task in FINE_TUNING:
        cmd += ["--seeds", seeds]
    return cmd + list(settings.get(task, []))


def summarise(reports: dict, commands: dict, note: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    summary = {"reports": reports, "commands": commands, "note": note}
    path = os.path.join(out_dir, "eval_shared_corpus.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    langs = []
    for r in reports.values():
        for l in r["languages"]:
            if l not in langs:
                langs.append(l)
    cols = []
    if "mbpc" in reports:
        cols.append(("mBPC", lambda l: reports["mbpc"]["languages"].get(l), "{:.3f}"))
    if "retrieval" in reports:
        cols.append(("retrieval %", lambda l: reports["retrieval"]["languages"].get(l), "{:.1f}"))
    for task, base in (("sib200", "majority"), ("udpos", "majority")):
        if task in reports:
            r = reports[task]
            cols.append((f"{task} %", lambda l, r=r: r["languages"].get(l), "{:.1f}"))
            if len(r.get("seeds") or {}) > 1:
                cols.append((f"± std", lambda l, r=r: r.get("std", {}).get(l), "{:.1f}"))
            cols.append((f"{task} {base}", lambda l, r=r, b=base: r["baselines"].get(b, {}).get(l), "{:.1f}"))

    def cell(v, fmt):
        return "" if v is None else fmt.format(v)
    lines = ["# Evaluation on ../shared/corpus/eval", "", note, "",
             "| lang | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for l in langs:
        lines.append(f"| {l} | " + " | ".join(cell(f(l), fmt) for _, f, fmt in cols) + " |")
    for g in ("High", "Low", "All", "mean"):
        row = []
        for name, f, fmt in cols:
            task = {"mBPC": "mbpc", "retrieval %": "retrieval"}.get(name) or name.split()[0]
            r = reports.get(task)
            if r is None or name == "± std":
                row.append("")
            elif name.endswith("majority"):
                row.append(cell(r["baseline_groups"].get("majority", {}).get(g), fmt))
            else:
                row.append(cell(r["groups"].get(g), fmt))
        lines.append(f"| **{g}** | " + " | ".join(row) + " |")
    lines += ["", "High = en fr, Low = sw ur, All = en fr de ru zh sw ur (those present); mean = every language "
              "evaluated. mBPC: lower is better; the rest: higher is better.", ""]
    for task, r in reports.items():
        lines.append(f"- **{task}**: {r['metric']}, {r['seconds']:.0f} s, settings `{json.dumps(r['config']['task'], default=str)[:400]}`")
    lines += ["", "## Commands", "", "```bash"] + [" ".join(shlex.quote(c) for c in cmd) for cmd in commands.values()] + ["```", ""]
    with open(os.path.join(out_dir, "eval_shared_corpus.md") + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(os.path.join(out_dir, "eval_shared_corpus.md") + ".tmp", os.path.join(out_dir, "eval_shared_corpus.md"))
    plot(reports, os.path.join(out_dir, "eval_shared_corpus.png"))


def plot(reports: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    tasks = list(reports)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 2.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        r = reports[task]
        langs = list(r["languages"])
        xs = range(len(langs))
        std = [r.get("std", {}).get(l, 0.0) for l in langs]
        ax.bar(xs, [r["languages"][l] for l in langs], yerr=std if any(std) else None, color="#4c72b0", capsize=2,
               label=r["metric"])
        for (name, per), marker in zip(r["baselines"].items(), "_x+"):
            ax.scatter([x for x, l in zip(xs, langs) if l in per], [per[l] for l in langs if l in per], marker=marker,
                       s=140, color="#c44e52", zorder=3, label=name)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(langs, fontsize=8)
        ax.set_ylabel(task)
        ax.set_title(f"{task}: {r['metric']} ({'higher' if r['higher_is_better'] else 'lower'} is better)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="directory for the per-task JSON, plots and predictions")
    p.add_argument("--languages", default="en,fr,de,ru,zh,sw,ur,ar,hi,ko,th,tr,ja,es")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--tasks", default="mbpc,retrieval,sib200,udpos")
    p.add_argument("--set", action="append", default=[], help="TASK:key=value (repeatable)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--note", default="")
    p.add_argument("--summarise-only", action="store_true", help="rebuild the summary from WORK/<task>.json")
    a = p.parse_args(argv)
    if not os.path.isdir(EVAL):
        print(f"error: {EVAL} not found (the shared corpus is not beside the checkout)", file=sys.stderr)
        return 2
    os.makedirs(a.work, exist_ok=True)
    langs = [l for l in a.languages.split(",") if l]
    settings = {}
    for kv in a.set:
        task, _, rest = kv.partition(":")
        settings.setdefault(task, []).append(rest)
    reports, commands = {}, {}
    for task in a.tasks.split(","):
        cmd = task_command(task, a.model, a.work, langs, a.seeds, settings)
        commands[task] = ["python"] + [c.replace(ROOT + os.sep, "") for c in cmd[1:]]
        out = os.path.join(a.work, f"{task}.json")
        if not a.summarise_only:
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT)
            print(f"[{task}] exit {r.returncode} after {time.time() - t0:.0f} s", flush=True)
        if os.path.isfile(out):
            with open(out) as f:
                reports[task] = json.load(f)
            if reports[task].get("command"):        # the command that wrote it, as evaluate.py recorded it
                commands[task] = ["python"] + reports[task]["command"]
    for task in ("xnli", "ner"):
        print(f"[{task}] not run: ../shared/corpus/eval has no {task} data")
    summarise(reports, commands, a.note, a.out_dir)
    print(f"wrote {a.out_dir}/eval_shared_corpus.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
