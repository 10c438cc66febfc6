"""XLMRTokenizer: the fairseq / Hugging Face XLM-R id layout, encode/decode, dict.txt loading."""
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from tests.support.prep import train_tiny_spm
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
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


# --- batch encoding into flat buffers (preprocessing's path) ------------------------------------
def _list_path_tokenizer(model, monkeypatch):
    monkeypatch.setenv("XLMR_MP_SPM_BUFFERS", "0")
    tok = XLMRTokenizer(model)
    monkeypatch.delenv("XLMR_MP_SPM_BUFFERS")
    assert tok._encode_buffers is None
    return tok


def test_buffer_path_is_used_with_current_sentencepiece(models):
    _, model, _ = models
    tok = XLMRTokenizer(model)
    version = tuple(int(x) for x in spm.__version__.split(".")[:3])
    if version >= (0, 2, 3):     # the binding has _EncodeAsBufferBatch: the fast path must not silently fall off
        assert tok._encode_buffers is not None
    from xlmr_mp import _C
    assert tok._flatten is _C.flatten_id_buffers


@pytest.mark.parametrize("which", [1, 2])
def test_encode_flat_buffer_path_equals_list_path(models, monkeypatch, which):
    d, *model_pair = models
    model = model_pair[which - 1]
    fast, slow = XLMRTokenizer(model), _list_path_tokenizer(model, monkeypatch)
    texts = TEXTS + ["", "  ", "人们 ☃☃ 𝔘 " * 50]
    texts += [line for p in sorted((d / "corpus").iterdir()) for line in p.read_text().splitlines()[:200]]
    for dtype in (np.int32, np.uint16):
        for add_eos in (True, False):
            a_ids, a_len, a_unk = fast.encode_flat(texts, add_eos=add_eos, dtype=dtype, count_unk=True)
            b_ids, b_len, b_unk = slow.encode_flat(texts, add_eos=add_eos, dtype=dtype, count_unk=True)
            assert a_ids.dtype == b_ids.dtype == dtype
            np.testing.assert_array_equal(a_ids, b_ids)
            np.testing.assert_array_equal(a_len, b_len)
            assert a_unk == b_unk == int(np.count_nonzero(a_ids == 3))
    assert fast.encode_flat([], dtype=np.uint16)[0].shape == (0,)
    assert which == 1 or a_unk > 0          # the no-byte-fallback model does produce <unk> here


def test_encode_flat_equal_on_shared_corpus(shared_corpus, models, monkeypatch):
    """Every language of ../shared/corpus, buffer path vs SentencePiece's list output, id for id."""
    _, model, _ = models
    fast, slow = XLMRTokenizer(model), _list_path_tokenizer(model, monkeypatch)
    n_lang = 0
    for name in sorted(os.listdir(shared_corpus)):
        if not name.endswith(".txt") or name[:-4].upper() == name[:-4]:
            continue
        with open(os.path.join(shared_corpus, name), encoding="utf-8") as f:
            lines = [line.rstrip("\n") for _, line in zip(range(300), f)]
        a, b = fast.encode_flat(lines, count_unk=True), slow.encode_flat(lines, count_unk=True)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=name)
        n_lang += 1
    assert n_lang >= 100


def test_flatten_id_buffers_matches_reference():
    from xlmr_mp._C import flatten_id_buffers
    from xlmr_mp.tokenizer.spm import flatten_id_buffers_reference
    rng = np.random.default_rng(0)
    table = rng.permutation(5000).astype(np.int32) + 4
    table[0] = 3
    bufs = [rng.integers(0, 5000, size=int(n)).astype(np.int32) for n in rng.integers(0, 40, size=300)]
    bufs[5] = np.zeros(0, dtype=np.int32)
    bufs[7] = np.zeros(6, dtype=np.int32)        # SentencePiece's unk
    for dtype in (np.int32, np.uint16):
        for eos in (2, -1):
            got = flatten_id_buffers(bufs, table, eos, 3, np.dtype(dtype))
            ref = flatten_id_buffers_reference(bufs, table, eos, 3, dtype)
            assert got[0].dtype == ref[0].dtype == dtype
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
            assert got[2] == ref[2] >= 6
    assert flatten_id_buffers([], table, 2, 3, np.dtype(np.int32))[0].shape == (0,)
    with pytest.raises(ValueError, match="outside the table"):
        flatten_id_buffers([np.array([5000], dtype=np.int32)], table, 2, 3, np.dtype(np.int32))
    with pytest.raises(ValueError, match="outside the table"):
        flatten_id_buffers_reference([np.array([-1], dtype=np.int32)], table, 2, 3)
    with pytest.raises(ValueError, match="not an int32 buffer"):
        flatten_id_buffers([np.arange(3, dtype=np.int64)], table, 2, 3, np.dtype(np.int32))
    with pytest.raises(ValueError, match="uint16"):
        flatten_id_buffers(bufs[:2], table + 70000, 2, 3, np.dtype(np.uint16))
