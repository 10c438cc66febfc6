"""tools/preprocess_data.py when it fails: a bad line in a later language keeps the languages finished
before it (complete, byte-identical to a clean run) and says so; the failing language leaves no
folder, temporary file or shard behind; a helper that never answers fails the run after
--task-timeout with a message naming the file, instead of blocking forever."""
import filecmp
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.data.corpus_io import CorpusError
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus

BAD = b"bad \xff\xfe line\n"


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    d = tmp_path_factory.mktemp("fail")
    make_tiny_corpus(d / "corpus", languages=["en", "fr", "ru"], scale=0.3)
    model = train_tiny_spm(d / "corpus", d / "spm", vocab_size=500)
    clean = d / "clean"
    run_tool("preprocess_data", "--input", d / "corpus", "--tokenizer", model, "--output-dir", clean, "--quiet")
    return dict(dir=d, model=model, clean=clean)


def _corpus_with_bad_line(prep, tmp_path, lang):
    d = tmp_path / "in"
    shutil.copytree(prep["dir"] / "corpus", d)
    with open(d / f"{lang}.txt", "ab") as f:
        f.write(BAD)
    return d, sum(1 for _ in open(d / f"{lang}.txt", "rb"))


def _everything(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_in_last_language_keeps_the_finished_ones(prep, tmp_path, workers):
    d, line = _corpus_with_bad_line(prep, tmp_path, "ru")
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", prep["model"], "--output-dir", out, "--quiet",
                 "--workers", workers, "--chunk-bytes", 4096, check=False)
    assert r.returncode == 2
    assert f"ru.txt:{line}: invalid UTF-8" in r.stderr
    assert "kept the finished languages en, fr (complete)" in r.stderr and "--languages ru" in r.stderr
    files = [f"{lang}/{s}.{e}" for lang in ("en", "fr") for s in ("test", "train", "valid") for e in ("bin", "idx")]
    assert _everything(out) == sorted(["en", "fr"] + files), "no ru/ folder, no temporary files"
    for f in files:
        assert filecmp.cmp(out / f, prep["clean"] / f, shallow=False), f


def test_bad_line_in_first_language_leaves_nothing(prep, tmp_path):
    d, line = _corpus_with_bad_line(prep, tmp_path, "en")
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", prep["model"], "--output-dir", out, "--quiet",
                 "--workers", 2, check=False)
    assert r.returncode == 2 and f"en.txt:{line}" in r.stderr and "nothing was written" in r.stderr
    assert _everything(out) == []


class _SilentResult:
    """An AsyncResult whose worker never answers (a helper killed by the OOM killer, or hung)."""

    def ready(self):
        return False

    def get(self, timeout=None):
        import multiprocessing
        import time
        time.sleep(timeout)
        raise multiprocessing.TimeoutError()


class _SilentPool:
    def apply_async(self, fn, args):
        return _SilentResult()


def test_a_helper_that_never_answers_fails_after_the_timeout(prep, tmp_path):
    from xlmr_mp.cli import preprocess_data as P
    from xlmr_mp.data.split import SPLITS
    args = P.build_parser().parse_args(["--input", str(prep["dir"] / "corpus"), "--tokenizer", prep["model"],
                                        "--output-dir", str(tmp_path / "out"), "--workers", "2", "--task-timeout", "0.5"])
    P._init_worker(args.tokenizer)
    path = str(prep["dir"] / "corpus" / "en.txt")
    units = [("en", path, 0, None, 1, [str(tmp_path / "out" / "en" / s) for s in SPLITS])]
    progress = SimpleNamespace(update=lambda *a: None)
    with pytest.raises(CorpusError, match=r"gave no answer for 0.5 s on a chunk of .*en.txt \(en\).*--task-timeout"):
        P.process_units(args, _SilentPool(), units, np.uint16, progress, lambda u, sink: sink.finalize())
    assert _everything(tmp_path / "out") == []
    r = run_tool("preprocess_data", "--input", prep["dir"] / "corpus", "--tokenizer", prep["model"], "--output-dir",
                 tmp_path / "o2", "--task-timeout", 0, check=False)
    assert r.returncode == 2 and "--task-timeout 0.0: must be > 0" in r.stderr


@pytest.mark.slow          # mpirun
def test_mpi_failure_removes_its_shards(prep, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    d, line = _corpus_with_bad_line(prep, tmp_path, "fr")
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", prep["model"], "--output-dir", out, "--quiet",
                 "--range-bytes", 2000, prefix=["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"],
                 check=False, timeout=240)
    assert r.returncode != 0 and f"fr.txt:{line}" in r.stderr, r.stderr[-2000:]
    assert _everything(out) == [], "an MPI run that failed while encoding leaves no shard or folder"


def _sleep_forever():
    import time
    time.sleep(1e9)


def test_close_pool_never_hangs_on_a_blocked_terminate():
    """The tool's pool shutdown returns and kills the helpers even when Pool.terminate() blocks
    (seen once in CI: preprocess_data hung 300 s after a bad line with --workers 3)."""
    import multiprocessing as mp
    import threading
    import time
    from xlmr_mp.cli.preprocess_data import close_pool

    helper = mp.get_context("spawn").Process(target=_sleep_forever, daemon=True)
    helper.start()

    class BlockedPool:
        _pool = [helper]

        def terminate(self):
            time.sleep(1e9)

    t = threading.Thread(target=close_pool, args=(BlockedPool(), 0.5), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(20)
    assert not t.is_alive(), "close_pool hung on a blocked terminate()"
    helper.join(10)
    assert not helper.is_alive() and helper.exitcode is not None
    assert time.monotonic() - t0 < 20
