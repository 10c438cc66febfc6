"""Readers for word-level tagging files, and entity chunks / F1 with seqeval's definition.

- `read_conllu(path)`: CoNLL-U sentences as (words, UPOS tags). Syntactic words only: multiword-token
  lines (`1-2`) are checked and skipped (their words carry the tags), empty nodes (`8.1`) skipped.
- `read_ner_columns(path)`: CoNLL-2003 / WikiANN column files (token first, tag last; `-DOCSTART-`
  lines and blank lines separate sentences), IOB1 or IOB2 tags, returned as IOB2.
- `entities(tags)` / `entity_f1(gold, pred)`: seqeval's default (non-strict) chunking and micro F1.

Every syntax error raises EvalError naming the file and line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from xlmr_mp.eval.api import EvalError

UPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
             "PUNCT", "SCONJ", "SYM", "VERB", "X")
_UPOS = frozenset(UPOS_TAGS)
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_EMPTY = re.compile(r"^\d+\.\d+$")
_NER_TAG = re.compile(r"^[BI]-\S+$")


@dataclass
class TaggedSentence:
    """One sentence of a tagging file: its words and one tag per word; `line` is where it starts."""
    id: str
    words: List[str]
    tags: List[str]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ----------------------------------------------------------------------------- CoNLL-U

def read_conllu(path: str) -> List[TaggedSentence]:
    """Sentences of a CoNLL-U file: the form (column 2) and UPOS (column 4) of each syntactic word."""
    out: List[TaggedSentence] = []
    words, tags, sent_id, start, expect, range_end, range_line = [], [], None, 0, 1, 0, 0
    name = os.path.basename(path)

    def bad(lineno, msg):
        return EvalError(f"{path}:{lineno}: {msg}; fix the file (CoNLL-U: 10 tab-separated columns per "
                         f"word, a blank line after each sentence)")

    def finish():
        nonlocal words, tags, sent_id, start, expect, range_end
        if range_end >= expect:
            raise bad(range_line, f"multiword token ends at word {range_end} but the sentence ends at word "
                                  f"{expect - 1}")
        if words:
            out.append(TaggedSentence(sent_id or f"{name}:{start}", words, tags, path, start))
        words, tags, sent_id, start, expect, range_end = [], [], None, 0, 1, 0

    with open(path, encoding="utf-8") as f:
        lineno = 0
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                finish()
                continue
            start = start or lineno
            if line.startswith("#"):
                if not words and line.startswith("# sent_id"):
                    sent_id = line.split("=", 1)[-1].strip()
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise bad(lineno, f"{len(cols)} tab-separated columns, expected 10")
            tid = cols[0]
            if _EMPTY.match(tid):
                continue
            m = _RANGE.match(tid)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if a != expect or b < a:
                    raise bad(lineno, f"multiword token {tid!r} does not start at the next word ({expect})")
                range_end, range_line = b, lineno
                continue
            if not tid.isdigit():
                raise bad(lineno, f"word id {tid!r} is not an integer, a range a-b or an empty node a.b")
            if int(tid) != expect:
                raise bad(lineno, f"word id {tid} out of order, expected {expect}")
            if cols[3] not in _UPOS:
                raise bad(lineno, f"UPOS {cols[3]!r} is not one of the 17 Universal POS tags")
            if not cols[1]:
                raise bad(lineno, "empty word form")
            words.append(cols[1])
            tags.append(cols[3])
            expect += 1
        finish()
    return out


# ----------------------------------------------------------------------------- CoNLL-2003 / WikiANN

def read_ner_columns(path: str, strip_prefix: Optional[str] = None) -> List[TaggedSentence]:
    """Sentences of a CoNLL-2003 / WikiANN column file (token first, tag last, whitespace-separated).
    Tags are IOB1 or IOB2 and are returned as IOB2. `strip_prefix` drops a leading 'xx:' from tokens
    (the XTREME WikiANN files write 'en:Paris')."""
    out: List[TaggedSentence] = []
    words, tags, start = [], [], 0
    name = os.path.basename(path)

    def finish():
        nonlocal words, tags
        if words:
            out.append(TaggedSentence(f"{name}:{start}", words, to_iob2(tags), path, start))
        words, tags = [], []

    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                finish()
                continue
            cols = line.split()
            if cols[0] == "-DOCSTART-":
                finish()
                continue
            if len(cols) < 2:
                raise EvalError(f"{path}:{lineno}: expected '<token> ... <tag>' (at least 2 columns), got "
                                f"{line!r}; fix the file")
            tag = cols[-1]
            if tag != "O" and not _NER_TAG.match(tag):
                raise EvalError(f"{path}:{lineno}: tag {tag!r} is neither 'O' nor IOB 'B-TYPE' / 'I-TYPE'; "
                                f"convert the file to IOB1 or IOB2")
            token = cols[0]
            if strip_prefix and token.startswith(strip_prefix + ":") and len(token) > len(strip_prefix) + 1:
                token = token[len(strip_prefix) + 1:]
            if not words:
                start = lineno
            words.append(token)
            tags.append(tag)
    finish()
    return out


# ----------------------------------------------------------------------------- entities and F1

def _split(tag: str) -> Tuple[str, str]:
    """(prefix, type) as seqeval reads a tag: 'B-PER' -> ('B', 'PER'), 'O' -> ('O', '_')."""
    return tag[0], (tag[1:].split("-", 1)[-1] or "_")


def _end_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entities(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """Entity chunks (type, first, last word) of one tag sequence, seqeval's default mode
    (an I- after O or after another type starts a chunk, so IOB1 and IOB2 read the same)."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split(t)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def to_iob2(tags: Sequence[str]) -> List[str]:
    """The same chunks written as IOB2 (B- on every chunk's first word); IOB2 input is unchanged."""
    out = ["O"] * len(tags)
    for type_, a, b in entities(tags):
        out[a] = f"B-{type_}"
        for i in range(a + 1, b + 1):
            out[i] = f"I-{type_}"
    return out


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Micro entity F1 over sentences (seqeval.metrics.f1_score, default mode): a predicted chunk
    counts when its type and span equal a gold chunk's; 0 when there are no chunks at all."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    n_gold = n_pred = n_ok = 0
    for k, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {k}: {len(g)} gold tags but {len(p)} predicted")
        ge, pe = set(entities(g)), set(entities(p))
        n_gold, n_pred, n_ok = n_gold + len(ge), n_pred + len(pe), n_ok + len(ge & pe)
    prec = n_ok / n_pred if n_pred else 0.0
    rec = n_ok / n_gold if n_gold else 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
