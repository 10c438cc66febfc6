"""Shared helpers for the tests of tools/: run a tool (subprocess or its main() in-process), build a
tiny tokenizer."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")


def run_tool(name, *args, check=True, env=None, timeout=300, prefix=()):
    """Run tools/<name>.py as a subprocess; returns CompletedProcess (text)."""
    cmd = list(prefix) + [sys.executable, os.path.join(TOOLS, name + ".py")] + [str(a) for a in args]
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    if env:
        e.update(env)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=e, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} failed ({r.returncode}):\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}")
    return r


def load_tool(name):
    """The module behind tools/<name>.py and its installed command: xlmr_mp/cli/<name>.py."""
    import importlib
    return importlib.import_module(f"xlmr_mp.cli.{name}")


def run_tool_main(name, *args):
    """xlmr_mp/cli/<name>.py's main(args) in this process with stdout/stderr captured: (rc, stdout, stderr).
    Cheaper than run_tool's subprocess; each CLI is still run once as a subprocess by its own tests."""
    import contextlib
    import io
    mod = load_tool(name)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = mod.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def train_tiny_spm(corpus_dir, prefix, vocab_size=1000, extra=()):
    """Train a tiny SentencePiece model with tools/train_spm.py (in-process); returns PREFIX.model."""
    from xlmr_mp.cli import train_spm
    rc = train_spm.main(["--input", str(corpus_dir), "--output-prefix", str(prefix), "--vocab-size", str(vocab_size),
                         "--quiet", *map(str, extra)])
    assert rc == 0
    return str(prefix) + ".model"
