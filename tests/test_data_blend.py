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
