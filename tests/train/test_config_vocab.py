"""model.vocab_size comes from data.tokenizer (the id authority) when the command line does not give
it: a preset's value is replaced, a conflicting explicit value is a config error naming both
values and the fix (one line from the CLI, exit 2, no traceback from every rank)."""
import os
import subprocess
import sys

import pytest

from tests.support import train_bodies as b
from tests.support.prep import train_tiny_spm
from xlmr_mp.config import ConfigError, load_config
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    make_tiny_corpus(d / "corpus", languages=["en", "fr"], scale=0.3)
    return train_tiny_spm(d / "corpus", d / "t", vocab_size=400)


def test_vocab_size_inferred_from_the_tokenizer(spm):
    assert load_config(b.TINY, []).model.vocab_size == 1002                  # the preset's, without a tokenizer
    assert load_config(b.TINY, [f"data.tokenizer={spm}"]).model.vocab_size == 402
    large = load_config(None, ["model.preset=large", f"data.tokenizer={spm}"])
    assert large.model.vocab_size == 402 and large.model.hidden_size == 1024  # the preset's shape, the tokenizer's ids
    assert load_config(b.TINY, [f"data.tokenizer={spm}", "model.vocab_size=402"]).model.vocab_size == 402


def test_foreign_dictionary_size_wins(spm, tmp_path):
    """A dict.txt with an extra entry (fairseq lets a dictionary list pieces the model lacks) gives one more id."""
    import shutil
    shutil.copy(spm, tmp_path / "f.model")
    lines = open(spm[:-len(".model")] + ".dict.txt", encoding="utf-8").read()
    (tmp_path / "f.dict.txt").write_text(lines + "extra_piece 1\n", encoding="utf-8")
    assert load_config(b.TINY, [f"data.tokenizer={tmp_path / 'f.model'}"]).model.vocab_size == 403


def test_conflicting_vocab_size_names_the_fix(spm):
    with pytest.raises(ConfigError, match=r"model.vocab_size=1002 but data.tokenizer=.* has 402 ids.*model.vocab_size=402"):
        load_config(b.TINY, [f"data.tokenizer={spm}", "model.vocab_size=1002"])
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, f"data.tokenizer={spm}",
                        "model.vocab_size=1002", f"run_dir={b.default_run_dir()}"], cwd=b.ROOT,
                       env=dict(os.environ, PYTHONPATH=b.ROOT), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("config error: model.vocab_size=1002 but data.tokenizer=")
