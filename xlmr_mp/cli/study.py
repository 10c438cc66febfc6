"""Scaling studies: plan, run, status and report of a study spec (launch/studies/*.yaml).

    xlmr-study plan   SPEC.yaml [--out DIR] [--jobs N] [--no-calibrate]
    xlmr-study run    SPEC.yaml [--out DIR] [--jobs N] [--threads T] [--slurm [--dry-run]]
    xlmr-study status SPEC.yaml [--out DIR]
    xlmr-study report SPEC.yaml [--out DIR]
    xlmr-study finish SPEC.yaml --cell NAME [--out DIR]     (SLURM array tasks)

The study directory (--out, default runs/studies/<name>) holds prep/ (tokenizers and datasets
shared by the cells, keyed by content hash), cells/<name>/ (run directory, logs, evaluation
JSON, done.json) and the report (results.csv, figures/*.png, report.md). `run` is idempotent
and resumable: run it again after an interruption, a failure or a change of the spec. A branch
(a grid with parent and branch_at) runs after its parent, from the parent's checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

from xlmr_mp.study.spec import SpecError, load_spec, select_cells


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("plan", "run", "status", "report", "finish"))
    p.add_argument("spec", help="study spec YAML (launch/studies/*.yaml)")
    p.add_argument("--out", default=None, help="study directory (default runs/studies/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at a time on this machine (default 1)")
    p.add_argument("--threads", type=int, default=None, help="threads per cell (default: cores / jobs)")
    p.add_argument("--no-calibrate", action="store_true", help="plan: skip the 20-second timing calibration")
    p.add_argument("--calibrate-seconds", type=float, default=20.0, help="plan/run: calibration time in all")
    p.add_argument("--progress-every", type=float, default=30.0, help="run: seconds between progress lines")
    p.add_argument("--slurm", action="store_true", help="run: submit a job array (launch/scaling_study.slurm)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch command only")
    p.add_argument("--sbatch-arg", action="append", default=[], help="with --slurm: extra sbatch option (repeat)")
    p.add_argument("--cell", default=None, help="finish: the cell an array task trained")
    p.add_argument("--cells", default=None, help="run/plan/status: only these cells (comma-separated), in this "
                                                  "order")
    p.add_argument("--order", choices=("longest", "shortest", "spec"), default="longest",
                   help="run: cell order (longest first, the default, finishes the study soonest; shortest "
                        "first finishes the most cells by a deadline; spec: as listed)")
    return p


def still_failed(study, out: str, states: dict) -> list:
    """The cells a run saw fail that are not done now: another runner on the same study directory
    may have finished one since (its done.json with the cell's hash is what counts)."""
    from xlmr_mp.study.runner import cell_state
    cells = {c.name: c for c in study.cells}
    return [n for n, s in states.items() if s == "failed" and cell_state(out, cells[n]) != "done"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)      # progress lines reach a log file as they happen
    try:
        study = load_spec(args.spec)
    except SpecError as e:
        print(f"spec error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or os.path.join("runs", "studies", study.name))
    if args.cells and args.command != "report":
        try:
            study = select_cells(study, [n for n in args.cells.split(",") if n])
        except SpecError as e:
            print(str(e), file=sys.stderr)
            return 2
        args.order = "spec"
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    from xlmr_mp.study import plan as P
    from xlmr_mp.study.prepare import Preparation
    if args.command == "plan":
        prep = Preparation(study, out, workers=threads)
        try:
            plans = P.plan_study(study, prep, out)
        except SpecError as e:
            print(f"spec error: {e}", file=sys.stderr)
            return 2
        if not args.no_calibrate:
            P.estimate_times(plans, out, threads, args.calibrate_seconds)
        print(P.format_plan(study, plans, prep, jobs))
        return 0
    from xlmr_mp.study import runner as R
    if args.command == "status":
        print(R.format_status(study, out))
        return 0
    if args.command == "report":
        from xlmr_mp.study.report import write_report
        paths = write_report(study, out)
        for p in paths:
            print(p)
        return 0
    if args.command == "finish":
        if not args.cell:
            print("finish needs --cell NAME", file=sys.stderr)
            return 2
        state = R.finish_cell(study, out, args.cell)
        print(f"{args.cell}: {state}")
        return 0 if state in ("done", "interrupted") else 1
    # run
    if args.slurm:
        R.slurm_submit(study, out, args.sbatch_arg, dry_run=args.dry_run)
        return 0
    est = {}
    prep = Preparation(study, out, workers=threads)
    try:            # a branch whose parent keeps no checkpoint at branch_at fails here, before any training
        if not args.no_calibrate:
            plans = P.plan_study(study, prep, out)
            P.estimate_times(plans, out, threads, args.calibrate_seconds)
            est = {p.cell.name: p.est_seconds for p in plans}
        else:
            for c in study.cells:
                if c.parent is not None:
                    P.plan_cell(study, prep, c, out)
    except SpecError as e:
        print(f"spec error: {e}", file=sys.stderr)
        return 2
    r = R.Runner(study, out, jobs=jobs, threads=threads, progress_every=args.progress_every, est=est,
                 order=args.order)
    states = r.run()
    failed = still_failed(study, out, states)
    if r.stopping.is_set():
        print(f"[study] stopped; run `xlmr-study run {args.spec}` again to continue")
        return 130
    print(R.format_status(study, out))
    if failed:
        print(f"[study] {len(failed)} cell(s) failed: {', '.join(failed)} (logs under {out}/cells/<name>/)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
