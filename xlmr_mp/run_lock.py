"""One trainer per run directory: an OS lock (flock) on `<run_dir>/.lock`.

The lock belongs to the open file, so the kernel drops it when the holder exits in any way,
SIGKILL included; a stale file never blocks a restart. The file names the holder (pid, host,
start time) so that a second trainer fails at once with a message saying who has the directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def read_holder(path: str) -> dict:
    """The holder record written into the lock file (empty when unreadable)."""
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


class DirLock:
    """`with DirLock(dir, what="trainer"):` holds `<dir>/.lock` (or `name`) exclusively, non-blocking."""

    def __init__(self, directory: str, what: str = "trainer", name: str = LOCK_NAME):
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, name)
        self._fd: Optional[int] = None

    def acquire(self) -> "DirLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = read_holder(self.path)
            who = (f"{h.get('what', 'a process')} pid {h.get('pid', '?')} on host {h.get('host', '?')} "
                   f"(since {h.get('since', '?')})") if h else "another process"
            raise RunDirLocked(f"{self.directory} is in use by {who}; wait for it to finish or stop it "
                               f"(kill {h.get('pid', '<pid>')}) before starting another run there") from None
        rec = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(directory: str, name: str = LOCK_NAME) -> Optional[dict]:
    """The holder record when some live process holds `<directory>/<name>`, else None."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {"pid": "?"}
    finally:
        os.close(fd)
    return None


_TRAINER_LOCKS: dict = {}     # realpath -> DirLock taken by train() in this process


def lock_run_dir(run_dir: str) -> DirLock:
    """Take the trainer's lock on `run_dir`; raises RunDirLocked naming the holder.

    A lock this same process still holds from an earlier train() that raised before its cleanup
    is released first (flock would otherwise refuse the process its own directory)."""
    key = os.path.realpath(run_dir)
    old = _TRAINER_LOCKS.pop(key, None)
    if old is not None:
        old.release()
    lock = DirLock(run_dir, "trainer").acquire()
    _TRAINER_LOCKS[key] = lock
    return lock
