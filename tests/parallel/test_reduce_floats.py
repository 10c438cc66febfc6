"""distributed.all_reduce_floats: the one helper the trainer uses to sum (or max) a few floats over
a process group, in float64, on real gloo ranks."""
import pytest

from tests.support.harness import run_distributed
from xlmr_mp.distributed import all_reduce_floats


def _body(rank, world_size):
    import torch.distributed as dist
    pair = dist.new_group([0, 1])
    return dict(
        sum=all_reduce_floats([rank, 1e8 if rank == 0 else 1.0]),     # float32 would round 1e8 + 2 to 1e8
        max=all_reduce_floats([float(rank == 1), -rank], op="max"),
        pair=all_reduce_floats([10.0 * (rank + 1)], pair) if rank < 2 else None,
    )


def test_sum_max_and_subgroup_over_three_ranks():
    r = run_distributed(_body, world_size=3, timeout=240)
    assert all(x["sum"] == [3.0, 1e8 + 2.0] for x in r)
    assert all(x["max"] == [1.0, 0.0] for x in r)
    assert [x["pair"] for x in r] == [[30.0], [30.0], None]


def test_single_process_returns_the_values():
    assert all_reduce_floats([1, 2.5]) == [1.0, 2.5]
    assert all_reduce_floats([0.0], op="max") == [0.0]
