"""XNLI with zero-shot transfer: train on MultiNLI (English) or XNLI-MT, test the 15 XNLI languages.

    --data DIR           holds the official XNLI files xnli.dev.tsv and xnli.test.tsv (XNLI-1.0): tab-
                         separated with a header; columns language, gold_label, sentence1, sentence2
                         (and pairID, used as the id when present)
    training data        train=PATH, else the first that exists of DIR/multinli_1.0_train.jsonl,
                         DIR/multinli_1.0_train.txt, DIR/multinli_1.0/multinli_1.0_train.{jsonl,txt},
                         the same under DIR/.., and (any language) DIR/multinli.train.<lang>.tsv or
                         DIR/../XNLI-MT-1.0/multinli/multinli.train.<lang>.tsv
                         (JSON lines or TSV with sentence1 / sentence2 / gold_label; XNLI-MT's
                         premise / hypo / label and its 'contradictory' are read as well)

The dev set is xnli.dev.tsv's rows of --train-language (the epoch is chosen there only); every
language of xnli.test.tsv is tested. Pairs are encoded as XLM-R does: `<s> A </s></s> B </s>`.
MultiNLI rows whose gold_label is '-' (no annotator majority) are skipped. Metric: accuracy.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, List, Optional

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import select_languages, task_settings
from xlmr_mp.eval.finetune import ACCURACY, FINETUNE_DEFAULTS, SeqItem, Split, TaskData, finetune
from xlmr_mp.eval.heads import SEQUENCE

LABELS = ["entailment", "neutral", "contradiction"]          # HF's xnli / MultiNLI label order
LABEL_ALIASES = {"contradictory": "contradiction"}           # XNLI-MT spells it so
COLUMN_ALIASES = {"premise": "sentence1", "hypo": "sentence2", "hypothesis": "sentence2", "label": "gold_label"}
NO_LABEL = "-"
DEFAULTS = dict(FINETUNE_DEFAULTS, epochs=2, train="")
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def _item(path: str, lineno: int, row: dict, rid: Optional[str]) -> Optional[SeqItem]:
    label = LABEL_ALIASES.get(row["gold_label"].strip(), row["gold_label"].strip())
    if label == NO_LABEL:
        return None
    if label not in LABELS:
        raise EvalError(f"{path}:{lineno}: gold_label {row['gold_label']!r} is not one of {', '.join(LABELS)} "
                        f"(or '-' for no majority); fix the row")
    return SeqItem(id=rid or f"{os.path.basename(path)}:{lineno}", texts=(row["sentence1"], row["sentence2"]),
                   label=label, where=f"{path}:{lineno}")


def read_nli_tsv(path: str) -> Dict[Optional[str], List[SeqItem]]:
    """{language (None without a language column): items} of an XNLI / MultiNLI TSV file."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: file not found")
    out: Dict[Optional[str], List[SeqItem]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [COLUMN_ALIASES.get(c.strip(), c.strip()) for c in next(reader, [])]
        missing = [c for c in ("sentence1", "sentence2", "gold_label") if c not in header]
        if missing:
            raise EvalError(f"{path}:1: header lacks column(s) {', '.join(missing)}; expected the XNLI / MultiNLI "
                            f"columns sentence1, sentence2, gold_label (or premise, hypo, label)")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise EvalError(f"{path}:{reader.line_num}: {len(row)} tab-separated fields, expected {len(header)}")
            rec = dict(zip(header, row))
            it = _item(path, reader.line_num, rec, rec.get("pairID"))
            if it is not None:
                out.setdefault(rec.get("language"), []).append(it)
    return out


def read_nli_jsonl(path: str) -> List[SeqItem]:
    """Items of a MultiNLI JSON-lines file (sentence1, sentence2, gold_label, pairID)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not JSON ({e.msg}); one JSON object per line expected") from None
            missing = [c for c in ("sentence1", "sentence2", "gold_label") if c not in rec]
            if missing:
                raise EvalError(f"{path}:{lineno}: the record lacks {', '.join(missing)}")
            it = _item(path, lineno, rec, rec.get("pairID"))
            if it is not None:
                items.append(it)
    return items


def train_candidates(root: str, lang: str) -> List[str]:
    """Where the training file is looked for, in order."""
    up = os.path.dirname(os.path.abspath(root))
    out = []
    if lang == "en":
        for base in (root, up):
            out += [os.path.join(base, "multinli_1.0_train.jsonl"), os.path.join(base, "multinli_1.0_train.txt"),
                    os.path.join(base, "multinli_1.0", "multinli_1.0_train.jsonl"),
                    os.path.join(base, "multinli_1.0", "multinli_1.0_train.txt")]
    out += [os.path.join(root, f"multinli.train.{lang}.tsv"),
            os.path.join(up, "XNLI-MT-1.0", "multinli", f"multinli.train.{lang}.tsv")]
    return out


def read_train(path: str) -> List[SeqItem]:
    if path.endswith(".jsonl"):
        return read_nli_jsonl(path)
    rows = read_nli_tsv(path)
    return [it for items in rows.values() for it in items]


def load(opts: EvalOptions, s: dict) -> TaskData:
    root, lang = opts.data, opts.train_language
    dev_path, test_path = os.path.join(root, "xnli.dev.tsv"), os.path.join(root, "xnli.test.tsv")
    for p in (dev_path, test_path):
        if not os.path.isfile(p):
            raise EvalError(f"--data {root}: {os.path.basename(p)} not found; give the XNLI-1.0 folder "
                            f"(xnli.dev.tsv, xnli.test.tsv)")
    if s["train"]:
        train_path = s["train"]
        if not os.path.isfile(train_path):
            raise EvalError(f"train={train_path}: file not found")
    else:
        found = [p for p in train_candidates(root, lang) if os.path.isfile(p)]
        if not found:
            raise EvalError(f"--train-language {lang}: no training file found (looked for "
                            f"{', '.join(train_candidates(root, lang))}); give one with train=PATH")
        train_path = found[0]
    dev_rows, test_rows = read_nli_tsv(dev_path), read_nli_tsv(test_path)
    if None in dev_rows or None in test_rows:
        raise EvalError(f"{dev_path if None in dev_rows else test_path}:1: no 'language' column; the official "
                        f"XNLI files have one")
    if lang not in dev_rows:
        raise EvalError(f"--train-language {lang}: {dev_path} has no rows of {lang} (the dev set the epoch is "
                        f"chosen on); languages there: {', '.join(sorted(dev_rows))}")
    langs = select_languages(test_rows, opts.languages, test_path, "rows with language={lang}")
    return TaskData(task="xnli", kind=SEQUENCE, metric=ACCURACY, labels=list(LABELS),
                    train=Split(lang, train_path, read_train(train_path)),
                    dev=Split(lang, f"{dev_path} (language={lang})", dev_rows[lang]),
                    tests={l: Split(l, f"{test_path} (language={l})", test_rows[l]) for l in langs})


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    """XNLI zero-shot accuracy per language (mean over opts.seeds)."""
    s = task_settings(opts.settings, DEFAULTS, "xnli")
    data = load(opts, s)
    return finetune(em, opts, data, s)
