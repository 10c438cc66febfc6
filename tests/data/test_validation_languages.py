"""Validation covers every language: the tiny corpus gives each language a document the preprocessor
(default --split 98,1,1) puts in the validation split, and a run whose data lacks validation
documents for some language, or that has no tokenizer (no bits per character), says so."""
import os
import subprocess
import sys

import numpy as np

from tests.support import train_bodies as b
from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.data.indexed import read_index
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus, tiny_languages


def test_tiny_corpus_has_a_validation_document_in_every_language(tmp_path):
    make_tiny_corpus(tmp_path / "corpus", scale=0.5)        # small: several languages need the guarantee
    model = train_tiny_spm(tmp_path / "corpus", tmp_path / "spm", vocab_size=1000)
    run_tool("preprocess_data", "--input", tmp_path / "corpus", "--tokenizer", model, "--output-dir",
             tmp_path / "bin", "--workers", 1, "--quiet")          # the preprocessor's default split
    for lang in tiny_languages():
        _, lengths, docs = read_index(str(tmp_path / "bin" / lang / "valid"))
        assert len(docs) > 1 and lengths.size > 0, f"{lang}: no validation document"
        _, lengths, _ = read_index(str(tmp_path / "bin" / lang / "train"))
        assert lengths.size > 0


def test_missing_validation_languages_and_tokenizer_are_warned(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    data = b.make_indexed_data(str(tmp_path / "data"))
    prefix = str(tmp_path / "data" / "sw" / "valid")              # sw: a validation split with no document
    for ext in (".bin", ".idx"):
        os.remove(prefix + ext)
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.path={data}",
                        f"run_dir={tmp_path / 'run'}", "train.train_steps=2", "train.eval_interval=2",
                        "checkpoint.interval=0"], cwd=b.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=b.ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WARNING: no validation documents for sw (1 of 3 languages)" in p.stdout
    assert "WARNING: no data.tokenizer: validation reports loss only, no bits per character" in p.stdout
    assert "loss_en" in p.stdout and "loss_sw" not in p.stdout
