"""The DP-sharded MLM loader: batch contract, exact resume at DP=1 and DP=2 (also in a real
2-process gloo run), same samples for any worker count, DP=1 + accumulation == DP=2, validation."""
import math

import numpy as np
import pytest
import torch

from tests.support.corpus import write_corpus
from tests.support.harness import run_distributed
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
    res = run_distributed(__import__("tests.data.data_bodies", fromlist=["x"]).resume_rank, world_size=2, args=(corpus_dir, k), timeout=240)
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
    cfg = load_config("preset:tiny", [f"data.path={corpus_dir}", "model.vocab_size=1000"])
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


# ----------------------------------------------------------------------------- schedules

ALPHA3 = [{"step": 0, "alpha": 0.7}, {"step": 4, "alpha": 0.5}, {"step": 8, "alpha": 0.3}]
LANGS3 = [{"step": 0, "languages": ["aa", "bb"]}, {"step": 4, "languages": ["aa", "bb", "cc"]}]
MASK2 = [{"step": 0, "mask_prob": 0.4}, {"step": 6, "mask_prob": 0.1}]


def _sched_loader(path, rank=0, dp=1, micro=2, global_batch=8, warmup=None, **kw):
    kw.setdefault("alpha_schedule", ALPHA3)
    kw.setdefault("language_schedule", LANGS3)
    kw.setdefault("mask_schedule", MASK2)
    cfg = DataConfig(path=path, seq_length=64, **kw)
    return MLMLoader(cfg, rank, dp, micro, global_batch, V, batch_warmup=warmup)


def _step(loader, step):
    return [next(loader) for _ in range(loader.micro_batches_at(step))]


def test_no_schedule_keeps_the_static_stream(corpus_dir):
    """A one-phase schedule equal to the static options gives today's static batches bit for bit."""
    plain = _loader(corpus_dir)
    sched = _sched_loader(corpus_dir, alpha_schedule=[{"step": 0, "alpha": 0.3}], language_schedule=None,
                          mask_schedule=[{"step": 0, "mask_prob": 0.15}])
    assert sched.samples.phased is None and plain.samples.phased is None
    for _ in range(8):
        assert _equal(next(plain), next(sched))


def test_mask_schedule_equals_static_runs_at_each_rate(corpus_dir):
    """Step s of a mask-scheduled run == a static run at that step's rate, on the same samples."""
    sched = _sched_loader(corpus_dir, alpha_schedule=None, language_schedule=None)
    at = {p: _loader(corpus_dir, mask_prob=p) for p in (0.4, 0.1)}
    for s in range(9):
        want_p = 0.4 if s < 6 else 0.1
        assert sched.schedule_values(s)["mask_prob"] == want_p
        got = _step(sched, s)
        for p, ref in at.items():
            exp = _step(ref, s)
            assert all(_equal(a, b) for a, b in zip(got, exp)) == (p == want_p), (s, p)


def test_language_schedule_joins_languages_at_the_boundary(corpus_dir):
    loader = _sched_loader(corpus_dir, micro=8, global_batch=64)
    langs = [torch.cat([b["lang"] for b in _step(loader, s)]) for s in range(12)]
    assert all(not (l == 2).any() for l in langs[:4])          # cc joins at step 4
    assert (torch.cat(langs[4:]) == 2).any()
    assert [loader.schedule_values(s)["active_languages"] for s in (3, 4)] == [2, 3]
    assert [loader.schedule_values(s)["alpha"] for s in (3, 4, 7, 8)] == [0.7, 0.5, 0.5, 0.3]
    # each step's languages are the phase's q_i within 2 samples (64 per step)
    for s in (0, 5, 9):
        ph = loader.samples.phased.phases[loader.samples.phased.phase_index(s * 64)]
        assert np.abs(np.bincount(langs[s].numpy(), minlength=3) - ph.q * 64).max() <= 2.0


@pytest.mark.parametrize("dp", [1, 2])
def test_scheduled_resume_inside_a_phase_and_across_a_boundary(corpus_dir, dp):
    warm = {"start": 4, "tokens": 3000}
    for k in (2, 5, 11, 14):       # micro-batches before the save: mid-step, in phases 0/1/2
        for rank in range(dp):
            ref = _sched_loader(corpus_dir, rank, dp, warmup=warm)
            full = [next(ref) for _ in range(k + 8)]
            first = _sched_loader(corpus_dir, rank, dp, warmup=warm)
            for _ in range(k):
                next(first)
            resumed = _sched_loader(corpus_dir, rank, dp, warmup=warm)
            resumed.load_state_dict(first.state_dict())
            for j in range(8):
                assert _equal(next(resumed), full[k + j]), (dp, rank, k, j)


def test_batch_warmup_steps_tile_the_stream_and_dp_splits_them(corpus_dir):
    warm = {"start": 4, "tokens": 3000}
    one = _sched_loader(corpus_dir, micro=4, warmup=warm)      # unit micro x DP = 4 in both layouts
    r0, r1 = (_sched_loader(corpus_dir, r, 2, warmup=warm) for r in range(2))
    sizes = [one.phases.global_batch(s) for s in range(16)]
    assert sizes[0] == 4 and sizes[-1] == 8 and len(set(sizes)) == 2
    assert sizes == [r0.phases.global_batch(s) for s in range(16)]
    for s in range(16):
        g = sizes[s]
        assert one.micro_batches_at(s) == g // 4 and r0.micro_batches_at(s) == g // 4
        a = torch.cat([b["input_ids"] for b in _step(one, s)])
        b = torch.cat([x["input_ids"] for x in _step(r0, s) + _step(r1, s)])
        assert a.shape[0] == g and torch.equal(a, b)
        want = one.samples.batch(one.phases.sample_start(s), g, one.phases.mask_prob(s))
        assert torch.equal(a, want["input_ids"])


def test_branch_keeps_the_prefix_and_changes_only_the_suffix(corpus_dir):
    parent = _sched_loader(corpus_dir)
    for _ in range(6 * 4):                # 6 steps of 4 micro-batches
        next(parent)
    state = parent.state_dict()
    cont = [next(parent) for _ in range(12)]
    same = _sched_loader(corpus_dir)
    same.load_state_dict(state, branch=True)
    assert all(_equal(next(same), c) for c in cont)
    other = _sched_loader(corpus_dir, language_schedule=[{"step": 0, "languages": ["aa"]}])
    other.load_state_dict(state, branch=True)
    assert [h[0] for h in other.state_dict()["schedule_history"]] == [0, 6]
    got = [next(other) for _ in range(12)]
    assert all(torch.all(b["lang"] == 0) for b in got) and not all(_equal(a, b) for a, b in zip(got, cont))
    with pytest.raises(ValueError, match="branch_from"):   # a plain resume with other schedules is refused
        _sched_loader(corpus_dir, language_schedule=[{"step": 0, "languages": ["aa"]}]).load_state_dict(state)


def test_scheduled_samples_identical_whatever_num_workers(corpus_dir):
    warm = {"start": 4, "tokens": 3000}
    a, b = _sched_loader(corpus_dir, warmup=warm), _sched_loader(corpus_dir, warmup=warm, num_workers=2)
    assert all(_equal(next(a), next(b)) for _ in range(30))
