"""Per-language packed datasets over megatron-core IndexedDatasets (`<path>/<lang>/<split>.{bin,idx}`).

`PackedLanguageDataset` reads one language's split, packs its sentences into blocks (packing.py)
and returns a block's tokens (int64, without `<s>`; the loader prepends it). The block index is
built once in memory when the dataset is opened (C++, linear in the number of sentences).
`MultilingualCorpus` opens every language of a split and reports the sizes the sampler uses.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np

from xlmr_mp.data.packing import pack_blocks

EOS_ID = 2


def discover_languages(path: str, split: str = "train") -> List[str]:
    """Sorted language directories under `path` holding `<split>.idx` and `<split>.bin`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={path!r} is not a directory: point it at the output of "
                                f"tools/preprocess_data.py (<path>/<lang>/{split}.bin/.idx)")
    langs = sorted(d for d in os.listdir(path)
                   if os.path.isfile(os.path.join(path, d, f"{split}.idx"))
                   and os.path.isfile(os.path.join(path, d, f"{split}.bin")))
    if not langs:
        raise FileNotFoundError(f"data.path={path!r} holds no <lang>/{split}.idx + .bin: "
                                f"run tools/preprocess_data.py first")
    return langs


class PackedLanguageDataset:
    """One language's split as packed blocks: `len(ds)` blocks, `ds.block(i)` -> int64 tokens."""

    def __init__(self, prefix: str, block_size: int, break_mode: str = "complete", name: str = ""):
        self.prefix, self.block_size, self.break_mode = prefix, block_size, break_mode
        self.name = name or os.path.basename(os.path.dirname(prefix))
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"{prefix + ext} is missing: re-run tools/preprocess_data.py "
                                        f"for language {self.name!r} or drop it from data.languages")
        from megatron.core.datasets.indexed_dataset import _IndexReader  # IndexedDataset's index reader
        try:  # (IndexedDataset itself cannot open an empty split: it mmaps the empty .bin)
            index = _IndexReader(prefix + ".idx", multimodal=False)
            sizes = np.array(index.sequence_lengths, dtype=np.int64)  # copies: the index mmap closes
            doc_index = np.array(index.document_indices, dtype=np.int64)
            pointers = np.array(index.sequence_pointers, dtype=np.int64)
            self.dtype = np.dtype(index.dtype)
            del index
        except Exception as e:  # noqa: BLE001 - say which file is bad
            raise ValueError(f"{prefix}.idx is not a valid megatron-core (MMIDIDX) index "
                             f"({type(e).__name__}: {e}); rebuild it with tools/preprocess_data.py") from e
        if os.path.getsize(prefix + ".bin") != int(sizes.sum()) * self.dtype.itemsize:
            raise ValueError(f"{prefix}.bin has {os.path.getsize(prefix + '.bin')} bytes but its index "
                             f"describes {int(sizes.sum())} tokens of {self.dtype}: the pair is incomplete or "
                             f"mismatched; rebuild it with tools/preprocess_data.py")
        expected = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * self.dtype.itemsize
        if len(sizes) and not np.array_equal(pointers - pointers[0], expected):
            raise ValueError(f"{prefix}.bin: sentences are not stored back to back; rebuild it with "
                             f"tools/preprocess_data.py (one add_item per sentence)")
        self._token_offset = int(pointers[0]) // self.dtype.itemsize if len(sizes) else 0
        self.num_sentences = int(len(sizes))
        self.num_tokens = int(sizes.sum())
        self.num_documents = int(len(doc_index) - 1)
        self._tokens = None
        self._check_sentence_ends(sizes)
        self.starts, self.lengths = pack_blocks(sizes, doc_index, block_size, break_mode)

    def _check_sentence_ends(self, sizes: np.ndarray, n_check: int = 64) -> None:
        ends = (np.cumsum(sizes) - 1)[sizes > 0][:n_check]
        if len(ends) and np.any(np.asarray(self.tokens)[self._token_offset + ends] != EOS_ID):
            raise ValueError(f"{self.prefix}.bin: sentences must end in </s> (id {EOS_ID}); "
                             f"rebuild it with tools/preprocess_data.py")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None and self.num_tokens == 0:
            self._tokens = np.zeros(0, dtype=self.dtype)  # an empty .bin cannot be mmapped
        if self._tokens is None:
            # a plain ndarray view of the memmap: slicing it skips np.memmap's per-call overhead
            self._tokens = np.asarray(np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r"))
        return self._tokens

    def __getstate__(self):  # worker processes re-open the memmap instead of copying it
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return len(self.starts)

    def block(self, i: int) -> np.ndarray:
        """Tokens of block i (int64, sentences each ending in </s>, no <s>)."""
        s = self._token_offset + int(self.starts[i])
        return self.tokens[s:s + int(self.lengths[i])].astype(np.int64)


class MultilingualCorpus:
    """Every language of one split: `datasets[i]`, `languages[i]`, and `sizes(unit)` for sampling."""

    def __init__(self, path: str, split: str, block_size: int, languages: Optional[Sequence[str]] = None,
                 break_mode: str = "complete", drop_empty: bool = False):
        found = discover_languages(path, split)
        if languages is None:
            languages = found
        else:
            missing = [l for l in languages if l not in found]
            if missing:
                raise FileNotFoundError(f"data.languages: {missing} have no {split}.bin/.idx under "
                                        f"data.path={path!r} (found: {found[:20]}...)")
        self.path, self.split, self.languages = path, split, list(languages)
        self.datasets = [PackedLanguageDataset(os.path.join(path, l, split), block_size, break_mode, l)
                         for l in self.languages]
        empty = [l for l, d in zip(self.languages, self.datasets) if len(d) == 0]
        if empty and drop_empty:  # e.g. a small language's validation split
            keep = [i for i, d in enumerate(self.datasets) if len(d)]
            self.languages = [self.languages[i] for i in keep]
            self.datasets = [self.datasets[i] for i in keep]
            if not self.datasets:
                raise ValueError(f"{path}: every language's {split} split is empty")
        elif empty:
            raise ValueError(f"{path}: languages {empty} have an empty {split} split; drop them "
                             f"from data.languages")

    def sizes(self, unit: str = "tokens") -> np.ndarray:
        """Per-language size in `tokens` or `sentences` (the p_i of the alpha sampler)."""
        if unit == "tokens":
            return np.array([d.num_tokens for d in self.datasets], dtype=np.float64)
        if unit == "sentences":
            return np.array([d.num_sentences for d in self.datasets], dtype=np.float64)
        raise ValueError(f"data.share_unit={unit!r}: choose tokens or sentences")

    def num_blocks(self) -> np.ndarray:
        return np.array([len(d) for d in self.datasets], dtype=np.uint64)
