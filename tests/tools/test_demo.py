"""`bash launch/demo.sh`, the README's first command, end to end (2 training steps, into a temporary
OUT): it installs nothing on an installed machine and never reaches for system packages or test
tooling (apt-get / mpirun / SLURM are shimmed to fail loudly), and it trains with bits per character
for every one of the tiny corpus's seven languages; it scores the run (mBPC JSON and plot) and ends
by saying where the run's files are and what to run next, with the installed commands, and the
conversion command it prints works as printed."""
import os
import shlex
import subprocess

import pytest

from tests.support import train_bodies as b
@pytest.mark.slow
def test_demo_installs_only_what_it_needs_and_validates_every_language(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("apt-get", "apt", "mpirun", "slurmctld", "munged", "sudo"):
        (shims / tool).write_text(f"#!/bin/sh\necho called >> {tmp_path}/{tool}.called\nexit 1\n")
        (shims / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", OUT=str(tmp_path / "demo"), STEPS="2",
               OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "launch/demo.sh", "train.eval_interval=2"], cwd=b.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert not list(tmp_path.glob("*.called")), [f.name for f in tmp_path.glob("*.called")]
    assert "xlmr_mp already installed" in p.stdout
    valid = [line for line in p.stdout.splitlines() if "valid " in line and "bpc_" in line]
    assert valid, p.stdout[-2000:]
    for lang in ("en", "fr", "ru", "zh", "hi", "ur", "sw"):
        assert f"bpc_{lang} " in valid[-1], (lang, valid[-1])
    assert "WARNING" not in p.stdout
    out = str(tmp_path / "demo")
    tail = p.stdout[p.stdout.index("== done. This run:"):]
    for path in ("run/metrics.jsonl", "run/valid.jsonl", "run/config.yaml", "run/checkpoints/step_00000002",
                 "eval/mbpc.png", "eval/mbpc.json", "study.yaml"):
        assert os.path.join(out, path) in tail and os.path.exists(os.path.join(out, path)), (path, tail)
    nxt = [line.strip() for line in tail[tail.index("Next:"):].splitlines()[1:] if line.startswith("  xlmr-")]
    assert [c.split()[0] for c in nxt] == ["xlmr-evaluate", "xlmr-convert", "xlmr-study", "xlmr-train"], nxt
    convert = shlex.split(nxt[1])
    r = subprocess.run(convert, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "hf", "config.json")) and os.path.exists(os.path.join(out, "hf", "model.safetensors"))
    from xlmr_mp.study.spec import load_spec
    assert [c.name for c in load_spec(os.path.join(out, "study.yaml")).cells] == ["demo-1", "demo-2"]


def test_demo_leaves_test_and_cluster_tooling_to_ci():
    text = open(os.path.join(b.ROOT, "launch", "demo.sh")).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for word in (".ci/", "apt-get", "slurm", "munge", "mpi", "nvidia", "[test", "pytest"):
        assert word not in code, word
    ci = open(os.path.join(b.ROOT, ".ci", "install.sh")).read()
    assert "slurm-wlm munge" in ci and ".[test,mpi,hf,tb]" in ci and "install.d" in ci
