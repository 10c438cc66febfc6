import os

import pytest
import yaml

from xlmr_mp.config import ConfigError, dump_config, grad_accumulation_steps, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "xlmr_mp", "presets", "tiny.yaml")


def test_tiny_preset_loads_and_overrides():
    cfg = load_config(TINY, ["model.hidden_size=64", "optim.lr=1e-3", "optim.betas=[0.9,0.99]"])
    assert cfg.model.hidden_size == 64
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("override,fragment", [
    (["model.hiden_size=3"], "model.hiden_size"),
    (["optim.lr=abc"], "optim.lr"),
    (["parallel.schedule=zigzag"], "parallel.schedule"),
    (["model.num_heads=3"], "model.num_heads"),
    (["train.global_batch=10", "train.micro_batch=4"], "train.global_batch"),
])
def test_bad_options_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(TINY, override)


def test_layout_checks_world_size():
    with pytest.raises(ConfigError, match="parallel.tensor"):
        load_config(TINY, ["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)
    cfg = load_config(TINY, ["parallel.tensor=2", "train.global_batch=16", "train.micro_batch=2"], world_size=4)
    assert cfg.parallel.data == 2 and grad_accumulation_steps(cfg) == 4


def test_seq_length_beyond_the_position_table_fails_before_allocation():
    """Positions count from pad_id + 1, so data.seq_length <= model.max_positions - pad_id - 1."""
    cfg = load_config(TINY, ["data.seq_length=64", "model.max_positions=66"])
    assert cfg.data.seq_length == cfg.model.max_positions - cfg.model.pad_id - 1
    with pytest.raises(ConfigError, match=r"data\.seq_length=65 needs model\.max_positions >= 67.*"
                                          r"model\.max_positions=66; use data\.seq_length=64"):
        load_config(TINY, ["data.seq_length=65", "model.max_positions=66"])
    with pytest.raises(ConfigError, match=r"data\.seq_length=512 .*model\.max_positions=66"):
        load_config(TINY, ["data.seq_length=512"], world_size=2)


def test_dump_roundtrip(tmp_path):
    cfg = load_config(TINY, ["optim.lr=2e-3"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, str(out))
    again = load_config(str(out))
    assert again == cfg
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == 2e-3


def test_yaml_files_missing_or_invalid_name_the_file(tmp_path):
    """One reader (config.read_yaml) for presets and study specs: a missing file names the path and
    where the shipped ones live; bad YAML names the file."""
    from xlmr_mp.config import ConfigError, load_config
    from xlmr_mp.study.spec import SpecError, load_spec
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist \(a preset is --preset NAME or --config preset:NAME, NAME one of base, large, mmbert_like, tiny, xl, xxl\)"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(str(bad))
    with pytest.raises(SpecError, match=r"study spec .*missing\.yaml does not exist"):
        load_spec(str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match=r"bad\.yaml: invalid YAML"):
        load_spec(str(bad))
