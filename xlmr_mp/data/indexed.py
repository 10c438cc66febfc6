"""Megatron MMIDIDX datasets (`PREFIX.bin` + `PREFIX.idx`): a streaming writer and an index reader.

The layout is the one megatron-core's `IndexedDataset(PREFIX)` reads (read training data with it):

    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1> | <B dtype code> | <Q n_sequences> | <Q n_doc_indices>
          | int32 lengths[n_sequences] | int64 byte pointers[n_sequences]
          | int64 document_indices[n_doc_indices]      (starts at 0; one entry per document end)
    .bin  the token ids of every sequence, back to back, in dtype

`IndexedWriter` keeps memory bounded whatever the dataset size (lengths and document ends are
spooled to temporary side files), writes deterministic bytes, and only makes the pair visible when
complete: everything goes to temporary names, `.bin` is renamed first and `.idx` last, and any
older pair under the same prefix is removed when writing starts. So a `.idx` exists only beside
the `.bin` it describes.
"""
from __future__ import annotations

import glob
import os
import shutil
import struct
from typing import Optional, Tuple

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_COPY_BLOCK = 1 << 22  # elements per block when streaming side files into the index


def token_dtype(vocab_size: int):
    """megatron's rule: uint16 when the vocabulary has fewer than 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def remove_dataset(prefix: str) -> None:
    """Delete PREFIX.idx then PREFIX.bin if present (the .idx first, so no stale pair survives)."""
    for ext in (".idx", ".bin"):
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IndexedWriter:
    """Append sequences and document ends; `finalize()` makes PREFIX.{bin,idx} appear atomically."""

    def __init__(self, prefix: str, dtype=np.int32):
        if np.dtype(dtype).type not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        d = os.path.dirname(prefix)
        if d:
            os.makedirs(d, exist_ok=True)
        remove_dataset(prefix)
        for stale in glob.glob(glob.escape(prefix) + ".*.tmp-*"):   # left by a killed earlier run
            pid = stale.rsplit(".tmp-", 1)[1]
            if not (pid.isdigit() and _alive(int(pid))):
                os.remove(stale)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = prefix + ".bin" + tag
        self._len_tmp = prefix + ".lengths" + tag
        self._doc_tmp = prefix + ".docs" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._len = open(self._len_tmp, "wb")
        self._doc = open(self._doc_tmp, "wb")
        self.n_sequences = 0
        self.n_documents = 0
        self.n_tokens = 0
        self._seq_in_doc = 0
        self._closed = False

    def add_sequences(self, ids: np.ndarray, lengths: np.ndarray, doc_starts: Optional[np.ndarray] = None) -> None:
        """Append len(lengths) sequences whose tokens are `ids` back to back.

        doc_starts (bool per sequence, optional): a new document begins at these sequences, i.e.
        the open document is ended just before each of them.
        """
        ids = np.asarray(ids)
        lengths = np.asarray(lengths)
        if doc_starts is not None and lengths.size:
            cut = np.flatnonzero(doc_starts)
            if cut.size and cut[0] == 0 and self._seq_in_doc == 0:
                cut = cut[1:]
            if cut.size:
                self._doc.write((cut.astype(np.int64) + self.n_sequences).tobytes())
                self.n_documents += cut.size
                self._seq_in_doc = lengths.size - int(cut[-1])
                self._write_sequences(ids, lengths, count_in_doc=False)
                return
        self._write_sequences(ids, lengths)

    def _write_sequences(self, ids: np.ndarray, lengths: np.ndarray, count_in_doc: bool = True) -> None:
        if int(lengths.sum()) != ids.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {ids.size} ids were given")
        if self.dtype == np.uint16 and ids.size and (ids.max() > 65535 or ids.min() < 0):
            raise ValueError("token id does not fit in uint16; use int32 (vocab_size >= 65500)")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._len.write(lengths.astype(np.int32, copy=False).tobytes(order="C"))
        self.n_sequences += lengths.size
        self.n_tokens += ids.size
        if count_in_doc:
            self._seq_in_doc += lengths.size

    def end_document(self) -> None:
        """Close the current document (no-op when it has no sequence)."""
        if self._seq_in_doc == 0:
            return
        self._doc.write(struct.pack("<q", self.n_sequences))
        self.n_documents += 1
        self._seq_in_doc = 0

    def append_dataset(self, prefix: str) -> None:
        """Append every document of the complete dataset PREFIX (streamed, for merging shards)."""
        self.end_document()
        dtype, lengths, doc_idx = read_index(prefix)
        if np.dtype(dtype) != self.dtype:
            raise ValueError(f"{prefix}.idx: dtype {np.dtype(dtype).name} differs from {self.dtype.name}")
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 1 << 24)
        for s in range(0, lengths.size, _COPY_BLOCK):
            self._len.write(np.asarray(lengths[s:s + _COPY_BLOCK], dtype=np.int32).tobytes())
        for s in range(1, doc_idx.size, _COPY_BLOCK):
            block = np.asarray(doc_idx[s:s + _COPY_BLOCK], dtype=np.int64) + self.n_sequences
            self._doc.write(block.tobytes())
        self.n_sequences += lengths.size
        self.n_documents += doc_idx.size - 1
        self.n_tokens += int(lengths.sum(dtype=np.int64))

    def finalize(self) -> None:
        """Write the index and rename both files into place (.bin first, .idx last)."""
        self.end_document()
        for f in (self._bin, self._len, self._doc):
            f.close()
        idx_tmp = self.prefix + ".idx" + self._bin_tmp[len(self.prefix) + 4:]
        itemsize = self.dtype.itemsize
        with open(idx_tmp, "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            out.write(struct.pack("<Q", self.n_sequences))
            out.write(struct.pack("<Q", self.n_documents + 1))
            with open(self._len_tmp, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            carry = 0
            with open(self._len_tmp, "rb") as f:
                while True:
                    block = np.frombuffer(f.read(4 * _COPY_BLOCK), dtype=np.int32)
                    if block.size == 0:
                        break
                    ends = np.cumsum(block, dtype=np.int64) * itemsize + carry
                    starts = np.empty_like(ends)
                    starts[0] = carry
                    starts[1:] = ends[:-1]
                    out.write(starts.tobytes())
                    carry = int(ends[-1])
            out.write(struct.pack("<q", 0))
            with open(self._doc_tmp, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
        os.remove(self._len_tmp)
        os.remove(self._doc_tmp)
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far (temporary files only; no final file is created)."""
        if self._closed:
            return
        for f in (self._bin, self._len, self._doc):
            f.close()
        for p in (self._bin_tmp, self._len_tmp, self._doc_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._closed = True


def read_index_arrays(prefix: str) -> Tuple[type, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, byte pointers, document indices) of PREFIX.idx, memory-mapped
    (nothing per sequence is copied). The trainer's reader: megatron-core is not imported, so reading
    data does not depend on its version (docs/megatron_core_compat.md). ValueError naming the file
    for a bad header or a file whose size is not the one its header describes (truncated)."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        header = f.read(9)
        if header != INDEX_HEADER:
            raise ValueError(f"{path}: not an MMIDIDX index (header {header!r})")
        try:
            version, code, n_seq, n_doc = struct.unpack("<QBQQ", f.read(25))
        except struct.error:
            raise ValueError(f"{path}: truncated header") from None
        offset = f.tell()
    if version != 1 or code not in _CODE_DTYPES:
        raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
    size, expected = os.path.getsize(path), offset + 12 * n_seq + 8 * n_doc
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but its header describes {n_seq} sequences and {n_doc} document "
                         f"indices ({expected} bytes): truncated or corrupt")
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = mm[offset:offset + 4 * n_seq].view(np.int32)
    pointers = mm[offset + 4 * n_seq:offset + 12 * n_seq].view(np.int64)
    doc_idx = mm[offset + 12 * n_seq:expected].view(np.int64)
    return _CODE_DTYPES[code], lengths, pointers, doc_idx


def read_index(prefix: str) -> Tuple[type, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, document indices) of PREFIX.idx, memory-mapped."""
    dtype, lengths, _, doc_idx = read_index_arrays(prefix)
    return dtype, lengths, doc_idx


def read_documents(prefix: str, max_documents: Optional[int] = None):
    """Yield each document of PREFIX as a list of int64 arrays (one per sequence); for tests/tools."""
    dtype, lengths, doc_idx = read_index(prefix)
    data = np.memmap(prefix + ".bin", mode="r", dtype=dtype) if lengths.size else np.zeros(0, dtype)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    for d in range(doc_idx.size - 1):
        if max_documents is not None and d >= max_documents:
            return
        a, b = int(doc_idx[d]), int(doc_idx[d + 1])
        yield [np.asarray(data[starts[s]:starts[s + 1]], dtype=np.int64) for s in range(a, b)]
