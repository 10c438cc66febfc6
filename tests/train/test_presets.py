"""Run presets inside the package (xlmr_mp/presets/): each one loads by --preset NAME, by
--config preset:NAME and by `preset: NAME` at the top of a YAML file of one's own; precedence is
preset < config file < key=value; an unknown name lists the shipped ones; study specs take
`preset: NAME` or `base_config: preset:NAME`; the trainer's --preset is the same mechanism."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from xlmr_mp.config import ConfigError, config_to_dict, load_config
from xlmr_mp.presets import PRESET_DIR, preset_names, preset_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = ["base", "large", "mmbert_like", "tiny", "xl", "xxl"]


def test_the_presets_are_in_the_package():
    assert preset_names() == SHIPPED
    assert PRESET_DIR == os.path.join(ROOT, "xlmr_mp", "presets")
    assert not os.path.exists(os.path.join(ROOT, "launch", "configs"))


@pytest.mark.parametrize("name", SHIPPED)
def test_three_ways_to_name_a_preset_give_the_same_config(name, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"preset: {name}\n")
    a = config_to_dict(load_config(preset=name, validate=False))
    assert a == config_to_dict(load_config(f"preset:{name}", validate=False))
    assert a == config_to_dict(load_config(str(mine), validate=False))
    assert a == config_to_dict(load_config(preset_path(name), validate=False))
    raw = yaml.safe_load(open(preset_path(name)))
    assert a["run_dir"] == raw["run_dir"] and a["train"]["global_batch"] == raw["train"]["global_batch"]


def test_precedence_preset_then_file_then_overrides(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: tiny\ntrain:\n  train_steps: 77\n  seed: 5\n")
    cfg = load_config(str(mine), ["train.seed=9"], validate=False)
    assert (cfg.model.hidden_size, cfg.train.train_steps, cfg.train.seed) == (64, 77, 9)
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  train_steps: 33\n")
    cfg = load_config(str(plain), ["optim.lr=1e-3"], preset="tiny", validate=False)
    assert (cfg.model.hidden_size, cfg.train.train_steps, cfg.optim.lr) == (64, 33, 1e-3)


def test_unknown_preset_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of base, large, mmbert_like, tiny, xl, xxl"):
        load_config("preset:huge")
    with pytest.raises(ConfigError, match="unknown preset '../tiny'"):
        load_config(preset="../tiny")
    nested = tmp_path / "n.yaml"
    nested.write_text("preset: [tiny]\n")
    with pytest.raises(ConfigError, match=r"n\.yaml: preset: \['tiny'\] must name a shipped preset"):
        load_config(str(nested))


def test_study_specs_name_presets(tmp_path):
    from xlmr_mp.study.spec import SpecError, base_config_path
    spec = str(tmp_path / "s.yaml")
    assert base_config_path({"preset": "tiny"}, spec) == preset_path("tiny")
    assert base_config_path({"base_config": "preset:base"}, spec) == preset_path("base")
    own = tmp_path / "own.yaml"
    own.write_text("preset: tiny\n")
    assert base_config_path({"base_config": str(own)}, spec) == str(own)
    with pytest.raises(SpecError, match="give exactly one of preset"):
        base_config_path({"preset": "tiny", "base_config": str(own)}, spec)
    with pytest.raises(SpecError, match="s.yaml: preset: unknown preset 'nano'"):
        base_config_path({"preset": "nano"}, spec)


def test_shipped_studies_use_the_preset_key():
    from xlmr_mp.study.spec import base_config_path
    studies = os.path.join(ROOT, "launch", "studies")
    for f in sorted(os.listdir(studies)):
        raw = yaml.safe_load(open(os.path.join(studies, f)))
        assert raw.get("preset") == "tiny" and "base_config" not in raw, f
        assert base_config_path(raw, f) == preset_path("tiny")


def test_trainer_and_planner_take_preset():
    r = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--preset", "huge"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr and "tiny" in r.stderr
    r = subprocess.run([sys.executable, "-m", "xlmr_mp.cli.plan", "--preset", "large", "--gpu", "H100", "--nodes", "64",
                        "--json"], capture_output=True, text=True, timeout=120, cwd=os.path.dirname(ROOT))
    assert r.returncode == 0 and '"world": 512' in r.stdout, r.stderr
