"""Checkpoints are read with weights_only=True: a rank, optimizer or model file carrying a pickled
callable is refused without running it, and the trainer's real rank state (RNG states incl. numpy's,
loss scaler, loader position) survives the plain-types encoding exactly."""
import os
import pathlib
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xlmr_mp.checkpoint.sharded import (UnsafeCheckpointError, from_plain, load_model_state, load_optim_state,
                                        load_rank_state, save_checkpoint, to_plain)


class Payload:
    """Unpickling this touches a marker file: the stand-in for arbitrary code in a handed-over checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _checkpoint(root):
    g = SimpleNamespace(tp_rank=0, pp_rank=0, dp_rank=0)
    return save_checkpoint(root, 1, g, model_state={"w": torch.zeros(2)},
                           optim_state={"w": {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2),
                                              "step": torch.tensor(1.0)}},
                           rank_state={"step": 1, "scaler": {"scale": 1.0}}, meta={"tp": 1, "pp": 1, "dp": 1})


@pytest.mark.parametrize("victim", ["rank00000.pt", "optim_tp00_pp00_dp00.pt", "model_tp00_pp00.pt"])
def test_file_with_a_pickled_callable_is_refused(tmp_path, victim):
    path = _checkpoint(str(tmp_path / "ck"))
    marker = tmp_path / "code_ran"
    torch.save({"step": 1, "w": Payload(str(marker))}, os.path.join(path, victim))
    g = SimpleNamespace(tp_rank=0, pp_rank=0, tp_size=1, pp_size=1)
    with pytest.raises(UnsafeCheckpointError, match=victim.replace(".", r"\.") + ": refused to load"):
        if victim.startswith("rank"):
            load_rank_state(path, 0)
        elif victim.startswith("optim"):
            load_optim_state(path, ["w"], None, g, same=True)
        else:
            load_model_state(path, ["w"], None, g, same=True)
    assert not marker.exists(), "the pickled callable ran while loading"


def test_rank_state_round_trips_through_plain_types(tmp_path):
    """The trainer's rank state (torch, python, numpy and tracker RNG states) is written as tensors and
    plain values and comes back equal; restoring it reproduces the same random draws."""
    from xlmr_mp.train import rng_state, set_rng_state
    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    state = {"step": 7, "scaler": {"scale": 2.0 ** 15, "good_steps": 3}, "rng": rng_state(),
             "loader": {"samples_consumed": 56, "languages": ["en", "fr"], "seed": 1234}}
    plain = to_plain(state)
    assert not any(isinstance(v, np.ndarray) for v in plain["rng"]["numpy"])
    g = SimpleNamespace(tp_rank=0, pp_rank=0, dp_rank=0)
    path = save_checkpoint(str(tmp_path / "ck"), 7, g, model_state={}, optim_state={}, rank_state=state,
                           meta={"tp": 1, "pp": 1, "dp": 1})
    back = load_rank_state(path, 0)
    assert back["loader"] == state["loader"] and back["scaler"] == state["scaler"] and back["step"] == 7
    expect = (torch.rand(3), random.random(), np.random.rand(3))
    set_rng_state(back["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and np.array_equal(got[2], expect[2])
    arr = np.arange(6, dtype=np.uint32).reshape(2, 3)
    out = from_plain(to_plain({"a": (arr, np.float32(1.5))}))
    assert out["a"][0].dtype == np.uint32 and np.array_equal(out["a"][0], arr) and out["a"][1] == 1.5
