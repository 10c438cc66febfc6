"""Streaming readers for per-language raw text.

Sources of a language <lang> in --input DIR:
  * DIR/<lang>.txt | .jsonl, optionally compressed: .gz, .xz, .zst (`DIR/<lang>.zst` is JSONL);
  * DIR/<lang>.parquet;
  * DIR/<lang>/: a folder of such files (any names, every one under it, in sorted path order), as
    FineWeb-2, CulturaX and HPLT ship a language in many shards;
  * with --lang-key COLUMN: every Parquet file under DIR, a row's language being its COLUMN value.
Formats:
  * txt:     UTF-8, one sentence per line, documents separated by blank (whitespace-only) lines.
  * jsonl:   one JSON object per line = one document; its text field (--text-key, default "text")
             holds the document, one sentence per non-empty line.
  * parquet: one row = one document, its text column (--text-key) read as a JSONL text field
             (xlmr_mp.data.parquet_io).
So the same documents give the same sentences and boundaries in every format.

Reading is split in two so it parallelises and stays memory bounded whatever the file size:
`iter_raw_chunks` (in the reading process) yields blocks of whole lines of about `chunk_bytes`
with their first line number, and `parse_chunk` (in any worker) turns one block into sentences
and document-boundary flags. Both report bad input by file and line: invalid UTF-8, a line over
`max_line_bytes` (never read into memory whole), a JSONL line that is not an object with the text
field. With `on_bad_line="error"` they raise `CorpusError`; with "skip" the line is dropped and
counted. Document boundaries do not depend on where blocks are cut, so any chunking of a file
gives the same documents. A folder or a Parquet file is read in pieces (files, row groups):
`source_pieces` lists them and `corpus_ranges` groups them for MPI ranks; zstd is decoded frame by
frame (xlmr_mp.data.zstd_io) so a damaged frame is reported with its byte offset.
"""
from __future__ import annotations

import gzip
import itertools
import json
import lzma
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

TEXT_EXTS = (".txt", ".jsonl")
COMPRESSIONS = ("", ".gz", ".xz", ".zst")
PARQUET_EXT = ".parquet"
BAD_LINE_POLICIES = ("skip", "error")


from xlmr_mp.data.chunks import CorpusError, ParsedChunk, RawChunk  # noqa: F401 (re-exported)


def split_ext(path: str) -> Tuple[str, str, str]:
    """(language code, format 'txt'|'jsonl'|'parquet', compression ''|'.gz'|'.xz'|'.zst') of a corpus file name."""
    name = os.path.basename(path)
    if name.endswith(PARQUET_EXT):
        return name[:-len(PARQUET_EXT)], "parquet", ""
    comp = ""
    for c in COMPRESSIONS[1:]:
        if name.endswith(c):
            comp, name = c, name[:-len(c)]
    for ext in TEXT_EXTS:
        if name.endswith(ext):
            return name[:-len(ext)], ext[1:], comp
    if comp == ".zst" and name:         # HPLT: <lang>.zst holds JSONL
        return name, "jsonl", comp
    raise CorpusError(f"{path}: not a corpus file; expected <lang>.txt, <lang>.jsonl (optionally .gz/.xz/.zst), "
                      f"<lang>.zst (JSONL) or <lang>.parquet")


def source_files(path: str) -> List[str]:
    """The corpus files of a source: [path] for a file; for a folder every corpus file under it, sorted
    by path (names starting with '.' are skipped)."""
    if not os.path.isdir(path):
        return [path]
    out = []
    for d, dirs, names in os.walk(path):
        dirs[:] = sorted(n for n in dirs if not n.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            try:
                split_ext(n)
            except CorpusError:
                continue
            out.append(os.path.join(d, n))
    return sorted(out)


def source_format(path: str) -> str:
    """Format of a source ('txt' | 'jsonl' | 'parquet'); a folder's is its first file's (chunks carry their own)."""
    files = source_files(path)
    if not files:
        raise CorpusError(f"{path}: no corpus files (.txt, .jsonl[.gz|.xz|.zst], .zst, .parquet) in this folder")
    return split_ext(files[0])[1]


def _check_source(lang: str, path: str, text_key: str) -> None:
    for f in source_files(path):
        if os.path.getsize(f) == 0:
            raise CorpusError(f"{f}: empty file for language {lang!r}; remove it or pass --languages without it")
        if f.endswith(PARQUET_EXT):
            from xlmr_mp.data.parquet_io import check_columns
            check_columns(f, text_key)


def find_language_files(input_dir: str, languages: Optional[Sequence[str]] = None, text_key: str = "text",
                        lang_key: Optional[str] = None) -> Dict[str, str]:
    """{lang: source} sorted by language, a source being DIR/<lang>.<ext> or the folder DIR/<lang>/ (see
    the module docstring); with lang_key, --input itself for every language its Parquet files name.
    Checks for problems (empty files, missing Parquet columns) before anything is read."""
    if not os.path.isdir(input_dir):
        raise CorpusError(f"--input {input_dir}: no such directory")
    found: Dict[str, str] = {}
    if lang_key is not None:
        from xlmr_mp.data.parquet_io import languages_in
        files = [f for f in source_files(input_dir) if f.endswith(PARQUET_EXT)]
        if not files:
            raise CorpusError(f"--lang-key {lang_key}: no .parquet files under {input_dir} (the language column "
                              f"is read from Parquet input only)")
        for f in files:
            for lang in languages_in(f, lang_key, text_key):
                found[lang] = input_dir
        found = dict(sorted(found.items()))
    else:
        for name in sorted(os.listdir(input_dir)):
            path = os.path.join(input_dir, name)
            if os.path.isdir(path):
                if name.startswith(".") or not source_files(path):
                    continue
                lang = name
            elif os.path.isfile(path):
                try:
                    lang, _, _ = split_ext(name)
                except CorpusError:
                    continue
            else:
                continue
            if lang in found:
                raise CorpusError(f"{input_dir}: two sources for language {lang!r} ({os.path.basename(found[lang])} "
                                  f"and {name}); keep one")
            found[lang] = path
    if languages:
        missing = [l for l in languages if l not in found]
        if missing:
            where = (f"no rows with {lang_key} = {missing[0]!r}" if lang_key is not None else
                     f"expected {missing[0]}.txt, .jsonl (optionally .gz/.xz/.zst), .parquet or a folder {missing[0]}/")
            raise CorpusError(f"{input_dir}: no file for language(s) {', '.join(missing)} "
                              f"({where}); present: {', '.join(found) or 'none'}")
        found = {l: found[l] for l in languages}
    if not found:
        raise CorpusError(f"{input_dir}: no <lang>.txt / <lang>.jsonl (optionally .gz/.xz/.zst) / <lang>.parquet "
                          f"files or <lang>/ folders found")
    for lang, path in found.items():
        if lang_key is None:
            _check_source(lang, path, text_key)
    return found


def open_binary(path: str):
    """Open a plain, .gz, .xz or .zst file for binary reading."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".zst"):
        from xlmr_mp.data.zstd_io import open_zstd
        return open_zstd(path)
    return open(path, "rb")


def is_seekable(path: str) -> bool:
    """Plain text files can be split into byte ranges; compressed and Parquet files and folders are read
    in pieces (whole files, row groups: see source_pieces)."""
    return not path.endswith((".gz", ".xz", ".zst", PARQUET_EXT)) and not os.path.isdir(path)


def source_pieces(path: str, text_key: str = "text", lang_key: Optional[str] = None) -> list:
    """The pieces of a source that is not one plain text file, in reading order: a Parquet file's row
    groups (parquet_io.RowGroup), any other file whole (its path). With lang_key, Parquet files only."""
    pieces: list = []
    for f in source_files(path):
        if lang_key is not None and not f.endswith(PARQUET_EXT):
            continue
        if f.endswith(PARQUET_EXT):
            from xlmr_mp.data.parquet_io import row_groups
            pieces.extend(row_groups(f, text_key))
        else:
            pieces.append(f)
    return pieces


def corpus_ranges(path: str, range_bytes: int, text_key: str = "text",
                  lang_key: Optional[str] = None) -> List[Tuple[int, Optional[int]]]:
    """[(start, end)] cutting one source into consecutive ranges of about range_bytes, for MPI ranks.

    A plain text file: byte ranges starting at document starts. Any other source: ranges of its
    pieces (source_pieces: row groups, whole files), each piece in one range."""
    if is_seekable(path):
        size = os.path.getsize(path)
        _, fmt, _ = split_ext(path)
        cuts = sorted({align_range_start(path, o, fmt) for o in range(0, size, max(1, range_bytes))} | {size})
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    pieces = source_pieces(path, text_key, lang_key)
    out, start, acc = [], 0, 0
    for i, p in enumerate(pieces):
        acc += os.path.getsize(p) if isinstance(p, str) else p.text_bytes
        if acc >= range_bytes or i == len(pieces) - 1:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    return out


def align_range_start(path: str, offset: int, fmt: str) -> int:
    """The first position >= offset where a document starts a fresh line (for splitting a file).

    txt: just after a blank line; jsonl: any line start. 0 stays 0; the file size if none.
    """
    if offset <= 0:
        return 0
    size = os.path.getsize(path)
    if offset >= size:
        return size
    with open(path, "rb") as f:
        f.seek(offset - 1)
        pos = offset - 1
        n, _ = _skip_line(f)        # the rest of the line holding byte offset-1
        if n == 0:
            return size
        pos += n
        if fmt == "jsonl":
            return pos
        while True:                 # then whole lines until a blank one has been passed
            n, blank = _skip_line(f)
            if n == 0:
                return size
            pos += n
            if blank:
                return pos


def _skip_line(f) -> Tuple[int, bool]:
    """Read past one line in bounded pieces; (bytes consumed, whether it was blank)."""
    n, blank = 0, True
    while True:
        piece = f.readline(1 << 16)
        if not piece:
            return n, blank
        n += len(piece)
        if piece.strip():
            blank = False
        if piece.endswith(b"\n"):
            return n, blank


def count_lines_before(path: str, offset: int) -> int:
    """Number of '\\n' in the first `offset` bytes of a plain file (for line numbers of a range)."""
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def iter_raw_chunks(path: str, chunk_bytes: int = 1 << 20, max_line_bytes: int = 1 << 20,
                    on_bad_line: str = "error", start: int = 0, end: Optional[int] = None,
                    first_line: int = 1, text_key: str = "text", lang_key: Optional[str] = None,
                    lang: Optional[str] = None, defer_bytes: int = 0) -> Iterator[RawChunk]:
    """Chunks of about chunk_bytes of one source, in order; memory O(chunk_bytes).

    A plain text file: blocks of whole lines of path[start:end] (bytes; first_line numbers the
    first). Any other source: its pieces [start:end] (source_pieces), each text file read whole as
    lines, each Parquet row group as batches of documents (keeping the rows whose lang_key column is
    lang, when lang_key is given); chunks of a folder's file name that file and its format.
    defer_bytes > 0: Parquet row groups of at most that much text come unread, one chunk each, for
    `load_chunk` to read in the process that encodes them (parquet_io.iter_row_group_chunks).
    """
    if on_bad_line not in BAD_LINE_POLICIES:
        raise CorpusError(f"--on-bad-line {on_bad_line!r}: choose skip or error")
    if is_seekable(path):
        yield from _iter_line_chunks(path, chunk_bytes, max_line_bytes, on_bad_line, start, end, first_line)
        return
    from xlmr_mp.data.parquet_io import iter_row_group_chunks
    pieces = source_pieces(path, text_key, lang_key)[start:end]
    for is_group, run in itertools.groupby(pieces, key=lambda p: not isinstance(p, str)):
        if is_group:
            yield from iter_row_group_chunks(list(run), chunk_bytes, text_key, lang_key, lang, on_bad_line,
                                             fmt_tag=os.path.isdir(path), defer_bytes=defer_bytes)
            continue
        for f in run:
            fmt = split_ext(f)[1]
            for chunk in _iter_line_chunks(f, chunk_bytes, max_line_bytes, on_bad_line, 0, None, 1):
                chunk.fmt = fmt
                if f != path:
                    chunk.file = f
                yield chunk


def load_chunk(chunk: RawChunk, path: str) -> RawChunk:
    """A chunk with its text, in the process that encodes it: a deferred Parquet row group decoded
    (parquet_io.read_deferred), a by-reference plain-text block re-read (RawChunk.loaded), else itself."""
    if chunk.source is not None:
        from xlmr_mp.data.parquet_io import read_deferred
        return read_deferred(chunk.source)
    return chunk.loaded(path)


def _iter_line_chunks(path: str, chunk_bytes: int, max_line_bytes: int, on_bad_line: str, start: int,
                      end: Optional[int], first_line: int) -> Iterator[RawChunk]:
    """Blocks of whole lines of about chunk_bytes from one text file's path[start:end].

    A line longer than max_line_bytes that crosses a block end is never held in memory: it is
    streamed past and reported (error) or counted (skip). Shorter-than-block long lines are
    caught by parse_chunk.
    """
    line_no = first_line
    with open_binary(path) as f:
        if start:
            f.seek(start)
        pos = start
        plain = is_seekable(path)
        while end is None or pos < end:
            want = chunk_bytes if end is None else min(chunk_bytes, end - pos)
            block = f.read(want)
            if not block:
                break
            block_offset = pos
            pos += len(block)
            skipped: List[Tuple[int, str]] = []
            if not block.endswith(b"\n") and (end is None or pos < end):
                cut = block.rfind(b"\n") + 1
                partial = len(block) - cut
                tail = []
                too_long = False
                while True:
                    piece = f.readline(1 << 16)
                    if not piece:
                        break
                    pos += len(piece)
                    partial += len(piece)
                    if partial > max_line_bytes + 1:
                        too_long = True
                    elif not too_long:
                        tail.append(piece)
                    if piece.endswith(b"\n"):
                        break
                if too_long:
                    bad_line = line_no + block.count(b"\n", 0, cut)
                    reason = f"line longer than --max-line-bytes {max_line_bytes} ({partial} bytes)"
                    if on_bad_line == "error":
                        raise CorpusError(f"{path}:{bad_line}: {reason}; fix the file or pass "
                                          f"--on-bad-line skip (or raise --max-line-bytes)")
                    block = block[:cut]
                    skipped.append((bad_line, reason))
                else:
                    block = block + b"".join(tail)
            chunk = RawChunk(block, line_no, skipped, block_offset if plain else -1, len(block))
            line_no += block.count(b"\n") + len(skipped)
            yield chunk


def _decode_lines(data: bytes, first_line: int, path: str, on_bad_line: str,
                  skipped: List[Tuple[int, str]]) -> List[Optional[str]]:
    """Lines of data as str; an undecodable line is an error or None (skip)."""
    if not data:
        return []
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for k, raw in enumerate(data.split(b"\n")):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                reason = f"invalid UTF-8 at byte {e.start} of the line ({raw[max(0, e.start - 8):e.start + 8]!r})"
                if on_bad_line == "error":
                    raise CorpusError(f"{path}:{first_line + k}: {reason}; re-encode the file as UTF-8 "
                                      f"or pass --on-bad-line skip") from None
                skipped.append((first_line + k, reason))
                lines.append(None)
    if lines and lines[-1] == "" and data.endswith(b"\n"):
        lines.pop()
    return lines


def parse_chunk(chunk: RawChunk, path: str, fmt: str = "txt", max_line_bytes: int = 1 << 20,
                on_bad_line: str = "error", json_key: str = "text") -> ParsedChunk:
    """Sentences and document-boundary flags of one raw chunk (see the module docstring).

    json_key is the text field of JSONL or the text column of Parquet; a chunk from a folder's file
    brings its own file name and format (chunk.file, chunk.fmt)."""
    path = chunk.file or path
    fmt = chunk.fmt or fmt
    if chunk.docs is not None:
        from xlmr_mp.data.parquet_io import parse_documents
        return parse_documents(chunk, path, max_line_bytes, on_bad_line)
    skipped = list(chunk.skipped)
    lines = _decode_lines(chunk.data, chunk.first_line, path, on_bad_line, skipped)
    char_limit = max_line_bytes // 4
    if fmt == "txt" and len(skipped) == len(chunk.skipped) and (not lines or max(map(len, lines)) <= char_limit):
        # fast path (no bad line here): a gap between non-blank line numbers means blank lines between
        # (C-level map/compress/numpy instead of a Python loop per line: this is on the hot path)
        stripped = list(map(str.strip, lines))
        where = np.flatnonzero(np.fromiter(map(bool, stripped), dtype=bool, count=len(stripped)))
        sentences = list(itertools.compress(stripped, stripped))
        doc_start = np.diff(where, prepend=-1) > 1
        trailing = bool((where[-1] if where.size else -1) < len(lines) - 1)
        return ParsedChunk(sentences, doc_start, trailing, len(lines), skipped)
    sentences: List[str] = []
    doc_start: List[bool] = []
    pending = False
    for k, line in enumerate(lines):
        if line is None:
            continue
        if len(line) > char_limit and len(line.encode("utf-8")) > max_line_bytes:
            reason = f"line longer than --max-line-bytes {max_line_bytes} ({len(line.encode('utf-8'))} bytes)"
            if on_bad_line == "error":
                raise CorpusError(f"{path}:{chunk.first_line + k}: {reason}; fix the file or pass "
                                  f"--on-bad-line skip (or raise --max-line-bytes)")
            skipped.append((chunk.first_line + k, reason))
            continue
        if fmt == "txt":
            s = line.strip()
            if s:
                sentences.append(s)
                doc_start.append(pending)
                pending = False
            else:
                pending = True
        else:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj[json_key]
                if not isinstance(text, str):
                    raise TypeError(f"field {json_key!r} is {type(text).__name__}, not a string")
            except (ValueError, KeyError, TypeError) as e:
                reason = (f"not a JSON object with a string field {json_key!r} "
                          f"({type(e).__name__}: {str(e)[:80]})")
                if on_bad_line == "error":
                    raise CorpusError(f"{path}:{chunk.first_line + k}: {reason}; fix the line, pass "
                                      f"--text-key, or --on-bad-line skip") from None
                skipped.append((chunk.first_line + k, reason))
                continue
            first = True
            for s in text.split("\n"):
                s = s.strip()
                if s:
                    sentences.append(s)
                    doc_start.append(first)
                    first = False
    if fmt != "txt":
        pending = True  # every JSONL line is a whole document
    return ParsedChunk(sentences, doc_start, pending, len(lines), skipped)


def iter_documents(path: str, max_line_bytes: int = 1 << 20, on_bad_line: str = "error",
                   json_key: str = "text", chunk_bytes: int = 1 << 20, lang_key: Optional[str] = None,
                   lang: Optional[str] = None) -> Iterator[List[str]]:
    """Documents (lists of sentences) of one source (a corpus file or folder), streamed."""
    fmt = source_format(path)
    doc: List[str] = []
    for raw in iter_raw_chunks(path, chunk_bytes, max_line_bytes, on_bad_line, text_key=json_key,
                               lang_key=lang_key, lang=lang):
        parsed = parse_chunk(raw, path, fmt, max_line_bytes, on_bad_line, json_key)
        for s, new in zip(parsed.sentences, parsed.doc_start):
            if new and doc:
                yield doc
                doc = []
            doc.append(s)
        if parsed.trailing_break and doc:
            yield doc
            doc = []
    if doc:
        yield doc


def iter_sentences(path: str, **kw) -> Iterator[str]:
    """Every sentence of one source, streamed (keywords as iter_documents)."""
    for doc in iter_documents(path, **kw):
        yield from doc
