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
"""
from __future__ import annotations

import itertools
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")
MASK_PIECE = "<mask>"


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
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(3, sp.get_piece_size()):
            c = int(counts[i]) if counts is not None else 1
            f.write(f"{sp.id_to_piece(i)} {c}\n")
    os.replace(tmp, path)


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

    def encode_flat(self, texts: Sequence[str], add_eos: bool = True, num_threads: int = 1):
        """All texts encoded into one int32 array of dictionary ids, and the per-text lengths.

        The fast path for preprocessing: one C++ batch call, one numpy remap, no per-token Python.
        """
        # SentencePiece appends its own </s> (spm id 2, which is also dictionary id 2)
        pieces = self.sp.encode(list(texts), add_eos=add_eos, num_threads=num_threads) if texts else []
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=total)
        return self._to_dict32.take(ids), lengths

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
