"""Schedules through the real trainer (`python -m xlmr_mp.train` processes on tiny indexed data):
logged values equal the configured schedules (metrics.jsonl and TensorBoard); SIGKILL inside a
phase and across a phase boundary, then resume, is bitwise the uninterrupted run (DP=1 here, TP=2
x PP=2 in the slow test); batch warmup equals fixed-size runs on its steps; branches
(checkpoint.branch_from) continue the parent bitwise and differ only from where their mix does."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import train_bodies as b

pytestmark = pytest.mark.slow         # real trainer processes: tens of seconds per test on 2 quiet cores

ROOT = b.ROOT
STEPS = 30
# alpha 0.7 -> 0.5 -> 0.3 and sw joining at step 12; mask 0.3 -> 0.15; wsd over the last 8 steps;
# global batch 4 -> 8 (tiny: micro-batch 4, 64-token sequences) once 2048 tokens are consumed: step 8
SCHED = ["train.batch_warmup={start: 4, tokens: 2048}",
         "data.alpha_schedule=[{step: 0, alpha: 0.7}, {step: 12, alpha: 0.5}, {step: 24, alpha: 0.3}]",
         "data.language_schedule=[{step: 0, languages: [en, fr]}, {step: 12, languages: [en, fr, sw]}]",
         "data.mask_schedule=[{step: 0, mask_prob: 0.3}, {step: 18, mask_prob: 0.15}]",
         "optim.decay=wsd", "optim.decay_steps=8", "optim.min_lr=1.0e-4",
         "model.dropout=0.1", "model.attention_dropout=0.1"]


def expected(step):
    """The configured schedules written out by hand (0-based optimizer step)."""
    alpha = 0.7 if step < 12 else 0.5 if step < 24 else 0.3
    lr = 1e-3 * (step + 1) / 5 if step < 5 else 1e-3 if step < 22 else \
        1e-4 + (1e-3 - 1e-4) * (1 - math.sqrt((step - 22) / 8))
    return {"alpha": alpha, "active_languages": 2 if step < 12 else 3, "mask_prob": 0.3 if step < 18 else 0.15,
            "global_batch": 4 if step < 8 else 8, "lr": lr}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return b.make_indexed_data(str(tmp_path_factory.mktemp("data")))


def _cmd(data_dir, run_dir, extra=(), steps=STEPS):
    return [sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run_dir}",
            f"train.train_steps={steps}", "checkpoint.interval=5", "checkpoint.keep_last=10",
            "train.eval_interval=0", *SCHED, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _rows(run_dir):
    """The complete rows of metrics.jsonl: a line without its newline is still being written (the
    poll in _kill_at reads while the trainer appends) or was cut by a SIGKILL."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _rows(run_dir)}


def _run(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _kill_at(cmd, run_dir, at_step):
    """Start training in its own process group; SIGKILL the whole group once metrics.jsonl shows
    `at_step`; return the last step it logged."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if os.path.exists(path) and any(r["step"] >= at_step for r in _rows(run_dir)):
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"the run ended on its own (rc {rc}): {p.stderr.read()[-2000:]}"
    return max(r["step"] for r in _rows(run_dir))


def _resumed_from(stdout):
    return int(stdout.split("loaded checkpoint")[1].split("(step ")[1].split(",")[0])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref"))
    _run(_cmd(data_dir, run, ["logging.tensorboard=true"]))
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {"run": run, "rows": rows, "losses": {r["step"]: r["loss"] for r in rows}}


def test_logged_values_equal_the_configured_schedule(reference):
    for r in reference["rows"]:
        want = expected(r["step"] - 1)
        for k, v in want.items():
            assert math.isclose(r[k], v, rel_tol=1e-12), (r["step"], k, r[k], v)
    # the resolved schedules are written beside the config
    import yaml
    res = yaml.safe_load(open(os.path.join(reference["run"], "schedules.yaml")))
    assert [(p["step"], p["alpha"], p["languages"]) for p in res["blend_phases"]] == \
        [(0, 0.7, ["en", "fr"]), (12, 0.5, ["en", "fr", "sw"]), (24, 0.3, ["en", "fr", "sw"])]
    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(os.path.join(reference["run"], "tb"))
    ev.Reload()
    for k in ("alpha", "mask_prob", "active_languages", "global_batch", "lr"):
        got = {e.step: e.value for e in ev.Scalars(f"train/{k}")}
        assert sorted(got) == list(range(1, STEPS + 1))
        assert all(math.isclose(got[s], expected(s - 1)[k], rel_tol=1e-6) for s in got), k


def _kill_resume_compare(cmd, run, at_step, ref, steps):
    """SIGKILL at `at_step`, resume: the checkpoint of step 10 is the one resumed from; bitwise."""
    killed = _kill_at(cmd, run, at_step)
    assert at_step <= killed < 20, killed          # checkpoints every 10 steps: the last one is 10
    p = _run(cmd)
    assert _resumed_from(p.stdout) == 10
    final = _losses(run)
    assert sorted(final) == list(range(1, steps + 1))
    for step, loss in final.items():
        assert loss == ref[step], (step, loss, ref[step])


def test_sigkill_inside_a_phase_resumes_bitwise(data_dir, reference, tmp_path):
    """Killed at step 11, resumed from step 10: both inside the phase [0, 12)."""
    run = str(tmp_path / "run")
    _kill_resume_compare(_cmd(data_dir, run, ["checkpoint.interval=10"]), run, 11, reference["losses"], STEPS)


def test_sigkill_across_a_boundary_resumes_bitwise(data_dir, reference, tmp_path):
    """Killed at step 14 (phase [12, 24)), resumed from step 10: the redone steps cross the boundary."""
    run = str(tmp_path / "run")
    _kill_resume_compare(_cmd(data_dir, run, ["checkpoint.interval=10"]), run, 14, reference["losses"], STEPS)


def _branch(data_dir, parent_run, step, run, extra=()):
    ck = os.path.join(parent_run, "checkpoints", f"step_{step:08d}")
    p = _run(_cmd(data_dir, run, [f"checkpoint.branch_from={ck}", *extra]))
    assert f"branched from {ck} at step {step}" in p.stdout
    return _losses(run)


def test_branch_with_the_parents_schedules_continues_it_bitwise(data_dir, reference, tmp_path):
    got = _branch(data_dir, reference["run"], 10, str(tmp_path / "same"))
    assert sorted(got) == list(range(11, STEPS + 1))
    assert all(got[s] == reference["losses"][s] for s in got)


def test_branch_with_another_mix_differs_only_from_where_its_mix_does(data_dir, reference, tmp_path):
    # the parent's language schedule until step 20, then English only
    mix = ["data.language_schedule=[{step: 0, languages: [en, fr]}, {step: 12, languages: [en, fr, sw]}, "
           "{step: 20, languages: [en]}]"]
    got = _branch(data_dir, reference["run"], 15, str(tmp_path / "mix"), mix)
    ref = reference["losses"]
    assert all(got[s] == ref[s] for s in range(16, 21))          # steps 15..19 (0-based): same mix
    assert all(got[s] != ref[s] for s in range(21, STEPS + 1))   # from step 20 on: English only
    rows = {r["step"]: r for r in _rows(str(tmp_path / "mix"))}
    assert rows[20]["active_languages"] == 3 and rows[21]["active_languages"] == 1
    # a mix changed at the branch step itself differs from the branch step on
    now = _branch(data_dir, reference["run"], 15, str(tmp_path / "now"), ["data.language_schedule=[{step: 0, languages: [en]}]"])
    assert all(now[s] != ref[s] for s in range(16, STEPS + 1))


def test_batch_warmup_equals_fixed_size_runs_on_its_steps(data_dir, reference, tmp_path):
    """Steps 1-8 run at global batch 4, later ones at 8: a fixed-size run at 4 from scratch repeats
    steps 1-8 bitwise, and a fixed-size run at 8 continuing from the step-10 checkpoint repeats
    steps 11-30 (same samples, same loss normalisation by the step's global masked tokens)."""
    ref = reference["losses"]
    assert [r["global_batch"] for r in reference["rows"][:10]] == [4] * 8 + [8] * 2
    small = str(tmp_path / "b4")
    # 8 steps with the reference's learning rates (its wsd decay starts at step 22: constant up to there)
    _run(_cmd(data_dir, small, ["train.batch_warmup=null", "train.global_batch=4", "optim.decay=constant"], steps=8))
    got = _losses(small)
    assert sorted(got) == list(range(1, 9)) and all(got[s] == ref[s] for s in got)
    big = _branch(data_dir, reference["run"], 10, str(tmp_path / "b8"), ["train.batch_warmup=null"])
    assert all(big[s] == ref[s] for s in big)
    # control: the fixed size at 8 from scratch sees other samples on the warmup's steps
    other = str(tmp_path / "b8_scratch")
    _run(_cmd(data_dir, other, ["train.batch_warmup=null", "optim.decay=constant"], steps=2))
    assert _losses(other)[2] != ref[2]


def _torchrun_cmd(data_dir, run_dir, extra=()):
    from tests.support.harness import free_port
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}",
            "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run_dir}",
            f"train.train_steps={STEPS_TP}", "checkpoint.interval=10", "checkpoint.keep_last=10",
            "train.eval_interval=0", *SCHED, "parallel.tensor=2", "parallel.pipeline=2", "train.micro_batch=2",
            *extra]


STEPS_TP = 20


@pytest.mark.timeout(3600)           # 4 runs of 4 processes; minutes on 2 loaded cores
def test_tp2_pp2_sigkill_inside_a_phase_and_across_a_boundary_resumes_bitwise(data_dir, tmp_path):
    """TP=2 x PP=2 (4 processes under torchrun, dropout on, batch 4 -> 6 -> 8 at micro-batch 2, so
    2, 3 then 4 micro-batches through 1F1B), one run killed twice: SIGKILL of the whole process
    group at step 11 (inside the phase [0, 12)), resumed from the step-10 checkpoint and killed
    again at step 14 (past the boundary at 12), resumed from step 10 again and run to the end.
    Every step any of its incarnations logged equals the uninterrupted run's loss bit for bit."""
    ref_run = str(tmp_path / "ref")
    _run(_torchrun_cmd(data_dir, ref_run))
    ref = _losses(ref_run)
    assert sorted(ref) == list(range(1, STEPS_TP + 1))
    sizes = [r["global_batch"] for r in _rows(ref_run)]
    assert sizes[:8] == [4, 4, 4, 4, 6, 6, 6, 8] and sizes[-1] == 8
    run = str(tmp_path / "killed")
    cmd = _torchrun_cmd(data_dir, run)
    for at in (11, 14):                 # inside the phase, then across its boundary
        killed = _kill_at(cmd, run, at)
        assert at <= killed < 20, killed          # checkpoints every 10 steps: the last one is 10
        for r in _rows(run):                      # the killed incarnation's steps too
            assert r["loss"] == ref[r["step"]], (at, r["step"], r["loss"], ref[r["step"]])
    p = _run(cmd)
    assert _resumed_from(p.stdout) == 10
    final = _losses(run)                          # a resumed run drops the log rows after its checkpoint
    assert sorted(final) == list(range(1, STEPS_TP + 1))
    for step, loss in final.items():
        assert loss == ref[step], (step, loss, ref[step])
