"""Universal Dependencies part-of-speech tagging (UPOS) with zero-shot transfer.

--data is a folder of treebanks as UD ships them, DIR/UD_<Language>-<Treebank>/<lang>_<tb>-ud-<split>.conllu;
the language is the file name's part before the first '_'. Files are chosen by name:

    train   --train-language's *-ud-{train_split}.conllu   (train_split=train)
    dev     --train-language's *-ud-{dev_split}.conllu     (dev_split=dev), the epoch is chosen there only
    test    every language's *-ud-{test_split}.conllu      (test_split=test), minus the files used above

When the training language has no file of `train_split` and no split setting is given, its dev files
train and the test files of the same treebanks select the epoch: the ../shared/STUDY.md rule for ../shared/corpus/eval/ud
(train on English EWT dev, select on EWT test, test the PUD sets, ur UDTB and ja GSD). The
settings train_files= / dev_files= / test_files= (comma-separated globs relative to --data, '|'
allowed in place of ',') replace a choice entirely. Labels: the UPOS of each syntactic word
(multiword-token lines skipped, their words tagged), on its first sub-word. Metric: accuracy over words.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from typing import Dict, List

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import select_languages, task_settings
from xlmr_mp.eval.conll import read_conllu
from xlmr_mp.eval.finetune import ACCURACY, FINETUNE_DEFAULTS, Split, TaskData, finetune
from xlmr_mp.eval.heads import TOKEN

DEFAULTS = dict(FINETUNE_DEFAULTS, epochs=5, train_split="train", dev_split="dev", test_split="test",
                train_files="", dev_files="", test_files="")
_NAME = re.compile(r"^(?P<lang>[^_/]+)_(?P<tb>[^-/]+)-ud-(?P<split>[A-Za-z0-9]+)\.conllu$")


def lang_of(path: str) -> str:
    """'en' for .../en_ewt-ud-test.conllu; EvalError for a name outside UD's pattern."""
    m = _NAME.match(os.path.basename(path))
    if not m:
        raise EvalError(f"{path}: not a UD file name (<lang>_<treebank>-ud-<split>.conllu); rename it or "
                        f"choose files with train_files= / dev_files= / test_files=")
    return m.group("lang")


def treebank_files(root: str) -> List[str]:
    """Every UD-named .conllu under DIR/UD_*/ (and DIR itself), sorted."""
    found = glob.glob(os.path.join(root, "UD_*", "*.conllu")) + glob.glob(os.path.join(root, "*.conllu"))
    return sorted(p for p in found if _NAME.match(os.path.basename(p)))


def _by_split(files: List[str], split: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for p in files:
        m = _NAME.match(os.path.basename(p))
        if m.group("split") == split:
            out.setdefault(m.group("lang"), []).append(p)
    return out


def _globs(root: str, spec: str, option: str) -> List[str]:
    out = []
    for pat in re.split(r"[,|]", spec):
        pat = pat.strip()
        if not pat:
            continue
        hits = sorted(glob.glob(pat if os.path.isabs(pat) else os.path.join(root, pat)))
        if not hits:
            raise EvalError(f"{option}={spec}: {pat!r} matches no file under {root}")
        out += hits
    return out


def choose_files(root: str, lang: str, s: dict) -> Dict[str, object]:
    """{'train': [paths], 'dev': [paths], 'test': {lang: [paths]}} by the rules above."""
    files = treebank_files(root)
    explicit_split = any(s[k] != DEFAULTS[k] for k in ("train_split", "dev_split"))
    train = _globs(root, s["train_files"], "train_files") if s["train_files"] else \
        _by_split(files, s["train_split"]).get(lang, [])
    dev = _globs(root, s["dev_files"], "dev_files") if s["dev_files"] else _by_split(files, s["dev_split"]).get(lang, [])
    if not train and not s["train_files"] and not explicit_split:
        train = _by_split(files, "dev").get(lang, [])            # the STUDY.md rule (no train file):
        folders = {os.path.dirname(p) for p in train}             # select on the same treebanks' test files
        dev = _globs(root, s["dev_files"], "dev_files") if s["dev_files"] else \
            [p for p in _by_split(files, "test").get(lang, []) if os.path.dirname(p) in folders]
        if train:
            print(f"udpos: {lang} has no *-ud-train.conllu under {root}: training on its dev file(s) "
                  f"{', '.join(map(os.path.basename, train))}, choosing the epoch on "
                  f"{', '.join(map(os.path.basename, dev)) or 'nothing'} (set train_split= / train_files= to choose)",
                  file=sys.stderr)
    if not train:
        trainable = sorted(set(_by_split(files, s["train_split"])) | set(_by_split(files, "dev")))
        raise EvalError(f"--train-language {lang}: no {lang}_*-ud-{s['train_split']}.conllu (nor dev file) under "
                        f"{root}/UD_*/; languages with one: {', '.join(trainable) or 'none'}; or give train_files=")
    if not dev:
        raise EvalError(f"dev_split={s['dev_split']}: no {lang}_*-ud-{s['dev_split']}.conllu under {root}/UD_*/ to "
                        f"choose the epoch on (empty dev set); give dev_files= or dev_split=")
    used = set(train) | set(dev)
    if s["test_files"]:
        test_paths = _globs(root, s["test_files"], "test_files")
    else:
        test_paths = [p for group in _by_split(files, s["test_split"]).values() for p in group]
    tests: Dict[str, List[str]] = {}
    for p in test_paths:
        if p not in used:
            tests.setdefault(lang_of(p), []).append(p)
    return {"train": train, "dev": dev, "test": tests}


def _read_all(paths: List[str]):
    return [s for p in paths for s in read_conllu(p)]


def load(opts: EvalOptions, s: dict) -> TaskData:
    root, lang = opts.data, opts.train_language
    if not os.path.isdir(root):
        raise EvalError(f"--data {root}: not a directory; give a folder of UD treebanks (DIR/UD_*/*.conllu)")
    chosen = choose_files(root, lang, s)
    langs = select_languages(chosen["test"], opts.languages, root, "UD_*/{lang}_*-ud-" + s["test_split"] + ".conllu")
    rel = lambda ps: [os.path.relpath(p, root) for p in ps]   # noqa: E731
    return TaskData(task="udpos", kind=TOKEN, metric=ACCURACY,
                    train=Split(lang, ", ".join(chosen["train"]), _read_all(chosen["train"])),
                    dev=Split(lang, ", ".join(chosen["dev"]), _read_all(chosen["dev"])),
                    tests={l: Split(l, ", ".join(chosen["test"][l]), _read_all(chosen["test"][l])) for l in langs},
                    files={"files": {"train": rel(chosen["train"]), "dev": rel(chosen["dev"]),
                                     "test": {l: rel(chosen["test"][l]) for l in langs}}})


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    """UD POS zero-shot accuracy per language (mean over opts.seeds)."""
    s = task_settings(opts.settings, DEFAULTS, "udpos")
    return finetune(em, opts, load(opts, s), s)
