"""Shared preparation of a study: text (cap_lines applied), SentencePiece models, datasets.

One SentencePiece model per distinct (languages, vocabulary size, cap_lines, spm settings, corpus
content), one preprocessed dataset per tokenizer; alpha and language subsets are selections of a
cell on the blend (data.languages, data.alpha), never a reprocess. Each artefact lives under
`<study>/prep/<kind>-<hash>/`, the hash being a content hash of its inputs (the corpus files'
SHA-256 included), so changing one axis rebuilds only what depends on it. A blocking flock per
artefact makes concurrent cells wait for the one builder; every build is appended to
`prep/builds.jsonl`. Artefacts are built in a temporary directory and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from xlmr_mp.study.spec import REPO, Cell, SpecError, Study

PREPROCESS_SPLIT = "98,1,1"
PREPROCESS_SEED = 1234


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class FileLock:
    """Blocking exclusive flock on a file (released by the kernel if the holder dies)."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


@dataclass
class TokenizerSpec:
    languages: List[str]
    vocab: int
    cap_lines: Dict[str, float]
    key: str

    @property
    def model(self) -> str:
        return os.path.join("tok-" + self.key, "spm.model")


@dataclass
class DatasetSpec:
    tokenizer: TokenizerSpec
    key: str


class Preparation:
    """Keys, paths and builders of a study's shared artefacts under `<out>/prep`."""

    def __init__(self, study: Study, out_dir: str, workers: int = 1, log=print):
        self.study, self.out, self.log = study, os.path.abspath(out_dir), log
        self.root = os.path.join(self.out, "prep")
        self.workers = max(1, workers)
        os.makedirs(self.root, exist_ok=True)
        self._file_hashes: Dict[str, str] = {}
        self._groups = self._shared_groups()

    # ------------------------------------------------------------------ keys
    def file_hash(self, lang: str) -> str:
        """SHA-256 of the corpus file of `lang` (cached by path, size, mtime, ctime and inode)."""
        if lang in self._file_hashes:
            return self._file_hashes[lang]
        path = self.corpus_file(lang)
        st = os.stat(path)
        cache_path = os.path.join(self.root, "file_hashes.json")
        cache = {}
        if os.path.exists(cache_path):
            try:
                cache = json.load(open(cache_path))
            except ValueError:
                cache = {}
        # ctime and inode too: a same-size rewrite with its mtime restored (cp -p, rsync -a) still changes them
        ck = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        if ck not in cache:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            cache[ck] = h.hexdigest()
            try:
                _atomic_json(cache_path, cache)
            except OSError:
                pass
        self._file_hashes[lang] = cache[ck]
        return cache[ck]

    def corpus_file(self, lang: str) -> str:
        from xlmr_mp.data.corpus_io import find_language_files
        return find_language_files(self.study.corpus, [lang])[lang]

    def _shared_groups(self) -> Dict[tuple, List[str]]:
        """(vocab, cap_lines) -> union of the languages of the shared-tokenizer cells with them, over
        every cell of the spec (study.all_cells), so that a selection of cells does not change them."""
        groups: Dict[tuple, List[str]] = {}
        for c in self.study.all_cells:
            if c.tokenizer == "shared":
                g = groups.setdefault(self._group_key(c), [])
                g.extend(l for l in c.languages if l not in g)
        return {k: sorted(v) for k, v in groups.items()}

    @staticmethod
    def _group_key(c: Cell) -> tuple:
        return (c.vocab, json.dumps(c.cap_all, sort_keys=True))

    def tokenizer_for(self, cell: Cell) -> TokenizerSpec:
        langs = self._groups[self._group_key(cell)] if cell.tokenizer == "shared" else sorted(cell.languages)
        cap = {l: n for l, n in sorted(cell.cap_all.items()) if l in langs}
        spm = self.study.spm
        key = _digest({"kind": "spm", "languages": langs, "vocab": cell.vocab, "cap_lines": cap, "spm": spm,
                       "files": {l: self.file_hash(l) for l in langs}})
        return TokenizerSpec(langs, cell.vocab, cap, key)

    def dataset_for(self, cell: Cell) -> DatasetSpec:
        tok = self.tokenizer_for(cell)
        key = _digest({"kind": "data", "tokenizer": tok.key, "split": PREPROCESS_SPLIT, "seed": PREPROCESS_SEED})
        return DatasetSpec(tok, key)

    def tokenizer_dir(self, tok: TokenizerSpec) -> str:
        return os.path.join(self.root, "tok-" + tok.key)

    def dataset_dir(self, ds: DatasetSpec) -> str:
        return os.path.join(self.root, "data-" + ds.key)

    def text_dir(self, tok: TokenizerSpec) -> str:
        return os.path.join(self.root, "text-" + _digest({"cap": tok.cap_lines, "languages": tok.languages,
                                                          "files": {l: self.file_hash(l) for l in tok.languages}}))

    # ------------------------------------------------------------------ corpus sizes
    def language_stats(self, lang: str, cap: Optional[float] = None) -> Dict[str, int]:
        """Lines (sentences) and characters of a language's text, after cap_lines (cached)."""
        cache_path = os.path.join(self.root, "stats.json")
        cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
        ck = f"{self.file_hash(lang)}:{cap}"
        if ck not in cache:
            lines = chars = 0
            limit = self._cap_count(lang, cap)
            for s in self._sentences(lang):
                if limit is not None and lines >= limit:
                    break
                lines += 1
                chars += len(s)
            cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
            cache[ck] = {"lines": lines, "characters": chars}
            _atomic_json(cache_path, cache)
        return cache[ck]

    def _sentences(self, lang: str):
        from xlmr_mp.data.corpus_io import iter_sentences
        return iter_sentences(self.corpus_file(lang))

    def _cap_count(self, lang: str, cap: Optional[float]) -> Optional[int]:
        if cap is None:
            return None
        if isinstance(cap, float) and cap <= 1:
            total = self.language_stats(lang, None)["lines"]
            return max(1, int(round(cap * total)))
        return int(cap)

    # ------------------------------------------------------------------ builders
    def _record(self, kind: str, key: str, seconds: float, built: Optional[List[dict]] = None,
                cpu: Optional[float] = None) -> None:
        rec = {"kind": kind, "key": key, "seconds": round(seconds, 3)}
        if cpu is not None:
            rec["cpu"] = round(cpu, 3)
        if built is not None:
            built.append(rec)
        with open(os.path.join(self.root, "builds.jsonl"), "a") as f:
            f.write(json.dumps(dict(rec, pid=os.getpid())) + "\n")

    def ensure_text(self, tok: TokenizerSpec) -> str:
        """The tokenizer's text: symlinks to the corpus files, a first-N-lines copy where capped."""
        d = self.text_dir(tok)
        with FileLock(d + ".lock"):
            if os.path.isdir(d):
                return d
            tmp = f"{d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for lang in tok.languages:
                src = self.corpus_file(lang)
                limit = self._cap_count(lang, tok.cap_lines.get(lang))
                if limit is None:
                    os.symlink(os.path.realpath(src), os.path.join(tmp, os.path.basename(src)))
                    continue
                if not src.endswith(".txt"):
                    raise SpecError(f"cap_lines.{lang}: {src} is compressed or JSONL; capping needs plain <lang>.txt")
                n = 0
                with open(src, encoding="utf-8") as fi, open(os.path.join(tmp, f"{lang}.txt"), "w",
                                                            encoding="utf-8") as fo:
                    for line in fi:
                        if line.strip():
                            if n >= limit:
                                break
                            n += 1
                        fo.write(line)
            os.replace(tmp, d)
        return d

    def ensure_tokenizer(self, tok: TokenizerSpec, built: Optional[List[dict]] = None) -> str:
        """Train the SentencePiece model (tools/train_spm.py, one thread: deterministic) once;
        `built` gets {kind, key, seconds} when this call built it."""
        d = self.tokenizer_dir(tok)
        model = os.path.join(d, "spm.model")
        with FileLock(d + ".lock"):
            if os.path.exists(model):
                return model
            text = self.ensure_text(tok)
            t0 = time.time()
            tmp = f"{d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            spm = self.study.spm
            cmd = [sys.executable, "-m", "xlmr_mp.cli.train_spm", "--input", text,
                   "--output-prefix", os.path.join(tmp, "spm"), "--vocab-size", str(tok.vocab),
                   "--languages", ",".join(tok.languages), "--alpha", str(spm["alpha"]),
                   "--sample-size", str(int(spm["sample_size"])), "--character-coverage",
                   str(spm["character_coverage"]), "--seed", str(spm["seed"]), "--num-threads", "1", "--quiet"]
            self.log(f"[prep] SentencePiece {tok.vocab} pieces on {len(tok.languages)} languages -> {d}")
            cpu = self._run(cmd, os.path.join(tmp, "train_spm.log"), "SentencePiece training")
            _atomic_json(os.path.join(tmp, "key.json"), {"languages": tok.languages, "vocab": tok.vocab,
                                                        "cap_lines": tok.cap_lines, "spm": spm})
            os.replace(tmp, d)
            self._record("tokenizer", tok.key, time.time() - t0, built, cpu)
        return model

    def ensure_dataset(self, ds: DatasetSpec, built: Optional[List[dict]] = None) -> str:
        """Preprocess the tokenizer's text with it (tools/preprocess_data.py) once; `built` gets
        {kind, key, seconds} of each artefact this call built (the tokenizer too)."""
        d = self.dataset_dir(ds)
        with FileLock(d + ".lock"):
            if os.path.exists(os.path.join(d, "preprocess_summary.json")):
                return d
            model = self.ensure_tokenizer(ds.tokenizer, built)
            text = self.ensure_text(ds.tokenizer)
            t0 = time.time()
            tmp = f"{d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            cmd = [sys.executable, "-m", "xlmr_mp.cli.preprocess_data", "--input", text,
                   "--tokenizer", model, "--output-dir", tmp, "--languages", ",".join(ds.tokenizer.languages),
                   "--workers", str(self.workers), "--split", PREPROCESS_SPLIT, "--seed", str(PREPROCESS_SEED),
                   "--quiet"]
            self.log(f"[prep] dataset of {len(ds.tokenizer.languages)} languages with tok-{ds.tokenizer.key} -> {d}")
            cpu = self._run(cmd, os.path.join(self.root, f"data-{ds.key}.log"), "preprocessing")
            os.replace(tmp, d)
            self._record("dataset", ds.key, time.time() - t0, built, cpu)
        return d

    def _run(self, cmd: List[str], log_path: str, what: str) -> float:
        """Run a builder (its log at log_path); returns its CPU seconds."""
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        from xlmr_mp.study.timing import wait_cpu
        with open(log_path, "w") as log:      # through study.child: dies with this process
            p = subprocess.Popen([sys.executable, "-m", "xlmr_mp.study.child", str(os.getpid())] + cmd,
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            rc, cpu = wait_cpu(p)
        if rc != 0:
            tail = open(log_path).read()[-2000:]
            raise RuntimeError(f"{what} failed (exit {rc}); log {log_path}:\n{tail}")
        return cpu

    def train_tokens(self, ds: DatasetSpec) -> Optional[Dict[str, int]]:
        """Train-split tokens per language of a built dataset (None before it is built)."""
        from xlmr_mp.data.indexed import read_index
        d = self.dataset_dir(ds)
        if not os.path.exists(os.path.join(d, "preprocess_summary.json")):
            return None
        return {l: int(read_index(os.path.join(d, l, "train"))[1].sum(dtype="int64")) for l in ds.tokenizer.languages}

    def builds(self) -> List[dict]:
        p = os.path.join(self.root, "builds.jsonl")
        return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
