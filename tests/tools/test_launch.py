"""Launcher static checks that need no cluster: scripts parse, the paper-scale defaults are a valid
layout at their own #SBATCH sizes, layout errors name the options (before anything starts), the
rendezvous port derivation, and the torchrun launcher end to end on a bad layout."""
import os
import re
import subprocess
import sys

import pytest

from tests.tools.launchers import sbatch_opts, training_command
from xlmr_mp.config import grad_accumulation_steps, load_config
from xlmr_mp.precision import resolve_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["launch/xlmr_base.slurm", "launch/xlmr_large.slurm", "launch/preprocess.slurm",
           "launch/scaling_study.slurm", "launch/local.sh", "launch/slurm_cluster.sh",
           "launch/tools/slurm_common.sh"]


@pytest.mark.parametrize("path", SCRIPTS)
def test_scripts_parse(path):
    p = subprocess.run(["bash", "-n", os.path.join(ROOT, path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("path, nodes, micro, accum", [
    ("launch/xlmr_large.slurm", 64, 8, 2),
    ("launch/xlmr_base.slurm", 32, 16, 2),
    ("launch/scaling_study.slurm", 4, 16, 4),
])
def test_paper_defaults_are_a_valid_layout(tmp_path, path, nodes, micro, accum):
    opts = sbatch_opts(path)
    assert int(opts["nodes"]) == nodes
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8", "one task per GPU"
    assert opts["signal"] == "USR1@300" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["output"].startswith("logs/%x-")
    job = training_command(tmp_path, path)       # what the job at its own size would train with
    world = nodes * 8
    assert (job.world_size, job.tasks_per_node) == (world, 8)
    cfg = job.resolve()
    assert cfg.train.micro_batch == micro and grad_accumulation_steps(cfg) == accum
    assert cfg.train.micro_batch * accum * cfg.parallel.data == cfg.train.global_batch
    if path != "launch/scaling_study.slurm":
        assert cfg.train.global_batch == 8192 and cfg.train.train_steps == 1_500_000
        assert cfg.parallel.data == world   # TP = PP = 1, see the memory arithmetic in the header
    assert cfg.precision.dtype == "auto"    # the device's: fp16 on V100 (no bf16), bf16 on A100 / H100
    assert resolve_dtype(cfg.precision.dtype, "cuda", (7, 0)) == "fp16"
    assert resolve_dtype(cfg.precision.dtype, "cuda", (9, 0)) == "bf16"


def test_large_launcher_trains_the_560M_model_its_header_plans_for(tmp_path):
    """The Large job's model (built on the meta device from the config the launcher passes) has the
    parameter count the header's memory arithmetic starts from (P ~ 560M), and it is this sum."""
    import dataclasses
    import torch
    from xlmr_mp.model.xlmr import XLMRModel
    m = training_command(tmp_path, "launch/xlmr_large.slurm").resolve().model
    h, f, v = m.hidden_size, m.ffn_size, m.vocab_size
    layer = 4 * h * h + 2 * h * f + 9 * h + f   # QKV/out + FFN weights, biases, 2 LayerNorms
    embeddings = v * h + m.max_positions * h + 2 * h            # word and position tables, LayerNorm
    total = embeddings + m.num_layers * layer + (h * h + 3 * h + v)   # + the masked-LM head
    with torch.device("meta"):
        built = sum(p.numel() for p in XLMRModel(dataclasses.replace(m, make_vocab_size_divisible_by=1)).parameters())
    assert built == total and abs(total / 1e6 - 560) < 2


@pytest.mark.parametrize("bad, names", [
    (["parallel.tensor=4", "--world-size", "6"], ["world size 6", "parallel.tensor", "parallel.pipeline"]),
    (["parallel.pipeline=3"], ["world size 8", "parallel.tensor", "parallel.pipeline"]),
    (["parallel.tensor=3"], ["model.num_heads=4", "parallel.tensor=3"]),
    (["train.micro_batch=3"], ["train.global_batch=8", "train.micro_batch=3"]),
    (["parallel.data=3"], ["parallel.data=3"]),
    (["data.seq_length=65", "--world-size", "1"], ["data.seq_length=65", "model.max_positions=66", "data.seq_length=64"]),
])
def test_check_layout_names_the_options(bad, names):
    p = subprocess.run([sys.executable, "launch/tools/check_layout.py", "--preset", "tiny",
                        "--world-size", "8", *bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    first = p.stderr.splitlines()[0]
    assert first.startswith("layout error (preset tiny):")
    for n in names:
        assert n in first, p.stderr
    assert "Traceback" not in p.stderr


def test_check_layout_ok_prints_layout_and_records(tmp_path):
    p = subprocess.run([sys.executable, "launch/tools/check_layout.py", "--preset", "tiny",
                        "--world-size", "4", "--tasks-per-node", "2", "--record", "job-7-r0", "parallel.tensor=2",
                        f"run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    vals = dict(line.split("=", 1) for line in p.stdout.splitlines() if not line.startswith("#"))
    assert vals == {"RUN_DIR": str(tmp_path), "CKPT_DIR": f"{tmp_path}/checkpoints", "TP": "2", "PP": "1",
                    "DP": "2", "ACCUM": "1"}
    rec = tmp_path / "launch" / "job-7-r0"
    assert sorted(os.listdir(rec)) == ["command.txt", "commit.txt", "config.yaml", "diff.patch"]
    assert load_config(str(rec / "config.yaml")).parallel.tensor == 2
    assert re.search(r"commit: [0-9a-f]{40}", (rec / "commit.txt").read_text())
    # TP spanning nodes is legal but slow: warned, not refused
    p = subprocess.run([sys.executable, "launch/tools/check_layout.py", "--preset", "tiny",
                        "--world-size", "4", "--tasks-per-node", "1", "parallel.tensor=2", f"run_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "does not fit within one node" in p.stderr


def test_master_port_from_job_id():
    def port(job, restart):
        return int(subprocess.run(["bash", "-c", f"source launch/tools/slurm_common.sh; xlmr_master_port {job} {restart}"],
                                  cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    ports = {port(j, 0) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= p < 60000 for p in ports)
    # never in Linux's default ephemeral range, where an outgoing connection may hold the port
    assert all(port(j, r) < 32768 for j in (0, 3283, 4999, 123456, 2 ** 31 - 1) for r in (0, 9))
    assert port(123456, 0) == port(123456, 0) != port(123456, 1)   # same on every node; new after requeue


def test_batch_script_outside_slurm_and_bad_argument_fail_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", "launch/xlmr_base.slurm", "--preset", "tiny"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not inside a SLURM job" in p.stderr
    p = subprocess.run(["bash", "launch/xlmr_base.slurm", "train.micro_batch"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "'train.micro_batch'" in p.stderr and "key.sub=value" in p.stderr
    p = subprocess.run(["bash", "launch/preprocess.slurm", "--input", "x"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--tokenizer" in p.stderr


def test_local_sh_bad_layout_fails_before_torchrun(tmp_path):
    p = subprocess.run(["bash", "launch/local.sh", "--preset", "tiny", "parallel.tensor=2",
                        f"run_dir={tmp_path}"], cwd=ROOT, env=dict(os.environ, NPROC="3"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert "world size 3 is not divisible by parallel.tensor x parallel.pipeline" in p.stderr
    assert "nothing was started" in p.stderr and "torchrun:" not in p.stdout
    assert not os.path.exists(tmp_path / "launch")


def test_sweep_cells_are_valid_configs(tmp_path):
    """Every array task of the scaling study trains a valid config (its cell's overrides on the job's
    defaults, at the job's world size), the task past the last cell stops naming the fix, and the
    #SBATCH --array range covers exactly the cells."""
    last = int(sbatch_opts("launch/scaling_study.slurm")["array"].split("-")[1])
    run_dirs = []
    for task in range(last + 1):
        job = training_command(tmp_path, "launch/scaling_study.slurm", task=task, DATA_ROOT="/data")
        cfg = job.resolve()
        assert cfg.model.hidden_size % cfg.model.num_heads == 0, task
        assert cfg.train.global_batch == 2048 and job.world_size == 32, task
        run_dirs.append(next(o for o in job.overrides if o.startswith("run_dir=")))
    assert len(set(run_dirs)) == len(run_dirs)      # one run directory per cell
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="1", SLURM_ARRAY_TASK_ID=str(last + 1))
    p = subprocess.run(["bash", "launch/scaling_study.slurm"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and f"array index {last + 1} has no cell" in p.stderr and "fix --array" in p.stderr
