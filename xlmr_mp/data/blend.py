"""XLM-R language sampling: weights q_i ~ p_i^alpha and the blended (language, block) index.

The blended stream is deterministic and built in linear time (C++ `xlmr_mp._C.blend_window`,
with `blend_window_reference` below as the numpy reference the tests compare it with):

* language i gets an integer weight w_i = round(q_i * W) (largest remainder, sum exactly W = 2^30)
  and a seeded offset o_i in [0, W);
* its k-th draw (k = 0, 1, 2, ...) falls in bucket floor((k * W + o_i) / w_i); the stream is all
  draws of all languages in (bucket, language) order. Buckets advance one sample on average, so
  ANY prefix of T samples holds q_i * T +- 1 draws of language i (no sampling noise), and any
  window [a, b) is computed on its own in O(b - a + L log) time: the loader never needs the whole
  run in memory, and the index does not depend on the run length;
* draw k of language i is block `perm_{seed, i, e}(k mod n_i)` with pass e = k div n_i, where perm
  is a seeded Feistel permutation of the language's n_i blocks: upsampled languages are repeated
  with a fresh shuffle on every pass, and every block is used once per pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

TOTAL_WEIGHT = 1 << 30
_M64 = (1 << 64) - 1


def sampling_weights(sizes: Sequence[float], alpha: float) -> np.ndarray:
    """q_i = p_i^alpha / sum_j p_j^alpha with p_i = sizes_i / sum(sizes) (XLM-R, alpha=0.3)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError("sampling_weights: need a non-empty 1-D list of language sizes")
    if np.any(sizes <= 0):
        bad = [int(i) for i in np.nonzero(sizes <= 0)[0]]
        raise ValueError(f"sampling_weights: languages {bad} have size <= 0 (empty training data?)")
    if not 0 < alpha <= 1:
        raise ValueError(f"sampling_weights: alpha={alpha} must be in (0, 1]")
    p = sizes / sizes.sum()
    q = p ** alpha
    return q / q.sum()


def integer_weights(q: Sequence[float], total: int = TOTAL_WEIGHT) -> np.ndarray:
    """Largest-remainder rounding of q * total to integers summing exactly to total (uint64)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / q.sum()
    exact = q * total
    w = np.floor(exact).astype(np.int64)
    short = total - int(w.sum())
    order = np.lexsort((np.arange(len(q)), -(exact - w)))  # largest remainder first, ties by index
    w[order[:short]] += 1
    if np.any(w == 0):
        raise ValueError(f"integer_weights: languages {np.nonzero(w == 0)[0].tolist()} have a "
                         f"sampling weight below 1/{total}; raise alpha or drop them")
    return w.astype(np.uint64)


def mix64(x: int) -> int:
    """splitmix64 finaliser (same as csrc/blend_index.h)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def language_offsets(n_lang: int, seed: int, total: int = TOTAL_WEIGHT) -> np.ndarray:
    """Seeded phase o_i in [0, total) of each language's draws (uint64)."""
    base = mix64(seed & _M64 ^ 0x6C616E67)
    return np.array([mix64(base + i) % total for i in range(n_lang)], dtype=np.uint64)


class BlendSpec:
    """Everything that defines a blended stream: integer weights, offsets, blocks per language, seed."""

    def __init__(self, q: Sequence[float], n_blocks: Sequence[int], seed: int):
        self.q = np.asarray(q, dtype=np.float64)
        self.n_blocks = np.asarray(n_blocks, dtype=np.uint64)
        if len(self.q) != len(self.n_blocks):
            raise ValueError("BlendSpec: q and n_blocks differ in length")
        if np.any(self.n_blocks == 0):
            raise ValueError(f"BlendSpec: languages {np.nonzero(self.n_blocks == 0)[0].tolist()} have no blocks")
        if int(self.n_blocks.max()) >= 1 << 62:
            raise ValueError("BlendSpec: a language has >= 2^62 blocks")
        self.seed = int(seed) & _M64
        self.weights = integer_weights(self.q)
        self.offsets = language_offsets(len(self.q), self.seed)
        self.lang_dtype = np.uint8 if len(self.q) <= 256 else np.uint16
        self.block_dtype = np.uint32 if int(self.n_blocks.max()) <= 1 << 32 else np.int64

    @property
    def num_languages(self) -> int:
        return len(self.q)


# ----------------------------------------------------------------------------- reference (numpy)

_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _feistel_keys(seed: int, lang: int, epoch: int) -> list:
    key = mix64(mix64(mix64(seed) ^ lang) ^ epoch)
    return [np.uint64(mix64((key + r) & _M64)) for r in range(4)]


def feistel_permute_reference(x: np.ndarray, n: int, seed: int, lang: int, epoch: int) -> np.ndarray:
    """Seeded permutation of [0, n) applied to x (numpy; C++: _C.feistel_permute).

    4-round unbalanced Feistel network on b = max(2, ceil(log2 n)) bits (halves of b//2 and
    b - b//2 bits), cycle-walked until the value is below n.
    """
    x = np.asarray(x, dtype=np.uint64).copy()
    if n <= 1:
        return np.zeros_like(x)
    b = max(2, (n - 1).bit_length())
    a, c = b // 2, b - b // 2
    mask_a, mask_c, sh = np.uint64((1 << a) - 1), np.uint64((1 << c) - 1), np.uint64(c)
    keys = _feistel_keys(seed, lang, epoch)

    def f(v, k):
        z = (v ^ k) * _GOLD
        return z ^ (z >> np.uint64(32))

    def once(v):
        left, right = v >> sh, v & mask_c
        for r, k in enumerate(keys):
            left, right = right, left ^ (f(right, k) & (mask_a if r % 2 == 0 else mask_c))
        return (left << sh) | right

    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        x[todo] = once(x[todo])
        todo = x >= np.uint64(n)
    return x


def _draws_before(spec: BlendSpec, bucket: int) -> list:
    out = []
    for w, o in zip(spec.weights.tolist(), spec.offsets.tolist()):
        num = bucket * w
        out.append(0 if num <= o else (num - o + TOTAL_WEIGHT - 1) // TOTAL_WEIGHT)
    return out


def blend_rank_reference(spec: BlendSpec, bucket: int) -> int:
    """Number of blended draws in buckets [0, bucket)."""
    return sum(_draws_before(spec, bucket))


def _last_bucket_at_or_before(spec: BlendSpec, start: int, rank) -> int:
    """The largest bucket b with rank(spec, b) <= start (binary search; rank is non-decreasing and
    rank(b) >= b - L - 2, so the answer lies below start + L + 2)."""
    lo, hi = 0, start + spec.num_languages + 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rank(spec, mid) <= start:
            lo = mid
        else:
            hi = mid
    return lo


def blend_window_reference(spec: BlendSpec, start: int, count: int):
    """Blended positions [start, start+count) -> (language, block) arrays; numpy reference."""
    b0 = _last_bucket_at_or_before(spec, start, blend_rank_reference)
    pos0 = blend_rank_reference(spec, b0)
    b1 = b0 + (start + count - pos0) + spec.num_languages + 2  # rank(b1) >= b1 - L >= start+count
    k0, k1 = _draws_before(spec, b0), _draws_before(spec, b1)
    if max(k1) >= 1 << 34:  # k * 2^30 must fit uint64 here (the C++ path has no such limit)
        raise ValueError("blend_window_reference: over 2^34 draws of one language; build xlmr_mp._C")
    buckets, langs, blocks = [], [], []
    for i in range(spec.num_languages):
        k = np.arange(k0[i], k1[i], dtype=np.uint64)
        w, o, n = spec.weights[i], spec.offsets[i], int(spec.n_blocks[i])
        buckets.append((k * np.uint64(TOTAL_WEIGHT) + o) // w)
        langs.append(np.full(len(k), i, dtype=np.int64))
        blk = np.empty(len(k), dtype=np.uint64)
        epoch = k // np.uint64(n)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            blk[sel] = feistel_permute_reference(k[sel] - np.uint64(e * n), n, spec.seed, i, e)
        blocks.append(blk)
    buckets, langs, blocks = map(np.concatenate, (buckets, langs, blocks))
    order = np.lexsort((langs, buckets))
    skip = start - pos0
    sel = order[skip:skip + count]
    assert len(sel) == count
    return langs[sel].astype(spec.lang_dtype), blocks[sel].astype(spec.block_dtype)


# ----------------------------------------------------------------------------- fast path (C++)

def have_cpp() -> bool:
    """Whether the C++ extension xlmr_mp._C is built (python setup.py build_ext --inplace)."""
    try:
        from xlmr_mp import _C  # noqa: F401
        return True
    except ImportError:
        return False


def blend_window(spec: BlendSpec, start: int, count: int, use_cpp: Optional[bool] = None,
                 with_epoch: bool = False):
    """Blended positions [start, start+count) -> (language, block) arrays, plus the pass over its
    language of each (int64) when with_epoch.

    Uses the C++ helper when built (use_cpp=None), else the numpy reference; both give the same bits.
    """
    if start < 0 or count < 0:
        raise ValueError(f"blend_window: start={start}, count={count} must be >= 0")
    if use_cpp is None:
        use_cpp = have_cpp()
    if not use_cpp:
        lang, block = blend_window_reference(spec, start, count)
        return (lang, block, pass_of_draw(spec, lang, start)) if with_epoch else (lang, block)
    from xlmr_mp import _C
    lang = np.empty(count, dtype=spec.lang_dtype)
    block = np.empty(count, dtype=spec.block_dtype)
    epoch = np.empty(count, dtype=np.uint32) if with_epoch else None
    _C.blend_window(spec.weights, spec.offsets, spec.n_blocks, TOTAL_WEIGHT, spec.seed, start, lang, block, epoch)
    return (lang, block, epoch.astype(np.int64)) if with_epoch else (lang, block)


def pass_of_draw(spec: BlendSpec, lang: np.ndarray, start: int) -> np.ndarray:
    """Pass (epoch) over its language of each blended position [start, start + len(lang))."""
    lang = np.asarray(lang, dtype=np.int64)
    before = draws_at_rank(spec, start)
    out = np.empty(len(lang), dtype=np.int64)
    for i in np.unique(lang).tolist():
        sel = np.nonzero(lang == i)[0]
        out[sel] = (before[i] + np.arange(len(sel))) // int(spec.n_blocks[i])
    return out


def draws_at_rank(spec: BlendSpec, start: int) -> list:
    """Draws of each language among blended positions [0, start)."""
    rank = blend_rank_reference
    if have_cpp():
        from xlmr_mp import _C
        rank = lambda spec, b: _C.blend_rank(spec.weights, spec.offsets, TOTAL_WEIGHT, b)  # noqa: E731
    counts = _draws_before(spec, _last_bucket_at_or_before(spec, start, rank))
    extra = start - sum(counts)
    if extra:
        lang, _ = blend_window(spec, sum(counts), extra)
        for i in lang.tolist():
            counts[i] += 1
    return counts


def expected_fraction_error(q: Sequence[float], n: int) -> float:
    """Largest relative error |count_i/n - q_i| / q_i the blend can show over n samples (2 draws)."""
    q = np.asarray(q, dtype=np.float64)
    return float(np.max(2.0 / (q * n)))


__all__ = ["sampling_weights", "integer_weights", "BlendSpec", "blend_window", "blend_window_reference",
           "feistel_permute_reference", "blend_rank_reference", "pass_of_draw", "draws_at_rank", "have_cpp"]
