"""tools/evaluate.py end to end: the --out JSON (groups, baselines, model, step, config, seconds),
the bar plot beside it, --predictions JSONL, the stdout table; an HF directory gives the same numbers
as the checkpoint it was exported from; bad input stops with one `error:` line (exit 2)."""
import json
import os
import subprocess
import sys

import pytest

from tests.eval.eval_bodies import EVAL_LANGS, eval_lines, trained_run
from tests.support.prep import run_tool_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "evaluate.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = trained_run(str(tmp_path_factory.getbasetemp() / "eval_tp2_run"))
    flores = tmp_path_factory.mktemp("flores")
    for lang in EVAL_LANGS + ("fr",):
        (flores / f"{lang}.txt").write_text("\n".join(eval_lines(lang, 12)) + "\n", encoding="utf-8")
    return dict(r, flores=str(flores))


def evaluate(*args):
    """tools/evaluate.py main() in this process: (rc, stdout, stderr)."""
    return run_tool_main("evaluate", *args)


def test_mbpc_report_predictions_table_plot(run, tmp_path):
    out, preds = tmp_path / "res" / "mbpc.json", tmp_path / "res" / "p.jsonl"
    r = subprocess.run([sys.executable, TOOL, "mbpc", "--model", run["root"], "--data", run["flores"], "--out", str(out),
                        "--predictions", str(preds), "batch_size=8"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["task"] == "mbpc" and rep["metric"] == "bits_per_char" and rep["higher_is_better"] is False
    assert sorted(rep["languages"]) == ["en", "fr", "ur", "zh"]
    L = rep["languages"]
    assert rep["groups"]["High"] == pytest.approx((L["en"] + L["fr"]) / 2)
    assert rep["groups"]["Low"] == pytest.approx(L["ur"])                      # sw is absent
    assert rep["groups"]["All"] == pytest.approx(sum(L.values()) / 4)
    assert rep["groups"]["mean"] == pytest.approx(sum(L.values()) / 4)
    assert set(rep["baselines"]) == {"uniform"} and rep["step"] == 4
    assert rep["model"]["kind"] == "xlmr_mp" and rep["model"]["tokenizer"] == run["spm"]
    assert rep["config"]["task"]["batch_size"] == 8 and rep["config"]["model"]["hidden_size"] == 64
    assert rep["config"]["run"]["data"]["tokenizer"] == run["spm"] and rep["seconds"] > 0
    assert rep["extra"]["chars"]["en"] == sum(len(l) for l in eval_lines("en", 12))
    rows = [json.loads(l) for l in preds.read_text().splitlines()]
    assert len(rows) == 48 and set(rows[0]) >= {"lang", "id", "pred", "gold"}
    assert (tmp_path / "res" / "mbpc.png").stat().st_size > 1000
    for lang in ("en", "fr", "ur", "zh", "High", "Low", "All", "mean"):
        assert any(line.startswith(lang) for line in r.stdout.splitlines()), r.stdout
    assert sorted(os.listdir(tmp_path / "res")) == ["mbpc.json", "mbpc.png", "p.jsonl"]   # no temporaries left


def test_hf_directory_gives_the_same_numbers(run, tmp_path):
    from tests.support import prep
    prep.run_tool("convert_checkpoint", "xlmr-to-hf", "--input", run["root"], "--output", tmp_path / "hf")
    res = {}
    for name, model in (("ours", run["root"]), ("hf", tmp_path / "hf")):
        rc, out, err = evaluate("mbpc", "--model", model, "--data", run["flores"], "--out", tmp_path / f"{name}.json",
                                "--no-progress", "--whole-word")
        assert rc == 0, err
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert res["hf"]["model"]["kind"] == "hf" and res["hf"]["step"] is None
    assert res["hf"]["metric"] == "bits_per_char_whole_word"
    for lang, v in res["ours"]["languages"].items():
        assert res["hf"]["languages"][lang] == pytest.approx(v, rel=1e-6)
    rc, out, err = evaluate("retrieval", "--model", tmp_path / "hf", "--data", run["flores"], "--no-progress",
                            "--out", tmp_path / "r.json", "layer=0")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert sorted(rep["languages"]) == ["fr", "ur", "zh"] and rep["config"]["task"]["layer"] == 0


def test_bad_input_gives_one_error_line(run, tmp_path):
    from tests.support.prep import train_tiny_spm
    other = train_tiny_spm(run["corpus"], tmp_path / "small", vocab_size=600)
    bad_ckpt = tmp_path / "notackpt"
    bad_ckpt.mkdir()
    cases = [
        (["mbpc", "--model", run["root"], "--data", run["flores"], "--languages", "en,sw"], ["--languages", "sw.txt"]),
        (["mbpc", "--model", run["root"], "--data", run["flores"], "--tokenizer", other], ["602", "1002", "--tokenizer"]),
        (["mbpc", "--model", run["root"], "--data", run["flores"], "bogus=1"], ["bogus", "batch_size"]),
        (["mbpc", "--model", run["root"], "--data", run["flores"], "k=x"], ["k=x", "int"]),
        (["mbpc", "--model", run["root"], "--data", run["flores"], "--export-hf", tmp_path / "e"], ["--export-hf"]),
        (["retrieval", "--model", run["root"], "--data", run["flores"], "--whole-word"], ["--whole-word"]),
        (["mbpc", "--model", bad_ckpt, "--data", run["flores"]], ["--model", "meta.json"]),
        (["mbpc", "--model", tmp_path / "missing", "--data", run["flores"]], ["--model", "does not exist"]),
        (["mbpc", "--model", run["root"], "--data", tmp_path / "nodata"], ["--data"]),
        (["mbpc", "--model", run["root"], "--data", run["flores"], "--seeds", "1,x"], ["--seeds"]),
    ]
    for args, needles in cases:
        rc, out, err = evaluate(*args, "--no-progress", "--out", tmp_path / "o.json")
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err
        for n in needles:
            assert n in err, (args, err)
        assert not os.path.exists(tmp_path / "o.json")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "en.txt").write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    rc, out, err = evaluate("mbpc", "--model", run["root"], "--data", tmp_path / "latin1", "--no-progress")
    assert rc == 2 and "en.txt:2" in err and "UTF-8" in err


def test_group_means():
    from xlmr_mp.eval.report import group_means
    g = group_means({"en": 1.0, "fr": 3.0, "sw": 5.0, "de": 7.0, "xx": 9.0})
    assert g == {"High": 2.0, "Low": 5.0, "All": 4.0, "mean": 5.0}
    assert group_means({"xx": 1.0})["High"] is None
