"""Streaming reader of Parquet corpora (FineWeb-2, CulturaX): one row = one document.

A row's text column (`--text-key`, default "text") holds the document, one sentence per non-empty
line, exactly as a JSONL line's text field: so a Parquet file gives the same documents, and the
tools the same bytes, as the same text written as plain lines with a blank line between documents.
With `--lang-key`, a column names each row's language and a reader for language L keeps the rows
whose value is L: it reads the (small) language column of every row group and decodes the text only
of row groups holding L, so files whose row groups each hold few languages read fastest.

Memory: a row group is decoded one record batch of about `chunk_bytes` of text at a time
(`ParquetFile.iter_batches` over one row group, only the needed columns, pyarrow's own threads
off so encoder processes keep the cores); pages are streamed through a 1 MiB read buffer (no
pre-buffering of the row group's column chunk), so memory is one batch, one page and the column's
dictionary page, whatever the size of the row group or the file. With `defer_bytes` (the
preprocessing tool: 8 chunks), a row group of at most that much text is instead handed out unread,
as a `DeferredGroup` (file, row group, language mask), and decoded whole by `read_deferred` in the
encoder process that takes it: the reading process then does no decoding and pipes no text for it,
as with plain text, where encoder processes re-read (offset, length). A batch is the column's own
buffers: its UTF-8 bytes back to back (a view of Arrow's buffer, not a copy, until the chunk goes to
an encoder process as bytes) and the rows' offsets (numpy), so the decoding process makes no
per-row Python object; `parse_documents` turns one into sentences with C-level
string operations (one join, one decode and one split per batch).

Sharding: a file is a list of row groups; MPI ranks and ranges take whole row groups.
Bad input: a file that is not Parquet, a missing or non-string column (the error lists the
columns present and names --text-key / --lang-key), and a row group that cannot be decoded (file,
row group, its rows) raise `CorpusError`; a null text, invalid UTF-8 or an over-long line is a bad
row (file and row: an error, or skipped and counted with --on-bad-line skip).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from xlmr_mp.data.chunks import CorpusError, ParsedChunk, RawChunk


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int          # row group number in the file
    first_row: int      # 0-based row number of its first row in the file
    num_rows: int
    text_bytes: int     # uncompressed size of its text column (a weight for planning ranges)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow: pip install pyarrow") from None
    return pa, pq


def open_parquet(path: str):
    """pq.ParquetFile of path, or CorpusError naming the file."""
    pa, pq = _pyarrow()
    try:
        # pages streamed through a 1 MiB buffer rather than the row group's column chunk read whole
        return pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}); "
                          f"the file is damaged or not Parquet: download it again or remove it") from None


def _is_text_type(t) -> bool:
    pa, _ = _pyarrow()
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def check_columns(path: str, text_key: str, lang_key: Optional[str] = None, pf=None) -> None:
    """The text column (and the language column) exist and hold strings; else CorpusError with the fix."""
    pf = pf or open_parquet(path)
    schema = pf.schema_arrow
    names = schema.names
    present = ", ".join(f"{n} ({schema.field(n).type})" for n in names) or "none"
    for key, option in ((text_key, "--text-key"), (lang_key, "--lang-key")):
        if key is None:
            continue
        if key not in names:
            strings = [n for n in names if _is_text_type(schema.field(n).type)]
            hint = f"; pass {option} {strings[0]}" if strings else f"; pass {option} COLUMN"
            raise CorpusError(f"{path}: no column {key!r} ({option} {key}); columns present: {present}{hint} "
                              f"(the column holding the {'text' if option == '--text-key' else 'language code'})")
        if not _is_text_type(schema.field(key).type):
            raise CorpusError(f"{path}: column {key!r} ({option}) is {schema.field(key).type}, not a string "
                              f"column; columns present: {present}")


def row_groups(path: str, text_key: str) -> List[RowGroup]:
    """The row groups of one Parquet file, with their row numbers and text sizes (metadata only)."""
    pf = open_parquet(path)
    check_columns(path, text_key, pf=pf)
    md = pf.metadata
    col = pf.schema_arrow.names.index(text_key)
    # a nested schema would shift leaf columns; fall back to the whole row group's size then
    leaf = col if md.num_columns == len(pf.schema_arrow.names) else None
    out, first = [], 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        size = rg.column(leaf).total_uncompressed_size if leaf is not None else rg.total_byte_size
        out.append(RowGroup(path, i, first, rg.num_rows, int(size)))
        first += rg.num_rows
    return out


def languages_in(path: str, lang_key: str, text_key: str) -> List[str]:
    """Distinct values of the language column of one file, read one row group at a time."""
    pa, _ = _pyarrow()
    import pyarrow.compute as pc
    pf = open_parquet(path)
    check_columns(path, text_key, lang_key, pf=pf)
    found = set()
    for i in range(pf.metadata.num_row_groups):
        col = _read(pf, path, i, lambda: pf.read_row_group(i, columns=[lang_key], use_threads=False).column(0))
        found.update(v for v in pc.unique(col).to_pylist() if v is not None)
    return sorted(found)


def _read(pf, path, group, fn):
    """fn() (a pyarrow read of row group `group`); a decoding failure becomes CorpusError with the place."""
    pa, _ = _pyarrow()
    try:
        return fn()
    except (OSError, pa.ArrowException) as e:
        md = pf.metadata
        first = sum(md.row_group(i).num_rows for i in range(group))
        n = md.row_group(group).num_rows
        raise CorpusError(f"{path}: row group {group} (rows {first + 1}-{first + n}) cannot be read "
                          f"({type(e).__name__}: {str(e)[:200]}); the file is damaged: download it again or "
                          f"remove it") from None


def _as_strings(arr):
    """A (large_)string Array of a column chunk: chunks combined, dictionaries decoded."""
    pa, _ = _pyarrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    return arr


def _buffers(arr):
    """(the rows' UTF-8 texts back to back, int64 offsets [n + 1] into them, null mask or None); the texts
    are a read-only memoryview of the array's own data buffer (no copy; it keeps the buffer alive)."""
    pa, _ = _pyarrow()
    validity, offsets_buf, data_buf = arr.buffers()
    n, first = len(arr), arr.offset
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=width, count=n + 1, offset=first * np.dtype(width).itemsize)
    offsets = offsets.astype(np.int64)
    a, b = int(offsets[0]), int(offsets[-1])
    data = memoryview(data_buf)[a:b] if data_buf is not None and b > a else b""
    nulls = None
    if arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        nulls = ~bits[first:first + n].astype(bool)
    return data, offsets - a, nulls


def iter_row_group_chunks(groups: Sequence[RowGroup], chunk_bytes: int, text_key: str,
                          lang_key: Optional[str] = None, lang: Optional[str] = None,
                          on_bad_line: str = "error", fmt_tag: bool = False,
                          defer_bytes: int = 0) -> Iterator[RawChunk]:
    """RawChunks of the documents of the given row groups, in order, about chunk_bytes of text each.

    first_line is the 1-based row number of the chunk's first row in its file; when rows were left
    out (another language, a null text skipped) the chunk carries the row numbers of those it kept.
    A null text is an error here (on_bad_line "error") or skipped and counted.

    defer_bytes > 0: a row group whose text column is at most defer_bytes comes as one deferred chunk
    (no data; `source` says what to read) that `read_deferred` decodes whole in whichever process
    encodes it, so a reading process feeding encoder processes decodes nothing itself."""
    pf, pf_path = None, None
    for g in groups:
        if pf_path != g.file:
            pf, pf_path = open_parquet(g.file), g.file
            check_columns(g.file, text_key, lang_key, pf=pf)
        keep = None
        if lang_key is not None:
            import pyarrow.compute as pc
            langs = _read(pf, g.file, g.index, lambda: pf.read_row_group(g.index, columns=[lang_key],
                                                                           use_threads=False).column(0))
            keep = pc.fill_null(pc.equal(langs, lang), False).combine_chunks().to_numpy(zero_copy_only=False)
            if not keep.any():
                continue
        if 0 < g.text_bytes <= defer_bytes:
            yield RawChunk(b"", g.first_row + 1, file=g.file if fmt_tag else "", fmt="parquet", group=g.index,
                           source=DeferredGroup(g, text_key, keep, on_bad_line, fmt_tag))
            continue
        rows = max(1, int(chunk_bytes * max(g.num_rows, 1) // max(g.text_bytes, 1)))
        batches = iter(_read(pf, g.file, g.index, lambda: pf.iter_batches(
            batch_size=rows, row_groups=[g.index], columns=[text_key], use_threads=False)))
        done = 0
        while True:
            batch = _read(pf, g.file, g.index, lambda: next(batches, None))
            if batch is None:
                break
            chunk = _batch_chunk(batch.column(0), g, done, keep, text_key, on_bad_line, fmt_tag)
            done += batch.num_rows
            if len(chunk.docs) > 1 or chunk.skipped:        # else every row of another language
                yield chunk


@dataclass(frozen=True)
class DeferredGroup:
    """A row group to decode where it is encoded (iter_row_group_chunks with defer_bytes)."""
    group: RowGroup
    text_key: str
    keep: object            # bool array [num_rows] of the rows of the language read, or None (all)
    on_bad_line: str
    fmt_tag: bool


_OPEN = {}                  # this process's last opened Parquet file: {(path, size, mtime): ParquetFile}


def read_deferred(ref: DeferredGroup) -> RawChunk:
    """The chunk of a deferred row group: its documents decoded in one read (same rows, row numbers
    and errors as iter_row_group_chunks gives without defer_bytes)."""
    g = ref.group
    st = os.stat(g.file)
    key = (g.file, st.st_size, st.st_mtime_ns)
    pf = _OPEN.get(key)
    if pf is None:
        _OPEN.clear()
        pf = _OPEN[key] = open_parquet(g.file)
    col = _read(pf, g.file, g.index, lambda: pf.read_row_group(g.index, columns=[ref.text_key],
                                                                 use_threads=False).column(0))
    if len(col) != g.num_rows:
        raise CorpusError(f"{g.file}: row group {g.index} has {len(col)} rows, {g.num_rows} when listed: the "
                          f"file changed while being read; rerun on a file that is not being written")
    return _batch_chunk(col, g, 0, ref.keep, ref.text_key, ref.on_bad_line, ref.fmt_tag)


def _batch_chunk(column, g: RowGroup, done: int, keep, text_key: str, on_bad_line: str,
                 fmt_tag: bool) -> RawChunk:
    """The chunk of rows [done, done + len(column)) of row group g: the rows kept (language, non-null)
    and the null rows skipped."""
    arr = _as_strings(column)
    n = len(arr)
    first = g.first_row + done
    data, offsets, nulls = _buffers(arr)
    mask = keep[done:done + n] if keep is not None else np.ones(n, dtype=bool)
    skipped = []
    if nulls is not None:
        for k in np.flatnonzero(nulls & mask).tolist():
            reason = f"no text (null in column {text_key!r})"
            if on_bad_line == "error":
                raise CorpusError(f"{g.file}: row {first + k + 1} (row group {g.index}): {reason}; "
                                  f"fix the file or pass --on-bad-line skip")
            skipped.append((first + k + 1, reason))
        mask = mask & ~nulls
    row_numbers = None
    if not mask.all():
        kept = np.flatnonzero(mask)
        if kept.size == 0:
            return RawChunk(b"", first + 1, skipped, -1, 0, docs=np.zeros(1, np.int64),
                            file=g.file if fmt_tag else "", fmt="parquet", group=g.index)
        lengths = np.diff(offsets)[kept]
        parts = [data[a:b] for a, b in zip(offsets[kept].tolist(), offsets[kept + 1].tolist())]
        data, offsets = b"".join(parts), np.concatenate([[0], np.cumsum(lengths)])
        row_numbers = first + kept
    return RawChunk(data, first + 1, skipped, -1, len(data), docs=offsets, file=g.file if fmt_tag else "",
                    fmt="parquet", group=g.index, rows=row_numbers)


def parse_documents(chunk: RawChunk, path: str, max_line_bytes: int = 1 << 20,
                    on_bad_line: str = "error") -> ParsedChunk:
    """Sentences of a chunk of documents: the stripped non-empty lines of each row's text; every row
    starts a document (JSONL's rule), so a document's blank lines do not split it."""
    data, offsets = chunk.data, chunk.docs
    skipped = list(chunk.skipped)
    n = len(offsets) - 1
    rows = chunk.rows if chunk.rows is not None else np.arange(n) + (chunk.first_line - 1)
    if n == 0:
        return ParsedChunk([], np.zeros(0, dtype=bool), True, 0, skipped)

    def bad(k, reason):
        if on_bad_line == "error":
            raise CorpusError(f"{path}: row {int(rows[k]) + 1} (row group {chunk.group}): {reason}; fix the file "
                              f"or pass --on-bad-line skip (or raise --max-line-bytes)")
        skipped.append((int(rows[k]) + 1, reason))

    view = memoryview(data)
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    try:
        # the rows' bytes joined by "\n" decode as a whole exactly when every row is valid UTF-8 (an ASCII
        # byte never sits inside a multi-byte sequence): one join, one decode and one split for the batch
        lines = str(b"\n".join([view[a:b] for a, b in zip(starts, ends)]), "utf-8").split("\n")
        # lines per row: its "\n" bytes + 1
        newlines = np.flatnonzero(np.frombuffer(view, dtype=np.uint8) == 10) if len(view) else np.zeros(0, np.int64)
        per_row = np.diff(np.searchsorted(newlines, offsets)) + 1
    except UnicodeDecodeError:
        texts = []
        for k, (a, b) in enumerate(zip(starts, ends)):
            try:
                texts.append(str(view[a:b], "utf-8"))
            except UnicodeDecodeError as e:
                bad(k, f"invalid UTF-8 at byte {e.start} of the text")
                texts.append("")
        lines = "\n".join(texts).split("\n")
        per_row = np.fromiter(map(str.count, texts, itertools.repeat("\n")), dtype=np.int64, count=n) + 1
    char_limit = max_line_bytes // 4
    if max(map(len, lines)) > char_limit:           # rare: look at the long lines one by one
        row_end = np.cumsum(per_row)
        for j, line in enumerate(lines):
            if len(line) > char_limit and len(line.encode("utf-8")) > max_line_bytes:
                k = int(np.searchsorted(row_end, j, side="right"))
                bad(k, f"a line of the text longer than --max-line-bytes {max_line_bytes} "
                       f"({len(line.encode('utf-8'))} bytes)")
                lines[j] = ""                         # dropped, as the plain-text reader drops the line
    stripped = list(map(str.strip, lines))
    where = np.flatnonzero(np.fromiter(map(bool, stripped), dtype=bool, count=len(stripped)))
    sentences = list(itertools.compress(stripped, stripped))
    row_of = np.repeat(np.arange(n), per_row)[where]
    doc_start = np.diff(row_of, prepend=-1) != 0
    return ParsedChunk(sentences, doc_start, True, n, skipped)
