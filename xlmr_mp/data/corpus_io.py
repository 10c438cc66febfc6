"""Streaming readers for per-language raw text: `DIR/<lang>.{txt,jsonl}[.gz|.xz]`.

Formats:
  * txt:   UTF-8, one sentence per line, documents separated by blank (whitespace-only) lines.
  * jsonl: one JSON object per line = one document; its text field (default "text") holds the
           document, one sentence per non-empty line.

Reading is split in two so it parallelises and stays memory bounded whatever the file size:
`iter_raw_chunks` (in the reading process) yields blocks of whole lines of about `chunk_bytes`
with their first line number, and `parse_chunk` (in any worker) turns one block into sentences
and document-boundary flags. Both report bad input by file and line: invalid UTF-8, a line over
`max_line_bytes` (never read into memory whole), a JSONL line that is not an object with the text
field. With `on_bad_line="error"` they raise `CorpusError`; with "skip" the line is dropped and
counted. Document boundaries do not depend on where blocks are cut, so any chunking of a file
gives the same documents.
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
COMPRESSIONS = ("", ".gz", ".xz")
BAD_LINE_POLICIES = ("skip", "error")


class CorpusError(ValueError):
    """Bad input text; the message names the file, the line when there is one, and the fix."""


@dataclass
class RawChunk:
    data: bytes                 # whole lines (the last one may lack "\n" at end of file)
    first_line: int             # 1-based line number of the first line in data
    skipped: List[Tuple[int, str]] = field(default_factory=list)  # (line, reason) dropped right after data
    offset: int = -1            # byte offset of data in a plain (uncompressed) file; -1 otherwise
    length: int = 0             # len(data), also when data was left out by by_reference()

    def __post_init__(self):
        if self.data and not self.length:
            self.length = len(self.data)

    def by_reference(self) -> "RawChunk":
        """The same chunk without its bytes, for a process that re-reads them (plain files only):
        handing an encoder process (offset, length) instead of the text saves pickling and piping
        the whole corpus through the coordinating process."""
        if self.offset < 0:
            return self
        return RawChunk(b"", self.first_line, self.skipped, self.offset, self.length)

    def loaded(self, path: str) -> "RawChunk":
        """This chunk with its bytes: itself, or for a by_reference() chunk, its bytes re-read from path."""
        if self.data or self.length == 0:
            return self
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), self.length, self.offset)
        if len(data) != self.length:
            raise CorpusError(f"{path}: file changed while being read (expected {self.length} bytes at "
                              f"offset {self.offset}, got {len(data)})")
        return RawChunk(data, self.first_line, self.skipped, self.offset, self.length)


@dataclass
class ParsedChunk:
    sentences: List[str]        # stripped, non-empty
    doc_start: Sequence[bool]   # True: a document boundary precedes this sentence inside the chunk
    trailing_break: bool        # the chunk ends with a document boundary after its last sentence
    n_lines: int
    skipped: List[Tuple[int, str]]


def split_ext(path: str) -> Tuple[str, str, str]:
    """(language code, format 'txt'|'jsonl', compression ''|'.gz'|'.xz') of a corpus file name."""
    name = os.path.basename(path)
    comp = ""
    for c in (".gz", ".xz"):
        if name.endswith(c):
            comp, name = c, name[:-len(c)]
    for ext in TEXT_EXTS:
        if name.endswith(ext):
            return name[:-len(ext)], ext[1:], comp
    raise CorpusError(f"{path}: not a corpus file; expected <lang>.txt or <lang>.jsonl, optionally .gz/.xz")


def find_language_files(input_dir: str, languages: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """{lang: path} for DIR/<lang>.{txt,jsonl}[.gz|.xz], sorted by language; checks for problems."""
    if not os.path.isdir(input_dir):
        raise CorpusError(f"--input {input_dir}: no such directory")
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            lang, _, _ = split_ext(name)
        except CorpusError:
            continue
        if lang in found:
            raise CorpusError(f"{input_dir}: two files for language {lang!r} ({os.path.basename(found[lang])} "
                              f"and {name}); keep one")
        found[lang] = path
    if languages:
        missing = [l for l in languages if l not in found]
        if missing:
            raise CorpusError(f"{input_dir}: no file for language(s) {', '.join(missing)} "
                              f"(expected {missing[0]}.txt, .txt.gz, .txt.xz or .jsonl); "
                              f"present: {', '.join(found) or 'none'}")
        found = {l: found[l] for l in languages}
    if not found:
        raise CorpusError(f"{input_dir}: no <lang>.txt / <lang>.jsonl (optionally .gz/.xz) files found")
    for lang, path in found.items():
        if os.path.getsize(path) == 0:
            raise CorpusError(f"{path}: empty file for language {lang!r}; remove it or pass --languages without it")
    return found


def open_binary(path: str):
    """Open a plain, .gz or .xz file for binary reading."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def is_seekable(path: str) -> bool:
    """Plain files can be split into byte ranges; compressed ones are read whole."""
    return not path.endswith((".gz", ".xz"))


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
                    first_line: int = 1) -> Iterator[RawChunk]:
    """Blocks of whole lines of about chunk_bytes from path[start:end]; memory O(chunk_bytes).

    A line longer than max_line_bytes that crosses a block end is never held in memory: it is
    streamed past and reported (error) or counted (skip). Shorter-than-block long lines are
    caught by parse_chunk.
    """
    if on_bad_line not in BAD_LINE_POLICIES:
        raise CorpusError(f"--on-bad-line {on_bad_line!r}: choose skip or error")
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
    """Sentences and document-boundary flags of one raw chunk (see the module docstring)."""
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
                                      f"--json-key, or --on-bad-line skip") from None
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
                   json_key: str = "text", chunk_bytes: int = 1 << 20) -> Iterator[List[str]]:
    """Documents (lists of sentences) of one corpus file, streamed."""
    _, fmt, _ = split_ext(path)
    doc: List[str] = []
    for raw in iter_raw_chunks(path, chunk_bytes, max_line_bytes, on_bad_line):
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
    """Every sentence of one corpus file, streamed."""
    for doc in iter_documents(path, **kw):
        yield from doc
