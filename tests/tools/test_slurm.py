"""The SLURM launchers on a real local SLURM cluster (launch/slurm_cluster.sh: one slurmctld and two
slurmd nodes n1, n2 on this machine, started here and stopped afterwards), not a mock.

- `sbatch launch/xlmr_base.slurm` with tiny CPU overrides on 2 nodes x 2 tasks (gloo, TP=2 within a
  node, DP=2 across nodes) trains, checkpoints, exits 0, and its per-step losses equal those of a
  torchrun run (launch/local.sh) of the same config.
- Preemption: `scancel --signal=USR1` and then `scontrol requeue` on the same job each make it save
  and go back to the queue; the resumed job ends with the same losses as the uninterrupted run.
- launch/preprocess.slurm (MPI across the two nodes) and launch/scaling_study.slurm (job array,
  one sweep cell per task) on the same cluster.
- A bad layout fails in the batch script before `srun` launches anything (no job step reaches a
  node), with a message naming the options.
Skipped only when SLURM is missing and cannot be installed (not root / apt-get fails).
"""
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40
TINY = ["--preset", "tiny", "parallel.tensor=2", f"train.train_steps={STEPS}",
        "train.eval_interval=0", "checkpoint.interval=0", "model.preset=", "train.global_batch=8",
        "train.micro_batch=4", "data.seq_length=64", "optim.lr=1e-3", "optim.warmup_steps=5",
        "precision.dtype=fp32", "checkpoint.keep_last=2"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _port_pair_free(p: int) -> bool:
    for q in (p, p + 1, p + 2):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", q))
            except OSError:
                return False
    return True


def _base_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHON=sys.executable, **extra)
    return env


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Start the local cluster in a fresh state dir on free ports; yield the client environment."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("slurm-wlm is not installed and this is not root, so it cannot be installed")
    state = str(tmp_path_factory.mktemp("slurm"))
    rnd = random.Random(os.getpid() ^ int(time.time()))
    base = next(p for p in (rnd.randrange(60000, 64000) for _ in range(200)) if _port_pair_free(p))
    env = _base_env(XLMR_SLURM_CTLD_PORT=str(base), XLMR_SLURM_NODE_PORT=str(base + 1),
                    XLMR_SLURM_FIRST_JOB_ID=str(rnd.randrange(1000, 4000)),
                    SLURM_CONF=os.path.join(state, "slurm.conf"))
    p = subprocess.run(["bash", "launch/slurm_cluster.sh", "start", state], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        if "apt-get" in p.stderr and shutil.which("slurmctld") is None:
            pytest.skip(f"SLURM could not be installed: {p.stderr.strip()[-500:]}")
        subprocess.run(["bash", "launch/slurm_cluster.sh", "stop", state], cwd=ROOT, env=env, timeout=120)
        pytest.fail(f"local SLURM cluster did not start:\n{p.stdout}\n{p.stderr}")
    # the client environment the script prints: `export SLURM_CONF=... OMPI_MCA_btl=...`
    line = [x for x in p.stdout.splitlines() if x.startswith("export ")][-1]
    env.update(kv.split("=", 1) for kv in line.split()[1:])
    env["XLMR_TEST_SLURM_STATE"] = state
    yield env
    subprocess.run(["bash", "launch/slurm_cluster.sh", "stop", state], cwd=ROOT, env=env, timeout=120,
                   capture_output=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny preprocessed data in the contract format (MMIDIDX, sentences ending in </s>=2)."""
    import numpy as np
    import torch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    root = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    for li, lang in enumerate(("en", "fr", "sw")):
        os.makedirs(os.path.join(root, lang))
        for split, n_docs in (("train", 40), ("valid", 4)):
            prefix = os.path.join(root, lang, split)
            b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for _ in range(n_docs):
                for _ in range(int(rng.integers(2, 6))):
                    toks = 4 + 50 * li + np.minimum(rng.zipf(1.5, int(rng.integers(4, 20))) - 1, 99)
                    b.add_item(torch.from_numpy(np.append(toks, 2).astype(np.int64)))
                b.end_document()
            b.finalize(prefix + ".idx")
    return root


def _losses(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        # complete lines only: the polls below read while the job appends
        return [(r["step"], r["loss"]) for r in (json.loads(line) for line in f if line.endswith("\n") and line.strip())]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The same tiny config under torchrun (launch/local.sh, 4 processes on this machine)."""
    run = str(tmp_path_factory.mktemp("torchrun"))
    p = subprocess.run(["bash", "launch/local.sh", *TINY, f"data.path={data_dir}", f"run_dir={run}"], cwd=ROOT,
                       env=_base_env(NPROC="4"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    losses = dict(_losses(run))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _sbatch(env, args, log):
    p = subprocess.run(["sbatch", "--parsable", *SBATCH_CPU, f"--output={log}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _job(env, job):
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(env, job, states, log, timeout=300, until=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job)
        if info.get("JobState") in states and (until is None or until(info)):
            return info
        if info.get("JobState") in TERMINAL and info.get("JobState") not in states:
            break
        time.sleep(0.5)
    text = open(log).read() if os.path.exists(log) else "(no log)"
    raise AssertionError(f"job {job} is {info.get('JobState')} (exit {info.get('ExitCode')}), wanted {states}; "
                         f"log:\n{text[-4000:]}")


def _wait_step(run_dir, step, env, job, log, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ls = _losses(run_dir)
        if ls and ls[-1][0] >= step:
            return ls[-1][0]
        state = _job(env, job).get("JobState")
        if state in TERMINAL:
            break
        time.sleep(0.02)
    raise AssertionError(f"run never reached step {step} (job {state}); log:\n{open(log).read()[-4000:]}")


def _release(env, job, log, restarts):
    """Wait until the job has been requeued `restarts` times and runs again. SLURM lets a requeued
    job start only once its old credential has expired (AuthInfo=cred_expire, 20 s on the local
    cluster; starting it earlier fails it with "Job credential revoked")."""
    _wait(env, job, ("RUNNING",), log, timeout=300, until=lambda i: int(i.get("Restarts", 0)) >= restarts)


def test_sbatch_base_matches_torchrun(slurm, data_dir, reference, tmp_path):
    run, log = str(tmp_path / "run"), str(tmp_path / "xlmr-base-%j.out")
    job = _sbatch(slurm, ["launch/xlmr_base.slurm", *TINY, f"data.path={data_dir}", f"run_dir={run}"], log)
    log = log.replace("%j", job)
    info = _wait(slurm, job, ("COMPLETED",), log, timeout=400)
    assert info["ExitCode"] == "0:0"
    text = open(log).read()
    assert "world 4 (slurm) = TP 2 x PP 1 x DP 2" in text
    assert "rendezvous n1:" in text
    got = _losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert dict(got) == reference, "sbatch losses differ from the torchrun run of the same config"
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step_{STEPS:08d}"
    rec = os.path.join(run, "launch", f"job-{job}-r0")
    commit = re.search(r"^commit: ([0-9a-f]{40})$", open(os.path.join(rec, "commit.txt")).read(), re.M).group(1)
    # the commit the job ran (HEAD may have moved on since: others commit to this tree)
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT).returncode == 0
    import yaml
    cfg = yaml.safe_load(open(os.path.join(rec, "config.yaml")))
    assert cfg["parallel"]["tensor"] == 2 and cfg["parallel"]["data"] == 2 and cfg["run_dir"] == run


def test_usr1_and_scontrol_requeue_resume_to_same_losses(slurm, data_dir, reference, tmp_path):
    run, log = str(tmp_path / "run"), str(tmp_path / "pre-%j.out")
    job = _sbatch(slurm, ["launch/xlmr_base.slurm", *TINY, f"data.path={data_dir}", f"run_dir={run}"], log)
    log = log.replace("%j", job)
    # 1) preemption warning: SIGUSR1 to the job's steps -> save, exit 75, the script requeues
    _wait_step(run, 3, slurm, job, log)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True, timeout=60)
    _release(slurm, job, log, restarts=1)
    # 2) the resumed job is requeued from outside: SIGTERM to every process -> save -> requeued
    _wait_step(run, _losses(run)[-1][0] + 4, slurm, job, log)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=60)
    _release(slurm, job, log, restarts=2)
    info = _wait(slurm, job, ("COMPLETED",), log, timeout=400)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "2"
    text = open(log).read()
    # rank 0 names the signal it got, or says a peer got it first (the stop is agreed over ranks)
    stops = re.findall(r"signal (10|15|on another rank): saving at step (\d+) and exiting 75", text)
    assert len(stops) == 2, text
    (sig1, first), (sig2, second) = [(s, int(n)) for s, n in stops]
    assert sig1 in ("10", "on another rank") and sig2 in ("15", "on another rank")
    assert 3 <= first < second < STEPS, (first, second)
    assert text.count("requeueing job") == 1   # the USR1 path: the script itself requeued
    assert f"job {job} was already requeued by SLURM (restart 2)" in text   # scontrol requeue: SLURM did
    for stop in (first, second):
        assert f"loaded checkpoint {run}/checkpoints/step_{stop:08d}" in text
    got = _losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "steps lost or repeated across the requeues"
    assert dict(got) == reference, "resumed losses differ from the uninterrupted run"
    assert got[-1][1] == reference[STEPS]


@pytest.mark.parametrize("bad, names", [
    (["parallel.tensor=1", "parallel.pipeline=3"],
     ["world size 4 is not divisible by parallel.tensor x parallel.pipeline = 1 x 3"]),
    (["train.micro_batch=3"], ["train.global_batch=8 is not divisible by train.micro_batch=3"]),
])
def test_bad_layout_fails_before_srun(slurm, data_dir, tmp_path, bad, names):
    run, log = str(tmp_path / "run"), str(tmp_path / "bad-%j.out")
    job = _sbatch(slurm, ["launch/xlmr_base.slurm", *TINY, f"data.path={data_dir}", f"run_dir={run}", *bad], log)
    log = log.replace("%j", job)
    info = _wait(slurm, job, ("FAILED",), log, timeout=200)
    assert info["ExitCode"] == "2:0"
    text = open(log).read()
    err = [line for line in text.splitlines() if line.startswith("layout error")]
    assert len(err) == 1 and all(n in err[0] for n in names), text
    assert "[xlmr_mp.train]" not in text
    # no job step was ever sent to a node: the training processes never started
    state = slurm["XLMR_TEST_SLURM_STATE"]
    for node in ("n1", "n2"):
        with open(os.path.join(state, "log", f"slurmd.{node}.log")) as f:
            assert f"StepId={job}.0" not in f.read()
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


def test_preprocess_slurm_mpi_across_nodes_matches_single_process(slurm, tmp_path):
    """launch/preprocess.slurm: 2 nodes x 2 MPI ranks (srun --mpi=pmix) write the same datasets,
    byte for byte, as one process."""
    from xlmr_mp.cli import train_spm
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    corpus = tmp_path / "corpus"
    make_tiny_corpus(corpus, languages=["en", "ru", "zh"], scale=0.6)
    assert train_spm.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "spm"), "--vocab-size", "800",
                           "--quiet"]) == 0
    common = ["--input", str(corpus), "--tokenizer", str(tmp_path / "spm.model"), "--split", "80,10,10"]
    p = subprocess.run([sys.executable, "tools/preprocess_data.py", *common, "--output-dir", str(tmp_path / "one"),
                        "--mpi", "off", "--quiet"], cwd=ROOT, env=_base_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = str(tmp_path / "pre-%j.out")
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={log}",
                          "launch/preprocess.slurm", *common, "--output-dir", str(tmp_path / "mpi"),
                          "--range-bytes", "20000"], cwd=ROOT, env=slurm, capture_output=True, text=True,
                         timeout=60).stdout.strip()
    log = log.replace("%j", job)
    _wait(slurm, job, ("COMPLETED",), log, timeout=300)
    assert "(1 worker(s) x 4 rank(s))" in open(log).read()
    import filecmp
    for lang in ("en", "ru", "zh"):
        for split in ("train", "valid", "test"):
            for ext in ("bin", "idx"):
                a = tmp_path / "one" / lang / f"{split}.{ext}"
                b = tmp_path / "mpi" / lang / f"{split}.{ext}"
                assert filecmp.cmp(a, b, shallow=False), f"{lang}/{split}.{ext} differs"


def test_scaling_study_array_runs_one_cell_per_task(slurm, data_dir, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two tiny cells\nalpha05 data.alpha=0.5\n\nwide model.hidden_size=96 model.ffn_size=192\n")
    root, log = str(tmp_path / "runs"), str(tmp_path / "scaling-%A_%a.out")
    tiny = [a for a in TINY if a != "parallel.tensor=2" and not a.startswith("train.train_steps")]
    p = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--nodes=1", "--ntasks-per-node=1",
                        "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", f"--output={log}",
                        "launch/scaling_study.slurm", *tiny, "train.train_steps=3", f"data.path={data_dir}"],
                       cwd=ROOT, env=dict(slurm, SWEEP=str(sweep), RUN_ROOT=root), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    for task, want in ((0, "COMPLETED"), (1, "COMPLETED"), (2, "FAILED")):
        _wait(slurm, f"{job}_{task}", (want,), log.replace("%A", job).replace("%a", str(task)), timeout=300)
    assert [s for s, _ in _losses(os.path.join(root, "alpha05"))] == [1, 2, 3]
    assert [s for s, _ in _losses(os.path.join(root, "wide"))] == [1, 2, 3]
    import yaml
    assert yaml.safe_load(open(os.path.join(root, "alpha05", "config.yaml")))["data"]["alpha"] == 0.5
    assert yaml.safe_load(open(os.path.join(root, "wide", "config.yaml")))["model"]["hidden_size"] == 96
    bad = open(log.replace("%A", job).replace("%a", "2")).read()
    assert "array index 2 has no cell" in bad and "2 cells" in bad


def test_time_limit_signal_saves_and_requeues_and_scancel_ends_it(slurm, data_dir, tmp_path):
    """The #SBATCH --signal=USR1@<s> path: SLURM itself warns the job before its time limit; the job
    saves, requeues, and the next incarnation resumes from that checkpoint (1 node x 1 task, a 2 min
    limit, SLURM's shortest, with the warning 50 s before it, which slurmctld's 30 s time-limit check
    may send up to 30 s early, i.e. 40-70 s into the job, well after the trainer is up). Once it has
    resumed, `scancel` ends it for good: the trainer saves, and the job is not requeued."""
    run, log = str(tmp_path / "run"), str(tmp_path / "tl-%j.out")
    tiny = [a for a in TINY if a != "parallel.tensor=2" and not a.startswith("train.train_steps")]
    p = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                        "--cpus-per-task=1", "--time=2", "--signal=USR1@50", f"--output={log}",
                        "launch/xlmr_base.slurm", *tiny, "train.train_steps=1000000", f"data.path={data_dir}",
                        f"run_dir={run}"], cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    log = log.replace("%j", job)
    try:
        _release(slurm, job, log, restarts=1)
        text = open(log).read()
        m = re.search(r"signal 10: saving at step (\d+) and exiting 75", text)
        assert m, text[-3000:]
        stop = int(m.group(1))
        _wait_step(run, stop + 2, slurm, job, log)
        text = open(log).read()
        assert f"loaded checkpoint {run}/checkpoints/step_{stop:08d}" in text
        assert "requeueing job" in text and "restart 1:" in text
        steps = [s for s, _ in _losses(run)]
        assert steps[:stop + 2] == list(range(1, stop + 1)) + [stop + 1, stop + 2]
        # scancel: the trainer saves on the SIGTERM, and the job ends there: it does not requeue
        # itself (it used to, and came back ~1 min later as restart 2)
        subprocess.run(["scancel", job], env=slurm, check=True, timeout=60)
        info = _wait(slurm, job, ("CANCELLED",), log, timeout=120)
        assert info["Restarts"] == "1", info
        text = open(log).read()
        assert re.search(rf"job {job} is \w+ \(cancelled, or at its hard time limit\): not requeueing", text), text[-3000:]
        assert text.count("requeueing job") == 1
    finally:
        subprocess.run(["scancel", job], env=slurm, timeout=60)
