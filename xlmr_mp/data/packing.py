"""Packing sentences into blocks, as XLM-R/fairseq's TokenBlockDataset(break_mode='complete').

A block holds consecutive complete sentences, at most `block_size = seq_length - 1` tokens (the
`<s>` prepended by the loader makes seq_length). Each sentence keeps its closing `</s>`.
A sentence longer than a block is split: block-size pieces become blocks of their own and the
remaining tail starts the next block, which later sentences may join.
Modes: "complete" (fairseq's: blocks cross document boundaries) and "complete_doc" (a block never
spans two documents). Blocks are token ranges [start, start + length) of the language's flat token
stream (the .bin file holds the sentences back to back).
The C++ fast path is `xlmr_mp._C.pack_blocks`; `pack_blocks_reference` is the plain Python version.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

BREAK_MODES = ("complete", "complete_doc")


def pack_blocks_reference(sizes, doc_index, block_size: int, break_mode: str = "complete"):
    """Block (starts, lengths) int64 arrays for sentences of `sizes`; documents start at doc_index."""
    _check(block_size, break_mode)
    doc_starts = set(int(d) for d in doc_index[1:-1]) if break_mode == "complete_doc" else set()
    starts, lengths = [], []
    block_start = filled = 0
    for s, length in enumerate(int(x) for x in sizes):
        if s in doc_starts and filled > 0:
            starts.append(block_start); lengths.append(filled)
            block_start += filled; filled = 0
        if filled > 0 and filled + length > block_size:
            starts.append(block_start); lengths.append(filled)
            block_start += filled; filled = 0
        while length > block_size:
            starts.append(block_start); lengths.append(block_size)
            block_start += block_size; length -= block_size
        filled += length
    if filled > 0:
        starts.append(block_start); lengths.append(filled)
    return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def pack_blocks(sizes, doc_index, block_size: int, break_mode: str = "complete",
                use_cpp: Optional[bool] = None):
    """Block (starts, lengths) int64 arrays; C++ when built, else the Python reference (same result)."""
    _check(block_size, break_mode)
    if not (isinstance(sizes, np.ndarray) and sizes.dtype == np.int32):  # int32 is read in place by C++
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    doc_index = np.ascontiguousarray(doc_index, dtype=np.int64)
    if use_cpp is None:
        from xlmr_mp.data.blend import have_cpp
        use_cpp = have_cpp()
    if not use_cpp:
        return pack_blocks_reference(sizes, doc_index, block_size, break_mode)
    from xlmr_mp import _C
    return _C.pack_blocks(sizes, doc_index, block_size, break_mode == "complete_doc")


def _check(block_size: int, break_mode: str) -> None:
    if block_size < 1:
        raise ValueError(f"pack_blocks: block_size={block_size} must be >= 1 (data.seq_length >= 2)")
    if break_mode not in BREAK_MODES:
        raise ValueError(f"pack_blocks: break_mode={break_mode!r}: choose one of {BREAK_MODES} (data.break_mode)")
