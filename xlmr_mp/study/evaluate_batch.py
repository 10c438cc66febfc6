"""`python -m xlmr_mp.study.evaluate_batch JOBS.json TIMES.json`: several `xlmr-evaluate` runs in one process.

A cell's evaluations (every task on the last checkpoint, mbpc and retrieval on each evaluate_at
checkpoint) run as jobs in this process, so the interpreter start and the imports (torch, the model
code, matplotlib) are paid once. Each job is `xlmr_mp.cli.evaluate.main(argv)` with the argv of
`xlmr-evaluate`, so its JSON holds the numbers a separate `xlmr-evaluate` run gives; the model is
loaded afresh for each job. JOBS.json is a list of {"argv": [...], "log": path}; each job's stdout
and stderr go to its log (appended). TIMES.json is rewritten after every job: [{"rc", "seconds",
"cpu"}] (wall and CPU seconds of the job in this process). The batch stops at the first job that
fails (exit status: that job's).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _write(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def run_jobs(jobs: list, times_path: str) -> int:
    from xlmr_mp.cli.evaluate import main as evaluate
    times = []
    out_fd, err_fd = os.dup(1), os.dup(2)
    try:
        for job in jobs:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(job["log"], "a") as log:
                log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} (batch {os.getpid()}) "
                          f"xlmr-evaluate {' '.join(job['argv'])}\n")
                log.flush()
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                t0, c0 = time.perf_counter(), _cpu()
                try:
                    rc = evaluate(list(job["argv"]))
                except SystemExit as e:          # argparse errors
                    rc = e.code if isinstance(e.code, int) else 2
                except Exception:                # noqa: BLE001  reported in the job's log, the batch stops
                    import traceback
                    traceback.print_exc()
                    rc = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.dup2(out_fd, 1)
                    os.dup2(err_fd, 2)
            times.append({"rc": rc, "seconds": time.perf_counter() - t0, "cpu": _cpu() - c0})
            _write(times_path, times)
            if rc != 0:
                return rc
    finally:
        os.close(out_fd)
        os.close(err_fd)
    return 0


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m xlmr_mp.study.evaluate_batch JOBS.json TIMES.json")
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    sys.exit(run_jobs(jobs, sys.argv[2]))


if __name__ == "__main__":
    main()
