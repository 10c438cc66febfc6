"""Resume is bitwise with dropout on (model.dropout = attention_dropout = 0.1): a run restarted from its
step-4 checkpoint repeats steps 5..8 of the uninterrupted run bit for bit, which needs the RNG
states (torch default generator, the tensor-parallel dropout stream) restored from the rank file.
Control: the same restart with another saved generator state differs, so dropout really is in play."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import train_bodies as b
ROOT = b.ROOT
STEPS, SAVE_AT = 8, 4


def _cmd(data_dir, run_dir, extra=()):
    return [sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data_dir}", f"run_dir={run_dir}",
            f"train.train_steps={STEPS}", f"checkpoint.interval={SAVE_AT}", "checkpoint.keep_last=5",
            "train.eval_interval=0", "model.dropout=0.1", "model.attention_dropout=0.1", *extra]


def _run(cmd):
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _restart_from_step(ref_run, run, step):
    """A run directory holding only the reference run's checkpoint of `step` as `latest`."""
    name = f"step_{step:08d}"
    os.makedirs(os.path.join(run, "checkpoints"))
    shutil.copytree(os.path.join(ref_run, "checkpoints", name), os.path.join(run, "checkpoints", name))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write(name + "\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = b.make_indexed_data(str(tmp_path_factory.mktemp("data")))
    run = str(tmp_path_factory.mktemp("ref"))
    _run(_cmd(data, run))
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return dict(data=data, run=run, losses=losses)


def test_resume_with_dropout_is_bitwise(reference, tmp_path):
    run = str(tmp_path / "run")
    _restart_from_step(reference["run"], run, SAVE_AT)
    p = _run(_cmd(reference["data"], run))
    assert f"(step {SAVE_AT}, same layout" in p.stdout
    got = _losses(run)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == reference["losses"][step], (step, loss, reference["losses"][step])


def test_dropout_streams_change_the_losses(reference, tmp_path):
    """Control: the same restart with the saved torch generator state replaced gives other losses,
    so the dropout randomness (not only the weights) decides the resumed steps."""
    run = str(tmp_path / "run")
    _restart_from_step(reference["run"], run, SAVE_AT)
    step_dir = os.path.join(run, "checkpoints", f"step_{SAVE_AT:08d}")
    ranks = [f for f in os.listdir(step_dir) if f.startswith("rank")]
    assert ranks == ["rank00000.pt"]
    import torch
    st = torch.load(os.path.join(step_dir, ranks[0]), weights_only=True)
    st["rng"]["torch"] = torch.Generator().manual_seed(99).get_state()
    torch.save(st, os.path.join(step_dir, ranks[0]))
    _run(_cmd(reference["data"], run))
    got = _losses(run)
    assert any(got[s] != reference["losses"][s] for s in got), "dropout did not change the losses"
