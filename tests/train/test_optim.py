"""AdamW groups, learning-rate schedule, gradient clipping, and DP/ZeRO-1 against one process."""
import math

import pytest
import torch

from tests.support.harness import run_scenarios
from xlmr_mp.config import OptimConfig
from xlmr_mp.optim import LRSchedule, clip_grads, global_grad_norm, param_groups


def test_param_groups_no_decay_on_bias_and_layernorm():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(m.named_parameters(), 0.01)
    decayed = [n for g in groups if g["weight_decay"] > 0 for n in g["names"]]
    plain = [n for g in groups if g["weight_decay"] == 0 for n in g["names"]]
    assert decayed == ["0.weight"]
    assert sorted(plain) == ["0.bias", "1.bias", "1.weight"]


def test_defaults_are_roberta_recipe():
    o = OptimConfig()
    assert tuple(o.betas) == (0.9, 0.98) and o.eps == 1e-6 and o.weight_decay == 0.01


def test_schedule_linear_warmup_then_decay():
    s = LRSchedule(1.0, warmup_steps=4, total_steps=12, decay="linear")
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(8) == pytest.approx(0.5) and s(12) == 0.0 and s(20) == 0.0
    c = LRSchedule(1.0, 0, 10, decay="cosine", min_lr=0.1)
    assert c(0) == pytest.approx(1.0) and c(5) == pytest.approx(0.55) and c(10) == pytest.approx(0.1)
    assert LRSchedule(2.0, 1, 10, decay="constant")(7) == 2.0


def test_clip_scales_to_max_norm():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    n = global_grad_norm([p.grad])
    assert n == pytest.approx(5.0)
    clip_grads([p], n, 1.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([0.3, 0.4, 0.0])
    assert clip_grads([p], 0.5, 1.0) == 1.0 and p.grad[0].item() == pytest.approx(0.3)


DP_CASES = {"ddp": (False, False), "zero1-allreduce": (True, False), "zero1-reduce-scatter": (True, True)}


@pytest.fixture(scope="module")
def dp_runs():
    """The three DP=2 variants, one after another in one pair of processes (spawning dominates)."""
    return run_scenarios("tests.support.train_bodies", 2, {
        case: ("dp_rank_body", dict(steps=4, zero=zero, reduce_scatter=rs)) for case, (zero, rs) in DP_CASES.items()},
        timeout=180)


@pytest.mark.parametrize("case", list(DP_CASES))
def test_dp_reducer_and_zero1_match_single_process(case, dp_runs):
    """DP=2 (bucketed in-place SUM reduction, ZeRO-1 on or off) == one process with 2x accumulation."""
    from tests.support import train_bodies as b
    zero, _ = DP_CASES[case]
    ref = b.dp_reference(steps=4)
    res = dp_runs[case]
    for r in res:
        for name, t in ref.items():
            torch.testing.assert_close(r[name], t, rtol=1e-6, atol=1e-7)
    owned = [set(r["__owned__"]) for r in res]
    if zero:  # state really is split: names written once, elements halved (padding aside)
        assert not (owned[0] & owned[1]) and owned[0] | owned[1] == set(ref)
        total = sum(t.numel() for t in ref.values())
        assert all(abs(r["__state_elems__"] - total / 2) <= 4 for r in res), [r["__state_elems__"] for r in res]
    else:
        assert owned[0] == owned[1] == set(ref)
