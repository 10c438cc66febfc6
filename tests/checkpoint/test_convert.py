"""tools/convert_checkpoint.py end to end on tiny HF directories (safetensors and .bin)."""
import os
import subprocess
import sys

import pytest
import torch

from tests.support.model_bodies import tiny_batch, tiny_hf_model
from tests.support.prep import run_tool_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def _run_subprocess(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(*args):
    """The tool's main() in this process (the CLI entry point itself is run once as a subprocess)."""
    return _Result(*run_tool_main("convert_checkpoint", *args))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = tiny_hf_model(seed=7)
    hf.save_pretrained(str(d / "st"))                        # model.safetensors
    os.makedirs(d / "bin")
    hf.config.save_pretrained(str(d / "bin"))
    torch.save(hf.state_dict(), d / "bin" / "pytorch_model.bin")
    return hf, d


@pytest.mark.parametrize("fmt,tp", [("st", 2), ("bin", 1)])
def test_hf_to_xlmr_to_hf(hf_dirs, tmp_path, fmt, tp):
    from transformers import XLMRobertaForMaskedLM
    from xlmr_mp import load_model
    from xlmr_mp.checkpoint.model_io import read_meta
    hf, d = hf_dirs
    ck = tmp_path / "ck"
    run = _run_subprocess if fmt == "st" else _run
    r = run("hf-to-xlmr", "--input", str(d / fmt), "--output", str(ck), "--tp", str(tp))
    assert r.returncode == 0, r.stderr
    meta = read_meta(str(ck))
    assert meta["tp"] == tp and meta["pp"] == 1
    assert sorted(os.listdir(ck)) == ["meta.json"] + [f"model_tp{t:02d}_pp00.pt" for t in range(tp)]
    shard = torch.load(ck / "model_tp00_pp00.pt", weights_only=True)
    padded = -(-150 // (128 * tp)) * 128 * tp
    assert shard["embeddings.word_embeddings.weight"].shape[0] == padded // tp

    model = load_model(str(ck))
    ids, mask, _ = tiny_batch(seed=8, vocab=150)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (model(ids, mask) - ref).abs().max().item() < 1e-5
    r = _run("xlmr-to-hf", "--input", str(ck), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    back = XLMRobertaForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item() < 1e-5


def test_reshard_and_latest(hf_dirs, tmp_path):
    from xlmr_mp import load_model
    hf, d = hf_dirs
    root = tmp_path / "root"
    assert _run("hf-to-xlmr", "--input", str(d / "st"), "--output", str(root / "step_5"), "--tp", "2",
                "--step", "5").returncode == 0
    (root / "latest").write_text("step_5\n")
    r = _run("reshard", "--input", str(root), "--output", str(tmp_path / "r"), "--tp", "4", "--pp", "2")
    assert r.returncode == 0, r.stderr
    assert len([f for f in os.listdir(tmp_path / "r") if f.endswith(".pt")]) == 8
    ids, mask, _ = tiny_batch(seed=9, vocab=150)
    with torch.no_grad():
        a, b = load_model(str(root))(ids, mask), load_model(str(tmp_path / "r"))(ids, mask)
    assert torch.equal(a, b)


def test_bad_tp_and_missing_input_are_clear(hf_dirs, tmp_path):
    hf, d = hf_dirs
    r = _run("hf-to-xlmr", "--input", str(d / "st"), "--output", str(tmp_path / "x"), "--tp", "3")
    assert r.returncode == 2 and "--tp 3" in r.stderr and "model.num_heads" in r.stderr
    assert not os.path.exists(tmp_path / "x")
    r = _run("hf-to-xlmr", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "y"))
    assert r.returncode == 2 and "config.json" in r.stderr
