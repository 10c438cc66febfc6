"""Launch safety the study runner relies on: single-process runs bind no port, one trainer per
run directory (OS lock naming the holder), workers die with their torchrun launcher."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import train_bodies as b
def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=b.ROOT, **extra)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return b.make_indexed_data(str(tmp_path_factory.mktemp("data")))


def _train_cmd(data_dir, run, steps):
    return [sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run}",
            f"train.train_steps={steps}", "train.eval_interval=0", "checkpoint.interval=0"]


def _wait_for(cond, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _lock_holder(run):
    try:
        h = json.loads(open(os.path.join(run, ".lock")).read() or "{}")
    except (OSError, ValueError):
        return None
    return h or None


@pytest.mark.slow          # trainer CLI processes
def test_two_single_process_runs_share_a_port_free_machine(data_dir, tmp_path):
    """Two single-process trainings at once, with the default rendezvous port taken by someone else:
    both finish (a TCP store at world size 1 would fail both with EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = _env(MASTER_PORT=str(port))
        procs = [subprocess.Popen(_train_cmd(data_dir, str(tmp_path / f"run{i}"), 6), cwd=b.ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        assert len(open(tmp_path / f"run{i}" / "metrics.jsonl").readlines()) == 6


@pytest.mark.slow          # trainer CLI processes
def test_second_trainer_in_a_run_dir_fails_naming_the_holder(data_dir, tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen(_train_cmd(data_dir, run, 100000), cwd=b.ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        holder = _wait_for(lambda: _lock_holder(run), what="the first trainer's lock")
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        t0 = time.time()
        second = subprocess.run(_train_cmd(data_dir, run, 5), cwd=b.ROOT, env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 4, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert time.time() - t0 < 60
        assert not os.path.exists(os.path.join(run, "checkpoints", "latest"))
    finally:
        first.kill()       # SIGKILL: the kernel drops the flock
        first.wait()
    third = subprocess.run(_train_cmd(data_dir, run, 3), cwd=b.ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]


def test_lock_in_process_released_and_reacquired(tmp_path):
    from xlmr_mp.run_lock import DirLock, RunDirLocked, is_locked
    a = DirLock(str(tmp_path), "runner").acquire()
    assert is_locked(str(tmp_path))["what"] == "runner"
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
        DirLock(str(tmp_path)).acquire()
    a.release()
    assert is_locked(str(tmp_path)) is None
    with DirLock(str(tmp_path)):
        pass


def _children(pid):
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.update(int(x) for x in open(f"/proc/{pid}/task/{tid}/children").read().split())
        except OSError:
            pass
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow          # trainer CLI processes
def test_workers_exit_when_torchrun_is_killed(data_dir, tmp_path):
    run = str(tmp_path / "run")
    env = _env(MASTER_PORT=str(__import__("tests.support.harness", fromlist=["x"]).free_port()))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2"] + _train_cmd(data_dir, run, 100000)[1:],
                                cwd=b.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = set()
    try:
        _wait_for(lambda: os.path.exists(os.path.join(run, "metrics.jsonl")), what="training to start")
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        _wait_for(lambda: not any(_alive(w) for w in workers), timeout=30, what="the workers to exit")
    finally:
        for w in workers | (_children(launcher.pid) if _alive(launcher.pid) else set()):
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
