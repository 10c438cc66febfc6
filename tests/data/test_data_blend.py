"""Alpha sampling weights and the blended (language, block) index: C++ == numpy reference,
exact language frequencies, fresh shuffle per pass, windows independent of each other."""
import numpy as np
import pytest

from xlmr_mp.data.blend import (BlendSpec, blend_window, blend_window_reference, feistel_permute_reference,
                                have_cpp, integer_weights, pass_of_draw, sampling_weights)

needs_cpp = pytest.mark.skipif(not have_cpp(), reason="xlmr_mp._C not built (python setup.py build_ext --inplace)")

SIZES = [5_000_000, 800_000, 90_000, 12_000, 700]  # skewed token counts of 5 languages
BLOCKS = [9000, 1500, 170, 23, 2]


def test_sampling_weights_formula():
    q = sampling_weights(SIZES, 0.3)
    p = np.array(SIZES) / sum(SIZES)
    np.testing.assert_allclose(q, p ** 0.3 / (p ** 0.3).sum(), rtol=1e-12)
    assert np.all(np.diff(q) < 0) and q[-1] / q[0] > p[-1] / p[0]  # flattened, order kept
    np.testing.assert_allclose(sampling_weights(SIZES, 1.0), p)
    w = integer_weights(q)
    assert int(w.sum()) == 1 << 30 and np.all(np.abs(w / 2 ** 30 - q) <= 1 / 2 ** 30)
    with pytest.raises(ValueError, match="size <= 0"):
        sampling_weights([10, 0], 0.3)


@needs_cpp
@pytest.mark.parametrize("start,count", [(0, 5000), (777, 3001), (123_456, 2000), (10_000_000_000, 300)])
def test_cpp_equals_reference(start, count):
    spec = BlendSpec(sampling_weights(SIZES, 0.3), BLOCKS, seed=11)
    lang_c, block_c, epoch_c = blend_window(spec, start, count, use_cpp=True, with_epoch=True)
    lang_r, block_r = blend_window_reference(spec, start, count)
    assert lang_c.dtype == lang_r.dtype == np.uint8 and block_c.dtype == block_r.dtype == np.uint32
    np.testing.assert_array_equal(lang_c, lang_r)
    np.testing.assert_array_equal(block_c, block_r)
    np.testing.assert_array_equal(epoch_c, pass_of_draw(spec, lang_r, start))
    assert epoch_c.max() > 0


@needs_cpp
def test_cpp_equals_reference_many_languages_and_wide_ids():
    rng = np.random.default_rng(3)
    n = 300  # > 256 languages: uint16 language ids
    spec = BlendSpec(sampling_weights(rng.integers(1, 10 ** 6, n), 0.5), rng.integers(1, 5000, n), seed=5)
    assert spec.lang_dtype == np.uint16
    a, b = blend_window(spec, 4321, 20_000, use_cpp=True), blend_window_reference(spec, 4321, 20_000)
    np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])
    big = BlendSpec([0.5, 0.5], [3, (1 << 33) + 7], seed=1)  # > 2^32 blocks: int64 block ids
    assert big.block_dtype == np.int64
    a, b = blend_window(big, 99, 4000, use_cpp=True), blend_window_reference(big, 99, 4000)
    np.testing.assert_array_equal(a[1], b[1])
    assert int(a[1].max()) > 1 << 32


@needs_cpp
def test_feistel_is_a_permutation_and_matches_cpp():
    from xlmr_mp import _C
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        p = feistel_permute_reference(np.arange(n), n, seed=9, lang=2, epoch=4)
        assert sorted(p.tolist()) == list(range(n))
        assert [_C.feistel_permute(x, n, 9, 2, 4) for x in range(n)] == p.tolist()
    a = feistel_permute_reference(np.arange(1000), 1000, 9, 2, 0)
    b = feistel_permute_reference(np.arange(1000), 1000, 9, 2, 1)
    assert (a != b).mean() > 0.9  # a fresh shuffle per pass


def test_frequencies_over_1m_samples_within_1_percent():
    q = sampling_weights(SIZES, 0.3)
    spec = BlendSpec(q, BLOCKS, seed=1234)
    n = 1_000_000
    lang, _ = blend_window(spec, 0, n)
    freq = np.bincount(lang, minlength=len(q)) / n
    rel = np.abs(freq - q) / q
    assert rel.max() < 0.01, (freq, q)
    # also over an arbitrary later window and in every global batch of 8192
    lang2, _ = blend_window(spec, 5_000_000_017, n)
    assert (np.abs(np.bincount(lang2, minlength=len(q)) / n - q) / q).max() < 0.01
    per_batch = np.stack([np.bincount(lang[i:i + 8192], minlength=len(q)) for i in range(0, 8192 * 100, 8192)])
    assert np.abs(per_batch - q * 8192).max() <= 2.0


def test_every_block_once_per_pass_and_passes_differ():
    spec = BlendSpec(sampling_weights(SIZES, 0.3), BLOCKS, seed=7)
    n = 200_000
    lang, block = blend_window(spec, 0, n)
    epoch = pass_of_draw(spec, lang, 0)
    for i, nb in enumerate(BLOCKS):
        blocks_i, epochs_i = block[lang == i].astype(np.int64), epoch[lang == i]
        full = int(epochs_i.max())
        for e in range(full):  # complete passes: a permutation of the language's blocks
            sel = blocks_i[epochs_i == e]
            assert sorted(sel.tolist()) == list(range(nb))
        if full >= 2 and nb > 5:
            assert not np.array_equal(blocks_i[epochs_i == 0], blocks_i[epochs_i == 1])


def test_windows_are_slices_of_one_stream():
    spec = BlendSpec(sampling_weights(SIZES, 0.3), BLOCKS, seed=3)
    lang, block = blend_window(spec, 1000, 50_000)
    for a, c in [(1000, 1), (1001, 17), (25_000, 26_000), (50_999, 1)]:
        l2, b2 = blend_window(spec, a, c)
        np.testing.assert_array_equal(l2, lang[a - 1000:a - 1000 + c])
        np.testing.assert_array_equal(b2, block[a - 1000:a - 1000 + c])
    other = blend_window(BlendSpec(spec.q, BLOCKS, seed=4), 1000, 50_000)
    assert not np.array_equal(other[1], block)  # the seed matters


def test_shared_corpus_129_languages(shared_corpus):
    import csv
    import os
    with open(os.path.join(shared_corpus, "STATS.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    sizes = [int(r["bytes"]) for r in rows]
    assert len(sizes) >= 100
    q = sampling_weights(sizes, 0.3)
    spec = BlendSpec(q, [max(1, s // 2000) for s in sizes], seed=1)
    lang, _ = blend_window(spec, 0, 1_000_000)
    freq = np.bincount(lang, minlength=len(q)) / 1e6
    assert (np.abs(freq - q) / q).max() < 0.01


# ----------------------------------------------------------------------------- scheduled blend (phases)

from xlmr_mp.data.blend import PhasedBlend, phase_counts_reference  # noqa: E402


def _three_phases(n_lang=5, sizes=SIZES, blocks=BLOCKS, starts=(0, 10_007, 25_000), seed=5):
    """mmBERT-like: alpha 0.7 over the first 3 languages, 0.5 over 4, 0.3 over all."""
    q1 = np.r_[sampling_weights(sizes[:3], 0.7), np.zeros(n_lang - 3)]
    q2 = np.r_[sampling_weights(sizes[:4], 0.5), np.zeros(n_lang - 4)]
    q3 = sampling_weights(sizes, 0.3)
    return PhasedBlend(list(starts), [q1, q2, q3], blocks, seed), [q1, q2, q3]


@needs_cpp
@pytest.mark.parametrize("start,count", [(0, 40_000), (9_000, 3_000), (10_007, 1), (24_990, 20), (123_456, 5_000)])
def test_phased_cpp_equals_reference(start, count):
    pb, _ = _three_phases()
    a, b = pb.window(start, count, use_cpp=True), pb.window(start, count, use_cpp=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for p in pb.phases[:-1]:  # the carried counts: C++ == reference
        from xlmr_mp import _C
        n = p.end - p.start
        assert _C.blend_phase_counts(p.weights, p.offsets, 1 << 30, n).tolist() == \
            phase_counts_reference(p.weights, p.offsets, n)


@needs_cpp
def test_phased_cpp_equals_reference_many_languages():
    rng = np.random.default_rng(8)
    n = 300  # uint16 language ids; languages join in three waves
    sizes, blocks = rng.integers(1, 10 ** 6, n), rng.integers(1, 3000, n)
    shares = []
    for k, alpha in ((60, 0.7), (110, 0.5), (300, 0.3)):
        shares.append(np.r_[sampling_weights(sizes[:k], alpha), np.zeros(n - k)])
    pb = PhasedBlend([0, 7_001, 19_999], shares, blocks, seed=3)
    assert pb.lang_dtype == np.uint16
    for start, count in ((0, 30_000), (6_000, 2_000), (19_000, 4_000)):
        a, b = pb.window(start, count, use_cpp=True), pb.window(start, count, use_cpp=False)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_one_phase_equals_static_index():
    q = sampling_weights(SIZES, 0.3)
    spec, pb = BlendSpec(q, BLOCKS, seed=11), PhasedBlend([0], [q], BLOCKS, 11)
    for start, count in ((0, 5000), (777, 3001), (10_000_000_000, 300)):
        for x, y in zip(blend_window(spec, start, count, with_epoch=True), pb.window(start, count)):
            np.testing.assert_array_equal(x, y)


def test_phase_frequencies_within_1_percent_over_1m_draws():
    n = 1_000_000
    pb, qs = _three_phases(starts=(0, n, 2 * n))
    lang, _, _ = pb.window(0, 3 * n)
    for p, q in enumerate(qs):
        freq = np.bincount(lang[p * n:(p + 1) * n], minlength=len(q)) / n
        on = q > 0
        assert np.all(freq[~on] == 0), (p, freq)       # a language not yet joined is never drawn
        assert (np.abs(freq[on] - q[on]) / q[on]).max() < 0.01, (p, freq, q)


def test_every_prefix_within_2_samples_of_the_integral_100_languages():
    rng = np.random.default_rng(0)
    L, n = 100, 60_000
    sizes = np.exp(rng.uniform(np.log(1e4), np.log(1e8), L))
    blocks = np.maximum(sizes // 1000, 1).astype(np.int64)
    shares = [np.r_[sampling_weights(sizes[:k], a), np.zeros(L - k)] for k, a in ((20, 0.7), (50, 0.5), (100, 0.3))]
    starts = [0, n, 2 * n]
    pb = PhasedBlend(starts, shares, blocks, seed=2)
    lang, _, _ = pb.window(0, 3 * n)
    q_at = np.concatenate([np.repeat(s[None], n, 0) for s in shares])        # [3n, L]
    integral = np.cumsum(q_at, 0)
    counts = np.cumsum(np.eye(L, dtype=np.int32)[lang], 0)
    assert np.abs(counts - integral).max() <= 2.0
    for t in (1, n - 1, n, n + 1, 2 * n + 77):                               # draws_before agrees
        np.testing.assert_array_equal(pb.draws_before(t), counts[t - 1])


def test_languages_continue_their_passes_and_joiners_start_fresh():
    pb, _ = _three_phases(blocks=[40, 17, 9, 5, 2])
    lang, block, epoch = pb.window(0, 40_000)
    for i, nb in enumerate([40, 17, 9, 5, 2]):
        k = np.arange(int((lang == i).sum()))
        e = k // nb
        want = np.concatenate([feistel_permute_reference(k[e == x] - x * nb, nb, pb.seed, i, int(x))
                               for x in np.unique(e).tolist()])  # draw k of the run -> block perm_e(k mod n)
        np.testing.assert_array_equal(block[lang == i], want)
        np.testing.assert_array_equal(epoch[lang == i], e)
    assert not np.isin(lang[:10_007], [3, 4]).any() and lang[10_007:].tolist().count(3) > 0


def test_branch_suffix_does_not_change_the_prefix():
    """Phases after a boundary never change the positions before it (a branch's premise)."""
    pb, qs = _three_phases()
    other = PhasedBlend([0, 10_007, 25_000], [qs[0], qs[1], np.r_[0.5, 0.2, 0.1, 0.1, 0.1]], BLOCKS, 5)
    a, b = pb.window(0, 40_000), other.window(0, 40_000)
    np.testing.assert_array_equal(a[0][:25_000], b[0][:25_000])
    assert not np.array_equal(a[0][25_000:], b[0][25_000:])


def test_carry_keeps_many_phases_on_the_integral():
    """A linear alpha anneal is 200 short phases: without the carried offsets each boundary would
    restart the rounding and the error would grow like a random walk (measured ~96 draws)."""
    rng = np.random.default_rng(0)
    L, P, n = 30, 200, 500
    sizes = np.exp(rng.uniform(np.log(1e4), np.log(1e8), L))
    shares = [sampling_weights(sizes, a) for a in np.linspace(0.7, 0.3, P)]
    pb = PhasedBlend([p * n for p in range(P)], shares, np.maximum(sizes // 1000, 1).astype(np.int64), seed=2)
    lang, _, _ = pb.window(0, P * n)
    counts = np.cumsum(np.eye(L, dtype=np.int32)[lang], 0)
    assert np.abs(counts - np.cumsum(np.repeat(np.stack(shares), n, 0), 0)).max() <= 2.0
