"""The numbers are never lost to a missing plotting library: with `import matplotlib` failing in every
process (a sitecustomize on PYTHONPATH, inherited by the study's children), a two-cell study of the
tiny corpus (`preset: tiny`) trains, evaluates and reports (results.csv, report.md, each cell's
eval/mbpc.json; no figure), and `xlmr-evaluate mbpc --out` on one of its checkpoints writes its
JSON with ONE printed line about the plot. This is what a `pip install` without matplotlib runs
(matplotlib is a dependency; the commands do not need it)."""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from xlmr_mp.plotting import SKIP_MESSAGE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_study_and_evaluation_finish_without_matplotlib(tmp_path):
    from xlmr_mp.fixtures.demo_corpus import make_heldout_sentences, make_tiny_corpus
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(block), OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr     # the block works

    corpus, eval_dir = tmp_path / "corpus", tmp_path / "eval"
    make_tiny_corpus(str(corpus), languages=["en", "fr"], scale=0.5)
    make_heldout_sentences(str(eval_dir / "flores200_devtest"), languages=["en", "fr"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "nomp", "corpus": str(corpus), "eval_data": str(eval_dir), "preset": "tiny", "evaluate": ["mbpc"],
        "overrides": ["train.global_batch=8", "train.micro_batch=8", "data.seq_length=32", "model.max_positions=34",
                      "train.eval_batches=2"],
        "axes": {"languages": {"L2": ["en", "fr"]}, "vocab": {"V400": 400}, "seed": [1, 2]},
        "budget": {"mode": "fixed_total", "tokens": 2560}, "spm": {"sample_size": 2000}}))
    out = tmp_path / "study"
    study = [sys.executable, "-m", "xlmr_mp.cli.study"]
    r = subprocess.run(study + ["run", str(spec), "--out", str(out), "--threads", "1", "--no-calibrate"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(study + ["report", str(spec), "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.count(SKIP_MESSAGE) == 1, r.stderr
    cells = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(str(out / "cells" / "*" / "done.json")))
    assert len(cells) == 2, os.listdir(out / "cells")
    for c in cells:
        report = json.load(open(out / "cells" / c / "eval" / "mbpc.json"))
        assert set(report["languages"]) == {"en", "fr"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["cell"] for r in rows} == set(cells) and {r["metric"] for r in rows} >= {"mbpc"}
    assert (out / "report.md").is_file() and not glob.glob(str(out / "figures" / "*.png"))

    ckpt = out / "cells" / cells[0] / "run" / "checkpoints"
    r = subprocess.run([sys.executable, "-m", "xlmr_mp.cli.evaluate", "mbpc", "--model", str(ckpt), "--data",
                        str(eval_dir / "flores200_devtest"), "--out", str(tmp_path / "r.json"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [l for l in r.stderr.splitlines() if "matplotlib" in l] == [SKIP_MESSAGE]
    assert f"wrote {tmp_path / 'r.json'}\n" in r.stdout and not (tmp_path / "r.png").exists()
    assert set(json.load(open(tmp_path / "r.json"))["languages"]) == {"en", "fr"}
