"""Branches in a study spec (a grid with parent and branch_at): spec errors naming the key and the fix,
the parent's overrides inherited and its key in the branch's, the branch point checked against the
checkpoints the parent keeps, the runner starting a branch only after its parent, the shipped
launch/studies/schedules.yaml resolving to the run configs of the schedule study, and a tiny
branched study end to end (the branch continues its parent's run bit for bit)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.study.study_cells import corpus, study_env, write_spec  # noqa: F401  (corpus: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = [sys.executable, os.path.join(ROOT, "tools", "study.py")]
LANGS = ["en", "fr", "de", "ru", "zh", "es", "ar", "hi", "sw", "ur"]


def _grids(*extra):
    """A parent grid P (20 steps, a checkpoint every 10, all kept) and the grids given."""
    return [{"name": "P", "overrides": ["train.train_steps=20", "checkpoint.interval=10", "checkpoint.keep_last=5"]},
            *extra]


def _spec(tmp_path, corpus, grids, **kw):  # noqa: F811
    from xlmr_mp.study.spec import load_spec
    axes = {"languages": {"L2": ["en", "sw"]}, "vocab": {"V500": 500}, "seed": [1]}
    return load_spec(write_spec(tmp_path / "s.yaml", corpus, axes=axes, budget=None, grids=grids, **kw))


@pytest.mark.parametrize("grid, match", [
    ({"name": "B", "parent": "P"}, r"grids\[1\] \(B\): a branch needs both parent and branch_at \(it has only parent\)"),
    ({"name": "B", "branch_at": 10}, r"needs both parent and branch_at \(it has only branch_at\)"),
    ({"name": "B", "parent": "Q", "branch_at": 10}, r"grids\[1\] \(B\)\.parent='Q' is not a cell of an earlier grid "
                                                     r"\(cells so far: P\)"),
    ({"name": "B", "parent": "B", "branch_at": 10}, r"parent='B' is the grid itself"),
    ({"name": "B", "parent": "P", "branch_at": "10"}, r"branch_at='10' must be a step"),
    ({"name": "B", "parent": "P", "branch_at": 0}, r"branch_at=0 must be a step"),
    ({"name": "B", "parent": "P", "branch_at": 10, "axes": {"vocab": {"V600": 600}}},
     r"parent='P': cell B has vocab=600 but its parent has 500; .* give it the parent's vocab"),
    ({"name": "B", "parent": "P", "branch_at": 10, "axes": {"languages": {"L3": ["en", "sw", "fr"]}}},
     r"cell B has languages=\['en', 'sw', 'fr'\] but its parent has \['en', 'sw'\]"),
    ({"name": "B", "parent": "P", "branch_at": 10, "tokenizer": "per_set"}, r"cell B has tokenizer='per_set'"),
    ({"name": "B", "parent": "P", "branch_at": 10, "overrides": ["checkpoint.branch_from=/x"]},
     r"checkpoint.branch_from is set by the runner \(.*a grid.s parent and branch_at\); remove it"),
    ({"name": "B", "parent": "P", "branch_at": 10, "overrides": {"data.alpha_shedule": []}},
     r"grids\[1\] \(B\)\.overrides: unknown key 'data.alpha_shedule'"),
    ({"name": "B", "overrides": "data.alpha=0.5"}, r"overrides must be a list of key=value strings or a mapping"),
    ({"name": "B", "overrides": ["run_dir=/tmp/x"]}, r"grid B, cell .*: run_dir is set by the runner"),
])
def test_bad_branch_names_the_key_and_the_fix(tmp_path, corpus, grid, match):  # noqa: F811
    from xlmr_mp.study.spec import SpecError
    with pytest.raises(SpecError, match=match):
        _spec(tmp_path, corpus, _grids(grid))


def test_parent_listed_after_its_branch_is_an_error_saying_move_it(tmp_path, corpus):  # noqa: F811
    from xlmr_mp.study.spec import SpecError
    grids = _grids()
    grids.insert(0, {"name": "B", "parent": "P", "branch_at": 10})
    with pytest.raises(SpecError, match=r"grids\[0\] \(B\)\.parent='P' comes later in grids; .* move the grid 'P' "
                                        r"before 'B'"):
        _spec(tmp_path, corpus, grids)


def test_branch_inherits_the_parents_overrides_and_key(tmp_path, corpus):  # noqa: F811
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.runner import cell_hash
    sched = [{"step": 0, "alpha": 0.7}, {"step": 10, "alpha": 0.1}]
    st = _spec(tmp_path, corpus, _grids({"name": "B", "parent": "P", "branch_at": 10, "label": "the branch",
                                         "overrides": {"data.alpha_schedule": sched}}))
    p, b = st.cells
    assert b.parent is p and b.branch_at == 10 and p.branch_points == [10] and b.label == "the branch"
    # (write_spec's YAML has the keys sorted; the override keeps the spec's order, on one line)
    assert b.run_overrides == p.run_overrides + ["data.alpha_schedule=[{alpha: 0.7, step: 0}, {alpha: 0.1, step: 10}]"]
    out = str(tmp_path / "out")
    plan = plan_cell(st, Preparation(st, out, log=lambda *_: None), b, out)
    assert plan.overrides[-1] == "checkpoint.branch_from=" + os.path.join(out, "cells", "P", "run", "checkpoints",
                                                                          "step_00000010")
    # a change of the parent changes the branch's hash (it would continue another run)
    st2 = _spec(tmp_path, corpus, [dict(_grids()[0], overrides=_grids()[0]["overrides"] + ["optim.lr=0.002"]),
                                   {"name": "B", "parent": "P", "branch_at": 10,
                                    "overrides": {"data.alpha_schedule": sched}}])
    assert cell_hash(st2.cells[1]) != cell_hash(b)
    st3 = _spec(tmp_path, corpus, _grids({"name": "B", "parent": "P", "branch_at": 20,
                                          "overrides": {"data.alpha_schedule": sched, "train.train_steps": 30}}))
    assert cell_hash(st3.cells[1]) != cell_hash(b)


@pytest.mark.parametrize("grid, match", [
    ({"name": "B", "parent": "P", "branch_at": 15}, r"grid B: branch_at=15 is not a checkpoint step P keeps \(it "
                                                   r"keeps 10, 20: checkpoint.interval=10, steps=20, "
                                                   r"checkpoint.keep_last=5\); set branch_at to one of them"),
    ({"name": "B", "parent": "P", "branch_at": 20}, r"branch_at=20 leaves cell B nothing to train \(it trains 20 "
                                                   r"steps\)"),
])
def test_branch_point_must_be_a_kept_checkpoint(tmp_path, corpus, grid, match):  # noqa: F811
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.spec import SpecError
    st = _spec(tmp_path, corpus, _grids(grid))
    out = str(tmp_path / "out")
    with pytest.raises(SpecError, match=match):
        plan_cell(st, Preparation(st, out, log=lambda *_: None), st.cells[1], out)
    # the CLI says so before training anything (exit 2), with or without the calibration
    r = subprocess.run(STUDY + ["run", st.path, "--out", out, "--no-calibrate"], capture_output=True, text=True,
                       env=study_env(), timeout=300)
    assert r.returncode == 2 and "spec error:" in r.stderr and "branch_at" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(out, "cells"))


def test_plan_validates_each_cells_run_config(tmp_path, corpus):  # noqa: F811
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.spec import SpecError
    st = _spec(tmp_path, corpus, _grids({"name": "B", "parent": "P", "branch_at": 10, "overrides": {
        "data.language_schedule": [{"step": 0, "languages": ["en", "xx"]}]}}))
    out = str(tmp_path / "out")
    with pytest.raises(SpecError, match=r"cell B: .*language_schedule.*xx"):
        plan_cell(st, Preparation(st, out, log=lambda *_: None), st.cells[1], out)


def test_keep_last_drops_the_branch_point(tmp_path, corpus):  # noqa: F811
    from xlmr_mp.study.plan import kept_checkpoints, plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.spec import SpecError
    assert kept_checkpoints(600, 480, 5) == [480, 600]
    assert kept_checkpoints(20, 5, 2) == [15, 20] and kept_checkpoints(20, 0, 3) == [20]
    assert kept_checkpoints(30, 10, 5, start=10) == [20, 30]
    st = _spec(tmp_path, corpus, [{"name": "P", "overrides": ["train.train_steps=20", "checkpoint.interval=10"]},
                                  {"name": "B", "parent": "P", "branch_at": 10}])
    out = str(tmp_path / "out")
    with pytest.raises(SpecError, match=r"branch_at=10 is not a checkpoint step P keeps \(it keeps 20: .*"
                                        r"checkpoint.keep_last=1\)"):
        plan_cell(st, Preparation(st, out, log=lambda *_: None), st.cells[1], out)


def _runner(tmp_path, corpus, jobs, est, fail=()):  # noqa: F811
    """A Runner whose run_cell records (cell, start, end) and finishes (or fails) after a short sleep."""
    from xlmr_mp.study.runner import Runner
    st = _spec(tmp_path, corpus, _grids({"name": "B", "parent": "P", "branch_at": 10},
                                        {"name": "C", "parent": "B", "branch_at": 15}, {"name": "S"}))
    r = Runner(st, str(tmp_path / "out"), jobs=jobs, threads=1, log=lambda *_: None, progress_every=0.05,
               est=est, order="longest")
    ran, lock = [], threading.Lock()

    def run_cell(cell, allow_train=True):
        t0 = time.time()
        time.sleep(0.2)
        with lock:
            ran.append((cell.name, t0, time.time()))
        return "failed" if cell.name in fail else "done"
    r.run_cell = run_cell
    return r, ran


def test_runner_starts_a_branch_after_its_parent(tmp_path, corpus):  # noqa: F811
    # the branches are the longest: "longest first" would start them first
    r, ran = _runner(tmp_path, corpus, 2, {"P": 1.0, "B": 9.0, "C": 8.0, "S": 2.0})
    states = r.run()
    assert states == {"P": "done", "B": "done", "C": "done", "S": "done"}
    t = {n: (a, b) for n, a, b in ran}
    assert t["B"][0] >= t["P"][1] and t["C"][0] >= t["B"][1], ran
    assert t["S"][0] < t["P"][1], "a cell that is no branch runs beside the parent"


def test_a_failed_parent_fails_its_branches_unrun(tmp_path, corpus):  # noqa: F811
    r, ran = _runner(tmp_path, corpus, 1, {"P": 1.0, "B": 9.0, "C": 8.0, "S": 2.0}, fail=("P",))
    states = r.run()
    assert states == {"P": "failed", "B": "failed", "C": "failed", "S": "done"}
    assert sorted(n for n, _, _ in ran) == ["P", "S"]
    why = json.load(open(os.path.join(r.out, "cells", "B", "failed.json")))["why"]
    assert "its parent P is failed" in why


def test_curve_clean_up_keeps_the_branch_points(tmp_path, corpus):  # noqa: F811
    """After a parent's evaluate_at evaluations, the checkpoints that are no curve point are deleted,
    but not the one a branch starts from."""
    from types import SimpleNamespace
    from xlmr_mp.study.runner import Runner
    st = _spec(tmp_path, corpus, _grids({"name": "B", "parent": "P", "branch_at": 10}))
    r = Runner(st, str(tmp_path / "out"), jobs=1, threads=1, log=lambda *_: None)
    ck = os.path.join(r.out, "cells", "P", "run", "checkpoints")
    for step in (5, 10, 15, 20):
        os.makedirs(os.path.join(ck, f"step_{step:08d}"))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("step_00000020\n")
    r._eval_job = lambda *a, **k: None             # every evaluation done already
    assert r.evaluate_all(st.cells[0], SimpleNamespace(curve=[(0.25, 5), (1.0, 20)], steps=20), None) == "ok"
    assert sorted(os.listdir(ck)) == ["latest", "step_00000005", "step_00000010", "step_00000020"]


def test_shipped_schedules_spec_resolves_to_the_schedule_study_configs(shared_corpus, tmp_path):
    """launch/studies/schedules.yaml: static, annealed and its two decay branches at step 480, with the
    run configs the schedule study trained (bench/results/schedule_study/)."""
    from xlmr_mp.config import load_config
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation
    from xlmr_mp.study.spec import load_spec
    st = load_spec(os.path.join(ROOT, "launch", "studies", "schedules.yaml"))
    names = ["static", "annealed", "decay_high", "decay_flat"]
    assert [c.name for c in st.cells] == names and st.evaluate == ["mbpc"]
    out = str(tmp_path / "out")
    prep = Preparation(st, out, log=lambda *_: None)
    plans = {c.name: plan_cell(st, prep, c, out) for c in st.cells}
    assert len({(p.tokenizer.key, p.dataset.key) for p in plans.values()}) == 1      # one tokenizer, one dataset
    tok = plans["static"].tokenizer
    assert tok.vocab == 8000 and tok.languages == sorted(LANGS) and st.spm["sample_size"] == 2000000
    cfg = {n: load_config(st.base_config, p.overrides) for n, p in plans.items()}
    for c in cfg.values():
        assert c.data.languages == LANGS and c.train.train_steps == 600 and c.checkpoint.interval == 480
        assert c.checkpoint.keep_last == 5 and c.model.vocab_size == 8002 and c.train.seed == c.data.seed == 1234
        assert (c.optim.decay, c.optim.wsd_decay, c.optim.decay_steps) == ("wsd", "1-sqrt", 120)
        assert (c.model.num_layers, c.model.hidden_size, c.data.seq_length, c.train.global_batch) == (4, 128, 128, 32)
        assert (c.model.dropout, c.optim.warmup_steps, c.train.eval_interval) == (0.1, 30, 0)
    s = cfg["static"]
    assert s.data.alpha == 0.3 and s.data.alpha_schedule is None and s.data.language_schedule is None
    assert s.data.mask_schedule is None and not s.checkpoint.branch_from

    def phases(sched, key):
        return [(p["step"], p[key]) for p in sched]
    a = cfg["annealed"]
    assert phases(a.data.alpha_schedule, "alpha") == [(0, 0.7), (240, 0.5), (480, 0.3)]
    assert phases(a.data.mask_schedule, "mask_prob") == [(0, 0.3), (240, 0.15), (480, 0.05)]
    assert phases(a.data.language_schedule, "languages") == [(0, LANGS[:6]), (240, LANGS[:8]), (480, LANGS)]
    assert a.train.batch_warmup == {"start": 8, "tokens": int(0.05 * 600 * 32 * 128)}
    hi, flat = cfg["decay_high"], cfg["decay_flat"]
    branch = os.path.join(out, "cells", "annealed", "run", "checkpoints", "step_00000480")
    assert hi.checkpoint.branch_from == flat.checkpoint.branch_from == branch
    assert phases(hi.data.language_schedule, "languages") == [(0, ["en", "fr", "de", "ru", "zh"])]
    assert phases(flat.data.alpha_schedule, "alpha") == [(0, 0.7), (240, 0.5), (480, 0.01)]
    # the rest of each branch is annealed's (inherited overrides)
    assert hi.data.alpha_schedule == a.data.alpha_schedule and hi.data.mask_schedule == a.data.mask_schedule
    assert flat.data.language_schedule == a.data.language_schedule and flat.train.batch_warmup == a.train.batch_warmup


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_branched_study_end_to_end(tmp_path, corpus):  # noqa: F811
    """P trains 20 steps (checkpoints at 10 and 20); B branches from P at 10 with P's schedules, C at
    10 with another mask rate. B's steps 11..20 are P's, bit for bit (it continues P's run from the
    step-10 checkpoint), C's differ; P's step-10 checkpoint is still there for them."""
    grids = _grids({"name": "B", "parent": "P", "branch_at": 10},
                   {"name": "C", "parent": "P", "branch_at": 10, "overrides": {"data.mask_schedule":
                                                                               [{"step": 0, "mask_prob": 0.3}]}})
    spec = write_spec(tmp_path / "s.yaml", corpus, budget=None, grids=grids,
                      axes={"languages": {"L2": ["en", "sw"]}, "vocab": {"V500": 500}, "seed": [1]})
    out = str(tmp_path / "out")
    r = subprocess.run(STUDY + ["run", spec, "--out", out, "--jobs", "2", "--threads", "1", "--no-calibrate"],
                       capture_output=True, text=True, env=study_env(), timeout=800, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def losses(cell):
        with open(os.path.join(out, "cells", cell, "run", "metrics.jsonl")) as f:
            return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}
    p, b, c = losses("P"), losses("B"), losses("C")
    assert sorted(b) == sorted(c) == list(range(11, 21)), sorted(b)
    assert all(b[s] == p[s] for s in b), (p, b)
    assert all(c[s] != p[s] for s in c), (p, c)
    assert "branched from" in open(os.path.join(out, "cells", "B", "train.log")).read()
    assert os.path.isdir(os.path.join(out, "cells", "P", "run", "checkpoints", "step_00000010"))
    rec = json.load(open(os.path.join(out, "cells", "C", "cell.json")))
    assert (rec["parent"], rec["branch_at"]) == ("P", 10)
