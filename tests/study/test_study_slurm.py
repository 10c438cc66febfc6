"""`tools/study.py run --slurm` on the local SLURM cluster (launch/slurm_cluster.sh): preparation on
the submit side, one array task per unfinished cell through launch/scaling_study.slurm, each task
trains its cell and runs `tools/study.py finish` (evaluation, done marker); a second submit has
nothing left to do."""
import glob
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.tools.test_slurm import slurm  # noqa: F401  (the session fixture that starts the local cluster)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "xlmr_mp", "presets", "tiny.yaml")


@pytest.mark.slow
@pytest.mark.slurm
def test_study_runs_as_a_job_array(slurm, tmp_path):  # noqa: F811
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    corpus = str(tmp_path / "corpus")
    make_tiny_corpus(corpus, languages=["en", "sw"], scale=0.5)
    spec = str(tmp_path / "spec.yaml")
    yaml.safe_dump({"name": "arr", "corpus": corpus, "base_config": TINY,
                    "overrides": ["train.global_batch=8", "train.micro_batch=8", "data.seq_length=32",
                                  "model.max_positions=34", "train.eval_batches=2"],
                    "axes": {"languages": {"L2": ["en", "sw"]}, "vocab": [400], "seed": [1, 2]},
                    "budget": {"mode": "fixed_total", "tokens": 2560}, "spm": {"sample_size": 3000}},
                   open(spec, "w"))
    out = str(tmp_path / "out")
    args = [sys.executable, os.path.join(ROOT, "tools", "study.py"), "run", spec, "--out", out, "--slurm"] + \
        [f"--sbatch-arg={a}" for a in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                                       "--cpus-per-task=1", "--time=10")]
    p = subprocess.run(args, cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "--array=0-1" in p.stdout
    lines = [l for l in open(os.path.join(out, "slurm", "cells.txt")) if not l.startswith("#")]
    assert [l.split()[0] for l in lines] == ["arr-1", "arr-2"]
    assert all(f"run_dir={out}/cells/{l.split()[0]}/run" in l for l in lines)
    t0 = time.time()
    while time.time() - t0 < 600 and len(glob.glob(os.path.join(out, "cells", "*", "done.json"))) < 2:
        time.sleep(1)
    logs = "".join(open(f).read()[-3000:] for f in glob.glob(os.path.join(out, "slurm", "*.out")))
    assert len(glob.glob(os.path.join(out, "cells", "*", "done.json"))) == 2, logs
    for c in ("arr-1", "arr-2"):
        assert os.path.exists(os.path.join(out, "cells", c, "run", "checkpoints", "latest"))
    p = subprocess.run(args, cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "nothing to submit" in p.stdout, p.stdout + p.stderr
