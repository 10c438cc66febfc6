"""What every bench/ script stamps on its figures and how it appends them to bench/results/.

    commit()            the checkout's short commit ("?" outside git)
    utc_stamp()         "2026-12-01 15:44 UTC"
    header(script)      "# bench/<script>  <utc>  commit <c>" (the first line of every entry)
    emit(text, out)     print the entry, and append it to `out` (directories made) when given
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
