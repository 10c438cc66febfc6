"""A 2 x 2 study of 20-step cells on the tiny corpus, end to end through tools/study.py: plan, run
--jobs 2 killed with SIGKILL mid-study, run again (finished cells not retrained), a third run that
trains nothing, each tokenizer and dataset built once per key, report; and one cell trained twice
from scratch, in two study directories, gives the same results.csv rows, bit for bit."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.study.study_cells import study_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "xlmr_mp", "presets", "tiny.yaml")
STUDY = [sys.executable, os.path.join(ROOT, "tools", "study.py")]
HAS_EVAL = os.path.exists(os.path.join(ROOT, "tools", "evaluate.py"))
CWD = __import__("tempfile").gettempdir()    # nothing may depend on the current directory


def _env():
    return study_env()


def _cli(*args, timeout=900):
    # one thread per cell in every run: float reductions (training and evaluation) depend on it
    extra = ["--threads", "1"] if args[0] == "run" else []
    return subprocess.run(STUDY + list(args) + extra, capture_output=True, text=True, cwd=CWD, env=_env(),
                          timeout=timeout)


def _write_spec(path, corpus, eval_dir, **extra):
    spec = {"name": "e2e", "corpus": corpus, "base_config": TINY,
            "overrides": ["train.global_batch=8", "train.micro_batch=8", "data.seq_length=32",
                          "model.max_positions=34", "train.eval_batches=2"],
            "axes": {"languages": {"L2": ["en", "sw"], "L3": ["en", "sw", "fr"]}, "vocab": {"V400": 400},
                     "seed": [1, 2]},
            "tokenizer": "per_set", "budget": {"mode": "fixed_total", "tokens": 5120},
            "spm": {"sample_size": 3000}}
    if HAS_EVAL:
        spec.update(evaluate=["mbpc"], eval_data=eval_dir)
    spec.update(extra)
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus, tiny_documents
    root = tmp_path_factory.mktemp("study")
    corpus = str(root / "corpus")
    make_tiny_corpus(corpus, languages=["en", "sw", "fr"], scale=0.5)
    flores = root / "eval" / "flores200_devtest"
    flores.mkdir(parents=True)
    for lang in ("en", "sw", "fr"):      # held-out sentences: another seed of the generator
        lines = [s for d in tiny_documents(lang, 24, seed=99) for s in d]
        (flores / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    return root, corpus, str(root / "eval")


def _launches(out, cell):
    p = os.path.join(out, "cells", cell, "train.log")
    return sum(1 for l in open(p) if l.startswith("# ") and "xlmr_mp.train" in l) if os.path.exists(p) else 0


def _done(out):
    return {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(out, "cells", "*", "done.json"))}


def _rows(out, cell):
    with open(os.path.join(out, "results.csv")) as f:
        return [r for r in csv.DictReader(f) if r["cell"] == cell]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_study_plan_run_kill_resume_report(data):
    from xlmr_mp.run_lock import is_locked
    root, corpus, eval_dir = data
    spec = _write_spec(str(root / "spec.yaml"), corpus, eval_dir)
    out = str(root / "out")
    cells = ["e2e-L2-1", "e2e-L2-2", "e2e-L3-1", "e2e-L3-2"]

    r = _cli("plan", spec, "--out", out, "--no-calibrate")
    assert r.returncode == 0, r.stderr
    for c in cells:
        assert f"\n{c}  [" in r.stdout
    assert "params" in r.stdout and "sw: q " in r.stdout and "20 steps x 8 x 32" in r.stdout

    # run --jobs 2, SIGKILL once a cell has finished
    p = subprocess.Popen(STUDY + ["run", spec, "--out", out, "--jobs", "2", "--no-calibrate", "--progress-every", "1",
                                  "--threads", "1"], cwd=CWD, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not _done(out) and p.poll() is None and time.time() - t0 < 900:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = _done(out)
    assert finished and finished != set(cells), finished
    # the killed runner's trainers die with it: no run directory stays locked
    t0 = time.time()
    while any(is_locked(os.path.join(out, "cells", c, "run")) for c in cells) and time.time() - t0 < 60:
        time.sleep(0.2)
    assert not any(is_locked(os.path.join(out, "cells", c, "run")) for c in cells)

    r = _cli("run", spec, "--out", out, "--jobs", "2", "--no-calibrate", "--progress-every", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _done(out) == set(cells)
    for c in finished:
        assert _launches(out, c) == 1, c                              # not retrained
    assert "done, 0 running, 0 failed, 0 pending" in r.stdout

    builds = [json.loads(l) for l in open(os.path.join(out, "prep", "builds.jsonl"))]
    for kind in ("tokenizer", "dataset"):
        keys = [b["key"] for b in builds if b["kind"] == kind]
        assert len(keys) == 2 and len(set(keys)) == 2, builds        # per_set: L2 and L3, once each

    before = {c: _launches(out, c) for c in cells}
    r = _cli("run", spec, "--out", out, "--jobs", "2", "--no-calibrate")
    assert r.returncode == 0 and "4 already done" in r.stdout, r.stdout
    assert {c: _launches(out, c) for c in cells} == before            # the third run trains nothing

    r = _cli("status", spec, "--out", out)
    assert r.returncode == 0 and r.stdout.count(" done ") == 4 and "20/20" in r.stdout, r.stdout

    r = _cli("report", spec, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    metrics = {"valid_bpc"} | ({"mbpc"} if HAS_EVAL else set())
    assert {r_["metric"] for r_ in rows} == metrics
    assert set(rows[0]) >= {"languages", "vocab", "seed", "language", "metric", "value", "cell", "grid"}
    if HAS_EVAL:
        mb = {(r_["cell"], r_["language"]) for r_ in rows if r_["metric"] == "mbpc"}
        assert mb == {(c, l) for c in cells for l in (["en", "sw"] if "L2" in c else ["en", "sw", "fr"])}
    figs = os.listdir(os.path.join(out, "figures"))
    assert {"e2e_curse_valid_bpc.png", "e2e_heatmap_valid_bpc.png", "e2e_learning_curves.png"} <= set(figs)
    md = open(os.path.join(out, "report.md")).read()
    assert "4 of 4 finished" in md and "translations of the same news" in md and "| e2e-L3-2 |" in md


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cell_trained_twice_from_scratch_gives_the_same_rows(data):
    """SentencePiece training, preprocessing, training and evaluation are deterministic (one
    thread per cell): the same cell in two fresh study directories gives identical rows."""
    root, corpus, eval_dir = data
    spec = _write_spec(str(root / "spec_rep.yaml"), corpus, eval_dir, exclude=[{"languages": "L2"}, {"seed": 1}])
    rows = []
    for name in ("rep_a", "rep_b"):
        out = str(root / name)
        r = _cli("run", spec, "--out", out, "--no-calibrate")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert _cli("report", spec, "--out", out).returncode == 0
        rows.append(_rows(out, "e2e-L3-2"))
    assert rows[0] and rows[0] == rows[1]
    from sentencepiece import sentencepiece_model_pb2
    models = []
    for n in ("rep_a", "rep_b"):
        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(open(glob.glob(str(root / n / "prep" / "tok-*" / "spm.model"))[0], "rb").read())
        m.trainer_spec.ClearField("model_prefix")        # the temporary output name (study dir, pid)
        models.append(m.SerializeToString())
    assert models[0] == models[1]
