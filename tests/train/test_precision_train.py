"""fp16 in the trainer: a forced inf gradient skips the step, halves the loss scale and changes
nothing else (parameters, Adam state), on every DP rank; bf16 trains close to fp32."""
import math

import pytest

from tests.support.harness import run_distributed
from tests.support import train_bodies as b


@pytest.mark.slow          # two trainer ranks
def test_forced_inf_skips_step_and_halves_scale(tmp_path):
    res = run_distributed(b.fp16_inf_body, 2, args=(str(tmp_path),), timeout=300)
    for r in res:
        assert r["first"]["skipped"] == 0 and r["first"]["loss_scale"] == 1024.0
        assert r["bad"]["skipped"] == 1 and r["bad"]["loss_scale"] == 1024.0
        assert math.isnan(r["bad"]["grad_norm"])
        assert r["params_same"] and r["opt_same"]
        assert r["after"]["skipped"] == 0 and r["after"]["loss_scale"] == 512.0
        assert r["params_moved_after"]
        assert r["step"] == 3 and r["skipped_total"] == 1
        assert math.isfinite(r["after"]["loss"])


@pytest.mark.slow          # two trainer ranks
def test_minimum_loss_scale_saves_and_aborts(tmp_path):
    data = b.make_indexed_data(str(tmp_path / "data"))
    res = run_distributed(b.loss_scale_abort_body, 2, args=(data, str(tmp_path / "run")), timeout=300)
    for r in res:
        assert r["code"] == 3
        assert r["latest"] == "step_00000002"      # steps 1, 2 skipped (scale 4 -> 2 -> 1); the 3rd aborts
    assert [row["loss_scale"] for row in res[0]["rows"]] == [4.0, 2.0]
    assert all(row["skipped"] == 1 for row in res[0]["rows"])
