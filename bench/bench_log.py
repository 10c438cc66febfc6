"""What every bench/ script stamps on its figures and how it appends them to bench/results/.

    commit()            the checkout's short commit ("?" outside git)
    utc_stamp()         "2026-12-01 15:44 UTC"
    header(script)      "# bench/<script>  <utc>  commit <c>" (the first line of every entry)
    emit(text, out)     print the entry, and append it to `out` (directories made) when given
    cpu_kernel_run(script, argv, what, rows, note, out)
                        the CPU kernel benchmarks' entry: header, command, machine line (cpus, torch
                        threads, load) + `what`, each result row printed as it comes, the note
"""
from __future__ import annotations

import datetime
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def utc_stamp() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"


def header(script: str) -> str:
    return f"# bench/{script}  {utc_stamp()}  commit {commit()}"


def emit(text: str, out: str | None) -> None:
    if not text.endswith("\n"):
        text += "\n"
    print(text, end="", flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(text + "\n")


def cpu_kernel_run(script: str, argv, what: str, rows, note: str = "", out: str | None = None) -> None:
    """Print (and with `out`, append) one entry of a CPU kernel benchmark: `rows` yields its result
    lines, each printed as soon as it is measured."""
    import sys

    import torch
    lines = [header(script),
             f"# command: python bench/{script} {' '.join(sys.argv[1:] if argv is None else argv)}",
             f"# cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
             f"load average {os.getloadavg()[0]:.2f}, {what}"]
    for line in rows:
        print(line, flush=True)
        lines.append(line)
    if note:
        lines.append(f"note: {note}")
    if out:
        emit("\n".join(lines), out)
