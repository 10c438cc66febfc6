"""xlmr_mp/atomic.py: a target is either its old content or its complete new content, and no
temporary is left behind, whether the writer finishes or raises."""
import os

import pytest

from xlmr_mp.atomic import atomic_dir, atomic_write, atomic_write_text, replace_dir, temp_path


def _entries(d):
    return sorted(os.listdir(d))


def test_file_appears_complete_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_write(str(target)) as f:
        f.write("half")
        assert not target.exists()                 # nothing under the final name while writing
        f.write(" and whole")
    assert target.read_text() == "half and whole"
    assert _entries(target.parent) == ["out.txt"]
    atomic_write_text(str(target), "new\n")
    assert target.read_text() == "new\n" and _entries(target.parent) == ["out.txt"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(str(target), "wb") as f:
            f.write(b"partial")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old" and _entries(tmp_path) == ["out.bin"]


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="write mode"):
        with atomic_write(str(tmp_path / "x"), "r"):
            pass


def test_directory_replaced_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.pt").write_text("old")
    with pytest.raises(KeyError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "new.pt"), "w").write("new")
            raise KeyError("crash")
    assert _entries(target) == ["old.pt"] and _entries(tmp_path) == ["ckpt"]
    with atomic_dir(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and _entries(tmp) == []
        open(os.path.join(tmp, "new.pt"), "w").write("new")
        assert _entries(target) == ["old.pt"]
    assert _entries(target) == ["new.pt"] and _entries(tmp_path) == ["ckpt"]   # no .old, no temporary


def test_replace_dir_over_a_stale_old_copy(tmp_path):
    target, tmp = tmp_path / "d", tmp_path / "t"
    for d, f in ((target, "a"), (tmp, "b"), (tmp_path / "d.old", "stale")):
        d.mkdir()
        (d / f).write_text(f)
    replace_dir(str(tmp), str(target))
    assert _entries(tmp_path) == ["d"] and _entries(target) == ["b"]


def test_temporary_names_are_hidden_and_per_process(tmp_path):
    p = temp_path(str(tmp_path / "x.yaml"), ".png")
    assert os.path.dirname(p) == str(tmp_path)
    assert os.path.basename(p) == f".x.yaml.tmp-{os.getpid()}.png"
