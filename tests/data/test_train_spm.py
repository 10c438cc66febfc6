"""tools/train_spm.py: alpha sampling, outputs, errors; a multilingual vocabulary on ../shared/corpus."""
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from tests.support.prep import run_tool
from xlmr_mp.data.corpus_io import iter_sentences
from xlmr_mp.fixtures.demo_corpus import DEFAULT_SIZES, make_tiny_corpus


def test_sampling_probabilities():
    from xlmr_mp.cli import train_spm
    counts = np.array([800.0, 200.0, 50.0])
    assert np.allclose(train_spm.sampling_probs(counts, 1.0), counts / counts.sum())
    q = train_spm.sampling_probs(counts, 0.3)
    p = counts / counts.sum()
    assert np.isclose(q.sum(), 1.0)
    assert np.allclose(q / q[0], (p / p[0]) ** 0.3)
    assert q[2] > p[2] and q[0] < p[0]                        # low-resource languages are up-sampled
    q, plan = train_spm.plan_sample([800, 200, 50], counts, 0.3, 500, heldout=10)
    assert [h for h, _ in plan] == [10, 10, 5]
    assert [k for _, k in plan] == [min(int(round(x * 500)), n - h) for x, n, h in zip(q, [800, 200, 50], [10, 10, 5])]
    assert plan[0][1] == int(round(q[0] * 500)) and plan[2][1] == 45
    _, plan = train_spm.plan_sample([800, 200, 50], counts, 0.3, 100000, heldout=10)
    assert [k for _, k in plan] == [790, 190, 45]            # capped at what a language has


def _table(stdout):
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\w+)\s+([\d,]+)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s+([\d,]+)", line)
        if m:
            rows[m.group(1)] = dict(n=int(m.group(2).replace(",", "")), p=float(m.group(3)),
                                    q=float(m.group(4)), k=int(m.group(5).replace(",", "")))
    return rows


def _eval_table(stdout):
    part = stdout.split("held-out evaluation")[1]
    rows = {}
    for line in part.splitlines():
        m = re.match(r"^(\w+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = dict(pieces=int(m.group(3).replace(",", "")), unk=float(m.group(4)),
                                    byte=float(m.group(5)))
    return rows


def test_train_on_tiny_corpus(tmp_path):
    corpus = tmp_path / "c"
    make_tiny_corpus(corpus, scale=2.0)
    prefix = tmp_path / "out" / "spm"
    r = run_tool("train_spm", "--input", corpus, "--output-prefix", prefix, "--vocab-size", 1200,
                 "--sample-size", 1500, "--alpha", 0.3, "--quiet")
    assert sorted(os.listdir(tmp_path / "out")) == ["spm.dict.txt", "spm.model", "spm.vocab"]   # no temp files
    rows = _table(r.stdout)
    assert set(rows) == set(DEFAULT_SIZES)
    for lang, row in rows.items():
        assert row["n"] == 2 * DEFAULT_SIZES[lang]
        held = min(1000, row["n"] // 10)
        assert abs(row["k"] - min(row["q"] * 1500, row["n"] - held)) <= 1   # n_i = q_i * sample size, capped
    assert rows["sw"]["q"] > rows["sw"]["p"] and rows["en"]["q"] < rows["en"]["p"]
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    assert sp.get_piece_size() == 1200 and (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    ev = _eval_table(r.stdout)
    assert set(ev) == set(DEFAULT_SIZES) and all(v["unk"] == 0.0 for v in ev.values())
    # the same seed gives the same model; sampled sentences are real lines of the corpus
    r2 = run_tool("train_spm", "--input", corpus, "--output-prefix", tmp_path / "again", "--vocab-size", 1200,
                  "--sample-size", 1500, "--quiet")
    for ext in (".vocab", ".dict.txt"):          # (.model embeds its temporary path, so compare pieces+scores)
        assert open(str(prefix) + ext, "rb").read() == open(str(tmp_path / "again") + ext, "rb").read()
    assert _table(r2.stdout) == rows


def test_alpha_one_follows_data_shares(tmp_path):
    corpus = tmp_path / "c"
    make_tiny_corpus(corpus, languages=["en", "sw"], sizes={"en": 900, "sw": 100})
    r = run_tool("train_spm", "--input", corpus, "--output-prefix", tmp_path / "m", "--vocab-size", 400,
                 "--sample-size", 500, "--alpha", 1.0, "--languages", "en,sw", "--quiet")
    rows = _table(r.stdout)
    assert rows["en"]["k"] == 450 and rows["sw"]["k"] == 50


def test_errors_name_the_problem(tmp_path):
    r = run_tool("train_spm", "--input", tmp_path / "missing", "--output-prefix", tmp_path / "m", check=False)
    assert r.returncode == 2 and "no such directory" in r.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "en.txt").write_text("hello world\n")
    r = run_tool("train_spm", "--input", tmp_path / "c", "--output-prefix", tmp_path / "m", "--languages", "en,xx",
                 check=False)
    assert r.returncode == 2 and "xx" in r.stderr
    r = run_tool("train_spm", "--input", tmp_path / "c", "--output-prefix", tmp_path / "m", "--alpha", "0",
                 check=False)
    assert r.returncode == 2 and "--alpha" in r.stderr
    r = run_tool("train_spm", "--input", tmp_path / "c", "--output-prefix", tmp_path / "m", "--vocab-size", 5000,
                 "--quiet", check=False)
    assert r.returncode == 2 and "--vocab-size" in r.stderr
    assert not any(n.startswith("m.") for n in os.listdir(tmp_path))


SHARED_LANGS = ("en,fr,de,ru,zh,ja,ko,ar,hi,ur,sw,es,pt,it,tr,vi,th,el,he,fa,id,pl,uk,bn,ta,zh_Hant")


@pytest.mark.slow          # sentencepiece on ../shared/corpus
def test_shared_corpus_vocabulary_keeps_cjk_unknowns_near_zero(shared_corpus, tmp_path):
    """>= 20 languages incl. zh/ja/ko, alpha-sampled, 8000 pieces: CJK unknown rate < 0.1%."""
    langs = [l for l in SHARED_LANGS.split(",") if os.path.exists(os.path.join(shared_corpus, f"{l}.txt"))]
    assert len(langs) >= 20 and {"zh", "ja", "ko"} <= set(langs)
    r = run_tool("train_spm", "--input", shared_corpus, "--languages", ",".join(langs),
                 "--output-prefix", tmp_path / "m", "--vocab-size", 8000, "--sample-size", 30000,
                 "--heldout", 300, "--quiet", timeout=600)
    rows, ev = _table(r.stdout), _eval_table(r.stdout)
    assert set(rows) == set(langs) == set(ev)
    assert rows["ko"]["q"] > rows["ko"]["p"]                            # alpha sampling up-samples small ones
    for lang in ("zh", "ja", "ko", "zh_Hant"):
        assert ev[lang]["unk"] < 0.1, (lang, ev[lang])                 # percent
        # with byte fallback, characters the small sample never showed become byte pieces, not <unk>
        assert ev[lang]["byte"] < 10.0, (lang, ev[lang])
    assert max(v["unk"] for v in ev.values()) < 0.1
