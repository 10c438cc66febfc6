"""Tests keep to their temporary directories: the tiny config's default run_dir is the session's
temporary root, not the preset's relative runs/tiny (where the README's Training command writes),
and the guard in conftest.py notices a file created, changed or deleted under a watched tree."""
import os

from tests.support import train_bodies as b
from tests.conftest import REPO_RUNS, tree_changes, tree_state


def test_default_run_dir_is_temporary(test_runs_root):
    run_dir = b.tiny_cfg().run_dir
    assert os.path.isabs(run_dir) and run_dir.startswith(test_runs_root + os.sep)
    assert not os.path.realpath(run_dir).startswith(os.path.realpath(REPO_RUNS))
    assert "test_default_run_dir_is_temporary" in run_dir          # one directory per test
    assert b.tiny_cfg(["run_dir=/x/y"]).run_dir == "/x/y"         # an explicit run_dir wins


def test_guard_sees_created_changed_and_deleted_files(tmp_path):
    watched = tmp_path / "runs"
    (watched / "tiny" / "checkpoints").mkdir(parents=True)
    (watched / "tiny" / "checkpoints" / "latest").write_text("step_00000040\n")
    before = tree_state(str(watched))
    assert tree_changes(before, tree_state(str(watched))) == []
    (watched / "tiny" / "metrics.jsonl").write_text("{}\n")
    assert tree_changes(before, tree_state(str(watched))) == ["tiny", "tiny/metrics.jsonl"]
    os.remove(watched / "tiny" / "checkpoints" / "latest")
    assert "tiny/checkpoints/latest" in tree_changes(before, tree_state(str(watched)))
