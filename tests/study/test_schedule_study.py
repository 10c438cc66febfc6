"""tools/schedule_study.py and launch/studies/schedules.yaml without training: the shipped spec's dry
run (the runs, their resolved schedules and branch points), bad specs (exit 2 naming the key) and the
results files."""
import copy
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.support.prep import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "schedule_study.py")
SPEC = os.path.join(ROOT, "launch", "studies", "schedules.yaml")
LANGS = ["en", "fr", "de", "ru", "zh", "es", "ar", "hi", "sw", "ur"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("schedule_study")


def _commands(text: str) -> list:
    return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def _settings(cmd: list) -> dict:
    """key -> value of a train command's overrides (the last one of a key wins, as in the trainer)."""
    return dict(o.split("=", 1) for o in cmd[5:])


def test_shipped_spec_dry_run(tool, tmp_path, capsys):
    from xlmr_mp.config import load_config
    out = str(tmp_path / "study")
    assert tool.main(["--dry-run", "--out", out]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert not os.path.exists(out), "a dry run writes nothing"
    train = [c for c in cmds if c[1:3] == ["-m", "xlmr_mp.train"]]
    evals = [c for c in cmds if c[1:3] == ["-m", "xlmr_mp.cli.evaluate"]]
    assert [c[2] for c in cmds[:2]] == ["xlmr_mp.cli.train_spm", "xlmr_mp.cli.preprocess_data"]
    assert len(train) == 4 and len(evals) == 4 and len(cmds) == 10
    names = ["static", "annealed", "decay_high", "decay_flat"]
    assert [_settings(c)["run_dir"] for c in train] == [os.path.join(out, n) for n in names]
    branch = os.path.join(out, "annealed", "checkpoints", "step_00000480")
    assert [_settings(c).get("checkpoint.branch_from") for c in train] == [None, None, branch, branch]
    assert [c[c.index("--model") + 1] for c in evals] == [os.path.join(out, n, "checkpoints") for n in names]
    assert [c[c.index("--out") + 1] for c in evals] == [os.path.join(out, n, "mbpc.json") for n in names]

    cfg = {n: load_config(c[4], c[5:]) for n, c in zip(names, train)}
    for c in cfg.values():
        assert c.data.languages == LANGS and c.train.train_steps == 600 and c.checkpoint.interval == 480
        assert (c.optim.decay, c.optim.wsd_decay, c.optim.decay_steps) == ("wsd", "1-sqrt", 120)
        assert (c.model.num_layers, c.model.hidden_size, c.data.seq_length, c.train.global_batch) == (4, 128, 128, 32)
    s = cfg["static"].data
    assert s.alpha == 0.3 and s.alpha_schedule is None and s.language_schedule is None and s.mask_schedule is None

    def phases(sched, key):
        return [(p["step"], p[key]) for p in sched]
    a = cfg["annealed"]
    assert phases(a.data.alpha_schedule, "alpha") == [(0, 0.7), (240, 0.5), (480, 0.3)]
    assert phases(a.data.mask_schedule, "mask_prob") == [(0, 0.3), (240, 0.15), (480, 0.05)]
    assert phases(a.data.language_schedule, "languages") == [(0, LANGS[:6]), (240, LANGS[:8]), (480, LANGS)]
    assert a.train.batch_warmup == {"start": 8, "tokens": int(0.05 * 600 * 32 * 128)}
    hi, flat = cfg["decay_high"], cfg["decay_flat"]
    assert phases(hi.data.language_schedule, "languages") == [(0, ["en", "fr", "de", "ru", "zh"])]
    assert phases(flat.data.alpha_schedule, "alpha") == [(0, 0.7), (240, 0.5), (480, 0.01)]
    # the rest of each branch is annealed's (inherited overrides)
    assert hi.data.alpha_schedule == a.data.alpha_schedule and hi.data.mask_schedule == a.data.mask_schedule
    assert flat.data.language_schedule == a.data.language_schedule and flat.train.batch_warmup == a.train.batch_warmup


def _bad(raw):
    raw["runs"][3]["branch_at"] = 470
    return raw


def _reordered(raw):
    raw["runs"][1], raw["runs"][2] = raw["runs"][2], raw["runs"][1]
    return raw


BAD = {
    "unknown_top_key": (lambda r: r.update(run=r.pop("runs")), ["unknown key run"]),
    "unknown_run_key": (lambda r: r["runs"][2].update(branch_step=480), ["runs[2].branch_step"]),
    "unknown_run_config_key": (lambda r: r["runs"][1]["overrides"].update({"data.alpha_schedul": 0.3}),
                               ["runs[1] (annealed).overrides", "data.alpha_schedul"]),
    "schedule_language_not_in_languages": (
        lambda r: r["runs"][2]["overrides"].update({"data.language_schedule": [{"step": 0, "languages": ["en", "xx"]}]}),
        ["runs[2] (decay_high)", "data.language_schedule", "xx"]),
    "missing_parent": (lambda r: r["runs"][2].update(parent="anealed"), ["runs[2] (decay_high).parent='anealed'", "not a run"]),
    "parent_runs_later": (_reordered, ["runs[1] (decay_high).parent='annealed' runs later", "move decay_high after annealed"]),
    "branch_at_not_a_checkpoint_step": (_bad, ["runs[3] (decay_flat).branch_at=470", "keeps 480, 600"]),
    "parent_without_branch_at": (lambda r: r["runs"][2].pop("branch_at"), ["runs[2] (decay_high)", "branch_at"]),
    "tool_set_key": (lambda r: r["overrides"].append("run_dir=/tmp/x"), ["overrides: run_dir"]),
    "high_resource_not_in_languages": (lambda r: r.update(high_resource=["en", "xx"]), ["high_resource", "xx"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_exit_2_names_the_key(tool, tmp_path, capsys, case):
    with open(SPEC) as f:
        raw = copy.deepcopy(yaml.safe_load(f))
    mutate, expected = BAD[case]
    mutate(raw)
    path = str(tmp_path / "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    assert tool.main(["--study", path, "--dry-run", "--out", str(tmp_path / "out")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "", "nothing is printed (or run) before the spec is valid"
    assert cap.err.startswith(f"spec error: {path}: ")
    for text in expected:
        assert text in cap.err


def test_cli_exit_code(tmp_path):
    path = str(tmp_path / "bad.yaml")
    with open(SPEC) as f:
        raw = yaml.safe_load(f)
    raw["runs"][2]["parent"] = "nope"
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    r = subprocess.run([sys.executable, TOOL, "--study", path, "--dry-run", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and "parent='nope'" in r.stderr and r.stdout == ""


def test_results_files(tool, tmp_path):
    study = tool.load_study(SPEC)
    table = {r.name: {l: 1.0 + i + 0.1 * j for j, l in enumerate(LANGS)} for i, r in enumerate(study.runs)}
    res = str(tmp_path / "res")
    summary = tool.write_results(study, table, res, 12.5)
    assert sorted(os.listdir(res)) == ["mbpc.png", "results.csv", "results.json"]   # no temporaries left
    with open(os.path.join(res, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert (saved["steps"], saved["branch_at"]) == (600, 480)
    assert saved["mean_mbpc"]["decay_high"] == pytest.approx(3.0 + 0.45)
    with open(os.path.join(res, "results.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "run,language,mbpc" and len(rows) == 1 + 4 * 10 and rows[1] == "static,en,1.0000"
    with open(os.path.join(res, "mbpc.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
