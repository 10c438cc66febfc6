"""The units the corpus readers hand out: `RawChunk` (whole lines or a columnar batch as read),
`ParsedChunk` (its sentences and document boundaries) and `CorpusError` (bad input, naming the place).

A leaf of the readers (corpus_io, parquet_io, zstd_io all import it; it imports none of them)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple


class CorpusError(ValueError):
    """Bad input text; the message names the file, the line when there is one, and the fix."""


@dataclass
class RawChunk:
    data: bytes                 # whole lines (the last one may lack "\n" at end of file); columnar input:
                                # bytes or, in the reading process, a memoryview of the reader's buffer
    first_line: int             # 1-based line number of the first line in data
    skipped: List[Tuple[int, str]] = field(default_factory=list)  # (line, reason) dropped right after data
    offset: int = -1            # byte offset of data in a plain (uncompressed) file; -1 otherwise
    length: int = 0             # len(data), also when data was left out by by_reference()
    docs: object = None         # columnar input: int64 offsets [rows + 1] of each row's text in data (then
                                # data is the rows' UTF-8 texts back to back)
    file: str = ""              # the file read, when it is not the source path (a folder's shard)
    fmt: str = ""               # its format, when it is not the source's
    group: int = -1             # Parquet: the row group the documents come from
    rows: object = None         # Parquet rows filtered (language, null text): 0-based row numbers of docs
    source: object = None       # a deferred chunk (no data yet): what to read, e.g. parquet_io.DeferredGroup

    def __post_init__(self):
        if self.data and not self.length:
            self.length = len(self.data)

    def by_reference(self) -> "RawChunk":
        """The same chunk without its bytes, for a process that re-reads them (plain files only):
        handing an encoder process (offset, length) instead of the text saves pickling and piping
        the whole corpus through the coordinating process. A deferred chunk (`source`) has no bytes to
        leave out; other chunks come back with their data as bytes (a memoryview of a reader's buffer is
        copied, since it cannot be pickled)."""
        if self.offset < 0:
            return self if isinstance(self.data, bytes) else dataclasses.replace(self, data=bytes(self.data))
        return RawChunk(b"", self.first_line, self.skipped, self.offset, self.length, file=self.file, fmt=self.fmt)

    def loaded(self, path: str) -> "RawChunk":
        """This chunk with its bytes: itself, or for a by_reference() chunk, its bytes re-read from path."""
        if self.data or self.length == 0:
            return self
        path = self.file or path
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), self.length, self.offset)
        if len(data) != self.length:
            raise CorpusError(f"{path}: file changed while being read (expected {self.length} bytes at "
                              f"offset {self.offset}, got {len(data)})")
        return RawChunk(data, self.first_line, self.skipped, self.offset, self.length, file=self.file, fmt=self.fmt)


@dataclass
class ParsedChunk:
    sentences: List[str]        # stripped, non-empty
    doc_start: Sequence[bool]   # True: a document boundary precedes this sentence inside the chunk
    trailing_break: bool        # the chunk ends with a document boundary after its last sentence
    n_lines: int
    skipped: List[Tuple[int, str]]
