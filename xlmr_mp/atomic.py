"""Outputs that never exist half-written: write under a temporary name beside the target (same
filesystem), rename onto the target only when complete. Standard library only, so every layer
and tool may use it (figures: plotting.save_figure).

    with atomic_write("run/config.yaml") as f:        # a file ("w", "wb", ...)
        yaml.safe_dump(cfg, f)
    atomic_write_text("ROOT/latest", "step_00000100\n")
    with atomic_dir("ckpt/step_00000100") as tmp:     # a directory filled in `tmp`
        torch.save(sd, os.path.join(tmp, "model_tp00_pp00.pt"))
    tmp = temp_path(prefix + ".bin")                  # several files renamed together by the caller

An exception inside the block removes the temporary and leaves an existing target untouched.
A directory that already exists is replaced only once the new one is complete (the old one is
kept as `<target>.old` until the new one is in place, then deleted).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def temp_path(path: str, suffix: str = "") -> str:
    """A temporary name beside `path`, unique to this process: DIR/.NAME.tmp-PID[suffix]."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", fsync: bool = True, **open_kwargs) -> Iterator:
    """Open a temporary file beside `path` for writing; on a clean exit flush it (and fsync),
    then rename it onto `path`; on an exception delete it."""
    if "w" not in mode:
        raise ValueError(f"atomic_write: mode {mode!r} must be a write mode ('w', 'wb', ...)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def replace_dir(tmp: str, path: str) -> None:
    """Rename the complete directory `tmp` onto `path`; an existing `path` is moved to
    `path.old` first and deleted once `tmp` is in place (readers may fall back to `.old`)."""
    if os.path.exists(path):
        old = path + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fresh_dir(path: str) -> str:
    """An empty directory at `path` (whatever was there is removed): for temporary directories."""
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """An empty temporary directory beside `path` to fill; renamed onto `path` (`replace_dir`)
    on a clean exit, deleted on an exception."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = fresh_dir(temp_path(path))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
