"""mbpc: equal to a plain per-pass reference loop, every piece scored exactly once, the same numbers
at batch size 1 and 32, and at TP=1 and TP=2 (the TP=2 model in two gloo processes, and the TP=2
checkpoint against its TP=1 reshard)."""
import math
import os
import zlib

import numpy as np
import pytest
import torch

from tests.eval.eval_bodies import EVAL_LANGS, eval_lines, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(str(tmp_path_factory.getbasetemp() / "eval_tp2_run"))


@pytest.fixture(scope="module")
def em(run):
    from xlmr_mp.eval.common import load_eval_model
    return load_eval_model(run["root"])


def reference_nll(model, tok, lang, lines, k=7):
    """The definition, one line and one pass at a time: mask the pieces whose crc32 hash of
    (lang, line, position) falls in group g, score them with the full logits."""
    total, chars, tokens = 0.0, 0, 0
    with torch.no_grad():
        for li, line in enumerate(lines):
            pieces = tok.encode(line)
            ids = [tok.bos_id] + pieces + [tok.eos_id]
            assert len(ids) <= model.cfg.max_positions - 2
            for g in range(k):
                pos = [p for p in range(len(pieces)) if zlib.crc32(f"{lang}\t{li}\t{p}".encode()) % k == g]
                if not pos:
                    continue
                x = torch.tensor([ids])
                for p in pos:
                    x[0, p + 1] = tok.mask_id
                logp = torch.log_softmax(model(x)[0].double(), dim=-1)
                total += -sum(float(logp[p + 1, ids[p + 1]]) for p in pos)
            chars += len(line)
            tokens += len(pieces)
    return total, chars, tokens


def test_equals_plain_reference_loop(em):
    from xlmr_mp.eval.mbpc import evaluate_lines
    for lang in EVAL_LANGS:
        lines = eval_lines(lang)
        nll, chars, tokens = reference_nll(em.model, em.tokenizer, lang, lines)
        r = evaluate_lines(em.model, em.tokenizer, lang, lines, show=False)
        assert r["chars"] == chars and r["tokens"] == tokens and r["lines"] == len(lines)
        assert r["nll"] == pytest.approx(nll, rel=1e-6)
        assert r["bpc"] == pytest.approx(nll / (math.log(2) * chars), rel=1e-6)
        assert r["bits_per_line"] == pytest.approx(nll / math.log(2) / len(lines), rel=1e-6)
        assert r["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-6)
        assert sum(r["per_line_bits"]) == pytest.approx(nll / math.log(2), rel=1e-6)


@pytest.mark.parametrize("whole_word,max_len", [(False, 66), (True, 66), (False, 9), (True, 9)],
                         ids=["pieces", "whole-word", "pieces-windows", "whole-word-windows"])
def test_every_piece_scored_exactly_once(em, whole_word, max_len):
    from xlmr_mp.eval.mbpc import plan_language
    tok = em.tokenizer
    for lang in EVAL_LANGS:
        lines = eval_lines(lang)
        windows, items, groups = plan_language(tok, lang, lines, 7, max_len, whole_word)
        seen = [np.zeros(len(tok.encode(l)), dtype=int) for l in lines]
        passes, fractions = set(), []
        for it in items:
            w = windows[it.window]
            assert len(w.ids) <= max_len and w.ids[0] == tok.bos_id and w.ids[-1] == tok.eos_id
            for p in it.local:
                assert 0 < p < len(w.ids) - 1                          # never <s> or </s>
                seen[w.line][w.start + p - 1] += 1
                assert groups[w.line][w.start + p - 1] == it.group
            fractions.append(len(it.local) / (len(w.ids) - 2))
            passes.add(it.group)
        assert all(np.all(s == 1) for s in seen), lang
        assert passes == set(range(7))
        assert np.mean(fractions) < 0.5                               # a pass masks a part of a window
        if max_len == 9:
            assert len(windows) > len(lines)                           # long lines were cut into windows


def test_whole_word_units(em):
    from xlmr_mp.eval.mbpc import PieceInfo, plan_language, word_units
    tok = em.tokenizer
    info = PieceInfo(tok)
    en = "The city river goes quickly"
    ids = tok.encode(en)
    units = word_units("en", 0, ids, info, tok)
    words = [sum(1 for i in ids[:j + 1] if tok.id_to_piece(i).startswith("\u2581")) - 1 for j in range(len(ids))]
    assert units == words and max(units) == 4
    zh = "人们城市河流学校政府孩子早上鑫龘"                              # no spaces; the last two are byte pieces
    ids = tok.encode(zh)
    units = word_units("zh", 0, ids, info, tok)
    assert units == sorted(units) and max(units) >= 4                 # cut into several runs, in order
    text = [tok.id_to_piece(i) for i in ids]
    for u in set(units):
        members = [j for j, x in enumerate(units) if x == u]
        chars = sum(len(text[j].lstrip("\u2581")) for j in members if not text[j].startswith("<0x"))
        n_pieces = len([j for j in members if not text[j].startswith("<0x")])
        assert chars <= 3 or n_pieces == 1, (u, [text[j] for j in members])
    byte_units = {units[j] for j, t in enumerate(text) if t.startswith("<0x")}
    for j, t in enumerate(text):                                      # a byte-spelled character stays whole
        if t.startswith("<0x") and 0x80 <= int(t[3:5], 16) <= 0xBF:
            assert units[j] == units[j - 1]
    assert byte_units
    _, items, groups = plan_language(tok, "zh", [zh], 7, 66, True)
    for u in set(units):
        assert len({int(groups[0][j]) for j, x in enumerate(units) if x == u}) == 1


def test_batch_size_does_not_change_the_numbers(em):
    from xlmr_mp.eval.mbpc import evaluate_lines
    for lang in EVAL_LANGS:
        lines = eval_lines(lang)
        for ww in (False, True):
            a = evaluate_lines(em.model, em.tokenizer, lang, lines, batch_size=1, whole_word=ww, show=False)
            b = evaluate_lines(em.model, em.tokenizer, lang, lines, batch_size=32, whole_word=ww, show=False)
            c = evaluate_lines(em.model, em.tokenizer, lang, lines, batch_size=5, whole_word=ww,
                               max_batch_tokens=120, show=False)
            for r in (b, c):
                assert r["nll"] == pytest.approx(a["nll"], rel=1e-7)   # float32 kernels at other padded widths
                np.testing.assert_allclose(r["per_line_bits"], a["per_line_bits"], rtol=1e-5)
                assert r["tokens"] == a["tokens"] and r["chars"] == a["chars"]


def test_tp1_and_tp2_give_the_same_numbers(run, em, tmp_path):
    from xlmr_mp.eval.common import load_eval_model
    from xlmr_mp.eval.mbpc import evaluate_lines
    from tests.support import prep
    prep.run_tool("convert_checkpoint", "reshard", "--input", run["root"], "--output", tmp_path / "tp1",
                        "--tp", "1")
    em1 = load_eval_model(str(tmp_path / "tp1"), tokenizer=run["spm"])
    for lang in EVAL_LANGS:
        lines = eval_lines(lang)
        r2 = evaluate_lines(em.model, em.tokenizer, lang, lines, show=False)
        r1 = evaluate_lines(em1.model, em1.tokenizer, lang, lines, show=False)
        assert r1["nll"] == r2["nll"]
        # the TP=2 model itself (vocab-parallel cross-entropy over two gloo ranks) on the same passes
        assert run["mbpc_tp2"][lang] == pytest.approx(r2["nll"], rel=1e-5)
        assert run["mbpc_tp2_rank1"][lang] == run["mbpc_tp2"][lang]


def test_run_result_fields(em, tmp_path):
    from xlmr_mp.eval.api import EvalError, EvalOptions
    from xlmr_mp.eval.mbpc import run as mbpc_run
    for lang in EVAL_LANGS:
        (tmp_path / f"{lang}.txt").write_text("\n".join(eval_lines(lang, 6)) + "\n", encoding="utf-8")
    res = mbpc_run(em, EvalOptions(data=str(tmp_path), languages=["zh", "en"], progress=False,
                                   predictions="p.jsonl", settings={"batch_size": "4"}))
    assert list(res.languages) == ["zh", "en"] and res.metric == "bits_per_char" and not res.higher_is_better
    assert set(res.extra) >= {"bits_per_line", "nll_per_token", "chars", "tokens"}
    assert len(res.predictions) == 12 and res.config["batch_size"] == 4
    assert all(res.baselines["uniform"][l] > res.languages[l] * 0.5 for l in res.languages)
    with pytest.raises(EvalError, match="k=0"):
        mbpc_run(em, EvalOptions(data=str(tmp_path), progress=False, settings={"k": "0"}))
    with pytest.raises(EvalError, match=r"sw.*sw\.txt"):
        mbpc_run(em, EvalOptions(data=str(tmp_path), languages=["sw"], progress=False))
