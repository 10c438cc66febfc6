"""Bits per character reported by the trainer with a real tokenizer equal a hand computation: the
final checkpoint's model (xlmr_mp.load_model) on the same validation batches, masked-token cross
entropy summed in nats, divided by ln 2 and by the characters of the masked pieces counted here
from the piece strings (the word-start marker counting as the space it stands for)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.support import train_bodies as b
from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.config import load_config
from xlmr_mp.data.loader import ValidationLoader
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.tokenizer import XLMRTokenizer

ROOT = b.ROOT
STEPS = 6


def _chars(piece: str) -> int:
    """Characters a piece stands for (hand version of the tokenizer's table)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return 0 if 0x80 <= int(piece[3:5], 16) <= 0xBF else 1      # UTF-8 continuation bytes add none
    return len(piece)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpc")
    make_tiny_corpus(d / "corpus", languages=["en", "ru", "zh"], scale=0.4)
    model = train_tiny_spm(d / "corpus", d / "spm", vocab_size=600)
    run_tool("preprocess_data", "--input", d / "corpus", "--tokenizer", model, "--output-dir", d / "bin",
             "--split", "80,20,0", "--workers", 1, "--quiet")
    run_dir = str(d / "run")
    overrides = [f"data.path={d / 'bin'}", f"data.tokenizer={model}", f"model.vocab_size={XLMRTokenizer(model).vocab_size}",
                 f"run_dir={run_dir}", f"train.train_steps={STEPS}", f"train.eval_interval={STEPS}",
                 "train.eval_batches=2", "checkpoint.interval=0"]
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, *overrides], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(cfg=load_config(b.TINY, overrides), model=model, run_dir=run_dir)


def test_trainer_bits_per_char_equals_hand_computation(run):
    from xlmr_mp import load_model
    rows = [json.loads(line) for line in open(os.path.join(run["run_dir"], "valid.jsonl"))]
    assert [r["step"] for r in rows] == [STEPS]
    logged = rows[0]
    cfg, tok = run["cfg"], XLMRTokenizer(run["model"])
    model = load_model(os.path.join(run["run_dir"], "checkpoints"))
    valid = ValidationLoader(cfg.data, cfg.model.vocab_size, cfg.train.micro_batch)
    assert sorted(valid.languages) == ["en", "ru", "zh"]
    for lang in valid.languages:
        nll, chars, n = 0.0, 0, 0
        for mb in valid.batches(lang, max_batches=cfg.train.eval_batches):
            with torch.no_grad():
                logits = model(mb["input_ids"], mb["attention_mask"]).double()
            sel = mb["labels"] != IGNORE_INDEX
            nll += float(F.cross_entropy(logits[sel][:, :tok.vocab_size], mb["labels"][sel], reduction="sum"))
            chars += sum(_chars(tok.id_to_piece(int(t))) for t in mb["labels"][sel])
            n += int(sel.sum())
        assert n > 0 and chars > n        # pieces average more than one character
        assert logged[f"loss_{lang}"] == pytest.approx(nll / n, rel=1e-5)
        assert logged[f"bpc_{lang}"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5), lang
