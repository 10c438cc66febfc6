"""Per-language packed datasets over megatron-core IndexedDatasets (`<path>/<lang>/<split>.{bin,idx}`).

`PackedLanguageDataset` reads one language's split, packs its sentences into blocks (packing.py)
and returns a block's tokens (int64, without `<s>`; the loader prepends it). The block index is
built once (C++, linear in the number of sentences) and cached next to the data.
`MultilingualCorpus` opens every language of a split and reports the sizes the sampler uses.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np

from xlmr_mp.atomic import atomic_write
from xlmr_mp.data.indexed import read_index_arrays
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
    """One language's split as packed blocks: `len(ds)` blocks, `ds.block(i)` -> int64 tokens.

    The block bounds (n_blocks + 1 token offsets, 8 bytes per block) are cached next to the data as
    `<prefix>.blocks-<block_size>-<break_mode>.npy` (+ `.json` fingerprint of the .idx/.bin) and
    memory-mapped, so the ranks of a node share one copy and later runs skip the packing; a stale
    or unwritable cache falls back to building them (in memory when the directory is read-only).
    """

    def __init__(self, prefix: str, block_size: int, break_mode: str = "complete", name: str = "",
                 cache: bool = True):
        self.prefix, self.block_size, self.break_mode = prefix, block_size, break_mode
        self.name = name or os.path.basename(os.path.dirname(prefix))
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"{prefix + ext} is missing: re-run tools/preprocess_data.py "
                                        f"for language {self.name!r} or drop it from data.languages")
        self._cache_path = f"{prefix}.blocks-{block_size}-{break_mode}.npy"
        fingerprint = {"idx_bytes": os.path.getsize(prefix + ".idx"), "bin_bytes": os.path.getsize(prefix + ".bin"),
                       "idx_mtime_ns": os.stat(prefix + ".idx").st_mtime_ns, "block_size": block_size,
                       "break_mode": break_mode}
        meta = self._load_cache(fingerprint) if cache else None
        if meta is None:
            bounds, meta = self._build(fingerprint)
            self._bounds = bounds
            if cache:
                self._write_cache(bounds, meta)
        self.dtype = np.dtype(meta["dtype"])
        self.num_sentences, self.num_tokens = meta["num_sentences"], meta["num_tokens"]
        self.num_documents = meta["num_documents"]
        self._token_offset = meta["token_offset"]
        self._tokens = None

    # -- block index
    def _load_cache(self, fingerprint: dict) -> Optional[dict]:
        meta_path = self._cache_path[:-4] + ".json"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("fingerprint") != fingerprint:
                return None
            self._bounds = np.load(self._cache_path, mmap_mode="r")
            if len(self._bounds) != meta["num_blocks"] + 1:
                return None
            return meta
        except (OSError, ValueError, KeyError):
            return None

    def _write_cache(self, bounds: np.ndarray, meta: dict) -> None:
        try:  # concurrent ranks write the same bytes; each renames its own complete file
            with atomic_write(self._cache_path, "wb") as f:
                np.save(f, bounds)
            with atomic_write(self._cache_path[:-4] + ".json") as f:
                json.dump(meta, f)
        except OSError:  # read-only data directory: keep the in-memory bounds
            pass

    def _build(self, fingerprint: dict):
        prefix = self.prefix
        try:      # megatron-core's MMIDIDX layout, read without megatron-core (data/indexed.py)
            dtype, sizes, pointers, doc_index = read_index_arrays(prefix)
            dtype = np.dtype(dtype)
        except Exception as e:  # noqa: BLE001 - say which file is bad
            raise ValueError(f"{prefix}.idx is not a valid megatron-core (MMIDIDX) index "
                             f"({type(e).__name__}: {e}); rebuild it with tools/preprocess_data.py") from e
        try:
            # memory-mapped views of the index: nothing per sentence is copied (there may be billions)
            n_tok = int(sizes.sum(dtype=np.int64))
            if fingerprint["bin_bytes"] != n_tok * dtype.itemsize:
                raise ValueError(f"{prefix}.bin has {fingerprint['bin_bytes']} bytes but its index describes "
                                 f"{n_tok} tokens of {dtype}: the pair is incomplete or mismatched; rebuild it "
                                 f"with tools/preprocess_data.py")
            offset = int(pointers[0]) // dtype.itemsize if len(sizes) else 0
            self._check_contiguous(sizes, pointers, dtype.itemsize)
            self.dtype, self._token_offset, self.num_tokens = dtype, offset, n_tok
            self._tokens = None
            self._check_sentence_ends(sizes)
            starts, lengths = pack_blocks(sizes, np.asarray(doc_index, dtype=np.int64), self.block_size,
                                          self.break_mode)
            meta = {"fingerprint": fingerprint, "dtype": dtype.name, "num_sentences": int(len(sizes)),
                    "num_tokens": n_tok, "num_documents": int(len(doc_index) - 1), "token_offset": offset,
                    "num_blocks": int(len(starts))}
        finally:
            del sizes, pointers, doc_index      # the index's memory maps
        bounds = np.append(starts, starts[-1] + lengths[-1] if len(starts) else 0).astype(np.int64)
        return bounds, meta

    def _check_contiguous(self, sizes, pointers, itemsize: int, chunk: int = 1 << 24) -> None:
        end = int(pointers[0]) if len(sizes) else 0
        for c in range(0, len(sizes), chunk):
            s = np.asarray(sizes[c:c + chunk], dtype=np.int64) * itemsize
            expected = end + np.concatenate([[0], np.cumsum(s)[:-1]])
            if not np.array_equal(np.asarray(pointers[c:c + chunk]), expected):
                raise ValueError(f"{self.prefix}.bin: sentences are not stored back to back; rebuild it "
                                 f"with tools/preprocess_data.py (one add_item per sentence)")
            end = int(expected[-1] + s[-1])

    def _check_sentence_ends(self, sizes, n_check: int = 64) -> None:
        head = np.asarray(sizes[:4 * n_check], dtype=np.int64)
        ends = (np.cumsum(head) - 1)[head > 0][:n_check]
        if len(ends) and np.any(self.tokens[self._token_offset + ends] != EOS_ID):
            raise ValueError(f"{self.prefix}.bin: sentences must end in </s> (id {EOS_ID}); "
                             f"rebuild it with tools/preprocess_data.py")

    # -- tokens
    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None and self.num_tokens == 0:
            self._tokens = np.zeros(0, dtype=self.dtype)  # an empty .bin cannot be mmapped
        if self._tokens is None:
            # a plain ndarray view of the memmap: slicing it skips np.memmap's per-call overhead
            self._tokens = np.asarray(np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r"))
        return self._tokens

    @property
    def bounds(self) -> np.ndarray:
        """Token offsets of the blocks: block i is [bounds[i], bounds[i+1])."""
        if self._bounds is None:
            self._bounds = np.load(self._cache_path, mmap_mode="r")
        return self._bounds

    def __getstate__(self):  # worker processes re-open the memmaps instead of copying them
        state = dict(self.__dict__)
        state["_tokens"] = None
        if isinstance(self._bounds, np.memmap):
            state["_bounds"] = None
        return state

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def block(self, i: int) -> np.ndarray:
        """Tokens of block i (int64, sentences each ending in </s>, no <s>)."""
        b = self.bounds
        s, e = int(b[i]), int(b[i + 1])
        return self.tokens[self._token_offset + s:self._token_offset + e].astype(np.int64)


class MultilingualCorpus:
    """Every language of one split: `datasets[i]`, `languages[i]`, and `sizes(unit)` for sampling."""

    def __init__(self, path: str, split: str, block_size: int, languages: Optional[Sequence[str]] = None,
                 break_mode: str = "complete", drop_empty: bool = False, cache: bool = True):
        found = discover_languages(path, split)
        if languages is None:
            languages = found
        else:
            missing = [l for l in languages if l not in found]
            if missing:
                raise FileNotFoundError(f"data.languages: {missing} have no {split}.bin/.idx under "
                                        f"data.path={path!r} (found: {found[:20]}...)")
        self.path, self.split, self.languages = path, split, list(languages)
        self.datasets = [PackedLanguageDataset(os.path.join(path, l, split), block_size, break_mode, l, cache)
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
