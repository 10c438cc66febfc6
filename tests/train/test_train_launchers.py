"""`python -m xlmr_mp.train` under torchrun and mpirun (2 processes, DP=2) logs the losses of the
single-process run (rank/world discovered from each launcher's environment)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import train_bodies as b
STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return b.make_indexed_data(str(tmp_path_factory.mktemp("data")))


def _args(data_dir, run):
    return ["-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run}",
            f"train.train_steps={STEPS}", "train.eval_interval=0", "checkpoint.interval=0"]


def _losses(run):
    return [json.loads(l)["loss"] for l in open(os.path.join(run, "metrics.jsonl"))]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=b.ROOT, MASTER_PORT=str(__import__("tests.support.harness", fromlist=["x"]).free_port()))
    p = subprocess.run(cmd, cwd=b.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("single"))
    _run([sys.executable] + _args(data_dir, run))
    return _losses(run)


def _check(losses, ref):
    assert len(losses) == STEPS
    for a, e in zip(losses, ref):
        assert abs(a - e) <= 1e-5 * e, (losses, ref)


def test_torchrun_dp2(data_dir, single, tmp_path):
    run = str(tmp_path / "run")
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
             + _args(data_dir, run))
    assert "(torchrun) = TP 1 x PP 1 x DP 2" in p.stdout
    _check(_losses(run), single)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed")
def test_mpirun_dp2(data_dir, single, tmp_path):
    run = str(tmp_path / "run")
    p = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS",
              "-x", "PYTHONPATH", "-x", "MASTER_PORT", sys.executable] + _args(data_dir, run))
    assert "(mpi) = TP 1 x PP 1 x DP 2" in p.stdout
    _check(_losses(run), single)
