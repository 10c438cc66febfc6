import pytest

from tests.support.harness import run_distributed
from tests.parallel import dist_bodies as bodies
def test_allreduce_two_ranks():
    assert run_distributed(bodies.allreduce_rank, 2, timeout=120) == [3.0, 3.0]


def test_rank_error_is_reported():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_distributed(bodies.fail_on_rank1, 2, timeout=120)
