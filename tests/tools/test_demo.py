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


def _sandbox(tmp_path):
    """A PATH holding only a recording `python` (pip succeeds, every import check fails: a fresh
    machine), a recording `apt-get`, `id` answering root, and the few plain tools the install scripts
    use; any other program (sudo, mpirun, pytest, nvidia-smi, ...) is not found and fails the script."""
    import shutil
    box, log = tmp_path / "bin", tmp_path / "calls"
    box.mkdir()
    for tool in ("bash", "dirname"):
        (box / tool).symlink_to(shutil.which(tool))
    scripts = {"python": 'case "$1 $2" in "-m pip") exit 0 ;; esac\nexit 1',
               "apt-get": "exit 0", "id": 'echo 0'}
    for name, body in scripts.items():
        (box / name).write_text(f'#!{shutil.which("bash")}\necho "{name} $*" >> {log}\n{body}\n')
        (box / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=str(box), HOME=str(tmp_path))
    return env, log


def _calls(log, prefix):
    return [line[len(prefix):] for line in log.read_text().splitlines() if line.startswith(prefix)]


def test_demo_installs_torch_and_the_package_only_ci_installs_the_test_and_cluster_tooling(tmp_path):
    """On a fresh machine the demo's install step pip-installs torch and `-e .` (no test extras) and
    nothing else: no system package, no CI script (it then stops: the installed commands are not on
    this PATH). `.ci/install.sh` on the same machine installs the test extras, MPI, SLURM + munge and
    runs its install.d steps (the CUDA compiler wheels, SLURM)."""
    import shutil
    bash = shutil.which("bash")
    env, log = _sandbox(tmp_path)
    p = subprocess.run([bash, "launch/demo.sh"], cwd=b.ROOT, env=dict(env, OUT=str(tmp_path / "demo")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not on PATH" in p.stderr, p.stdout + p.stderr
    pip = "python -m pip install -q --disable-pip-version-check "
    assert _calls(log, pip) == ["torch==2.13.0", "-e ."]
    assert _calls(log, "apt-get") == [] and not (tmp_path / "demo").exists()
    log.unlink()
    p = subprocess.run([bash, ".ci/install.sh"], cwd=b.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    installs = _calls(log, pip)
    assert installs[:2] == ["torch==2.13.0", "-e .[test,mpi,hf,tb]"], installs
    assert any("nvidia-cuda-nvcc-cu12" in c for c in installs[2:]), installs          # install.d/cuda_toolchain.sh
    apt = [c.split() for c in _calls(log, "apt-get ") if " install " in f" {c} "]
    assert {"libopenmpi-dev", "openmpi-bin", "slurm-wlm", "munge"} <= {w for c in apt for w in c}, apt
    assert ["install", "-y", "-qq", "slurm-wlm", "munge"] in apt, apt                  # install.d/slurm.sh
