"""A TP = PP = 1 run needs no megatron-core (the stock GPU image has none): `init_parallel` builds
the groups itself there, with Megatron's rank order, and a training step runs with `import megatron`
failing."""
import os
import subprocess
import sys

import pytest

from xlmr_mp.parallel.state import grid_ranks, uses_megatron

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = "import sys; sys.modules['megatron'] = None\n"     # every `import megatron...` raises ImportError


@pytest.mark.parametrize("world, tp, pp", [(1, 1, 1), (8, 1, 1), (8, 2, 2), (8, 2, 1), (8, 1, 4), (16, 2, 2)])
def test_grid_ranks_are_megatrons(world, tp, pp):
    ps = pytest.importorskip("megatron.core.parallel_state")
    rg = ps.RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    ours = grid_ranks(world, tp, pp)
    for kind in ("tp", "dp", "pp"):
        assert ours[kind] == rg.get_ranks(kind), kind


def test_only_tp_or_pp_layouts_use_megatron():
    assert not uses_megatron(1, 1)
    assert uses_megatron(2, 1) and uses_megatron(1, 2)


def _run(body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + body], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_dp_groups_at_full_world_without_megatron():
    """World 8 under torch's fake backend, rank 5, TP = PP = 1: one-rank TP / PP / embedding groups,
    the DP group of all ranks; megatron-core is not imported."""
    p = _run("""
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
from xlmr_mp.parallel.state import destroy_parallel, init_parallel
g = init_parallel(1, 1)
r = dist.get_process_group_ranks
print(r(g.tp_group), r(g.pp_group), r(g.dp_group), g.embedding_ranks, g.tp_rank, g.pp_rank, g.dp_rank, g.dp_size)
destroy_parallel()
print("megatron imported:", any(k.startswith("megatron.") for k in sys.modules))
""", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines() == ["[5] [5] [0, 1, 2, 3, 4, 5, 6, 7] (5,) 0 0 5 8", "megatron imported: False"]


@pytest.mark.slow
def test_training_step_without_megatron():
    """bench/train_step.py (what bench/gpu_suite.sh runs) at the tiny preset, one process, with every
    `import megatron` failing: the real trainer step runs and reports."""
    p = _run("""
import runpy
sys.argv = ["bench/train_step.py", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
            "--micro-batch", "2", "--seq", "32", "--no-peer"]
sys.path.insert(0, "bench")
runpy.run_path("bench/train_step.py", run_name="__main__")
try:
    import megatron.core
    print("megatron importable")
except ImportError:
    print("megatron blocked")
""")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "ours:" in p.stdout and "MFU" in p.stdout, p.stdout
    assert p.stdout.rstrip().endswith("megatron blocked")
