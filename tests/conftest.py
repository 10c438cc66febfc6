"""Shared fixtures and the test lanes.

Every test runs confined: run directories default to the session's temporary directory
(XLMR_MP_TEST_RUNS, inherited by spawned ranks), and a test that creates, changes or deletes
anything under the repository's own runs/ fails (see `repo_runs_untouched`).

Lanes: `pytest -m "not slow and not slurm"` is the fast lane (a few minutes on 2 quiet cores); the
full suite runs every test. A test taking more than ~8 s on a quiet 2-core machine (spawned ranks,
trainer CLI runs, compilers, clusters) is marked `slow` by its own decorator (a parametrized case:
`pytest.param(..., marks=pytest.mark.slow)`), or here in SLOW by node-id prefix for modules whose
every test is that slow; `slurm` (needs the local cluster) likewise in SLURM. An entry that matches
no collected test fails a full collection. Each feature area keeps a fast test where one exists."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CORPUS = os.path.abspath(os.path.join(ROOT, "..", "shared", "corpus"))


@pytest.fixture
def shared_corpus():
    """Path of ../shared/corpus; the test is skipped when it is not beside the checkout."""
    if not os.path.isdir(SHARED_CORPUS):
        pytest.skip("../shared/corpus not present")
    return SHARED_CORPUS


REPO_RUNS = os.path.join(ROOT, "runs")


def tree_state(path):
    """{relative path: (size, mtime_ns)} of every file and directory under `path` ({} when absent)."""
    out = {}
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            full = os.path.join(d, n)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            out[os.path.relpath(full, path)] = (st.st_size if n in files else 0, st.st_mtime_ns)
    return out


def tree_changes(before, after):
    """Sorted relative paths created, deleted or modified between two tree_state() snapshots."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


@pytest.fixture(scope="session", autouse=True)
def test_runs_root(tmp_path_factory):
    """Root of the default run directories of this session (tests/support/train_bodies.tiny_cfg)."""
    root = str(tmp_path_factory.mktemp("runs"))
    os.environ["XLMR_MP_TEST_RUNS"] = root
    return root


@pytest.fixture(autouse=True)
def repo_runs_untouched(request):
    """Fail a test that wrote into, or deleted from, the repository's runs/ (a README command's
    output lives there; tests must keep to their temporary directories)."""
    os.environ["XLMR_MP_TEST_NAME"] = re.sub(r"[^\w.-]+", "_", request.node.nodeid)[-120:]
    before = tree_state(REPO_RUNS)
    yield
    changed = tree_changes(before, tree_state(REPO_RUNS))
    if changed:
        pytest.fail(f"{request.node.nodeid} touched the repository's runs/: {changed[:10]}; give the run a "
                    f"temporary run_dir (tmp_path) instead", pytrace=False)


# More than ~8 s each on a quiet 2-core machine (multi-process gloo runs, trainer CLI runs, mpirun,
# the preprocessing benchmark), by node-id prefix: modules (or test-name prefixes) with no faster test.
SLOW = (
    "tests/train/test_train_parallel.py", "tests/train/test_train_resume.py",
    "tests/parallel/test_pipeline.py",
    "tests/train/test_train_resume_dropout.py", "tests/train/test_train_launchers.py",
    "tests/checkpoint/test_checkpoint_reshard.py::test_tp2pp2_to_dp4_and_back",
    "tests/tools/test_bench_preprocess.py",
    "tests/data/test_preprocess.py::test_killed_run", "tests/data/test_preprocess.py::test_mpi",
)
# Need the local two-node SLURM cluster (launch/slurm_cluster.sh; skipped without slurm-wlm).
SLURM = ("tests/tools/test_slurm.py",)


def pytest_collection_modifyitems(config, items):
    """Apply the `slow` / `slurm` markers of SLOW and SLURM (slurm tests are slow too)."""
    used = set()
    for item in items:
        for prefix in SLOW + SLURM:
            if item.nodeid.startswith(prefix):
                used.add(prefix)
                item.add_marker(pytest.mark.slow)
                if prefix in SLURM:
                    item.add_marker(pytest.mark.slurm)
    full = [os.path.abspath(str(a)) for a in config.args] in ([os.path.join(ROOT, "tests")], [ROOT])
    stale = [p for p in SLOW + SLURM if p not in used]
    if full and stale and not config.option.markexpr:
        raise pytest.UsageError(f"tests/conftest.py: SLOW/SLURM entries match no test: {stale}; update them")
