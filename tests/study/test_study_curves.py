"""Learning curves (evaluate_at) and the per-cell time split (timing.json): spec, plan, report and
status (fast, no training); one tiny cell end to end through tools/study.py (slow)."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.study.study_cells import ROOT, corpus, finish_cell, study_env, write_spec  # noqa: F401 (corpus: a fixture)



def _load(tmp_path, corpus, **kw):
    from xlmr_mp.study.spec import load_spec
    return load_spec(write_spec(tmp_path / "spec.yaml", corpus, **kw))


@pytest.mark.parametrize("fractions, steps, interval, points", [
    ([0.25, 0.5, 0.75, 1.0], 370, 93, [93, 186, 279, 370]),       # 92.5 rounds half up
    ([0.25, 0.5, 0.75, 1.0], 650, 163, [163, 326, 489, 650]),
    ([0.25, 0.5, 0.75, 1.0], 1260, 315, [315, 630, 945, 1260]),
    ([0.1, 0.25, 1.0], 400, 20, [40, 100, 400]),                  # common divisor 0.05
    ([0.5], 370, 185, [185]),
    ([1.0], 370, 370, [370]),
    ([0.25, 0.5, 0.75, 1.0], 3, 1, [1, 2, 3, 3]),                 # capped at the last step
])
def test_curve_points_by_hand(fractions, steps, interval, points):
    from xlmr_mp.study.plan import curve_points
    got_interval, got = curve_points(fractions, steps)
    assert got_interval == interval and [s for _, s in got] == points
    assert all(s % interval == 0 or s == steps for s in points)


def test_evaluate_at_plan_keeps_the_curve_checkpoints(tmp_path, corpus):
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    st = _load(tmp_path, corpus, evaluate_at=[0.25, 0.5, 0.75, 1.0], eval_data=corpus,
               budget={"mode": "fixed_total", "tokens": 8 * 32 * 370})
    prep = Preparation(st, str(tmp_path / "out"))
    plan = plan_cell(st, prep, st.cells[0], str(tmp_path / "out"))
    assert plan.steps == 370 and plan.curve == [(0.25, 93), (0.5, 186), (0.75, 279), (1.0, 370)]
    ov = dict(o.split("=", 1) for o in plan.overrides)
    assert ov["checkpoint.interval"] == "93" and int(ov["checkpoint.keep_last"]) >= 370 // 93 + 1
    plain = _load(tmp_path, corpus)
    ov = dict(o.split("=", 1) for o in plan_cell(plain, Preparation(plain, str(tmp_path / "o2")), plain.cells[0],
                                                 str(tmp_path / "o2")).overrides)
    assert ov["checkpoint.keep_last"] == "1"                      # without evaluate_at: unchanged


@pytest.mark.parametrize("kw, match", [
    ({"evaluate_at": [0.0, 0.5], "eval_data": "."}, r"evaluate_at=\[0\.0, 0\.5\].*fractions"),
    ({"evaluate_at": [0.5, 1.5], "eval_data": "."}, r"evaluate_at.*\(0, 1\]"),
    ({"evaluate_at": "half", "eval_data": "."}, r"evaluate_at='half'"),
    ({"evaluate_at": [0.5]}, r"evaluate_at is set but eval_data is not set"),
])
def test_bad_evaluate_at_names_the_key(tmp_path, corpus, kw, match):
    from xlmr_mp.study.spec import SpecError
    with pytest.raises(SpecError, match=match):
        _load(tmp_path, corpus, **kw)


def test_evaluate_at_with_checkpoint_override_fails_in_plan(tmp_path, corpus):
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.spec import SpecError
    st = _load(tmp_path, corpus, evaluate_at=[0.5, 1.0], eval_data=corpus,
               overrides=["train.global_batch=8", "train.micro_batch=8", "data.seq_length=32",
                          "model.max_positions=34", "checkpoint.interval=7"])
    with pytest.raises(SpecError, match="evaluate_at sets checkpoint.interval"):
        plan_cell(st, Preparation(st, str(tmp_path / "out")), st.cells[0], str(tmp_path / "out"))


def test_identical_cells_take_every_grids_curve_points(tmp_path, corpus):
    grids = [{"name": "A", "axes": {"seed": [1]}}, {"name": "B", "axes": {"seed": [1]}, "evaluate_at": [0.5, 1.0]}]
    st = _load(tmp_path, corpus, grids=grids, axes={"languages": {"L2": ["en", "sw"]}, "vocab": [500]},
               eval_data=corpus)
    assert len(st.cells) == 1 and st.cells[0].evaluate_at == [0.5, 1.0]


def test_report_rows_curves_and_time_split(tmp_path, corpus):
    """Curve points are rows with their step and tokens; the tables use the last step only; one
    learning-curve PNG per grid and metric; the time split in report.md and status."""
    from xlmr_mp.study.report import write_report
    from xlmr_mp.study.runner import format_status
    st = _load(tmp_path, corpus, evaluate_at=[0.5, 1.0], eval_data=corpus, evaluate=["mbpc", "retrieval"],
               budget={"mode": "fixed_total", "tokens": 8 * 32 * 100})
    out = str(tmp_path / "out")
    vals = {"t-L2-1": 3.0, "t-L2-2": 3.5, "t-L3-1": 4.0, "t-L3-2": 4.5}
    for c in st.cells:
        v = vals[c.name]
        langs = c.languages
        finish_cell(st, out, c, evals={"mbpc": {l: v for l in langs}, "retrieval": {l: 10 * v for l in langs}},
                    curve={("mbpc", 50): {l: v + 10 for l in langs}, ("retrieval", 50): {l: 5 * v for l in langs}},
                    timing={"prepare": 10.0, "train": 60.0, "mbpc": 20.0, "retrieval": 5.0, "curve": 20.0,
                            "curve/mbpc": 16.0, "curve/retrieval": 4.0, "eval_start": 5.0},
                    cpu={"prepare": 0.0, "train": 30.0, "mbpc": 20.0, "retrieval": 5.0, "curve": 40.0,
                         "curve/mbpc": 32.0, "curve/retrieval": 8.0, "eval_start": 5.0})
    tok = json.load(open(os.path.join(out, "cells", "t-L2-1", "cell.json")))["tokenizer"]
    with open(os.path.join(out, "prep", "builds.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "tokenizer", "key": tok, "seconds": 65.0, "cpu": 61.0, "pid": 1}) + "\n")
    paths = write_report(st, out)
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    mb = [r for r in rows if r["cell"] == "t-L2-1" and r["metric"] == "mbpc" and r["language"] == "en"]
    assert sorted((r["step"], r["tokens"], r["value"]) for r in mb) == [("100", str(100 * 256), "3.0"),
                                                                     ("50", str(50 * 256), "13.0")]
    md = open(os.path.join(out, "report.md")).read()
    # the tables: the mean of seeds 1 and 2 at the last step (3.0, 3.5 -> 3.25; half-width 12.706 x 0.25),
    # never the curve's (13.0, 13.5)
    assert "| L2 V500 | 3.2500 ± 3.1765 (n=2) | 3.2500 ± 3.1765 (n=2) |" in md
    assert "13.2500" not in md
    figs = {os.path.basename(p) for p in paths}
    assert {"t_curve_mbpc.png", "t_curve_retrieval.png"} <= figs
    assert "## Where a cell's time goes" in md
    # wall: 120 s in all (curve/mbpc and curve/retrieval are parts of curve, not added); CPU: 100 s
    assert "| t-L2-1 | 0m10s 8% (shared) | 1m00s 50% | 0m20s 17% | 0m05s 4% | 0m20s 17% | 0m05s 4% | 2m00s | train |" in md
    assert "| t-L2-1 | 0m00s 0% (shared) | 0m30s 30% | 0m20s 20% | 0m05s 5% | 0m40s 40% | 0m05s 5% | 1m40s | curve |" in md
    assert f"| tokenizer {tok} | 1m05s | 1m01s | 4 finished cell(s): t-L2-1, t-L2-2, t-L3-1, t-L3-2 |" in md
    assert "Largest phase by CPU seconds: curve in 4 of 4 cells." in md      # by wall seconds: train
    status = format_status(st, out)
    assert "prep" in status and "curve" in status and "eval_start" in status
    assert "1m00s" in status and "2m00s" in status and "1m40s" in status
    assert "time per phase" in status


def test_curve_figure_has_one_line_per_cell(tmp_path):
    from xlmr_mp.study.figures import metric_curves
    pts = {((("languages", "L2"),), 1): {"en": [(100, 4.0), (200, 3.0)], "sw": [(100, 5.0), (200, 4.5)]},
           ((("languages", "L2"),), 2): {"en": [(100, 4.1), (200, 3.1)]},
           ((("languages", "L3"),), 1): {"en": [(100, 4.2), (200, 3.2)]}}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    orig = plt.subplots

    def spy(*a, **k):
        fig, axs = orig(*a, **k)
        made.append(axs)
        return fig, axs
    plt.subplots = spy
    try:
        (p,) = metric_curves("A", "mbpc", pts, str(tmp_path))
    finally:
        plt.subplots = orig
    assert os.path.getsize(p) > 0
    en, sw = made[0].flat[0], made[0].flat[1]
    assert len(en.get_lines()) == 3 and len(sw.get_lines()) == 1
    assert list(en.get_lines()[0].get_xdata()) == [100, 200]
    assert metric_curves("A", "mbpc", {}, str(tmp_path)) == []


# ----------------------------------------------------------------------------- end to end (slow)

def _env():
    return study_env()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_one_cell_with_curves_end_to_end(tmp_path_factory):
    """One cell with evaluate_at through the CLI: curve JSONs, kept checkpoints, the time split
    (wall and CPU per phase, one evaluation process), rows with step and tokens, the figure; then
    the same cell from scratch elsewhere gives the same results.csv bytes (deliverable 5)."""
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus, tiny_documents
    root = tmp_path_factory.mktemp("curves")
    corpus = str(root / "corpus")
    make_tiny_corpus(corpus, languages=["en", "sw", "fr"], scale=0.5)
    flores = root / "eval" / "flores200_devtest"
    flores.mkdir(parents=True)
    for lang in ("en", "sw", "fr"):          # line-aligned (retrieval): the same number of lines each
        lines = [s for d in tiny_documents(lang, 24, seed=99) for s in d][:20]
        (flores / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    spec = write_spec(root / "spec.yaml", corpus, tokenizer="per_set", evaluate=["mbpc", "retrieval"],
                      eval_data=str(root / "eval"), evaluate_at=[0.25, 0.5, 1.0], spm={"sample_size": 3000},
                      axes={"languages": {"L3": ["en", "sw", "fr"]}, "vocab": {"V400": 400}, "seed": [1]},
                      budget={"mode": "fixed_total", "tokens": 8 * 32 * 20})
    out = str(root / "out")
    study = [sys.executable, os.path.join(ROOT, "tools", "study.py")]
    r = subprocess.run(study + ["run", spec, "--out", out, "--no-calibrate", "--threads", "1"], capture_output=True,
                       text=True, env=_env(), timeout=800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = os.path.join(out, "cells", "t")
    assert sorted(os.listdir(os.path.join(d, "eval", "curve"))) == [
        "mbpc-step10.json", "mbpc-step10.png", "mbpc-step5.json", "mbpc-step5.png",
        "retrieval-step10.json", "retrieval-step10.png", "retrieval-step5.json", "retrieval-step5.png"]
    assert json.load(open(os.path.join(d, "eval", "curve", "mbpc-step5.json")))["step"] == 5
    # the curve's checkpoints and the last are kept, nothing else
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, "run", "checkpoints", "step_*")))
    assert kept == ["step_00000005", "step_00000010", "step_00000020"]
    t = json.load(open(os.path.join(d, "timing.json")))
    phases = {"prepare", "train", "mbpc", "retrieval", "curve", "curve/mbpc", "curve/retrieval", "eval_start"}
    assert set(t["seconds"]) == phases and set(t["cpu"]) == phases
    assert t["built"] and {b["kind"] for b in t["built"]} == {"tokenizer", "dataset"}
    assert all(v > 0 for v in t["seconds"].values()) and all(v > 0 for v in t["cpu"].values())
    # one evaluation process for the cell: 6 jobs (2 tasks on the last checkpoint, 2 x 2 curve points)
    assert len(json.load(open(os.path.join(d, "eval-batch-times.json")))) == 6
    r = subprocess.run(study + ["report", spec, "--out", out], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    steps = {(r_["metric"], r_["step"]) for r_ in rows}
    assert {("mbpc", "5"), ("mbpc", "10"), ("mbpc", "20"), ("retrieval", "5"), ("retrieval", "20")} <= steps
    assert {r_["tokens"] for r_ in rows if r_["step"] == "5"} == {str(5 * 8 * 32)}
    assert os.path.exists(os.path.join(out, "figures", "t_curve_mbpc.png"))
    r = subprocess.run(study + ["status", spec, "--out", out], capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and "curve" in r.stdout and " b " in r.stdout, r.stdout
    # the same cell from scratch in another study directory: the same rows, bit for bit (curve points
    # included), whatever the timings (timing.json, the JSONs' seconds) of the two runs
    out2 = str(root / "out2")
    r = subprocess.run(study + ["run", spec, "--out", out2, "--no-calibrate", "--threads", "1"], capture_output=True,
                       text=True, env=_env(), timeout=800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert subprocess.run(study + ["report", spec, "--out", out2], capture_output=True, env=_env()).returncode == 0
    assert open(os.path.join(out, "results.csv")).read() == open(os.path.join(out2, "results.csv")).read()


def test_paper_small_grid_a_curve_points(shared_corpus):
    """launch/studies/paper_small.yaml (pre-registered): grid A's 12 cells carry evaluate_at at the
    quarters, no other grid does except through an identical cell (B-L7, E-p100 = A-H64-L7)."""
    from xlmr_mp.study.plan import curve_points
    from xlmr_mp.study.spec import load_spec
    st = load_spec(os.path.join(ROOT, "launch", "studies", "paper_small.yaml"))
    a = [c for c in st.cells if c.grid == "A"]
    assert sorted(c.name for c in a) == sorted(f"A-{w}-{l}-{s}" for w in ("H64", "H96") for l in ("L7", "L15", "L30")
                                               for s in (1, 2))
    assert all(c.evaluate_at == [0.25, 0.5, 0.75, 1.0] for c in a)
    assert not [c.name for c in st.cells if c.grid != "A" and c.evaluate_at]
    assert {g for c in a for g, _ in c.aliases} == {"B", "E"}
    assert [s for _, s in curve_points(a[0].evaluate_at, 370)[1]] == [93, 186, 279, 370]
