"""Checkpoints: saved at TP=2 x PP=2, loaded at TP=1 x PP=1 x DP=4 (ZeRO-1) and back to TP=2 x PP=2:
the weights arrive bit for bit, Adam state too (the next steps' losses match the run that never
changed layout), and an interrupted save never damages `latest`."""
import os

import pytest
import torch

from tests.support.harness import run_distributed
from tests.support import train_bodies as b
from xlmr_mp.model.sharding import local_to_full

TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]
DP4 = ["parallel.distributed_optimizer=true"]


def full_params(results, key):
    """Full (unsharded) parameters from every rank's local `key` params (DP rank 0 of each stage)."""
    cfg = b.tiny_cfg().model
    full = {}
    for pp in sorted({r["pp_rank"] for r in results}):
        per_tp = sorted((r for r in results if r["pp_rank"] == pp and r["dp_rank"] == 0), key=lambda r: r["tp_rank"])
        full.update(local_to_full([r[key] for r in per_tp], cfg))
    full.pop("lm_head.decoder_weight", None)       # the tied copy equals the word embedding
    return full


def close(a, e, rtol=1e-5):
    return all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, e)) and len(a) == len(e)


def test_tp2pp2_to_dp4_and_back(tmp_path):
    ck1, ck2, ck3 = (str(tmp_path / n) for n in ("ck1", "ck2", "ck3"))
    # run 1, TP2 x PP2: 3 steps, save (step 3), 2 more steps: the never-resharded reference
    r1 = run_distributed(b.reshard_body, 4, args=(TP2PP2, "", 3, 2, ck1, str(tmp_path / "r1")), timeout=400)
    saved1 = full_params(r1, "saved")
    # run 2, TP1 x PP1 x DP4 with ZeRO-1: load step 3, 1 step, save (step 4), 1 step
    r2 = run_distributed(b.reshard_body, 4, args=(DP4, r1[0]["path"], 1, 1, ck2, str(tmp_path / "r2")), timeout=400)
    loaded2 = full_params(r2, "loaded")
    assert loaded2.keys() == saved1.keys()
    for n in saved1:
        assert torch.equal(loaded2[n], saved1[n]), n
    assert close(r2[0]["losses"], r1[0]["losses"][3:]), (r2[0]["losses"], r1[0]["losses"])
    # run 3, back at TP2 x PP2: load step 4, 1 step
    r3 = run_distributed(b.reshard_body, 4, args=(TP2PP2, r2[0]["path"], 0, 1, ck3, str(tmp_path / "r3")), timeout=400)
    loaded3, saved2 = full_params(r3, "loaded"), full_params(r2, "saved")
    for n in saved2:
        assert torch.equal(loaded3[n], saved2[n]), n
    assert close(r3[0]["losses"], r1[0]["losses"][4:]) and close(r3[0]["losses"], r2[0]["losses"][1:])
    assert r3[0]["step"] == 5


@pytest.mark.slow          # two trainer processes in turn
def test_optimizer_state_matters(tmp_path):
    """Control for the test above: loading the weights without the Adam state changes the next
    steps' losses beyond the tolerance used there."""
    ck1 = str(tmp_path / "ck1")
    r1 = run_distributed(b.reshard_body, 1, args=([], "", 3, 2, ck1, str(tmp_path / "r1")), timeout=300)
    path = r1[0]["path"]
    for f in os.listdir(path):
        if f.startswith("optim_"):
            os.remove(os.path.join(path, f))
    r2 = run_distributed(b.reshard_body, 1, args=([], path, 0, 2, str(tmp_path / "ck2"), str(tmp_path / "r2")), timeout=300)
    assert r2[0]["losses"][0] == r1[0]["losses"][3]          # same weights, same first loss
    assert not close(r2[0]["losses"][1:], r1[0]["losses"][4:])   # fresh Adam state: different update


@pytest.mark.slow          # two trainer processes in turn
def test_interrupted_save_keeps_latest(tmp_path):
    """A crash after some ranks wrote their files (a leftover step_N.tmp) leaves `latest` and its
    directory usable, and the next save replaces the leftover."""
    from xlmr_mp.checkpoint.sharded import latest_checkpoint, read_meta
    ck = str(tmp_path / "ck")
    r1 = run_distributed(b.reshard_body, 1, args=([], "", 2, 0, ck, str(tmp_path / "r1")), timeout=300)
    os.makedirs(os.path.join(ck, "step_00000003.tmp"))
    open(os.path.join(ck, "step_00000003.tmp", "model_tp00_pp00.pt.tmp"), "w").write("partial")
    assert latest_checkpoint(ck) == r1[0]["path"] and read_meta(r1[0]["path"])["step"] == 2
    r2 = run_distributed(b.reshard_body, 1, args=([], r1[0]["path"], 1, 0, ck, str(tmp_path / "r2")), timeout=300)
    assert latest_checkpoint(ck).endswith("step_00000003") and not os.path.exists(os.path.join(ck, "step_00000003.tmp"))


def test_model_only_checkpoint_loads_at_another_layout(tmp_path):
    """A model-only checkpoint (xlmr_mp.checkpoint.model_io, as written by tools/convert_checkpoint.py)
    saved at TP=2 x PP=2 starts a single-process run with exactly its weights (fresh Adam state)."""
    from xlmr_mp.checkpoint.model_io import save_model_checkpoint
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = b.tiny_cfg().model
    torch.manual_seed(0)
    m = XLMRModel(cfg, init_seed=7)
    full = local_to_full([{n: p.detach() for n, p in m.named_parameters()}], cfg)
    save_model_checkpoint(str(tmp_path / "ck"), full, cfg, tp=2, pp=2, step=0)
    r = run_distributed(b.model_only_load_body, 1, args=(str(tmp_path / "ck"), full), timeout=300)[0]
    assert r["same"] and r["step"] == 1 and r["loss"] == r["loss"]


def test_resave_same_step_and_crash_window(tmp_path):
    """Saving a step that already exists replaces it (no leftovers); if a crash fell between moving
    the old directory aside and renaming the new one in, `latest` still resolves (to the old one)."""
    import shutil
    from types import SimpleNamespace
    from xlmr_mp.checkpoint.sharded import latest_checkpoint, save_checkpoint
    g = SimpleNamespace(tp_rank=0, pp_rank=0, dp_rank=0)
    root = str(tmp_path / "ck")
    kw = dict(optim_state={}, rank_state={}, meta={"tp": 1, "pp": 1, "dp": 1}, keep_last=2)
    save_checkpoint(root, 1, g, model_state={"w": torch.zeros(2)}, **kw)
    path = save_checkpoint(root, 1, g, model_state={"w": torch.ones(2)}, **kw)
    assert latest_checkpoint(root) == path and not os.path.exists(path + ".old")
    assert torch.equal(torch.load(os.path.join(path, "model_tp00_pp00.pt"))["w"], torch.ones(2))
    shutil.move(path, path + ".old")           # the crash window of a third save
    assert latest_checkpoint(root) == path + ".old"
