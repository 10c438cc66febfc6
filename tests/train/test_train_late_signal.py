"""A SIGUSR1 / SIGTERM that lands at or after the last step (during the final save or teardown) leaves
a finished run finished: `python -m xlmr_mp.train` exits 0 with its final checkpoint, instead of
dying by the signal (exit 138 / 143, which SLURM marks FAILED). The signal is sent over and over
from the moment the last step's metrics appear until the process has exited, so it lands in the
final save, the logger's close, the process-group teardown and interpreter shutdown."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import train_bodies as b
ROOT = b.ROOT
STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return b.make_indexed_data(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_after_the_last_step_exits_0(data_dir, tmp_path, sig):
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run}",
           f"train.train_steps={STEPS}", "train.eval_interval=0", "checkpoint.interval=0"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run, "metrics.jsonl")
    sent = 0
    try:
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if os.path.exists(metrics) and any(json.loads(l)["step"] == STEPS for l in open(metrics)
                                                if l.endswith("\n") and l.strip()):   # (a line being written: skip)
                break
            time.sleep(0.005)
        while p.poll() is None and time.monotonic() < deadline:
            p.send_signal(sig)
            sent += 1
            time.sleep(0.002)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert sent > 0, "the run finished before its last step's metrics could be seen"
    assert p.returncode == 0, (p.returncode, err[-3000:])
    assert "exiting 75" not in out
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == f"step_{STEPS:08d}"
