"""XLMRTokenizer: the fairseq / Hugging Face XLM-R id layout, encode/decode, dict.txt loading."""
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from _prep_util import train_tiny_spm
from xlmr_mp.data.tiny_corpus import make_tiny_corpus
from xlmr_mp.tokenizer import TokenizerError, XLMRTokenizer, read_fairseq_dict

TEXTS = ["The city river goes to the market.", "Люди читают книга сегодня.", "人们 城市 河流 学校。",
         "लोग शहर नदी बाज़ार।", "لوگ شہر دریا بازار۔", "Watu mji mto 2024 soko.", "  extra   spaces  here ",
         "Zebra quixotic ǅ ∮ 𝔘 ☃ mixed ünïcödé"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus"
    make_tiny_corpus(corpus)
    with_bf = train_tiny_spm(corpus, d / "bf", vocab_size=1000)
    no_bf = train_tiny_spm(corpus, d / "nobf", vocab_size=600, extra=["--no-byte-fallback"])
    return d, with_bf, no_bf


def test_special_ids_and_sizes(models):
    _, model, _ = models
    tok = XLMRTokenizer(model)
    sp = spm.SentencePieceProcessor(model_file=model)
    n = sp.get_piece_size()
    assert n == 1000
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == n + 2 == len(tok) == 1002      # 250000 pieces -> 250002 in the same formula
    assert tok.mask_id == tok.vocab_size - 1 == n + 1
    assert tok.special_ids == {0, 1, 2, 3, n + 1}
    assert [tok.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.id_to_piece(tok.mask_id) == "<mask>" and tok.piece_to_id("<mask>") == tok.mask_id
    for i in range(3, n):                                   # SentencePiece piece i -> id i + 1
        piece = sp.id_to_piece(i)
        assert tok.piece_to_id(piece) == i + 1
        assert tok.id_to_piece(i + 1) == piece
    assert tok.piece_to_id(sp.id_to_piece(0)) == 3           # spm's own <unk> -> 3


def test_formula_without_dict_matches_250k(models):
    d, model, _ = models
    bare = d / "bare"
    bare.mkdir(exist_ok=True)
    shutil.copy(model, bare / "m.model")                     # no m.dict.txt: the formula is used
    tok = XLMRTokenizer(str(bare / "m.model"))
    assert tok.dict_path is None
    ref = XLMRTokenizer(model)
    assert ref.dict_path is not None
    assert tok.vocab_size == ref.vocab_size and tok.mask_id == ref.mask_id
    for t in TEXTS:
        assert tok.encode(t) == ref.encode(t)
    # the released XLM-R: 250000 pieces; ids i+1 up to 250000, <mask> = 250001, 250002 ids
    assert tok.spm_to_dict(np.array([0, 1, 2, 3, 249999])).tolist() == [3, 0, 2, 4, 250000]


def test_dict_txt_is_fairseq_layout(models):
    _, model, _ = models
    sp = spm.SentencePieceProcessor(model_file=model)
    dict_path = model[:-len(".model")] + ".dict.txt"
    lines = open(dict_path, encoding="utf-8").read().splitlines()
    assert len(lines) == sp.get_piece_size() - 3
    pieces = read_fairseq_dict(dict_path)
    assert pieces == [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    counts = [int(l.rsplit(" ", 1)[1]) for l in lines]
    assert sum(counts) > 0 and all(c >= 0 for c in counts)
    # fairseq's Dictionary: <s> <pad> </s> <unk>, then the file's lines, then task-added <mask>
    fairseq = ["<s>", "<pad>", "</s>", "<unk>"] + pieces + ["<mask>"]
    tok = XLMRTokenizer(model)
    assert len(fairseq) == tok.vocab_size
    for i, piece in enumerate(fairseq):
        assert tok.piece_to_id(piece) == i


def test_encode_decode_roundtrip(models):
    _, model, _ = models
    tok = XLMRTokenizer(model)
    sp = spm.SentencePieceProcessor(model_file=model)
    for t in TEXTS:
        ids = tok.encode(t)
        ref = [3 if i == 0 else i + 1 for i in sp.encode(t)]
        assert ids == ref
        assert 0 not in ids and 1 not in ids and 2 not in ids and max(ids) < tok.mask_id
        assert tok.decode(ids) == sp.decode(sp.encode(t)) == tok.normalize(t)
        full = tok.encode(t, add_bos=True, add_eos=True)
        assert full[0] == 0 and full[-1] == 2 and full[1:-1] == ids
        assert tok.decode(full + [tok.pad_id, tok.mask_id]) == tok.decode(ids)   # specials are dropped
    assert tok.encode_batch(TEXTS, add_eos=True) == [tok.encode(t, add_eos=True) for t in TEXTS]
    flat, lengths = tok.encode_flat(TEXTS, add_eos=True)
    assert flat.dtype == np.int32 and lengths.tolist() == [len(tok.encode(t)) + 1 for t in TEXTS]
    assert flat.tolist() == sum((tok.encode(t, add_eos=True) for t in TEXTS), [])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_unknown_maps_to_3(models):
    _, _, model = models
    tok = XLMRTokenizer(model)                               # no byte fallback: unseen characters are <unk>
    ids = tok.encode("人们 ☃☃ 𝔘")
    assert 3 in ids
    assert "⁇" in tok.decode(ids)


def test_byte_fallback_has_no_unknowns(models):
    _, model, _ = models
    tok = XLMRTokenizer(model)
    ids = tok.encode("☃ 𝔘 漢字")
    assert 3 not in ids
    assert tok.decode(ids) == tok.normalize("☃ 𝔘 漢字") == "☃ U 漢字"   # NFKC maps 𝔘 to U


def test_foreign_dictionary_order_and_mismatch(models, tmp_path):
    _, model, _ = models
    sp = spm.SentencePieceProcessor(model_file=model)
    pieces = [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    shutil.copy(model, tmp_path / "r.model")
    rev = list(reversed(pieces))
    (tmp_path / "r.dict.txt").write_text("".join(f"{p} 1\n" for p in rev), encoding="utf-8")
    tok = XLMRTokenizer(str(tmp_path / "r.model"))
    for t in TEXTS[:4]:
        expect = [3 if i == 0 else 4 + rev.index(sp.id_to_piece(i)) for i in sp.encode(t)]
        assert tok.encode(t) == expect
        assert tok.decode(tok.encode(t)) == sp.decode(sp.encode(t))
    (tmp_path / "r.dict.txt").write_text("".join(f"{p} 1\n" for p in pieces[:-5]), encoding="utf-8")
    with pytest.raises(TokenizerError, match="r.dict.txt"):
        XLMRTokenizer(str(tmp_path / "r.model"))
    (tmp_path / "r.dict.txt").write_text("nocount\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"r.dict.txt:1"):
        XLMRTokenizer(str(tmp_path / "r.model"))
    with pytest.raises(TokenizerError, match="not found"):
        XLMRTokenizer(str(tmp_path / "missing.model"))


def test_matches_hugging_face_xlmr_tokenizer(models, tmp_path):
    """Same ids as HF's XLMRobertaTokenizer (the released XLM-R has no byte fallback, nor does HF's)."""
    transformers = pytest.importorskip("transformers")
    _, _, model = models
    shutil.copy(model, tmp_path / "sentencepiece.bpe.model")
    hf = transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    tok = XLMRTokenizer(model)
    assert len(hf) == tok.vocab_size
    assert hf.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, tok.mask_id]
    for t in TEXTS[:6]:
        assert hf(t)["input_ids"] == tok.encode(t, add_bos=True, add_eos=True)
