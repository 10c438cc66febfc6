"""bench/gpu_suite.sh: its plan fits one borrowed GPU command (<= 540 s, step limits included, <= 8
result files), the steps it runs on the GPU are the planned ones, and --dry-run runs every step at a
tiny CPU shape (same scripts, same options as on the GPU), so the prepared command cannot rot."""
import os
import re
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")
BUDGET_S, MAX_FILES = 540, 8       # one device command of 10 minutes, start-up and copies aside; 8 files back


def _plan(text):
    steps = re.findall(r"^\[plan\] (\w+)\s+(\d+) s$", text, re.M)
    total = int(re.search(r"^\[plan\] total (\d+) s", text, re.M).group(1))
    files = int(re.search(r"^\[plan\] result files: (\d+)", text, re.M).group(1))
    return [(n, int(s)) for n, s in steps], total, files


def test_plan_fits_one_gpu_command():
    p = subprocess.run(["bash", SUITE, "--plan"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    steps, total, files = _plan(p.stdout)
    assert steps and total <= BUDGET_S and files <= MAX_FILES, p.stdout
    assert total >= sum(s for _, s in steps)            # every step's limit inside the budget
    assert {"install", "build"} <= {n for n, _ in steps}   # installing and building count too


def test_gpu_branch_runs_exactly_the_planned_steps(tmp_path):
    """The GPU branch (no --dry-run), with a stand-in interpreter that reports a CUDA device and
    succeeds at every command: the steps it records are the planned ones, in order, each under its
    planned limit."""
    py = tmp_path / "python"
    py.write_text("#!/bin/sh\nexit 0\n")
    py.chmod(0o755)
    out = tmp_path / "suite"
    p = subprocess.run(["bash", SUITE, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=str(py), TMPDIR=str(tmp_path)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    planned, _, _ = _plan(subprocess.run(["bash", SUITE, "--plan"], capture_output=True, text=True, timeout=60).stdout)
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        commands = tar.extractfile("./commands.txt").read().decode().splitlines()
    ran = [re.match(r"(\w+) rc=0 (\d+)s-limit", c) for c in commands]
    assert all(ran), commands
    assert [(m.group(1), int(m.group(2))) for m in ran] == planned, commands


@pytest.mark.slow               # ten suite steps, one with the HF peer
@pytest.mark.timeout(1500)      # ~2 min quiet, 10+ min on a busy machine
def test_gpu_suite_dry_run(tmp_path):
    out, wheels = tmp_path / "suite", tmp_path / "wheels"
    wheels.mkdir()              # an empty wheel folder: the install step's pip runs (--dry-run) from it alone
    p = subprocess.run(["bash", SUITE, "--dry-run", "--wheels", str(wheels), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    steps, total, files = _plan(p.stdout)
    assert total <= BUDGET_S and files <= MAX_FILES
    assert sorted(os.listdir(out)) == ["gpu_suite.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    got = tmp_path / "x"
    env = (got / "env.txt").read_text()
    assert "commit:" in env and "device: CPU (dry run)" in env
    cmds = (got / "commands.txt").read_text().splitlines()
    assert [c.split()[0] for c in cmds] == [n for n, _ in steps]     # the GPU run's steps, in its order
    assert all(" rc=0 " in c for c in cmds), cmds
    assert "pip install --no-index --find-links" in (got / "install.log").read_text()
    summary = (out / "summary.txt").read_text()
    for needle in ("ours:", "ratio ours/peer", "optimizer-state bytes per rank", "planner (xlmr-plan --gpu CPU)",
                   "chunked (ours, model)", "dtype=fp32", "steps failed: 0, skipped: 0", "megatron-core:",
                   "missing: none"):
        assert needle in summary, (needle, summary)
    bad = subprocess.run(["bash", SUITE, "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--dry-run" in bad.stderr
