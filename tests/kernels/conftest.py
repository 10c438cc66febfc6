"""Fixtures of the kernel tests."""
import pytest

from xlmr_mp.kernels import dispatch


@pytest.fixture
def cpu_extension_calls(monkeypatch):
    """The list the names of the xlmr_mp._C functions called during the test are appended to
    (dispatch._cpu_extension replaced by a spy on it); skips where the CPU kernels are missing."""
    ext = dispatch._cpu_extension()
    if ext is None:
        pytest.skip("xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            return lambda *a: calls.append(name) or fn(*a)
    monkeypatch.setattr(dispatch, "_cpu_extension", lambda: Spy())
    return calls
