"""The path users take: the trainer at TP=2 (real gloo, two processes) writes a checkpoint ->
`xlmr_mp.load_model` -> `tools/convert_checkpoint.py xlmr-to-hf` (weights and tokenizer) ->
transformers' AutoTokenizer / AutoModelForMaskedLM on the exported directory alone: same ids
(byte-fallback pieces included) and the same logits. Unreadable checkpoints give `error:` lines."""
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from tests.eval.eval_bodies import trained_run
from tests.support.prep import run_tool_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")
# The tiny tokenizer has never seen these characters: byte-fallback pieces.
TEXTS = ["The city river goes to the market.", "人们 城市 河流 学校。", "鑫龘齉靐 饕餮 人们城市", "لوگ شہر دریا بازار۔",
         "Люди читают книгу сегодня.", "  extra   spaces  2024 ", "😀 ǅ ünïcödé"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(str(tmp_path_factory.getbasetemp() / "eval_tp2_run"))


def _tool(path, *args):
    return run_tool_main(os.path.basename(path)[:-3], *args)


def test_load_model_reads_the_tp2_trainer_checkpoint(run):
    from xlmr_mp import load_model
    from xlmr_mp.checkpoint.model_io import read_meta
    meta = read_meta(run["root"])
    assert meta["tp"] == 2 and meta["step"] == 4
    assert "embeddings.token_type_embeddings" not in torch.load(
        os.path.join(run["step_dir"], "model_tp00_pp00.pt"), weights_only=True)      # the trainer saves parameters only
    model = load_model(run["root"])
    sd = model.state_dict()
    for name, full in run["params"].items():
        want = full[: model.cfg.vocab_size] if name.startswith(("embeddings.word", "lm_head.bias")) else full
        assert torch.equal(sd[name][: want.shape[0]], want), name
    assert torch.all(sd["embeddings.token_type_embeddings"] == 0)


def test_export_with_tokenizer_matches_transformers(run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from xlmr_mp import load_model
    from xlmr_mp.tokenizer import XLMRTokenizer
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, CONVERT, "xlmr-to-hf", "--input", run["root"], "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    hf_dir = tmp_path / "alone"                    # the directory alone: nothing else of the run beside it
    shutil.copytree(out, hf_dir)
    tok = XLMRTokenizer(run["spm"])
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    byte_ids = {i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")}
    ours = [tok.encode(t, add_bos=True, add_eos=True) for t in TEXTS]
    assert any(set(ids) & byte_ids for ids in ours)             # byte-fallback pieces are exercised
    for t, ids in zip(TEXTS, ours):
        assert hf_tok(t)["input_ids"] == ids, t
    hf = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()
    model = load_model(run["root"])
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch).logits
        mine = model(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert (theirs[real] - mine[real]).abs().max().item() < 1e-5


def test_exported_tokenizer_keeps_a_foreign_dictionary_order(run, tmp_path):
    """A dict.txt whose order is not SentencePiece's: the export gives the dictionary's ids."""
    from transformers import AutoTokenizer
    from xlmr_mp.tokenizer import XLMRTokenizer
    from xlmr_mp.tokenizer.hf import save_hf_tokenizer
    src = tmp_path / "foreign"
    src.mkdir()
    shutil.copy(run["spm"], src / "m.model")
    lines = open(run["spm"][:-len(".model")] + ".dict.txt", encoding="utf-8").read().splitlines()
    random.Random(0).shuffle(lines)
    (src / "m.dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = XLMRTokenizer(str(src / "m.model"))
    formula = XLMRTokenizer(run["spm"])
    assert tok.encode(TEXTS[0]) != formula.encode(TEXTS[0])
    out = tmp_path / "hf"
    out.mkdir()
    save_hf_tokenizer(tok, str(out))
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for t in TEXTS:
        assert hf_tok(t)["input_ids"] == tok.encode(t, add_bos=True, add_eos=True), t
    assert XLMRTokenizer(str(out / "sentencepiece.bpe.model")).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_export_tokenizer_options(run, tmp_path):
    from xlmr_mp.checkpoint.model_io import load_full_model_state, save_model_checkpoint
    cfg, full = load_full_model_state(run["root"])
    bare = tmp_path / "bare"                       # a checkpoint without a run config (e.g. hf-to-xlmr output)
    save_model_checkpoint(str(bare), full, cfg)
    rc, out, err = _tool(CONVERT, "xlmr-to-hf", "--input", bare, "--output", tmp_path / "w")
    assert rc == 0 and "no tokenizer exported" in out and "--tokenizer" in out
    assert "tokenizer.json" not in os.listdir(tmp_path / "w")
    rc, out, err = _tool(CONVERT, "xlmr-to-hf", "--input", bare, "--output", tmp_path / "t", "--tokenizer", run["spm"])
    assert rc == 0 and "tokenizer.json" in os.listdir(tmp_path / "t")
    # a tokenizer of another size: refused before anything is written
    from tests.support.prep import train_tiny_spm
    other = train_tiny_spm(run["corpus"], tmp_path / "small", vocab_size=600)
    rc, out, err = _tool(CONVERT, "xlmr-to-hf", "--input", bare, "--output", tmp_path / "x", "--tokenizer", other)
    assert rc == 2 and err.startswith("error:") and "602" in err and "1002" in err
    assert not os.path.exists(tmp_path / "x")
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
    rc, out, err = _tool(CONVERT, "xlmr-to-hf", "--input", bare, "--output", tmp_path / "y", "--tokenizer",
                         tmp_path / "nope.model")
    assert rc == 2 and "nope.model" in err


def _damaged(run, tmp_path):
    """{name: a checkpoint path that cannot be read}."""
    out = {}
    for name in ("truncated", "badjson", "missing_shard", "wrong_format"):
        d = tmp_path / name
        shutil.copytree(run["step_dir"], d)
        out[name] = d
    f = out["truncated"] / "model_tp01_pp00.pt"
    f.write_bytes(f.read_bytes()[:200])
    (out["badjson"] / "meta.json").write_text('{"format": "xlmr_mp-v1", "tp": 2,\n  "pp": 1 oops')
    os.remove(out["missing_shard"] / "model_tp01_pp00.pt")
    (out["wrong_format"] / "meta.json").write_text('{"format": "other"}')
    root = tmp_path / "root"
    root.mkdir()
    (root / "latest").write_text("step_00000099\n")
    out["latest_nowhere"] = root
    out["not_a_checkpoint"] = tmp_path
    return out


def test_unreadable_checkpoints_give_error_lines(run, tmp_path):
    cases = _damaged(run, tmp_path / "bad")
    expect = {"truncated": "model_tp01_pp00.pt", "badjson": "meta.json:2", "missing_shard": "model_tp01_pp00.pt",
              "wrong_format": "format", "latest_nowhere": "step_00000099", "not_a_checkpoint": "meta.json"}
    for name, path in cases.items():
        for cmd in (["xlmr-to-hf", "--output", tmp_path / "o"], ["reshard", "--output", tmp_path / "o", "--tp", "1"]):
            rc, out, err = _tool(CONVERT, cmd[0], "--input", path, *cmd[1:])
            assert rc == 2 and err.startswith("error:") and "Traceback" not in err, (name, cmd[0], err)
            assert expect[name] in err, (name, err)
            assert not os.path.exists(tmp_path / "o")
    # the CLI entry point itself, as a subprocess: one line, no traceback
    r = subprocess.run([sys.executable, CONVERT, "xlmr-to-hf", "--input", str(cases["truncated"]), "--output",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_exported_tokenizer_on_shared_flores_zh(shared_corpus, tmp_path):
    """The issue's measure: a byte-fallback vocabulary trained on the shared corpus; the exported
    tokenizer gives our ids on all 200 first zh FLORES lines, byte-fallback pieces included."""
    from transformers import AutoTokenizer
    from tests.support.prep import train_tiny_spm
    from xlmr_mp.tokenizer import XLMRTokenizer
    from xlmr_mp.tokenizer.hf import save_hf_tokenizer
    src = tmp_path / "text"
    src.mkdir()
    for lang in ("en", "zh"):
        os.symlink(os.path.join(shared_corpus, f"{lang}.txt"), src / f"{lang}.txt")
    model = train_tiny_spm(src, tmp_path / "spm", vocab_size=3000, extra=["--sample-size", "6000"])
    tok = XLMRTokenizer(model)
    out = tmp_path / "hf"
    out.mkdir()
    save_hf_tokenizer(tok, str(out))
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    with open(os.path.join(shared_corpus, "eval", "flores200_devtest", "zh.txt"), encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f][:200]
    byte_ids = {i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")}
    with_bytes = 0
    for line in lines:
        ours = tok.encode(line, add_bos=True, add_eos=True)
        with_bytes += bool(set(ours) & byte_ids)
        assert hf_tok(line)["input_ids"] == ours, line
    assert with_bytes > 10
