"""xlmr_mp/metrics.py: the peak RSS the trainer reports every step."""
import os
import sys

import pytest

from xlmr_mp.metrics import peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM of /proc/<pid>/status is Linux's")
def test_peak_rss_is_this_process_s_own_after_a_fork():
    """The status file stays open between reads; a forked child must read its own, not its
    parent's: a child touching 256 MiB more reports at least that much more than its parent."""
    parent = peak_rss_bytes()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        buf = bytearray(256 << 20)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        os.write(w, str(peak_rss_bytes()).encode())
        os._exit(0)
    os.close(w)
    child = int(os.read(r, 64))
    os.waitpid(pid, 0)
    assert child >= parent + (128 << 20)
    assert peak_rss_bytes() < child
