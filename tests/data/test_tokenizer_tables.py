"""The tokenizer is the id authority: with a foreign (permuted) P.dict.txt the preprocessor writes the
dictionary's ids, and the whole-word and bits-per-character tables the loader uses follow the same
dictionary (fairseq's contract: line k of dict.txt is id 4 + k), not the id = piece + 1 formula."""
import dataclasses
import os
import shutil

import numpy as np
import pytest

from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.data.config import DataConfig
from xlmr_mp.data.indexed import read_documents
from xlmr_mp.data.loader import ValidationLoader, make_masker
from xlmr_mp.data.masking import sentencepiece_tables
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.tokenizer import XLMRTokenizer, read_fairseq_dict

LANGS = ["en", "fr", "ru"]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A tokenizer whose dict.txt lists the pieces in a shuffled order, and data preprocessed with it."""
    d = tmp_path_factory.mktemp("foreign")
    make_tiny_corpus(d / "corpus", languages=LANGS, scale=0.3)
    own = train_tiny_spm(d / "corpus", d / "own", vocab_size=500)
    pieces = read_fairseq_dict(own[:-len(".model")] + ".dict.txt")
    order = np.random.default_rng(0).permutation(len(pieces))
    shutil.copy(own, d / "foreign.model")
    (d / "foreign.dict.txt").write_text("".join(f"{pieces[k]} 1\n" for k in order), encoding="utf-8")
    model = str(d / "foreign.model")
    run_tool("preprocess_data", "--input", d / "corpus", "--tokenizer", model, "--output-dir", d / "bin",
             "--split", "80,20,0", "--workers", 1, "--quiet")
    dict_pieces = [pieces[k] for k in order]                     # id 4 + k <-> dict_pieces[k]
    return dict(model=model, bin=str(d / "bin"), piece_of={4 + k: p for k, p in enumerate(dict_pieces)})


def _sentences(foreign, split="train"):
    for lang in LANGS:
        for doc in read_documents(os.path.join(foreign["bin"], lang, split)):
            yield from doc


def test_dictionary_is_really_foreign_and_preprocessed_ids_follow_it(foreign):
    tok = XLMRTokenizer(foreign["model"])
    formula = {i + 1: tok.sp.id_to_piece(i) for i in range(3, tok.sp.get_piece_size())}
    moved = sum(formula[i] != p for i, p in foreign["piece_of"].items())
    assert moved > 0.9 * len(formula), "the permuted dictionary must disagree with id = piece + 1"
    # decoding with dict.txt alone gives SentencePiece's own segmentation of the same sentence
    for ids in list(_sentences(foreign))[:200]:
        spm_ids = [tok.sp.piece_to_id(foreign["piece_of"][int(i)]) for i in ids[:-1]]
        assert tok.sp.encode(tok.sp.decode(spm_ids)) == spm_ids


def test_word_start_and_char_tables_follow_the_dictionary(foreign):
    is_ws, chars = sentencepiece_tables(foreign["model"])        # what make_masker / ValidationLoader use
    seen = {int(i) for ids in _sentences(foreign) for i in ids[:-1]}
    assert len(seen) > 100
    for i in seen:
        piece = foreign["piece_of"][i]
        assert is_ws[i] == piece.startswith("\u2581"), (i, piece)
        if not (piece.startswith("<0x") and piece.endswith(">")):
            assert chars[i] == len(piece), (i, piece)
    for special in (0, 1, 2, 3, len(is_ws) - 1):
        assert not is_ws[special] and chars[special] == 0


def test_whole_word_masking_masks_dictionary_words(foreign):
    cfg = DataConfig(path=foreign["bin"], tokenizer=foreign["model"], whole_word_mask=True, mask_prob=0.3,
                     seq_length=128)
    vocab = XLMRTokenizer(foreign["model"]).vocab_size
    masker = make_masker(cfg, vocab)
    checked = 0
    for k, ids in enumerate(list(_sentences(foreign))[:100]):
        seq = np.concatenate([[0], ids])
        _, labels = masker(seq, key=k)
        # words by dict.txt: a piece starting with the marker opens one; </s> and <s> stand alone
        word, words = [], []
        for pos, t in enumerate(seq):
            piece = foreign["piece_of"].get(int(t))
            if piece is None or piece.startswith("\u2581"):
                if word:
                    words.append(word)
                word = [] if piece is None else [pos]
            else:
                word.append(pos)
        words.append(word) if word else None
        for w in words:
            sel = labels[w] != IGNORE_INDEX
            assert sel.all() or not sel.any(), ("a dictionary word was masked in part", k, w, labels[w])
            checked += int(sel.all() and len(w) > 1)
    assert checked > 10, "need masked multi-piece words for the check to mean anything"


def test_validation_chars_are_the_dictionary_pieces_lengths(foreign):
    cfg = DataConfig(path=foreign["bin"], tokenizer=foreign["model"], seq_length=64)
    vocab = XLMRTokenizer(foreign["model"]).vocab_size
    valid = ValidationLoader(dataclasses.replace(cfg), vocab, batch_size=4)
    n = 0
    for lang in valid.languages:
        for mb in valid.batches(lang, max_batches=3):
            for r in range(len(mb["labels"])):
                lab = mb["labels"][r]
                want = sum(len(foreign["piece_of"][int(t)]) for t in lab[lab != IGNORE_INDEX])
                assert int(mb["masked_chars"][r]) == want
                n += want
    assert n > 0
