"""`python -m xlmr_mp.train` killed with SIGKILL (or stopped with SIGTERM) and restarted continues
with a bitwise identical loss sequence; SIGTERM exits 75 after saving."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import train_bodies as b
ROOT = b.ROOT
STEPS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return b.make_indexed_data(str(tmp_path_factory.mktemp("data")))


def _cmd(data_dir, run_dir, extra=()):
    return [sys.executable, "-m", "xlmr_mp.train", "--preset", "tiny",
            f"data.path={data_dir}", f"run_dir={run_dir}", f"train.train_steps={STEPS}", "checkpoint.interval=4",
            "train.eval_interval=0", *b.compile_overrides(), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _start_and_signal(cmd, run_dir, sig, at_step):
    """Start training, send `sig` once metrics.jsonl shows `at_step`; return the exit code."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if os.path.exists(path) and any(s >= at_step for s, _ in _losses(run_dir)):
                p.send_signal(sig)
                break
            time.sleep(0.01)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return rc, p.stderr.read()


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref"))
    _run(_cmd(data_dir, run))
    losses = dict(_losses(run))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_sigkill_and_resume_is_bitwise_identical(data_dir, reference, tmp_path):
    run = str(tmp_path / "run")
    rc, err = _start_and_signal(_cmd(data_dir, run), run, signal.SIGKILL, at_step=10)
    assert rc == -signal.SIGKILL, f"the run ended on its own (rc {rc}) before it could be killed: {err[-2000:]}"
    killed_at = max(s for s, _ in _losses(run))
    assert killed_at < STEPS
    p = _run(_cmd(data_dir, run))
    assert "loaded checkpoint" in p.stdout
    resumed_from = int(p.stdout.split("loaded checkpoint")[1].split("(step ")[1].split(",")[0])
    assert 0 < resumed_from <= killed_at
    # metrics.jsonl now tells one trajectory: steps 1..STEPS, the redone ones from the resumed run
    final = _losses(run)
    assert [s for s, _ in final] == list(range(1, STEPS + 1))
    for step, loss in final:
        assert loss == reference[step], (step, loss, reference[step])   # bitwise (JSON keeps every bit)


def test_sigterm_saves_and_exits_75_then_resumes(data_dir, reference, tmp_path):
    run = str(tmp_path / "run")
    rc, err = _start_and_signal(_cmd(data_dir, run), run, signal.SIGTERM, at_step=6)
    assert rc == 75, err[-2000:]
    stopped_at = max(s for s, _ in _losses(run))
    latest = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{stopped_at:08d}"      # saved at the step it finished, not an older one
    p = _run(_cmd(data_dir, run))
    assert f"loaded checkpoint {os.path.join(run, 'checkpoints', latest)} (step {stopped_at}," in p.stdout
    final = _losses(run)
    assert [s for s, _ in final] == list(range(1, STEPS + 1))
    for step, loss in final:
        assert loss == reference[step]


def test_keep_last_prunes_old_checkpoints(reference, data_dir, tmp_path):
    run = str(tmp_path / "run")
    _run(_cmd(data_dir, run, ["train.train_steps=12", "checkpoint.keep_last=2"]))
    ck = os.path.join(run, "checkpoints")
    assert sorted(d for d in os.listdir(ck) if d.startswith("step_")) == ["step_00000008", "step_00000012"]
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000012"
