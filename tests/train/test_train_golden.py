"""Golden loss curves: 20 steps of the tiny preset on data generated here from a fixed seed must
reproduce the curves in tests/golden/ (rtol 1e-4). A change of the model, the data pipeline, the
optimizer or the schedule moves them. Two curves:
  tiny_losses.json                    the default path (on CPU the fused C++ nodes; dropout 0, the preset's)
  tiny_losses_reference_dropout.json  the plain reference model (XLMR_MP_KERNELS=reference) with dropout
                                      and attention dropout 0.1, so dropout's RNG use is pinned too
After an intended change, regenerate with `XLMR_UPDATE_GOLDEN=1 python -m pytest tests/train/test_train_golden.py`
and say why in the commit."""
import json
import os
import subprocess
import sys

import pytest

from tests.support import train_bodies as b
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
CURVES = {
    "tiny_losses.json": ([], {}),
    "tiny_losses_reference_dropout.json": (["model.dropout=0.1", "model.attention_dropout=0.1"],
                                           {"XLMR_MP_KERNELS": "reference"}),
}


@pytest.mark.parametrize("name", sorted(CURVES))
def test_tiny_golden_curve(tmp_path, name):
    overrides, env = CURVES[name]
    golden_path = os.path.join(GOLDEN_DIR, name)
    data = b.make_indexed_data(str(tmp_path / "data"), seed=0)
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "xlmr_mp.train", "--preset", "tiny",
           f"data.path={data}", f"run_dir={run}", "train.train_steps=20", "checkpoint.interval=0",
           "train.eval_interval=0"] + overrides
    p = subprocess.run(cmd, cwd=b.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 20
    if os.environ.get("XLMR_UPDATE_GOLDEN") == "1":
        with open(golden_path, "w") as f:
            json.dump({"preset": "tiny", "steps": 20, "overrides": overrides, "env": env,
                       "data": "tests/support/train_bodies.py:make_indexed_data(seed=0)", "losses": losses}, f, indent=1)
    golden = json.load(open(golden_path))["losses"]
    assert losses[-1] < losses[0] - 0.5          # it learns
    for i, (a, e) in enumerate(zip(losses, golden)):
        assert abs(a - e) <= 1e-4 * abs(e), f"step {i + 1}: loss {a} vs golden {e}"
