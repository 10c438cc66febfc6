"""Schedule study: training runs and decay branches from one spec, each scored by FLORES-200 mBPC.

    xlmr-schedule-study --out DIR [--study launch/studies/schedules.yaml] [--dry-run]
                                   [--corpus ../shared/corpus] [--eval-data CORPUS/eval]
                                   [--results bench/results/schedule_study]

The spec (format documented at the top of launch/studies/schedules.yaml):
    name, description, corpus, eval_data, preset (or base_config), languages (joining order), high_resource,
    vocab, spm_alpha, overrides (every run's key=value), runs: [{name, label, overrides, parent, branch_at}]
Runs are trained in list order; a run is trained from scratch or is a branch (`parent`, `branch_at`)
started from its parent's checkpoint at step branch_at (`checkpoint.branch_from`) with the parent's
overrides and then its own. The tool sets data.path, data.tokenizer, data.languages, run_dir and
checkpoint.branch_from (a spec may not, nor checkpoint.dir). The shipped
spec: `static` (alpha 0.3), `annealed` (alpha 0.7 -> 0.5 -> 0.3, languages 6 -> 8 -> 10, mask 0.3 ->
0.15 -> 0.05, batch warmup; its own decay phase is the first decay branch, "decay_all"), and the
branches `decay_high` (the 5 highest-resource languages) and `decay_flat` (alpha 0.01) at step 480.

The spec is validated before anything runs (unknown keys, run-config keys and values, a branch whose
parent is missing or runs later, a branch_at that is not a checkpoint step the parent keeps): a
`spec error` naming the file, the key and the fix, exit 2. Then: one SentencePiece model and one
dataset under DIR/prep/ (skipped when there), each run's `python -m xlmr_mp.train` (log DIR/<name>.log),
each run's `xlmr-evaluate mbpc` on its final checkpoint (skipped when DIR/<name>/mbpc.json exists),
and results.csv, results.json and a bar plot mbpc.png in --results (each written under a temporary
name, then renamed). --dry-run prints every command (prepare, train, evaluate) and runs nothing.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from xlmr_mp.atomic import atomic_write
from xlmr_mp.cli import source_root
from xlmr_mp.plotting import pyplot, save_figure
from xlmr_mp.study.spec import SpecError, base_config_path, check_keys, run_config_key_error

ROOT = source_root()       # the checkout: relative paths in a spec are relative to it

DEFAULT_SPEC = os.path.join(ROOT, "launch", "studies", "schedules.yaml")
TOP_KEYS = ("name", "description", "corpus", "eval_data", "base_config", "preset", "languages", "high_resource",
            "vocab", "spm_alpha", "overrides", "runs")
REQUIRED = ("name", "corpus", "eval_data", "languages", "vocab", "runs")
RUN_KEYS = ("name", "label", "overrides", "parent", "branch_at")
TOOL_KEYS = ("data.path", "data.tokenizer", "data.languages", "run_dir", "checkpoint.branch_from",
             "checkpoint.dir")             # set by this tool (or left at the default it relies on)


@dataclass
class Run:
    name: str
    label: str
    overrides: List[str]                   # this run's own key=value, applied last
    parent: Optional[str] = None
    branch_at: Optional[int] = None


@dataclass
class ScheduleStudy:
    path: str
    name: str
    corpus: str
    eval_data: str
    base_config: str
    languages: List[str]
    high_resource: List[str]
    vocab: int
    spm_alpha: float
    overrides: List[str]
    runs: List[Run]
    description: str = ""
    steps: Dict[str, int] = field(default_factory=dict)          # run -> train.train_steps (resolved)


def log(msg: str) -> None:
    print(f"[schedule_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the spec

def _override_text(v: Any) -> str:
    """A YAML value as the text of a key=value override (flow style, keys in the spec's order)."""
    if isinstance(v, (list, dict)):
        class NoAliases(yaml.SafeDumper):
            def ignore_aliases(self, data):
                return True
        return yaml.dump(v, Dumper=NoAliases, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return str(v)


def _overrides(raw: Any, path: str, where: str) -> List[str]:
    """key=value strings from a list of them or a mapping key: value; every key a run-config field the
    spec may set."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        items = [(str(k), _override_text(v)) for k, v in raw.items()]
    elif isinstance(raw, list) and all(isinstance(o, str) and "=" in o for o in raw):
        items = [tuple(o.split("=", 1)) for o in raw]
    else:
        raise SpecError(f"{path}: {where} must be a list of key=value strings or a mapping key: value")
    for k, _ in items:
        if k.strip() in TOOL_KEYS:
            raise SpecError(f"{path}: {where}: {k.strip()} is set by xlmr-schedule-study (from languages, "
                            f"--out and parent/branch_at); remove it from the spec")
        err = run_config_key_error(k.strip())
        if err:
            raise SpecError(f"{path}: {where}: unknown key {k.strip()!r}: {err}")
    return [f"{k}={v}" for k, v in items]


def _path(value: Any, path: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}: {key} must be a path (relative ones are relative to the repository root)")
    return os.path.normpath(os.path.join(ROOT, value))


def _languages(value: Any, path: str, key: str) -> List[str]:
    if not isinstance(value, list) or not value or not all(isinstance(l, str) and l for l in value):
        raise SpecError(f"{path}: {key} must be a non-empty list of language codes, e.g. [en, fr, sw]")
    if len(set(value)) != len(value):
        raise SpecError(f"{path}: {key} lists a language twice: {value}")
    return list(value)


def checkpoint_steps(cfg, start: int = 0) -> List[int]:
    """The checkpoint steps a run of `cfg` (started at step `start`) keeps once it is complete."""
    n, every = cfg.train.train_steps, cfg.checkpoint.interval
    steps = [s for s in range(every, n, every) if s > start] if every else []
    steps.append(n)
    return steps[-cfg.checkpoint.keep_last:]


def load_study(path: str, corpus: Optional[str] = None, eval_data: Optional[str] = None) -> ScheduleStudy:
    """Read and validate a schedule-study spec, down to each run's resolved run config and every
    branch point (SpecError naming the file, the key and the fix)."""
    from xlmr_mp.config import ConfigError, load_config, read_yaml
    raw = read_yaml(path, SpecError, "study spec", "shipped: launch/studies/schedules.yaml")
    check_keys(raw, TOP_KEYS, "top level", path)
    for k in REQUIRED:
        if k not in raw:
            raise SpecError(f"{path}: missing key {k!r} (see the format at the top of launch/studies/schedules.yaml)")
    langs = _languages(raw["languages"], path, "languages")
    high = _languages(raw.get("high_resource", langs), path, "high_resource")
    if any(l not in langs for l in high):
        raise SpecError(f"{path}: high_resource {[l for l in high if l not in langs]} are not in languages; "
                        f"add them to languages or drop them")
    vocab = raw["vocab"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 16:
        raise SpecError(f"{path}: vocab={vocab!r} must be an integer number of SentencePiece pieces, e.g. 8000")
    spm_alpha = raw.get("spm_alpha", 0.3)
    if isinstance(spm_alpha, bool) or not isinstance(spm_alpha, (int, float)) or not 0 < spm_alpha <= 1:
        raise SpecError(f"{path}: spm_alpha={spm_alpha!r} must be in (0, 1]")
    base_config = base_config_path(raw, path)
    study = ScheduleStudy(
        path=path, name=str(raw["name"]), description=str(raw.get("description", "")),
        corpus=os.path.abspath(corpus) if corpus else _path(raw["corpus"], path, "corpus"),
        eval_data=os.path.abspath(eval_data) if eval_data else _path(raw["eval_data"], path, "eval_data"),
        base_config=base_config, languages=langs, high_resource=high, vocab=vocab, spm_alpha=float(spm_alpha),
        overrides=_overrides(raw.get("overrides"), path, "overrides"), runs=[])
    if not isinstance(raw["runs"], list) or not raw["runs"]:
        raise SpecError(f"{path}: runs must be a non-empty list of runs (each with at least a name)")
    order = {}
    for i, r in enumerate(raw["runs"]):
        where = f"runs[{i}]"
        check_keys(r, RUN_KEYS, where, path)
        name = r.get("name")
        if not isinstance(name, str) or not name or any(not (c.isalnum() or c in "._-") for c in name):
            raise SpecError(f"{path}: {where}.name={name!r} must be a directory name (letters, digits, . _ -)")
        if name in order:
            raise SpecError(f"{path}: {where}.name={name!r} is also runs[{order[name]}]'s name; names must be unique")
        order[name] = i
        where = f"runs[{i}] ({name})"
        if ("parent" in r) != ("branch_at" in r):
            raise SpecError(f"{path}: {where}: a branch needs both parent and branch_at (it has only "
                            f"{'parent' if 'parent' in r else 'branch_at'}); give both, or neither for a run from scratch")
        run = Run(name=name, label=str(r.get("label", name)),
                  overrides=_overrides(r.get("overrides"), path, f"{where}.overrides"))
        if "parent" in r:
            parent, at = r["parent"], r["branch_at"]
            names = [x.get("name") for x in raw["runs"] if isinstance(x, dict)]
            if parent not in names:
                raise SpecError(f"{path}: {where}.parent={parent!r} is not a run of this spec (runs: "
                                f"{', '.join(map(str, names))}); name an earlier run")
            if parent == name:
                raise SpecError(f"{path}: {where}.parent={parent!r} is the run itself; name an earlier run")
            if parent not in order:
                raise SpecError(f"{path}: {where}.parent={parent!r} runs later (runs[{names.index(parent)}]); a "
                                f"branch needs its parent's checkpoint: move {name} after {parent}")
            if isinstance(at, bool) or not isinstance(at, int):
                raise SpecError(f"{path}: {where}.branch_at={at!r} must be an integer step")
            run.parent, run.branch_at = parent, at
        study.runs.append(run)
    by_name = {r.name: r for r in study.runs}
    for i, run in enumerate(study.runs):
        where = f"runs[{i}] ({run.name})"
        try:
            cfg = load_config(base_config, train_command(study, run, "OUT")[5:])
        except ConfigError as e:
            raise SpecError(f"{path}: {where}: {e} (in the overrides of {run.name} or those it inherits)") from None
        study.steps[run.name] = cfg.train.train_steps
        if run.parent:
            parent = by_name[run.parent]
            pcfg = load_config(base_config, train_command(study, parent, "OUT")[5:])
            kept = checkpoint_steps(pcfg, parent.branch_at or 0)
            if run.branch_at not in kept:
                raise SpecError(
                    f"{path}: {where}.branch_at={run.branch_at} is not a checkpoint step {run.parent} keeps (it keeps "
                    f"{', '.join(map(str, kept))}: checkpoint.interval={pcfg.checkpoint.interval}, train.train_steps="
                    f"{pcfg.train.train_steps}, checkpoint.keep_last={pcfg.checkpoint.keep_last}); set branch_at to "
                    f"one of them or change {run.parent}'s checkpoint.interval")
            if run.branch_at >= cfg.train.train_steps:
                raise SpecError(f"{path}: {where}.branch_at={run.branch_at} leaves nothing to train (its "
                                f"train.train_steps={cfg.train.train_steps}); branch earlier or train longer")
    return study


# ----------------------------------------------------------------------------- commands

def inherited(study: ScheduleStudy, run: Run) -> List[str]:
    """The overrides a branch takes from its ancestors (oldest first); none for a run from scratch."""
    if not run.parent:
        return []
    parent = next(r for r in study.runs if r.name == run.parent)
    return inherited(study, parent) + parent.overrides


def prep_paths(out: str) -> tuple:
    prep = os.path.join(out, "prep")
    return prep, os.path.join(prep, "spm"), os.path.join(prep, "data")


def checkpoint_dir(out: str, run_name: str, step: Optional[int] = None) -> str:
    d = os.path.join(out, run_name, "checkpoints")
    return d if step is None else os.path.join(d, f"step_{step:08d}")


def train_command(study: ScheduleStudy, run: Run, out: str) -> List[str]:
    """The command line of one run's training (python -m xlmr_mp.train --config ... key=value ...)."""
    _, spm, data = prep_paths(out)
    mine = [f"run_dir={os.path.join(out, run.name)}"]
    if run.parent:
        mine.append(f"checkpoint.branch_from={checkpoint_dir(out, run.parent, run.branch_at)}")
    return [sys.executable, "-m", "xlmr_mp.train", "--config", study.base_config,
            f"data.path={data}", f"data.tokenizer={spm}.model", f"data.languages=[{','.join(study.languages)}]",
            *study.overrides, *inherited(study, run), *mine, *run.overrides]


def prep_commands(study: ScheduleStudy, out: str) -> List[tuple]:
    """(command, log file, the file whose presence means it is done) of the data preparation."""
    prep, spm, data = prep_paths(out)
    langs = ",".join(study.languages)
    return [([sys.executable, "-m", "xlmr_mp.cli.train_spm", "--input", study.corpus, "--output-prefix", spm,
              "--vocab-size", str(study.vocab), "--alpha", f"{study.spm_alpha:g}", "--languages", langs, "--quiet"],
             os.path.join(prep, "spm.log"), spm + ".model"),
            ([sys.executable, "-m", "xlmr_mp.cli.preprocess_data", "--input", study.corpus, "--tokenizer", spm + ".model",
              "--output-dir", data, "--languages", langs, "--workers", "2", "--quiet"],
             os.path.join(prep, "preprocess.log"), os.path.join(data, study.languages[-1], "train.idx"))]


def eval_command(study: ScheduleStudy, run: Run, out: str) -> List[str]:
    rd = os.path.join(out, run.name)
    return [sys.executable, "-m", "xlmr_mp.cli.evaluate", "mbpc", "--model", checkpoint_dir(out, run.name),
            "--data", os.path.join(study.eval_data, "flores200_devtest"), "--languages", ",".join(study.languages),
            "--tokenizer", prep_paths(out)[1] + ".model", "--out", os.path.join(rd, "mbpc.json"), "--no-progress"]


def run(cmd: List[str], log_path: str) -> None:
    log(" ".join(cmd[:6]) + " ...")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    if p.returncode != 0:
        raise SystemExit(f"failed (exit {p.returncode}): see {log_path}")


def dry_run(study: ScheduleStudy, out: str) -> None:
    """Every command the study runs, in order, one per line (comments start with #); runs nothing."""
    print(f"# schedule study {study.name!r} ({study.path}): {len(study.runs)} training runs, then "
          f"{len(study.runs)} evaluations; commands run from {ROOT}")
    for cmd, _, done in prep_commands(study, out):
        print(f"# prepare (skipped when {done} exists)")
        print(shlex.join(cmd))
    for r in study.runs:
        how = f"branch of {r.parent} at step {r.branch_at}" if r.parent else "from scratch"
        print(f"# train {r.name} ({how}; log {os.path.join(out, r.name + '.log')})")
        print(shlex.join(train_command(study, r, out)))
    for r in study.runs:
        print(f"# evaluate {r.name} (skipped when {os.path.join(out, r.name, 'mbpc.json')} exists)")
        print(shlex.join(eval_command(study, r, out)))


# ----------------------------------------------------------------------------- results

def per_language(report: dict, languages: List[str]) -> dict:
    """{language: mBPC} from an evaluate.py mbpc report (its "languages" map)."""
    return {lang: float(v) for lang, v in report["languages"].items() if lang in languages}


def write_results(study: ScheduleStudy, table: Dict[str, dict], results: str, wall_s: float) -> dict:
    """results.csv, results.json and mbpc.png in `results`, each through a temporary name."""
    langs = study.languages
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["run", "language", "mbpc"])
    for k, row in table.items():
        for lang in langs:
            if lang in row:
                w.writerow([k, lang, f"{row[lang]:.4f}"])
    with atomic_write(os.path.join(results, "results.csv"), newline="") as f:
        f.write(buf.getvalue())
    steps = sorted(set(study.steps.values()))
    branch_ats = sorted({r.branch_at for r in study.runs if r.parent})
    summary = {"wall_s": wall_s, "steps": steps[0] if len(steps) == 1 else study.steps,
               "branch_at": branch_ats[0] if len(branch_ats) == 1 else {r.name: r.branch_at for r in study.runs if r.parent},
               "mean_mbpc": {k: sum(r.values()) / max(len(r), 1) for k, r in table.items()}, "per_language": table,
               "study": os.path.relpath(os.path.abspath(study.path), ROOT)}
    with atomic_write(os.path.join(results, "results.json")) as f:
        json.dump(summary, f, indent=1)
    plt = pyplot()
    if plt is None:
        return summary
    labels = {r.name: r.label for r in study.runs}
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(table)
    for j, (k, row) in enumerate(table.items()):
        ax.bar([i + j * width for i in range(len(langs))], [row.get(l, float("nan")) for l in langs], width,
               label=labels[k])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))], langs)
    ax.set_ylabel("mBPC (FLORES-200 devtest, lower is better)")
    ax.set_title(f"schedules at {summary['steps']} steps (branch at {summary['branch_at']})")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(results, "mbpc.png"), dpi=120)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study directory (prep/ and one run directory per run)")
    ap.add_argument("--study", default=DEFAULT_SPEC, help="the spec (default launch/studies/schedules.yaml)")
    ap.add_argument("--dry-run", action="store_true", help="print every command (prepare, train, evaluate); run nothing")
    ap.add_argument("--corpus", default=None, help="replaces the spec's corpus")
    ap.add_argument("--eval-data", default=None, help="replaces the spec's eval_data")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "schedule_study"))
    args = ap.parse_args(argv)
    try:
        study = load_study(args.study, args.corpus, args.eval_data)
    except SpecError as e:
        print(f"spec error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    missing = [p for p in (study.corpus, os.path.join(study.eval_data, "flores200_devtest")) if not os.path.isdir(p)]
    if not missing:
        from xlmr_mp.data.corpus_io import find_language_files
        absent = [l for l in study.languages if l not in find_language_files(study.corpus, None)]
        if absent:
            print(f"spec error: {study.path}: languages {absent} are not in the corpus {study.corpus} (no "
                  f"<lang>.txt or .jsonl); drop them or give --corpus", file=sys.stderr)
            return 2
    if args.dry_run:
        for p in missing:
            print(f"# note: {p} does not exist (the study reads ../shared/corpus; give --corpus / --eval-data)")
        dry_run(study, out)
        return 0
    if missing:
        print(f"{missing[0]} does not exist (the study reads ../shared/corpus; give --corpus / --eval-data)",
              file=sys.stderr)
        return 2
    t0 = time.time()
    for cmd, log_path, done in prep_commands(study, out):
        if not os.path.exists(done):
            run(cmd, log_path)
    for i, r in enumerate(study.runs):
        log(f"run {i + 1}/{len(study.runs)}: {r.name}"
            + (f" (branch of {r.parent} at step {r.branch_at})" if r.parent else "")
            + f"; {(time.time() - t0) / 60:.1f} min so far")
        run(train_command(study, r, out), os.path.join(out, f"{r.name}.log"))
    table = {}
    for r in study.runs:
        report = os.path.join(out, r.name, "mbpc.json")
        if not os.path.exists(report):
            run(eval_command(study, r, out), os.path.join(out, r.name, "eval.log"))
        with open(report) as f:
            table[r.name] = per_language(json.load(f), study.languages)
    summary = write_results(study, table, args.results, time.time() - t0)
    for r in study.runs:
        log(f"{r.label:>24s}: mean mBPC {summary['mean_mbpc'][r.name]:.4f}")
    log(f"done in {summary['wall_s'] / 60:.1f} min; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
