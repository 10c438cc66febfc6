"""Masking properties the golden curve alone would not catch: the training loader masks the same
block differently on its next pass over the language, and whole-word units never span or include
a special token (<s>, </s>, <unk>, <pad>, <mask>): a special between two pieces ends the word."""
import numpy as np
import torch

from tests.support.corpus import write_corpus
from xlmr_mp.data.config import DataConfig
from xlmr_mp.data.loader import MLMLoader
from xlmr_mp.data.masking import Masker
from xlmr_mp.ids import IGNORE_INDEX

V = 500


def test_loader_masks_a_block_differently_on_its_next_pass(tmp_path):
    write_corpus(str(tmp_path), {"aa": 4, "bb": 2}, vocab_size=V, seed=3)   # small: many passes per language
    loader = MLMLoader(DataConfig(path=str(tmp_path), seq_length=64), 0, 1, micro_batch=4, global_batch=8,
                       vocab_size=V)
    n = 96
    samples = [next(loader) for _ in range(n // 4)]
    ids = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([s["labels"] for s in samples])
    original = torch.where(labels != IGNORE_INDEX, labels, ids)
    lang, block, epoch = loader.samples.indices(0, n)
    first = {}
    repeats = 0
    for t in range(n):
        key = (int(lang[t]), int(block[t]))
        if key not in first:
            first[key] = t
            continue
        s = first[key]
        if int(epoch[t]) == int(epoch[s]):
            continue
        repeats += 1
        assert torch.equal(original[t], original[s]), "same block, same tokens"
        assert not torch.equal(labels[t], labels[s]), \
            f"block {key} masked identically on pass {int(epoch[s])} and pass {int(epoch[t])}"
    assert repeats >= 20, repeats


def _words_masker(span=False):
    vocab, mask_id = 40, 39
    is_start = np.zeros(vocab, dtype=bool)
    is_start[4:20] = True                      # 4..19 start a word, 20..38 continue one
    return Masker(vocab, mask_id, mask_prob=0.5, whole_word_mask=True, span_mask=span, is_word_start=is_start)


# <s> w(5 21 22) </s> (23 24) w(6 25) <unk> (26) w(7) </s> <pad>: a special ends a word, so the
# continuation pieces after </s> and after <unk> are words of their own
SEQ = np.array([0, 5, 21, 22, 2, 23, 24, 6, 25, 3, 26, 7, 2, 1])
UNITS = [[1, 2, 3], [5, 6], [7, 8], [10], [11]]
SPECIAL_POS = [0, 4, 9, 12, 13]


def test_whole_word_units_stop_at_special_tokens():
    for span in (False, True):
        masker = _words_masker(span)
        apart = {(0, 1): 0, (2, 3): 0}
        for key in range(400):
            out, labels = masker(SEQ, key)
            sel = labels != IGNORE_INDEX
            assert not sel[SPECIAL_POS].any() and (out[SPECIAL_POS] == SEQ[SPECIAL_POS]).all()
            for unit in UNITS:
                assert sel[unit].all() or not sel[unit].any(), (span, key, unit, labels)
            for a, b in apart:
                apart[(a, b)] += int(sel[UNITS[a]].all() != sel[UNITS[b]].all())
        # the words on either side of </s> and of <unk> are masked independently
        assert all(v > 20 for v in apart.values()), (span, apart)
