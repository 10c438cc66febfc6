"""The SLURM launchers change only the cluster layout: the config a job would train with (the batch
script run for real through launch/tools/slurm_common.sh up to srun, XLMR_MP_DRY_RUN=1) has its
preset's learning rate and warmup, and those are the values the presets cite (RoBERTa, Liu et al.
2019, table 9: Large 4e-4 / 30k, Base 6e-4 / 24k); a key=value argument still wins."""
import pytest

from tests.tools.launchers import dry_run
from xlmr_mp.config import load_config

CITED = {"preset:large": (4e-4, 30000), "preset:base": (6e-4, 24000)}


@pytest.mark.parametrize("script", ["launch/xlmr_large.slurm", "launch/xlmr_base.slurm",
                                    "launch/scaling_study.slurm"])
def test_launcher_defaults_keep_the_presets_recipe(tmp_path, script):
    preset, cfg = dry_run(tmp_path, script)
    ref = load_config(preset)
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (ref.optim.lr, ref.optim.warmup_steps) == CITED[preset]
    assert (cfg.optim.decay, cfg.optim.betas, cfg.optim.weight_decay, cfg.model.dropout) == \
        (ref.optim.decay, ref.optim.betas, ref.optim.weight_decay, ref.model.dropout)
    assert cfg.model.hidden_size == ref.model.hidden_size and cfg.model.num_layers == ref.model.num_layers
    assert cfg.precision.dtype == "auto"    # fp16 on the paper's V100s, bf16 where the GPU has it


def test_user_override_wins_over_the_preset(tmp_path):
    _, cfg = dry_run(tmp_path, "launch/xlmr_large.slurm", ["optim.lr=1e-4", "optim.warmup_steps=500"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-4, 500)
