"""XLM-R masking: 15/80/10/10 statistics, special tokens untouched, pure function of the key,
whole-word and span masking."""
import numpy as np
import pytest

from xlmr_mp.data.masking import IGNORE_INDEX, Masker, sample_key

V, MASK = 1000, 999


def _sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sents = [np.concatenate([rng.integers(4, MASK, rng.integers(1, 40)), [2]]) for _ in range(rng.integers(1, 6))]
        seq = np.concatenate([[0]] + sents)
        seq[rng.random(len(seq)) < 0.02] = 3  # a few <unk>
        out.append(seq)
    return out


def _stats(masker, seqs, epoch=0):
    n_cand = n_sel = n_mask = n_rand = n_keep = 0
    for j, seq in enumerate(seqs):
        out, lab = masker(seq, sample_key(1234, 0, epoch, j))
        sel = lab != IGNORE_INDEX
        special = (seq < 4) | (seq == MASK)
        assert not np.any(sel & special), "a special token was masked"
        assert np.array_equal(out[~sel], seq[~sel]) and np.array_equal(lab[sel], seq[sel])
        assert np.all(out >= 0) and np.all(out < V)
        changed = sel & (out != MASK) & (out != seq)
        assert np.all(out[changed] >= 4) and np.all(out[changed] < MASK), "special token used as replacement"
        n_cand += int((~special).sum()); n_sel += int(sel.sum())
        n_mask += int((out[sel] == MASK).sum()); n_rand += int(changed.sum()); n_keep += int((out[sel] == seq[sel]).sum())
    return n_sel / n_cand, n_mask / n_sel, n_rand / n_sel, n_keep / n_sel


def test_token_masking_statistics():
    seqs = _sequences(3000)
    frac, m, r, k = _stats(Masker(V, MASK), seqs)
    assert abs(frac - 0.15) < 0.003
    assert abs(m - 0.8) < 0.01 and abs(r - 0.1) < 0.008 and abs(k - 0.1) < 0.008


def test_pure_function_of_key_and_dynamic_across_passes():
    masker = Masker(V, MASK)
    seq = _sequences(1, seed=5)[0]
    a = masker(seq, sample_key(1, 2, 0, 7))
    b = masker(seq.copy(), sample_key(1, 2, 0, 7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = masker(seq, sample_key(1, 2, 1, 7))  # next pass over the same block
    d = masker(seq, sample_key(2, 2, 0, 7))  # another seed
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[1], d[1])


def test_whole_word_masking_masks_whole_words():
    rng = np.random.default_rng(1)
    is_start = rng.random(V) < 0.4
    is_start[:4] = False
    masker = Masker(V, MASK, whole_word_mask=True, is_word_start=is_start)
    seqs = _sequences(1500, seed=2)
    frac, m, r, k = _stats(masker, seqs)
    assert abs(frac - 0.15) < 0.02 and abs(m - 0.8) < 0.02
    for j, seq in enumerate(seqs[:300]):
        _, lab = masker(seq, sample_key(1234, 0, 0, j))
        sel = lab != IGNORE_INDEX
        for p in range(1, len(seq)):
            # a continuation piece (not a word start, after a non-special token) shares its word's fate
            if seq[p] >= 4 and seq[p - 1] >= 4 and not is_start[seq[p]]:
                assert sel[p] == sel[p - 1]
    with pytest.raises(ValueError, match="tokenizer"):
        Masker(V, MASK, whole_word_mask=True)


def test_span_masking_makes_runs_of_mean_length():
    masker = Masker(V, MASK, span_mask=True, span_mean_length=3.0)
    seqs = _sequences(1500, seed=3)
    frac, m, _, _ = _stats(masker, seqs)
    assert abs(frac - 0.15) < 0.01 and abs(m - 0.8) < 0.02
    runs = []
    for j, seq in enumerate(seqs):
        _, lab = masker(seq, sample_key(1234, 0, 0, j))
        sel = np.concatenate([[0], (lab != IGNORE_INDEX).astype(int), [0]])
        d = np.diff(sel)
        runs += (np.nonzero(d == -1)[0] - np.nonzero(d == 1)[0]).tolist()
    assert np.mean(runs) > 2.0  # token masking gives ~1.18; geometric spans of mean 3, merged/clipped


def test_bad_mask_id():
    with pytest.raises(ValueError, match="mask_id"):
        Masker(V, 2)
