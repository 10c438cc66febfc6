"""Named-entity recognition with zero-shot transfer: CoNLL-2002/2003 and WikiANN column files.

Layouts under --data (the first that has the training language's train file is used):

    WikiANN / XTREME:  DIR/<lang>/{train,dev,test}[.txt|.tsv|.conll|.iob|.iob2|.bio]
                       (tokens may carry XTREME's '<lang>:' prefix, which is dropped)
    CoNLL-2002/2003:   DIR/{eng,deu,esp,ned}.{train,testa,testb}  (testa = dev, testb = test;
                       the language is en, de, es, nl)

Overrides: train_file= and dev_file= (paths), test_files=lang:path,lang:path. Token first, tag last
on each line; IOB1 or IOB2 tags, read as IOB2, the label of each word's first sub-word. Metric:
entity-level micro F1, seqeval's default definition (xlmr_mp.eval.conll.entity_f1); the
majority-class baseline (all 'O') scores 0, chance is uniformly random tags.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import select_languages, task_settings
from xlmr_mp.eval.conll import read_ner_columns
from xlmr_mp.eval.finetune import F1, FINETUNE_DEFAULTS, Split, TaskData, finetune
from xlmr_mp.eval.heads import TOKEN

DEFAULTS = dict(FINETUNE_DEFAULTS, epochs=5, train_file="", dev_file="", test_files="")
EXTENSIONS = ("", ".txt", ".tsv", ".conll", ".iob", ".iob2", ".bio")
CONLL_LANGS = {"eng": "en", "deu": "de", "esp": "es", "ned": "nl"}
CONLL_SPLITS = {"train": "train", "dev": "testa", "test": "testb"}


def find_files(root: str) -> Dict[str, Dict[str, str]]:
    """{lang: {split: path}} of every file found in either layout."""
    out: Dict[str, Dict[str, str]] = {}
    if not os.path.isdir(root):
        raise EvalError(f"--data {root}: not a directory; give a folder of NER files (DIR/<lang>/test or eng.testb)")
    for name in sorted(os.listdir(root)):
        sub = os.path.join(root, name)
        if os.path.isdir(sub):
            for split in CONLL_SPLITS:
                for ext in EXTENSIONS:
                    if os.path.isfile(os.path.join(sub, split + ext)):
                        out.setdefault(name, {}).setdefault(split, os.path.join(sub, split + ext))
        stem, _, suffix = name.partition(".")
        if stem in CONLL_LANGS and os.path.isfile(sub):
            for split, conll in CONLL_SPLITS.items():
                if suffix == conll:
                    out.setdefault(CONLL_LANGS[stem], {}).setdefault(split, sub)
    return out


def _test_overrides(spec: str) -> Dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lang, sep, path = part.partition(":")
        if not sep or not lang or not path:
            raise EvalError(f"test_files={spec}: expected lang:path,lang:path (got {part!r})")
        if not os.path.isfile(path):
            raise EvalError(f"test_files={spec}: {path} not found")
        out[lang] = path
    return out


def _read(lang: str, path: str):
    return read_ner_columns(path, strip_prefix=lang)


def choose_files(root: str, lang: str, s: dict) -> Tuple[str, str, Dict[str, str]]:
    found = find_files(root)
    train = s["train_file"] or found.get(lang, {}).get("train")
    dev = s["dev_file"] or found.get(lang, {}).get("dev")
    if not train or not os.path.isfile(train):
        raise EvalError(f"--train-language {lang}: no training file {'train_file=' + train if train else ''} under "
                        f"{root} ({lang}/train or {'/'.join(k for k, v in CONLL_LANGS.items() if v == lang) or 'xxx'}"
                        f".train); languages there: {', '.join(sorted(found)) or 'none'}; or give train_file=")
    if not dev or not os.path.isfile(dev):
        raise EvalError(f"--train-language {lang}: no dev file under {root} (the epoch is chosen on it: empty dev "
                        f"set); give dev_file=")
    tests = _test_overrides(s["test_files"]) if s["test_files"] else \
        {l: sp["test"] for l, sp in found.items() if "test" in sp}
    return train, dev, tests


def load(opts: EvalOptions, s: dict) -> TaskData:
    lang = opts.train_language
    train, dev, tests = choose_files(opts.data, lang, s)
    langs = select_languages(tests, opts.languages, opts.data, "{lang}/test")
    train_items = _read(lang, train)
    return TaskData(task="ner", kind=TOKEN, metric=F1, labels=labels_of(train_items),
                    train=Split(lang, train, train_items), dev=Split(lang, dev, _read(lang, dev)),
                    tests={l: Split(l, tests[l], _read(l, tests[l])) for l in langs})


def labels_of(sentences) -> list:
    """'O' and B-/I- of every entity type the training data has (an I- tag unseen in training is fine)."""
    types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    """Entity F1 per language (mean over opts.seeds)."""
    s = task_settings(opts.settings, DEFAULTS, "ner")
    return finetune(em, opts, load(opts, s), s)
