"""The SLURM launchers run as SLURM would start them, without a cluster (tests/tools, tests/train):
the job's environment at the script's own #SBATCH size and a stand-in `scontrol`, then either

- `dry_run`: the real dry run (XLMR_MP_DRY_RUN=1: layout check, rank 0 built, config recorded,
  srun never started), or
- `training_command`: a stand-in interpreter (the launchers' PYTHON) that records the first
  Python command the job runs, its layout check (the preset and every override the job would train
  with), and fails it, so the job stops there in a fraction of a second.
"""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sbatch_opts(path: str) -> dict:
    """The job's #SBATCH options ({long option: value or None}), as sbatch reads them from the script."""
    opts = {}
    for line in open(os.path.join(ROOT, path)):
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


def _job_env(tmp_path, script: str, task: int, **extra) -> dict:
    """The environment SLURM gives the batch script of a job at its own #SBATCH size."""
    opts = sbatch_opts(script)
    nodes, tpn = int(opts["nodes"]), int(opts["ntasks-per-node"])
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text("#!/bin/sh\necho node001\n")
    (fake / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="t",
               SLURM_NTASKS=str(nodes * tpn), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tpn),
               SLURM_JOB_NODELIST="node001", SLURM_ARRAY_TASK_ID=str(task), RUN_DIR=str(run), RUN_ROOT=str(run))
    env.update(extra)
    return env


def dry_run(tmp_path, script: str, args=()):
    """Run `script` through the real dry run, stopping before srun; return (the preset the job
    logged, the resolved config it recorded)."""
    from xlmr_mp.config import load_config
    env = _job_env(tmp_path, script, 0, XLMR_MP_DRY_RUN="1")
    p = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "srun not started" in p.stdout
    run = tmp_path / "run"
    recorded = [os.path.join(d, "config.yaml") for d, _, files in os.walk(run) if "config.yaml" in files]
    assert len(recorded) == 1, recorded
    preset = re.search(r"; preset (\S+); overrides:", p.stdout + p.stderr).group(1)
    return preset, load_config(recorded[0])


class TrainingCommand:
    """What a job would train with: `config` (preset:NAME or a file), `overrides` (key=value, in the
    order the launcher passes them), `world_size` and `tasks_per_node`, read from its layout check."""

    def __init__(self, argv: list):
        assert argv[0] == "launch/tools/check_layout.py", argv
        named, self.overrides, i = {}, [], 1
        while i < len(argv):
            if argv[i].startswith("--"):
                named[argv[i]] = argv[i + 1]
                i += 2
            else:
                self.overrides.append(argv[i])
                i += 1
        self.config = named["--config"]
        self.world_size, self.tasks_per_node = int(named["--world-size"]), int(named["--tasks-per-node"])

    def resolve(self):
        from xlmr_mp.config import load_config
        return load_config(self.config, self.overrides, world_size=self.world_size)


def training_command(tmp_path, script: str, args=(), task: int = 0, **env) -> TrainingCommand:
    """Run `script` as a SLURM job whose interpreter records its argv and fails: the launcher's first
    Python command (the layout check) is recorded and the job stops there (exit 2)."""
    rec = tmp_path / "python_calls"
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{rec}"\nexit 3\n')
    py.chmod(0o755)
    p = subprocess.run(["bash", script, *args], cwd=ROOT, env=_job_env(tmp_path, script, task, PYTHON=str(py), **env),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "layout check failed" in p.stderr and rec.exists(), p.stdout + p.stderr
    return TrainingCommand(rec.read_text().splitlines())
