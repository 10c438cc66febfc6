"""XLM-R tokenizer: a SentencePiece model plus the fairseq / Hugging Face dictionary ids.

Id layout (the released XLM-R, fairseq `Dictionary` + HF `XLMRobertaTokenizer`):

    <s>=0  <pad>=1  </s>=2  <unk>=3   SentencePiece piece i (i >= 3) -> i + 1   <mask> = spm_size + 1

SentencePiece's own control pieces <unk>/<s>/</s> (spm ids 0/1/2) map to 3/0/2, so a model of
250000 pieces gives 250002 ids.

`P.dict.txt` (written by tools/train_spm.py beside `P.model`) is fairseq's format: one
`<piece> <count>` line per SentencePiece piece 3, 4, ..., spm_size-1, in that order; fairseq's
`Dictionary.load` puts line k at id 4 + k, which is the formula above. The four specials and
`<mask>` are not listed (fairseq adds them itself). When a dict.txt is found beside the model its
pieces decide the ids (so a foreign dictionary with a different order also works); otherwise the
formula is used.

The tokenizer is the id authority: besides encoding it builds the per-id tables the data pipeline
needs from its own dictionary (`word_start_table`, `char_length_table`), so whole-word masking and
bits per character agree with the ids the preprocessor wrote, whatever the dictionary's order.

Batch encoding for preprocessing (`encode_flat`) asks SentencePiece (>= 0.2.3) for one int32
buffer per sentence instead of a list of Python ints, and flattens and remaps the buffers in C++
(`xlmr_mp._C.flatten_id_buffers`; Python reference `flatten_id_buffers_reference`): no Python int
per token, so it costs less CPU than SentencePiece's own list output (bench/results/README.md).
Older SentencePiece, or XLMR_MP_SPM_BUFFERS=0, takes the list path; both give the same ids
(checked at load time).
"""
from __future__ import annotations

import itertools
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

from xlmr_mp.atomic import atomic_write
from xlmr_mp.ids import BOS_ID, EOS_ID, MASK_PIECE, PAD_ID, SPECIAL_PIECES, UNK_ID  # noqa: F401 (re-exported)

WORD_START = "\u2581"   # SentencePiece's marker for "a space before this piece"


def flatten_id_buffers_reference(buffers, table: np.ndarray, eos_id: int, unk_id: int, dtype=np.int32):
    """(ids in dtype, lengths int64, count of unk_id) of per-sentence int32 buffers remapped through table,
    with eos_id appended to each sentence when eos_id >= 0. Reference for _C.flatten_id_buffers."""
    arrs = [np.frombuffer(b, dtype=np.int32) for b in buffers]
    extra = 1 if eos_id >= 0 else 0
    lengths = np.fromiter((len(a) + extra for a in arrs), dtype=np.int64, count=len(arrs))
    parts = []
    for a in arrs:
        if a.size and (a.min() < 0 or a.max() >= len(table)):
            raise ValueError(f"flatten_id_buffers: id outside the table of {len(table)} entries")
        parts.append(table[a])
        if extra:
            parts.append(np.array([eos_id], dtype=table.dtype))
    ids = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
    return ids, lengths, int(np.count_nonzero(ids == unk_id))


def _flatten_id_buffers():
    try:
        from xlmr_mp._C import flatten_id_buffers
        return flatten_id_buffers
    except ImportError:  # source tree without the built extension
        return flatten_id_buffers_reference


_PROBE_TEXTS = ["Hello world.", "", "  two  spaces ", "Grüße, 世界! ١٢٣ 😀", "000 0000 00000", "a" * 300]


def _buffer_batch_encoder(sp):
    """SentencePiece's buffer-returning batch encoder as fn(texts, num_threads), or None.

    Uses the binding's `_EncodeAsBufferBatch` (what `encode(..., out_type="numpy")` calls, minus
    one numpy object per sentence); returns None when it is missing, disabled with
    XLMR_MP_SPM_BUFFERS=0, or gives other ids than sp.encode on probe texts."""
    if os.environ.get("XLMR_MP_SPM_BUFFERS", "1") == "0":
        return None
    fn = getattr(getattr(sp, "_processor", None), "_EncodeAsBufferBatch", None)
    if fn is None:
        return None

    def encode(texts, num_threads=1):
        # (input, num_threads, thread_pool, enable_sampling, nbest_size, alpha, add_bos, add_eos, reverse)
        return fn(texts, num_threads, None, False, 0, 0.0, False, False, False)
    try:
        got = [np.frombuffer(b, dtype=np.int32).tolist() for b in encode(_PROBE_TEXTS)]
    except Exception:  # another binding's signature: use the list path
        return None
    return encode if got == sp.encode(_PROBE_TEXTS) else None


class TokenizerError(ValueError):
    """A tokenizer model or dictionary that cannot be used; the message names the file."""


def _load_spm(model_path: str):
    import sentencepiece as spm
    if not os.path.isfile(model_path):
        raise TokenizerError(f"{model_path}: SentencePiece model not found (train one with tools/train_spm.py)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(model_path)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context
        raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from e
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        raise TokenizerError(
            f"{model_path}: expected SentencePiece unk/bos/eos ids 0/1/2 (XLM-R layout), got "
            f"{sp.unk_id()}/{sp.bos_id()}/{sp.eos_id()}; retrain with tools/train_spm.py")
    return sp


def dict_path_for(model_path: str) -> str:
    """`P.dict.txt` for `P.model`."""
    base = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
    return base + ".dict.txt"


def read_fairseq_dict(path: str) -> List[str]:
    """Pieces of a fairseq dict.txt in file order (line k -> id 4 + k); checks the format."""
    pieces = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                raise TokenizerError(f"{path}:{lineno}: empty line; expected '<piece> <count>'")
            piece, sep, count = line.rpartition(" ")
            if not sep or not piece:
                raise TokenizerError(f"{path}:{lineno}: expected '<piece> <count>', got {line!r}")
            if count.lstrip("-").isdigit() is False and count != "#fairseq:overwrite":
                raise TokenizerError(f"{path}:{lineno}: count {count!r} is not an integer")
            pieces.append(piece)
    return pieces


def write_fairseq_dict(sp, path: str, counts: Optional[np.ndarray] = None) -> None:
    """Write `P.dict.txt` for SentencePiece model `sp`: pieces 3..size-1 with their counts."""
    with atomic_write(path, encoding="utf-8") as f:
        for i in range(3, sp.get_piece_size()):
            c = int(counts[i]) if counts is not None else 1
            f.write(f"{sp.id_to_piece(i)} {c}\n")


class XLMRTokenizer:
    """Encode/decode text with a SentencePiece model, using XLM-R (fairseq/HF) dictionary ids."""

    def __init__(self, model_path: str, dict_path: Optional[str] = None):
        self.model_path = model_path
        self.sp = _load_spm(model_path)
        n = self.sp.get_piece_size()
        self.spm_size = n
        if dict_path is None and os.path.isfile(dict_path_for(model_path)):
            dict_path = dict_path_for(model_path)
        self.dict_path = dict_path
        # spm id -> dictionary id
        table = np.empty(n, dtype=np.int64)
        table[0], table[1], table[2] = UNK_ID, BOS_ID, EOS_ID
        if dict_path is None:
            table[3:] = np.arange(4, n + 1)
            self._vocab_size = n + 2
        else:
            pieces = read_fairseq_dict(dict_path)
            index = {p: 4 + k for k, p in enumerate(pieces)}
            for i in range(3, n):
                piece = self.sp.id_to_piece(i)
                if piece not in index:
                    raise TokenizerError(f"{dict_path}: piece {piece!r} (SentencePiece id {i}) of "
                                         f"{model_path} is missing; the dictionary belongs to another model")
                table[i] = index[piece]
            self._vocab_size = 4 + len(pieces) + 1
        self._to_dict = table
        self._to_dict32 = table.astype(np.int32)
        inverse = np.full(self._vocab_size, -1, dtype=np.int64)
        inverse[table[3:]] = np.arange(3, n)
        self._to_spm = inverse
        self._identity_layout = bool(np.array_equal(table[3:], np.arange(4, n + 1)))
        self._encode_buffers = _buffer_batch_encoder(self.sp)
        self._flatten = _flatten_id_buffers()

    # ids ---------------------------------------------------------------------------------------
    bos_id = property(lambda self: BOS_ID, doc="<s> = 0")
    pad_id = property(lambda self: PAD_ID, doc="<pad> = 1")
    eos_id = property(lambda self: EOS_ID, doc="</s> = 2")
    unk_id = property(lambda self: UNK_ID, doc="<unk> = 3")
    mask_id = property(lambda self: self._vocab_size - 1, doc="<mask> = the last id")
    vocab_size = property(lambda self: self._vocab_size, doc="number of ids incl. specials and <mask>")

    @property
    def special_ids(self) -> set:
        """Ids that are not text pieces: <s>, <pad>, </s>, <unk>, <mask>."""
        return {BOS_ID, PAD_ID, EOS_ID, UNK_ID, self.mask_id}

    def __len__(self) -> int:
        return self._vocab_size

    def id_to_piece(self, i: int) -> str:
        """Piece string of dictionary id i (specials included)."""
        if 0 <= i < 4:
            return SPECIAL_PIECES[i]
        if i == self.mask_id:
            return MASK_PIECE
        return self.sp.id_to_piece(int(self._to_spm[i]))

    def piece_to_id(self, piece: str) -> int:
        """Dictionary id of a piece string (<unk> for unknown pieces)."""
        if piece in SPECIAL_PIECES:
            return SPECIAL_PIECES.index(piece)
        if piece == MASK_PIECE:
            return self.mask_id
        return int(self._to_dict[self.sp.piece_to_id(piece)])

    # per-id tables ---------------------------------------------------------------------------
    def _table_size(self, size: Optional[int]) -> int:
        size = self._vocab_size if size is None else int(size)
        if size < self._vocab_size:
            raise TokenizerError(f"{self.model_path}: a table of {size} ids cannot hold this dictionary's "
                                 f"{self._vocab_size} ids; set model.vocab_size={self._vocab_size}")
        return size

    def _text_pieces(self):
        """(dictionary id, piece string, SentencePiece id or -1) of every text piece (no specials)."""
        out = []
        for i in range(3, self.spm_size):
            if not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out.append((int(self._to_dict[i]), self.sp.id_to_piece(i), i))
        if self.dict_path is not None:   # dictionary entries the model never produces
            mapped = set(self._to_dict[3:].tolist())
            for k, piece in enumerate(read_fairseq_dict(self.dict_path)):
                if 4 + k not in mapped:
                    out.append((4 + k, piece, -1))
        return out

    def word_start_table(self, size: Optional[int] = None) -> np.ndarray:
        """bool [size] (default vocab_size) over dictionary ids: True for a text piece that starts a
        word (begins with SentencePiece's '\u2581'); False for specials, <mask> and padding ids."""
        table = np.zeros(self._table_size(size), dtype=bool)
        for d, piece, _ in self._text_pieces():
            table[d] = piece.startswith(WORD_START)
        return table

    def char_length_table(self, size: Optional[int] = None) -> np.ndarray:
        """int32 [size] over dictionary ids: characters of the text a piece stands for. The word-start
        marker counts as the space it stands for; a byte-fallback piece <0xNN> counts one for a UTF-8
        lead byte and none for a continuation byte (a character spelled in bytes counts once);
        specials, <mask> and padding ids count 0."""
        table = np.zeros(self._table_size(size), dtype=np.int32)
        for d, piece, i in self._text_pieces():
            is_byte = self.sp.is_byte(i) if i >= 0 else (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"))
            if is_byte:
                table[d] = 0 if 0x80 <= int(piece[3:5], 16) <= 0xBF else 1
            else:
                table[d] = len(piece)
        return table

    # encode / decode -------------------------------------------------------------------------
    def spm_to_dict(self, spm_ids: np.ndarray) -> np.ndarray:
        """Vectorised map of SentencePiece ids to dictionary ids (same shape)."""
        spm_ids = np.asarray(spm_ids)
        if self._identity_layout:
            out = spm_ids + 1
            out[spm_ids == 0] = UNK_ID
            out[spm_ids == 1] = BOS_ID
            out[spm_ids == 2] = EOS_ID
            return out
        return self._to_dict[spm_ids]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Dictionary ids of `text` (pieces only unless add_bos / add_eos)."""
        ids = self.spm_to_dict(np.asarray(self.sp.encode(text), dtype=np.int64)).tolist()
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 1) -> List[List[int]]:
        """encode() of each text, using SentencePiece's batched C++ path."""
        flat, lengths = self.encode_flat(texts, add_eos=add_eos, num_threads=num_threads)
        out, pos = [], 0
        for n in lengths.tolist():
            ids = flat[pos:pos + n].tolist()
            out.append(([BOS_ID] if add_bos else []) + ids)
            pos += n
        return out

    def encode_flat(self, texts: Sequence[str], add_eos: bool = True, num_threads: int = 1,
                    dtype=np.int32, count_unk: bool = False):
        """All texts encoded into one array of dictionary ids (int32, or uint16 when every id fits),
        and the per-text lengths (int64); with count_unk, also the number of <unk> ids.

        The fast path for preprocessing: one SentencePiece batch call returning an int32 buffer per
        text, then one C++ pass that remaps, appends </s> and concatenates; no per-token Python.
        """
        dtype = np.dtype(dtype)
        if dtype == np.uint16 and self._vocab_size > 65536:
            raise TokenizerError(f"{self.model_path}: {self._vocab_size} ids do not fit uint16")
        eos = EOS_ID if add_eos else -1
        texts = texts if isinstance(texts, list) else list(texts)
        if self._encode_buffers is not None:
            ids, lengths, n_unk = self._flatten(self._encode_buffers(texts, num_threads), self._to_dict32, eos,
                                                UNK_ID, dtype)
        else:  # SentencePiece's list-of-lists output
            pieces = self.sp.encode(texts, add_eos=add_eos, num_threads=num_threads) if texts else []
            lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
            flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
            ids = self._to_dict32.take(flat).astype(dtype, copy=False)   # spm </s> (2) maps to dictionary 2
            n_unk = int(np.count_nonzero(ids == UNK_ID)) if count_unk else 0
        return (ids, lengths, n_unk) if count_unk else (ids, lengths)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of dictionary ids; <s>, <pad>, </s>, <mask> are dropped, <unk> decodes as SentencePiece's."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self._vocab_size):
            raise TokenizerError(f"id out of range [0, {self._vocab_size}) in decode input")
        keep = (ids > UNK_ID) & (ids != self.mask_id) | (ids == UNK_ID)
        ids = ids[keep]
        spm_ids = np.where(ids == UNK_ID, 0, self._to_spm[ids])
        return self.sp.decode(spm_ids.tolist())

    def normalize(self, text: str) -> str:
        """What decode(encode(text)) gives: SentencePiece's normalised form of text."""
        return self.sp.decode(self.sp.encode(text))

    def __repr__(self) -> str:
        return f"XLMRTokenizer({self.model_path!r}, vocab_size={self._vocab_size})"
