"""TrainState (xlmr_mp/checkpoint/state.py): the rank part of a checkpoint round-trips the step's
scaler, the loader position and every RNG stream; `named` follows the chunks; CheckpointManager
takes only a TrainState. (Bitwise resume through real checkpoints: test_train_resume*.py.)"""
import random

import numpy as np
import pytest
import torch
from torch import nn

from xlmr_mp.checkpoint.manager import CheckpointManager
from xlmr_mp.checkpoint.state import TrainState
from xlmr_mp.precision import DynamicLossScaler


class _Loader:
    def __init__(self):
        self.position, self.loaded = 0, []

    def state_dict(self):
        return {"samples_consumed": self.position}

    def load_state_dict(self, state, branch=False):
        self.loaded.append((dict(state), branch))
        self.position = state["samples_consumed"]


def _draws():
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def _state():
    chunks = [nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 1))]
    return TrainState(chunks, optimizer=None, scaler=DynamicLossScaler(2.0 ** 8), loader=_Loader())


def test_named_follows_the_chunks_in_order():
    st = _state()
    assert [n for n, _ in st.named] == ["weight", "bias", "0.weight", "0.bias"]
    assert all(p is q for (_, p), q in zip(st.named, [*st.chunks[0].parameters(), *st.chunks[1].parameters()]))


@pytest.mark.parametrize("branch", [False, True])
def test_rank_state_round_trip(branch):
    st = _state()
    st.step, st.loader.position = 7, 112
    st.scaler.update(True)                     # an overflow: the scale backs off
    rs = st.rank_state_dict()
    want = _draws()
    assert rs["step"] == 7 and rs["loader"] == {"samples_consumed": 112}

    other = _state()
    other.load_rank_state_dict(rs, restore_rng=True, branch=branch)
    assert _draws() == want                    # every stream continues from the saved point
    assert other.scaler.scale == st.scaler.scale == 2.0 ** 7
    assert other.loader.loaded == [({"samples_consumed": 112}, branch)] and other.loader.position == 112

    other.load_rank_state_dict(rs, restore_rng=False)
    assert _draws() != want                    # at another layout the streams are reseeded, not restored


def test_checkpoint_manager_takes_a_train_state(tmp_path):
    class Cfg:
        class checkpoint:
            dir = str(tmp_path)
        run_dir = str(tmp_path)

    class Trainer:
        step = 0
    with pytest.raises(TypeError, match="takes a TrainState"):
        CheckpointManager(Cfg, None).save(Trainer())
