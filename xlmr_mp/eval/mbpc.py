"""Masked bits per character (mBPC) on line-aligned text: `DIR/<lang>.txt`, one sentence per line.

Every line is tokenized alone as `<s> pieces </s>` (a line longer than the model's positions is cut
into consecutive windows of pieces, each wrapped in `<s> ... </s>`). Its piece positions p are split
into K groups (setting k, default 7) by a fixed hash of (language, line index, position):
`crc32(f"{lang}\\t{line}\\t{p}") % K`; pass g masks group g (every masked position becomes <mask>),
so over the K passes every piece is scored exactly once, by the model seeing the rest of its line.

    mBPC     = sum of the NLL (nats) of every piece / (ln 2 x characters of the lines)
    bits/line = the same NLL in bits / lines (FLORES is parallel: comparable across languages)
    NLL/token = the same NLL / pieces (depends on the tokenizer; mBPC does not)

Characters are Unicode code points of the lines as read (newline excluded). With whole_word=true
(`--whole-word`) all pieces of a word share one group (the hash of its first position): a word starts
at a piece beginning with '\u2581'; inside a word of a script written without spaces (Han, kana, Thai,
Lao, Khmer, Myanmar, Tibetan) units are runs of 2 or 3 characters on piece boundaries (the length
drawn from the same hash; a run ends early rather than pass 3 characters, a longer piece is a unit
alone), and the continuation bytes of a byte-fallback character stay with it.

Work items (window, pass) are batched longest first; every item's NLLs are stored at their
(line, position) and summed in a fixed order, so the numbers do not depend on batch_size.
"""
from __future__ import annotations

import math
import os
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import (length_sorted_batches, max_tokens, pad_batch, progress, read_lines,
                                 select_languages, task_settings)
from xlmr_mp.ids import IGNORE_INDEX

DEFAULTS = {"k": 7, "batch_size": 32, "whole_word": False, "max_batch_tokens": 16384, "max_lines": 0}
WORD_START = "\u2581"

# Scripts written without spaces between words (whole-word units are 2-3 character runs there).
_NO_SPACE_RANGES = ((0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x19E0, 0x19FF),
                    (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
                    (0x20000, 0x3FFFF))


def no_space_char(ch: str) -> bool:
    """A character of a script written without spaces between words."""
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in _NO_SPACE_RANGES)


def group_of(lang: str, line: int, position: int, k: int) -> int:
    """The pass (0..k-1) that masks piece `position` of line `line` of `lang`: a fixed hash."""
    return zlib.crc32(f"{lang}\t{line}\t{position}".encode("utf-8")) % k


@dataclass
class Window:
    """One model input: `<s> pieces[start:start+len] </s>` of one line."""
    lang: str
    line: int
    start: int                 # position of its first piece within the line
    ids: List[int]             # with <s> and </s>


@dataclass
class Item:
    """One forward pass: window `window` with the pieces at `local` (1-based, inside the window) masked."""
    window: int
    group: int
    local: List[int]


class PieceInfo:
    """Per-id facts of a tokenizer for word units: word start, byte continuation, text."""

    def __init__(self, tok):
        n = tok.vocab_size
        self.word_start = np.zeros(n, dtype=bool)
        self.byte_cont = np.zeros(n, dtype=bool)       # a byte-fallback piece 0x80..0xBF
        self.byte_lead = np.zeros(n, dtype=bool)
        self.text = [""] * n
        specials = tok.special_ids
        for i in range(n):
            if i in specials:
                continue
            p = tok.id_to_piece(i)
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                b = int(p[3:5], 16)
                self.byte_cont[i] = 0x80 <= b <= 0xBF
                self.byte_lead[i] = not self.byte_cont[i]
                self.text[i] = "\ufffd"          # one character of unknown script
                continue
            self.word_start[i] = p.startswith(WORD_START)
            self.text[i] = p.replace(WORD_START, " ")


def word_units(lang: str, line: int, pieces: Sequence[int], info: PieceInfo, tok) -> List[int]:
    """The unit index of every piece of a line (whole-word masking): words begin at a piece with
    '\u2581'; words in scripts without spaces are cut into runs of 2-3 characters on piece boundaries."""
    units, unit = [], -1
    run_chars, run_target, prev_no_space = 0, 0, False
    for j, pid in enumerate(pieces):
        if info.byte_cont[pid] and unit >= 0:          # the rest of a byte-fallback character
            units.append(unit)
            continue
        text = _byte_char(tok, pieces, j) if info.byte_lead[pid] else info.text[pid]
        body = text.lstrip(" ")
        ns = bool(body) and sum(map(no_space_char, body)) * 2 >= len(body)
        if info.word_start[pid] or unit < 0:
            unit += 1
            run_chars = len(body)
            run_target = 2 + group_of(lang, line, j, 2)
        elif ns and prev_no_space and run_chars > 0 and (run_chars >= run_target or run_chars + len(body) > 3):
            unit += 1                                  # a new 2-3 character run inside the word
            run_chars = len(body)
            run_target = 2 + group_of(lang, line, j, 2)
        else:
            run_chars += len(body)
        prev_no_space = ns or not body
        units.append(unit)
    return units


def _byte_char(tok, pieces: Sequence[int], j: int) -> str:
    """The character spelled by byte-fallback pieces starting at j ('\ufffd' when they do not decode)."""
    raw = bytearray()
    for q in pieces[j:j + 4]:
        p = tok.id_to_piece(int(q))
        if not (len(p) == 6 and p.startswith("<0x") and p.endswith(">")):
            break
        b = int(p[3:5], 16)
        if raw and not 0x80 <= b <= 0xBF:
            break
        raw.append(b)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd"


def plan_language(tok, lang: str, lines: Sequence[str], k: int, max_len: int, whole_word: bool,
                  info: Optional[PieceInfo] = None):
    """(windows, items, groups): the model inputs of a language's lines and the K passes over them.
    `groups[line]` is the int array of each piece's pass; every piece lies in exactly one item."""
    if k < 1:
        raise EvalError(f"k={k} must be >= 1")
    if max_len < 3:
        raise EvalError(f"the model's positions allow {max_len} ids; mbpc needs at least 3")
    if whole_word and info is None:
        info = PieceInfo(tok)
    encoded = tok.encode_batch(list(lines))
    windows, items, groups = [], [], []
    width = max_len - 2
    for li, pieces in enumerate(encoded):
        if whole_word:
            units = word_units(lang, li, pieces, info, tok)
            first = {}
            for j, u in enumerate(units):
                first.setdefault(u, j)
            g = np.array([group_of(lang, li, first[u], k) for u in units], dtype=np.int64)
        else:
            g = np.array([group_of(lang, li, j, k) for j in range(len(pieces))], dtype=np.int64)
        groups.append(g)
        for start in range(0, len(pieces), width):
            chunk = pieces[start:start + width]
            w = len(windows)
            windows.append(Window(lang, li, start, [tok.bos_id] + list(chunk) + [tok.eos_id]))
            cg = g[start:start + width]
            for grp in range(k):
                local = (np.nonzero(cg == grp)[0] + 1).tolist()
                if local:
                    items.append(Item(w, grp, local))
    return windows, items, groups


def masked_inputs(windows: Sequence[Window], items: Sequence[Item], batch: Sequence[int], mask_id: int,
                  pad_id: int, device: str = "cpu"):
    """(input_ids, attention_mask, labels) of a batch of items: labels are IGNORE_INDEX except at the masked
    positions, which hold the original ids (the inputs hold <mask> there)."""
    seqs, labels = [], []
    for i in batch:
        it = items[i]
        ids = list(windows[it.window].ids)
        lab = [IGNORE_INDEX] * len(ids)
        for p in it.local:
            lab[p] = ids[p]
            ids[p] = mask_id
        seqs.append(ids)
        labels.append(lab)
    ids, attn = pad_batch(seqs, pad_id, device)
    lab, _ = pad_batch(labels, IGNORE_INDEX, device)
    return ids, attn, lab


@torch.no_grad()
def score_items(model, tok, windows, items, batch_size: int, max_batch_tokens: Optional[int] = None,
                device: str = "cpu", show: bool = True, desc: str = "mbpc") -> List[np.ndarray]:
    """NLL (nats, float64) of each item's masked pieces, in the order of `item.local`."""
    lengths = [len(windows[it.window].ids) for it in items]
    batches = length_sorted_batches(lengths, batch_size, max_batch_tokens)
    out: List[Optional[np.ndarray]] = [None] * len(items)
    for batch in progress(batches, total=len(batches), desc=desc, enabled=show, unit="batch"):
        ids, attn, lab = masked_inputs(windows, items, batch, tok.mask_id, tok.pad_id, device)
        hidden = model.encode(ids, attn)
        sel = lab.ne(IGNORE_INDEX)
        logits = model.lm_head(hidden[sel], model.decoder_weight()).float()
        nll = -torch.log_softmax(logits, dim=-1).gather(1, lab[sel].unsqueeze(1)).squeeze(1)
        nll = nll.double().cpu().numpy()
        counts = sel.sum(1).tolist()
        pos = 0
        for i, c in zip(batch, counts):    # rows of `sel` are row-major: each item's positions in order
            out[i] = nll[pos:pos + c]
            pos += c
    return out


def language_nll(tok, lang: str, lines: Sequence[str], windows, items, groups, scores) -> np.ndarray:
    """Per-piece NLL arrays per line (every piece filled exactly once)."""
    per_line = [np.full(len(g), np.nan) for g in groups]
    for it, s in zip(items, scores):
        w = windows[it.window]
        for p, v in zip(it.local, s):
            j = w.start + p - 1
            if not np.isnan(per_line[w.line][j]):
                raise RuntimeError(f"{lang} line {w.line + 1} piece {j} scored twice")
            per_line[w.line][j] = v
    for li, a in enumerate(per_line):
        if np.isnan(a).any():
            raise RuntimeError(f"{lang} line {li + 1}: {int(np.isnan(a).sum())} pieces never scored")
    return per_line


def evaluate_lines(model, tok, lang: str, lines: Sequence[str], k: int = 7, batch_size: int = 32,
                   whole_word: bool = False, max_batch_tokens: Optional[int] = None, device: str = "cpu",
                   show: bool = True, info: Optional[PieceInfo] = None) -> dict:
    """mBPC figures of one language's lines: bpc, bits_per_line, nll_per_token, nll, chars, tokens,
    lines, windows, per_line_bits."""
    windows, items, groups = plan_language(tok, lang, lines, k, max_tokens(model), whole_word, info)
    scores = score_items(model, tok, windows, items, batch_size, max_batch_tokens, device, show, f"mbpc {lang}")
    per_line = language_nll(tok, lang, lines, windows, items, groups, scores)
    nll = float(sum(float(a.sum()) for a in per_line))        # fixed order: line by line
    chars = sum(len(l) for l in lines)
    tokens = sum(len(a) for a in per_line)
    if chars == 0:
        raise EvalError(f"{lang}: no characters to score (empty file?)")
    ln2 = math.log(2)
    return {"bpc": nll / (ln2 * chars), "bits_per_line": nll / ln2 / max(1, len(lines)),
            "nll_per_token": nll / max(1, tokens), "nll": nll, "chars": chars, "tokens": tokens,
            "lines": len(lines), "windows": len(windows), "split_lines": len(windows) - len(lines),
            "per_line_bits": [float(a.sum()) / ln2 for a in per_line]}


def available_languages(data: str) -> List[str]:
    if not os.path.isdir(data):
        raise EvalError(f"--data {data}: not a directory; give a directory of <lang>.txt files (one sentence "
                        f"per line, e.g. FLORES-200 devtest)")
    return [f[:-4] for f in os.listdir(data) if f.endswith(".txt") and not f.startswith(".")]


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    s = task_settings(opts.settings, DEFAULTS, "mbpc")
    langs = select_languages(available_languages(opts.data), opts.languages, opts.data, "{lang}.txt")
    info = PieceInfo(em.tokenizer) if s["whole_word"] else None
    per, preds = {}, []
    for lang in progress(langs, total=len(langs), desc="mbpc languages", enabled=opts.progress and len(langs) > 1,
                         unit="lang"):
        lines = read_lines(os.path.join(opts.data, f"{lang}.txt"))
        if s["max_lines"] > 0:     # a quick run on the first lines (FLORES is parallel: the same content)
            lines = lines[: s["max_lines"]]
        per[lang] = evaluate_lines(em.model, em.tokenizer, lang, lines, s["k"], s["batch_size"], s["whole_word"],
                                   s["max_batch_tokens"], em.device, opts.progress, info)
        if opts.predictions:       # one row per line: its bits (no gold: mbpc has no labels)
            preds += [{"lang": lang, "id": i, "pred": bits, "gold": None, "chars": len(line)}
                      for i, (bits, line) in enumerate(zip(per[lang]["per_line_bits"], lines))]
    uniform = math.log2(em.tokenizer.vocab_size)
    extra = {key: {l: per[l][key] for l in langs}
             for key in ("bits_per_line", "nll_per_token", "nll", "chars", "tokens", "lines", "split_lines")}
    return TaskResult(task="mbpc", metric="bits_per_char" + ("_whole_word" if s["whole_word"] else ""),
                      languages={l: per[l]["bpc"] for l in langs}, higher_is_better=False,
                      baselines={"uniform": {l: uniform * per[l]["tokens"] / per[l]["chars"] for l in langs}},
                      extra=extra, predictions=preds, config=dict(s))
