"""Study fixtures without training: a spec on a given corpus, and finished cells written by hand
(cell.json from the real plan, done.json with the cell's hash, evaluation JSONs with chosen values),
so that report / status code is checked against numbers fixed in the test."""
import json
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "xlmr_mp", "presets", "tiny.yaml")


def study_env():
    """The environment of a study CLI child: one thread, this checkout first, no launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def write_spec(path, corpus, **kw):
    """A small study spec (two language sets x two seeds, 8 x 32 batches); keys of kw replace or,
    given None, remove the defaults."""
    spec = {"name": "t", "corpus": corpus, "base_config": TINY,
            "overrides": ["train.global_batch=8", "train.micro_batch=8", "data.seq_length=32",
                          "model.max_positions=34"],
            "axes": {"languages": {"L2": ["en", "sw"], "L3": ["en", "sw", "fr"]}, "vocab": {"V500": 500},
                     "seed": [1, 2]},
            "budget": {"mode": "fixed_total", "tokens": 5120}, "spm": {"sample_size": 5000}}
    for k, v in kw.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return str(path)


def finish_cell(study, out, cell, evals=None, curve=None, valid=None, timing=None, cpu=None):
    """Write cell `cell` of `study` under `out` as finished: cell.json (real plan), done.json,
    eval/<task>.json {task, languages, step} for evals = {task: {lang: value}}, eval/curve/
    <task>-step<N>.json for curve = {(task, step): {lang: value}}, run/valid.jsonl for
    valid = {lang: bpc} at the last step, timing.json for timing = {phase: seconds} (and cpu)."""
    from xlmr_mp.study.plan import plan_cell
    from xlmr_mp.study.prepare import Preparation, _atomic_json
    from xlmr_mp.study.runner import cell_dir, cell_hash, cell_record
    prep = Preparation(study, out, log=lambda *_: None)
    plan = plan_cell(study, prep, cell, out)
    d = cell_dir(out, cell.name)
    os.makedirs(os.path.join(d, "eval", "curve"), exist_ok=True)
    _atomic_json(os.path.join(d, "cell.json"), cell_record(cell, plan))
    for task, langs in (evals or {}).items():
        _atomic_json(os.path.join(d, "eval", f"{task}.json"), {"task": task, "languages": langs, "step": plan.steps})
    for (task, step), langs in (curve or {}).items():
        _atomic_json(os.path.join(d, "eval", "curve", f"{task}-step{step}.json"),
                     {"task": task, "languages": langs, "step": step})
    if valid:
        os.makedirs(os.path.join(d, "run"), exist_ok=True)
        with open(os.path.join(d, "run", "valid.jsonl"), "w") as f:
            f.write(json.dumps(dict({f"bpc_{l}": v for l, v in valid.items()}, step=plan.steps)) + "\n")
    if timing:
        rec = {"seconds": timing, "built": [], "shared": True, "sittings": 1}
        if cpu:
            rec["cpu"] = cpu
        _atomic_json(os.path.join(d, "timing.json"), rec)
    _atomic_json(os.path.join(d, "done.json"), {"hash": cell_hash(cell), "step": plan.steps})
    return plan


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    d = str(tmp_path_factory.mktemp("corpus"))
    make_tiny_corpus(d)
    return d
