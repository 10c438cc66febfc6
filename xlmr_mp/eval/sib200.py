"""SIB-200 topic classification with zero-shot transfer.

Layout (as SIB-200 ships it, and ../shared/corpus/eval/sib200): DIR/<lang>/{train,dev,test}.tsv,
tab-separated with a header naming the columns index_id, category, text (CSV quoting: a field in
double quotes may contain doubled quotes). Fine-tune on --train-language's train.tsv, choose the
epoch on its dev.tsv, test every language's test.tsv; metric: accuracy.
"""
from __future__ import annotations

import csv
import os
from typing import List

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import select_languages, task_settings
from xlmr_mp.eval.finetune import ACCURACY, FINETUNE_DEFAULTS, SeqItem, Split, TaskData, finetune
from xlmr_mp.eval.heads import SEQUENCE

DEFAULTS = dict(FINETUNE_DEFAULTS, epochs=10)
COLUMNS = ("index_id", "category", "text")


def read_sib_tsv(path: str) -> List[SeqItem]:
    """Rows of one SIB-200 TSV file as SeqItems (id = index_id, label = category)."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: file not found (SIB-200 layout: DIR/<lang>/{{train,dev,test}}.tsv)")
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise EvalError(f"{path}:1: empty file; expected a header line 'index_id<TAB>category<TAB>text'")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise EvalError(f"{path}:1: header {header} lacks column(s) {', '.join(missing)}; SIB-200 files "
                            f"have index_id, category, text")
        col = {c: header.index(c) for c in COLUMNS}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise EvalError(f"{path}:{reader.line_num}: {len(row)} tab-separated fields, expected "
                                f"{len(header)} as in the header; fix the row (quote a text containing tabs)")
            text, label = row[col["text"]], row[col["category"]].strip()
            if not label or not text.strip():
                raise EvalError(f"{path}:{reader.line_num}: empty category or text")
            items.append(SeqItem(id=row[col["index_id"]], texts=(text,), label=label,
                                 where=f"{path}:{reader.line_num}"))
    return items


def load(opts: EvalOptions) -> TaskData:
    """TaskData of a SIB-200 directory (train and dev of opts.train_language, test of each language)."""
    root = opts.data
    if not os.path.isdir(root):
        raise EvalError(f"--data {root}: not a directory; give the SIB-200 folder (DIR/<lang>/test.tsv)")
    available = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "test.tsv"))]
    lang = opts.train_language
    for split in ("train", "dev"):
        if not os.path.isfile(os.path.join(root, lang, f"{split}.tsv")):
            raise EvalError(f"--train-language {lang}: {os.path.join(root, lang, split + '.tsv')} does not exist; "
                            f"languages with data under {root}: {', '.join(sorted(available)) or 'none'}")
    langs = select_languages(available, opts.languages, root, "{lang}/test.tsv")
    path = lambda l, sp: os.path.join(root, l, f"{sp}.tsv")   # noqa: E731
    return TaskData(task="sib200", kind=SEQUENCE, metric=ACCURACY,
                    train=Split(lang, path(lang, "train"), read_sib_tsv(path(lang, "train"))),
                    dev=Split(lang, path(lang, "dev"), read_sib_tsv(path(lang, "dev"))),
                    tests={l: Split(l, path(l, "test"), read_sib_tsv(path(l, "test"))) for l in langs})


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    """SIB-200 zero-shot accuracy per language (mean over opts.seeds)."""
    settings = task_settings(opts.settings, DEFAULTS, "sib200")
    return finetune(em, opts, load(opts), settings)
