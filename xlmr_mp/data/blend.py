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


# ----------------------------------------------------------------------------- scheduled blend (phases)

class BlendPhase:
    """One phase of a scheduled blend: stream positions [start, end) (end None = open), the shares q
    (0 = language not active), integer weights w (sum W over the active languages), signed offsets o
    and the draws kbase each language made before the phase."""

    def __init__(self, start: int, end: Optional[int], q: np.ndarray, weights: np.ndarray, offsets: np.ndarray,
                 kbase: np.ndarray):
        self.start, self.end = int(start), (None if end is None else int(end))
        self.q, self.weights, self.offsets, self.kbase = q, weights, offsets, kbase

    @property
    def active(self) -> np.ndarray:
        return np.nonzero(self.weights)[0]


def active_weights(q: Sequence[float]) -> np.ndarray:
    """integer_weights over the languages with q_i > 0; 0 for the others (uint64)."""
    q = np.asarray(q, dtype=np.float64)
    w = np.zeros(len(q), dtype=np.uint64)
    on = np.nonzero(q > 0)[0]
    if len(on) == 0:
        raise ValueError("a blend phase needs at least one language with a share > 0")
    w[on] = integer_weights(q[on])
    return w


def phase_draws_before_reference(weights, offsets, bucket: int) -> list:
    """Draws of each language of a phase in its local buckets [0, bucket) (Python ints)."""
    out = []
    for w, o in zip(np.asarray(weights).tolist(), np.asarray(offsets).tolist()):
        num = bucket * w - o
        out.append(0 if bucket == 0 or w == 0 or num <= 0 else (num + TOTAL_WEIGHT - 1) // TOTAL_WEIGHT)
    return out


def _phase_last_bucket(weights, offsets, position: int, rank) -> int:
    lo, hi = 0, position + len(weights) + 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rank(weights, offsets, mid) <= position:
            lo = mid
        else:
            hi = mid
    return lo


def _rank_reference(weights, offsets, bucket):
    return sum(phase_draws_before_reference(weights, offsets, bucket))


def phase_counts_reference(weights, offsets, position: int) -> list:
    """Draws of each language among a phase's local positions [0, position) (numpy reference of
    _C.blend_phase_counts): whole buckets, then the partial last bucket in language order."""
    b = _phase_last_bucket(weights, offsets, position, _rank_reference)
    counts = phase_draws_before_reference(weights, offsets, b)
    nxt = phase_draws_before_reference(weights, offsets, b + 1)
    left = position - sum(counts)
    for i in range(len(counts)):
        take = min(nxt[i] - counts[i], left)
        counts[i] += take
        left -= take
    return counts


def phase_window_reference(phase: BlendPhase, n_blocks: np.ndarray, seed: int, start: int, count: int,
                           lang_dtype=np.uint8, block_dtype=np.uint32):
    """Phase-local positions [start, start+count) -> (language, block, pass) arrays; numpy reference
    of _C.blend_window_phase. Local draw j of language i is its global draw kbase_i + j, in local
    bucket max(0, floor((j W + o_i) / w_i))."""
    w, o = phase.weights, phase.offsets
    b0 = _phase_last_bucket(w, o, start, _rank_reference)
    pos0 = _rank_reference(w, o, b0)
    b1 = b0 + (start + count - pos0) + len(w) + 2
    j0, j1 = phase_draws_before_reference(w, o, b0), phase_draws_before_reference(w, o, b1)
    if max(j1) * TOTAL_WEIGHT + int(np.abs(o).max()) >= 1 << 63:
        raise ValueError("phase_window_reference: too many draws for int64 arithmetic; build xlmr_mp._C")
    buckets, langs, blocks, epochs = [], [], [], []
    for i in np.nonzero(w)[0].tolist():
        j = np.arange(j0[i], j1[i], dtype=np.int64)
        buckets.append(np.maximum((j * TOTAL_WEIGHT + int(o[i])) // int(w[i]), 0))
        langs.append(np.full(len(j), i, dtype=np.int64))
        k = j + int(phase.kbase[i])
        n = int(n_blocks[i])
        epoch = k // n
        blk = np.empty(len(k), dtype=np.uint64)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            blk[sel] = feistel_permute_reference((k[sel] - e * n).astype(np.uint64), n, seed, i, e)
        blocks.append(blk)
        epochs.append(epoch)
    buckets, langs, blocks, epochs = map(np.concatenate, (buckets, langs, blocks, epochs))
    order = np.lexsort((langs, buckets))
    sel = order[start - pos0:start - pos0 + count]
    assert len(sel) == count
    return langs[sel].astype(lang_dtype), blocks[sel].astype(block_dtype), epochs[sel]


class PhasedBlend:
    """The blended stream of a schedule: phase p holds positions [T_p, T_{p+1}) with its own shares
    q^p (languages may join or leave), each phase a static-style stream in its own buckets.

    Carry: language i enters phase p with D_i draws made and an ideal share A_i = sum over earlier
    phases of w_i^p' * N_p' (in 1/W units); its phase offset is o_i = W D_i - A_i + phi_i W (phi_i
    its seeded offset of the static index), so its cumulative draws follow ceil(integral of q_i -
    phi_i) across boundaries instead of restarting its rounding, and every prefix of the stream
    stays within about 2 draws of the integral of q_i. Draw k of language i is block
    perm_{seed,i,k div n_i}(k mod n_i) with k counted over the whole run: a language that joins
    starts its own fresh shuffle at pass 0, the others continue theirs. A one-phase blend with
    every language active is bitwise the static index (BlendSpec). Setup is O(P L^2 log N); a
    window [a, b) costs O(b - a + L) like the static index.
    """

    def __init__(self, starts: Sequence[int], shares: Sequence[Sequence[float]], n_blocks: Sequence[int], seed: int,
                 use_cpp: Optional[bool] = None):
        starts = [int(s) for s in starts]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"PhasedBlend: phase starts {starts} must begin at 0 and increase")
        if len(shares) != len(starts):
            raise ValueError("PhasedBlend: one share vector per phase")
        self.n_blocks = np.asarray(n_blocks, dtype=np.uint64)
        n_lang = len(self.n_blocks)
        if np.any(self.n_blocks == 0):
            raise ValueError(f"PhasedBlend: languages {np.nonzero(self.n_blocks == 0)[0].tolist()} have no blocks")
        self.seed = int(seed) & _M64
        self.use_cpp = have_cpp() if use_cpp is None else use_cpp
        self.lang_dtype = np.uint8 if n_lang <= 256 else np.uint16
        self.block_dtype = np.uint32 if int(self.n_blocks.max()) <= 1 << 32 else np.int64
        phi = [int(x) for x in language_offsets(n_lang, self.seed)]
        drawn, ideal = [0] * n_lang, [0] * n_lang
        self.phases: list = []
        for p, (t0, q) in enumerate(zip(starts, shares)):
            q = np.asarray(q, dtype=np.float64)
            if q.shape != (n_lang,) or np.any(q < 0):
                raise ValueError(f"PhasedBlend: phase {p} shares must be {n_lang} values >= 0")
            w = active_weights(q)
            off = np.array([TOTAL_WEIGHT * d - a + f for d, a, f in zip(drawn, ideal, phi)], dtype=np.int64)
            end = starts[p + 1] if p + 1 < len(starts) else None
            ph = BlendPhase(t0, end, q / q.sum(), w, off, np.array(drawn, dtype=np.uint64))
            self.phases.append(ph)
            if end is not None:
                counts = self._counts(ph, end - t0)
                drawn = [d + int(c) for d, c in zip(drawn, counts)]
                ideal = [a + int(wi) * (end - t0) for a, wi in zip(ideal, w.tolist())]
        self.starts = np.array(starts, dtype=np.int64)

    @property
    def num_languages(self) -> int:
        return len(self.n_blocks)

    def _counts(self, ph: BlendPhase, position: int):
        if self.use_cpp:
            from xlmr_mp import _C
            return _C.blend_phase_counts(ph.weights, ph.offsets, TOTAL_WEIGHT, position).tolist()
        return phase_counts_reference(ph.weights, ph.offsets, position)

    def phase_index(self, position: int) -> int:
        """Index of the phase holding stream position `position`."""
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def draws_before(self, position: int) -> np.ndarray:
        """Draws of each language among stream positions [0, position) (int64)."""
        ph = self.phases[self.phase_index(position)]
        return ph.kbase.astype(np.int64) + np.asarray(self._counts(ph, position - ph.start), dtype=np.int64)

    def window(self, start: int, count: int, use_cpp: Optional[bool] = None):
        """Positions [start, start+count) -> (language, block, pass int64), across phase boundaries."""
        if start < 0 or count < 0:
            raise ValueError(f"PhasedBlend.window: start={start}, count={count} must be >= 0")
        use_cpp = self.use_cpp if use_cpp is None else use_cpp
        lang = np.empty(count, dtype=self.lang_dtype)
        block = np.empty(count, dtype=self.block_dtype)
        epoch = np.empty(count, dtype=np.uint32 if use_cpp else np.int64)
        pos, end = start, start + count
        while pos < end:
            p = self.phase_index(pos)
            ph = self.phases[p]
            stop = end if ph.end is None else min(end, ph.end)
            a, b = pos - start, stop - start
            if use_cpp:
                from xlmr_mp import _C
                _C.blend_window_phase(ph.weights, ph.offsets, ph.kbase, self.n_blocks, TOTAL_WEIGHT, self.seed,
                                      pos - ph.start, lang[a:b], block[a:b], epoch[a:b])
            else:
                lang[a:b], block[a:b], epoch[a:b] = phase_window_reference(
                    ph, self.n_blocks, self.seed, pos - ph.start, stop - pos, self.lang_dtype, self.block_dtype)
            pos = stop
        return lang, block, epoch.astype(np.int64)


def expected_fraction_error(q: Sequence[float], n: int) -> float:
    """Largest relative error |count_i/n - q_i| / q_i the blend can show over n samples (2 draws)."""
    q = np.asarray(q, dtype=np.float64)
    return float(np.max(2.0 / (q * n)))


__all__ = ["sampling_weights", "integer_weights", "BlendSpec", "blend_window", "blend_window_reference",
           "feistel_permute_reference", "blend_rank_reference", "pass_of_draw", "draws_at_rank", "have_cpp",
           "BlendPhase", "PhasedBlend", "phase_window_reference", "phase_counts_reference", "active_weights"]
