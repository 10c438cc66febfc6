"""bench/encoder_layer_cpu.py: one short real run at a small shape (every path, HF with the same
weights agreeing with ours, the GEMM floor), and the HF weight mapping itself."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def _kernels_or_skip():
    from xlmr_mp.kernels import attention_cpu
    if attention_cpu._ext() is None:
        pytest.skip("xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")


def test_hf_layer_gets_our_weights():
    pytest.importorskip("transformers")
    import encoder_layer_cpu as bench
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.encoder import EncoderLayer
    cfg = ModelConfig(vocab_size=64, hidden_size=24, num_layers=1, num_heads=3, ffn_size=40, max_positions=20,
                      dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    ours = EncoderLayer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    hf = bench.hf_layer(ours, 24, 3, 40).eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        out = hf(x)
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, ours(x, None), rtol=1e-5, atol=1e-5)


def test_runs_every_path(tmp_path):
    _kernels_or_skip()
    out = tmp_path / "r.txt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "encoder_layer_cpu.py"), "--shape", "2x16x32x4x64",
                        "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("B=2 S=16")][0]
    for part in ("one-node", "module", "reference", "GEMMs only", "max |diff| vs module"):
        assert part in line, line
    assert "# command: python bench/encoder_layer_cpu.py" in out.read_text()
