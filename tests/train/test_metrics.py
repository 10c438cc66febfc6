"""xlmr_mp/metrics.py: the peak RSS the trainer reports every step."""
import os
import sys

import pytest

from xlmr_mp.metrics import peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM of /proc/<pid>/status is Linux's")
def test_peak_rss_is_this_process_s_own_after_a_fork():
    """The status file stays open between reads; a forked child must read its own, not its
    parent's: the child's peak grows by the 256 MiB it touches (the parent's would not move)."""
    peak_rss_bytes()                                   # the parent opens its descriptor first
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = peak_rss_bytes()
        buf = bytearray(256 << 20)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        os.write(w, f"{before} {peak_rss_bytes()}".encode())
        os._exit(0)
    os.close(w)
    before, after = map(int, os.read(r, 64).split())
    os.waitpid(pid, 0)
    assert after - before >= 128 << 20, (before, after)
