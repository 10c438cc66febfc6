"""Dynamic loss scaler and autocast contexts."""
import pytest
import torch

from xlmr_mp.precision import (DynamicLossScaler, LossScaleAtMinimum, autocast, grads_have_inf,
                               unscale_grads)


def test_overflow_skips_and_halves_then_grows():
    s = DynamicLossScaler(initial_scale=8.0, min_scale=1.0, window=3)
    assert s.update(found_inf=True) is True and s.scale == 4.0
    assert [s.update(False) for _ in range(2)] == [False, False] and s.scale == 4.0
    assert s.update(False) is False and s.scale == 8.0
    assert s.skipped_steps == 1


def test_hysteresis_delays_backoff():
    s = DynamicLossScaler(initial_scale=8.0, window=100, hysteresis=2)
    assert s.update(True) and s.scale == 8.0
    assert s.update(True) and s.scale == 4.0


def test_minimum_scale_aborts_with_clear_error():
    s = DynamicLossScaler(initial_scale=2.0, min_scale=1.0, window=100)
    s.update(True)
    assert s.scale == 1.0
    with pytest.raises(LossScaleAtMinimum, match="min_loss_scale"):
        s.update(True)


def test_state_roundtrip():
    s = DynamicLossScaler(initial_scale=16.0, window=5)
    s.update(True); s.update(False)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_inf_detection_and_unscale():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([4.0, 8.0])
    assert not grads_have_inf([p])
    unscale_grads([p], 4.0)
    assert p.grad.tolist() == [1.0, 2.0]
    p.grad[0] = float("inf")
    assert grads_have_inf([p])


def test_autocast_bf16_matmul_dtype():
    a = torch.randn(4, 4)
    with autocast("bf16", torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
