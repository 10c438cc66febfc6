"""The trainer at DP=2, ZeRO-1, TP=2, PP=2, TP=2 x PP=2 and interleaved PP gives the losses and the
parameters of the single-process run (fp32, gloo, real multi-process runs)."""
import pytest
import torch

from tests.support.harness import run_distributed
from tests.support import train_bodies as b
STEPS = 10
BASE = ["train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run: 10 steps, micro-batch 2 x 4 accumulation."""
    return run_distributed(b.train_rank_body, 1, args=(BASE, STEPS, str(tmp_path_factory.mktemp("ref"))),
                           timeout=300)[0]


def check_same(reference, results, rtol_loss=1e-5):
    """Every rank's losses within rtol_loss of the reference, its parameters equal to the
    reference's full parameters cut for its TP rank."""
    from xlmr_mp.model.sharding import full_to_local, local_to_full
    cfg = b.tiny_cfg().model
    full = local_to_full([reference["params"]], cfg)
    full["lm_head.decoder_weight"] = full["embeddings.word_embeddings.weight"]
    for r in results:
        for a, e in zip(r["losses"], reference["losses"]):
            assert abs(a - e) <= rtol_loss * abs(e), (r["losses"], reference["losses"])
        # clipping is active (norms > optim.clip_grad=1): a norm that double counts replicated or
        # tied parameters, or misses a shard, would show here and in the parameters
        for a, e in zip(r["grad_norms"], reference["grad_norms"]):
            assert abs(a - e) <= 1e-5 * e, (r["grad_norms"], reference["grad_norms"])
        local = full_to_local({n: full[n] for n in r["params"]}, cfg, r["tp_size"], r["tp_rank"])
        for n, t in local.items():
            torch.testing.assert_close(r["params"][n], t, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_reference_learns(reference):
    assert reference["losses"][-1] < reference["losses"][0]
    assert all(1.0 < x < 100 for x in reference["grad_norms"])     # clipping at 1.0 is active


@pytest.mark.parametrize("extra", [[], ["parallel.distributed_optimizer=true"]], ids=["ddp", "zero1"])
def test_dp2_equals_single(reference, extra, tmp_path):
    res = run_distributed(b.train_rank_body, 2, args=(BASE + extra, STEPS, str(tmp_path)), timeout=300)
    check_same(reference, res)


def test_tp2_equals_single(reference, tmp_path):
    res = run_distributed(b.train_rank_body, 2, args=(BASE + ["parallel.tensor=2"], STEPS, str(tmp_path)), timeout=300)
    check_same(reference, res)


@pytest.mark.parametrize("layout,world", [
    (["parallel.pipeline=2"], 2),
    (["parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved"], 2),
    (["parallel.tensor=2", "parallel.pipeline=2"], 4),
    (["parallel.pipeline=2", "parallel.distributed_optimizer=true"], 4),
], ids=["pp2-1f1b", "pp2-interleaved", "tp2xpp2", "pp2xdp2-zero1"])
def test_pipeline_layouts_equal_single(reference, layout, world, tmp_path):
    res = run_distributed(b.train_rank_body, world, args=(BASE + layout, STEPS, str(tmp_path)), timeout=400)
    check_same(reference, res)
    # the tied embedding and its decoder copy on the last stage stay identical
    emb = {r["tp_rank"]: r["params"]["embeddings.word_embeddings.weight"] for r in res
           if "embeddings.word_embeddings.weight" in r["params"] and r["dp_rank"] == 0}
    dec = {r["tp_rank"]: r["params"]["lm_head.decoder_weight"] for r in res
           if "lm_head.decoder_weight" in r["params"] and r["dp_rank"] == 0}
    assert emb and emb.keys() == dec.keys()
    for t in emb:
        assert torch.equal(emb[t], dec[t])
