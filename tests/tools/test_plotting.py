"""xlmr_mp/plotting.py: the one matplotlib module. save_figure writes PNGs atomically and closes the
figure; without matplotlib, pyplot() is None after ONE printed line and the callers still write their
numbers (the evaluation report here; the whole study and xlmr-evaluate in test_no_matplotlib.py)."""
import json
import os
import subprocess
import sys

import pytest

BLOCK = "import sys; sys.modules['matplotlib'] = None\n"     # `import matplotlib` raises ImportError


def _entries(d):
    return sorted(os.listdir(d))


def test_save_figure_writes_a_png_closes_the_figure_and_keeps_the_old_one_on_failure(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from xlmr_mp.plotting import save_figure
    target = tmp_path / "figs" / "plot.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, str(target)) == str(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)            # closed: a study's many plots do not pile up
    assert _entries(target.parent) == ["plot.png"]
    old = target.read_bytes()
    fig, _ = plt.subplots()

    def half_written(f, **kw):                            # a renderer dying halfway through the file
        f.write(b"\x89PNG partial")
        raise RuntimeError("renderer failed")
    fig.savefig = half_written
    with pytest.raises(RuntimeError, match="renderer failed"):
        save_figure(fig, str(target))
    assert target.read_bytes() == old and _entries(target.parent) == ["plot.png"]


def test_without_matplotlib_one_line_and_the_report_is_still_written(tmp_path):
    """write_json then write_plot, as xlmr-evaluate --out does: the JSON is complete, no PNG, and the
    note is printed once however many plots are skipped."""
    code = BLOCK + """
from xlmr_mp.eval.report import write_json, write_plot
from xlmr_mp.plotting import pyplot
report = {"languages": {"en": 1.5}, "baselines": {}, "metric": "mbpc", "higher_is_better": False,
          "task": "mbpc", "model": {"source": "m"}}
out = sys.argv[1]
write_json(out + ".json", report)
assert write_plot(out + ".png", report) is None
assert pyplot() is None and write_plot(out + ".png", report) is None
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from xlmr_mp.plotting import SKIP_MESSAGE
    assert r.stdout.strip() == "ok" and r.stderr.splitlines() == [SKIP_MESSAGE]
    assert json.load(open(tmp_path / "r.json"))["languages"] == {"en": 1.5}
    assert _entries(tmp_path) == ["r.json"]


def test_without_tensorboard_training_metrics_still_go_to_jsonl(tmp_path):
    """logging.tensorboard=true (the big presets' setting) on a machine without tensorboard: one
    note, and the metrics are in metrics.jsonl as always."""
    code = """import sys; sys.modules['tensorboard'] = None
from xlmr_mp.metrics import MetricsLogger
m = MetricsLogger(sys.argv[1], 0, jsonl=True, tensorboard=True)
m.log(1, {"loss": 2.5})
m.close()
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "tensorboard is not installed" in r.stderr
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
