"""The DP-sharded MLM loader: batch contract, exact resume at DP=1 and DP=2 (also in a real
2-process gloo run), same samples for any worker count, DP=1 + accumulation == DP=2, validation."""
import math

import numpy as np
import pytest
import torch

from _data_corpus import write_corpus
from dist import run_distributed
from xlmr_mp.data.config import DataConfig
from xlmr_mp.data.loader import MLMLoader, ValidationLoader, bits_per_char, build_train_loader

V = 1000


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    write_corpus(str(root), {"aa": 120, "bb": 30, "cc": 6}, vocab_size=V, seed=1)
    return str(root)


def _loader(path, rank=0, dp=1, micro=2, global_batch=8, workers=0, **kw):
    cfg = DataConfig(path=path, seq_length=64, num_workers=workers, **kw)
    return MLMLoader(cfg, rank, dp, micro, global_batch, V)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contract(corpus_dir):
    loader = _loader(corpus_dir)
    assert loader.accumulation_steps == 4
    for _ in range(6):
        b = next(loader)
        ids, att, lab = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.shape == att.shape == lab.shape == (2, 64) and b["lang"].shape == (2,)
        assert all(t.dtype == torch.int64 for t in b.values())
        assert torch.all(ids[:, 0] == 0)  # <s> first (never masked)
        assert torch.all((ids == 1) == (att == 0))  # pad exactly after the end
        n = att.sum(1)
        for r in range(2):
            assert torch.all(att[r, :n[r]] == 1)
            orig = torch.where(lab[r] != -100, lab[r], ids[r])[:n[r]]
            assert orig[-1] == 2  # the block ends with a complete sentence's </s>
        assert torch.all((lab == -100) | (lab >= 4))
    assert loader.state_dict()["samples_consumed"] == 12


@pytest.mark.parametrize("dp", [1, 2])
def test_resume_is_bitwise(corpus_dir, dp):
    for k in (3, 4, 5):  # mid-accumulation and at a global-batch boundary
        for rank in range(dp):
            ref = _loader(corpus_dir, rank, dp)
            full = [next(ref) for _ in range(k + 6)]
            first = _loader(corpus_dir, rank, dp)
            for _ in range(k):
                next(first)
            state = first.state_dict()
            resumed = _loader(corpus_dir, rank, dp)
            resumed.load_state_dict(state)
            for j in range(6):
                assert _equal(next(resumed), full[k + j]), (dp, rank, k, j)


def test_same_samples_whatever_num_workers(corpus_dir):
    ref = [next(_loader(corpus_dir, workers=0)) for _ in range(1)]
    l0, l2 = _loader(corpus_dir, workers=0), _loader(corpus_dir, workers=2)
    a = [next(l0) for _ in range(9)]
    b = [next(l2) for _ in range(9)]
    assert all(_equal(x, y) for x, y in zip(a, b)) and _equal(ref[0], a[0])


def test_dp1_accumulation_equals_dp2_and_resume_across_dp(corpus_dir):
    one = _loader(corpus_dir, 0, 1, micro=2)
    r0, r1 = _loader(corpus_dir, 0, 2, micro=2), _loader(corpus_dir, 1, 2, micro=2)
    for _ in range(3):  # global batches
        g1 = torch.cat([next(one)["input_ids"] for _ in range(4)])
        g2 = torch.cat([next(r0)["input_ids"] for _ in range(2)] + [next(r1)["input_ids"] for _ in range(2)])
        assert torch.equal(g1, g2)
    # a DP=1 state at a global-batch boundary resumes on DP=2 with micro=4
    r = _loader(corpus_dir, 1, 2, micro=4)
    r.load_state_dict(one.state_dict())
    want = [next(one) for _ in range(4)]
    assert torch.equal(next(r)["labels"], torch.cat([want[2]["labels"], want[3]["labels"]]))


def test_language_mix_follows_q(corpus_dir):
    loader = _loader(corpus_dir, micro=8, global_batch=64)
    counts = np.zeros(3)
    for _ in range(40):
        counts += np.bincount(next(loader)["lang"].numpy(), minlength=3)
    freq = counts / counts.sum()
    assert np.abs(freq - loader.q).max() * 320 <= 2.0 + 1e-9  # within 2 samples of q_i * 320


def test_real_two_process_resume(corpus_dir):
    k = 3
    res = run_distributed(__import__("_data_bodies").resume_rank, world_size=2, args=(corpus_dir, k), timeout=240)
    single = _loader(corpus_dir, 0, 1)
    global0 = torch.cat([next(single)["input_ids"] for _ in range(4)])
    assert torch.equal(res[0]["global0"], global0)
    for rank in range(2):
        for j in range(k):
            assert _equal(res[rank]["after"][j], res[rank]["full"][k + j])
    assert res[0]["state"]["samples_consumed"] == k * 2 * 2


def test_validation_batches_and_bpc(corpus_dir):
    chars = np.arange(V) % 5 + 1
    cfg = DataConfig(path=corpus_dir, seq_length=64)
    val = ValidationLoader(cfg, V, batch_size=3, char_lengths=chars)
    a = list(val.batches("bb"))
    b = list(val.batches("bb"))
    assert len(a) == val.num_batches("bb") >= 1 and all(_equal(x, y) for x, y in zip(a, b))
    assert all(torch.all(x["lang"] == 1) for x in a)
    masked = sum(int(torch.from_numpy(chars)[x["labels"][x["labels"] != -100]].sum()) for x in a)
    assert masked == sum(int(x["masked_chars"].sum()) for x in a) > 0
    ones = list(ValidationLoader(cfg, V, 1, char_lengths=chars).batches("bb"))
    shards = [list(ValidationLoader(cfg, V, 1, r, 2, char_lengths=chars).batches("bb")) for r in range(2)]
    assert len(ones) >= 2 and len(shards[0]) + len(shards[1]) == len(ones)
    assert _equal(shards[1][0], ones[1]) and _equal(shards[0][1], ones[2]) if len(ones) > 2 else _equal(shards[1][0], ones[1])
    assert bits_per_char(math.log(2) * 10, 5) == pytest.approx(2.0)


def test_build_from_run_config_and_errors(corpus_dir):
    from xlmr_mp.config import load_config
    cfg = load_config("launch/configs/tiny.yaml", [f"data.path={corpus_dir}", "model.vocab_size=1000"])
    loader = build_train_loader(cfg, 0, 1)
    assert next(loader)["input_ids"].shape == (cfg.train.micro_batch, cfg.data.seq_length)
    with pytest.raises(ValueError, match="global_batch"):
        _loader(corpus_dir, 0, 3, micro=2, global_batch=8)
    loader = _loader(corpus_dir)
    with pytest.raises(ValueError, match="micro-batch boundary"):
        loader.load_state_dict({"samples_consumed": 3, "global_batch": 8, "seed": 1234,
                                "languages": ["aa", "bb", "cc"]})
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"samples_consumed": 8, "seed": 1})
