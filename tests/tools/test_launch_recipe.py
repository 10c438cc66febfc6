"""The SLURM launchers change only the cluster layout: the config a job would train with (the batch
script run for real through launch/tools/slurm_common.sh up to srun, XLMR_MP_DRY_RUN=1) has its
preset's learning rate and warmup, and those are the values the presets cite (RoBERTa, Liu et al.
2019, table 9: Large 4e-4 / 30k, Base 6e-4 / 24k); a key=value argument still wins."""
import os
import re
import subprocess

import pytest

from xlmr_mp.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CITED = {"preset:large": (4e-4, 30000), "preset:base": (6e-4, 24000)}


def _sbatch(path, key):
    for line in open(os.path.join(ROOT, path)):
        m = re.match(rf"#SBATCH\s+--{key}=(\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"{path} has no #SBATCH --{key}")


def _resolved(tmp_path, script, args=()):
    """Run `script` as SLURM would start it (fake allocation at its #SBATCH size), stopping before srun;
    return (the preset it used, the resolved config it recorded)."""
    nodes, tpn = int(_sbatch(script, "nodes")), int(_sbatch(script, "ntasks-per-node"))
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text("#!/bin/sh\necho node001\n")
    (fake / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", XLMR_MP_DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="t",
               SLURM_NTASKS=str(nodes * tpn), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tpn),
               SLURM_JOB_NODELIST="node001", SLURM_ARRAY_TASK_ID="0", RUN_DIR=str(run), RUN_ROOT=str(run))
    p = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "srun not started" in p.stdout
    recorded = [os.path.join(d, "config.yaml") for d, _, files in os.walk(run) if "config.yaml" in files]
    assert len(recorded) == 1, recorded
    preset = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', open(os.path.join(ROOT, script)).read()).group(1)
    return preset, load_config(recorded[0])


@pytest.mark.parametrize("script", ["launch/xlmr_large.slurm", "launch/xlmr_base.slurm",
                                    "launch/scaling_study.slurm"])
def test_launcher_defaults_keep_the_presets_recipe(tmp_path, script):
    preset, cfg = _resolved(tmp_path, script)
    ref = load_config(preset)
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (ref.optim.lr, ref.optim.warmup_steps) == CITED[preset]
    assert (cfg.optim.decay, cfg.optim.betas, cfg.optim.weight_decay, cfg.model.dropout) == \
        (ref.optim.decay, ref.optim.betas, ref.optim.weight_decay, ref.model.dropout)
    assert cfg.model.hidden_size == ref.model.hidden_size and cfg.model.num_layers == ref.model.num_layers
    assert cfg.precision.dtype == "auto"    # fp16 on the paper's V100s, bf16 where the GPU has it


def test_user_override_wins_over_the_preset(tmp_path):
    _, cfg = _resolved(tmp_path, "launch/xlmr_large.slurm", ["optim.lr=1e-4", "optim.warmup_steps=500"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-4, 500)
