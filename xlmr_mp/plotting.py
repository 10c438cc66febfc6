"""Figures: the one module that imports matplotlib. matplotlib is a dependency of the package, but
a plot is never what loses a result: without it `pyplot()` prints ONE line (per process) saying
the plots are skipped and returns None, and the callers write their numbers (JSON, CSV) first
and skip the figure.

    plt = pyplot()                            # matplotlib.pyplot on the Agg backend, or None
    if plt is not None:
        fig, ax = plt.subplots()
        ...
        save_figure(fig, "results/plot.png")  # PNG written atomically (atomic.py), figure closed
"""
from __future__ import annotations

import sys

from xlmr_mp.atomic import atomic_write

_SKIP_NOTED = False
SKIP_MESSAGE = "note: matplotlib is not installed: plots skipped, results written (pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend; None (and the one-line note on stderr,
    the first time in this process) when matplotlib cannot be imported."""
    global _SKIP_NOTED
    try:
        import matplotlib
    except ImportError:
        if not _SKIP_NOTED:
            print(SKIP_MESSAGE, file=sys.stderr, flush=True)
            _SKIP_NOTED = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """A matplotlib figure laid out (tight_layout), written to `path` as PNG atomically, and closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    return path
