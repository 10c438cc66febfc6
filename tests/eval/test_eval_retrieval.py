"""retrieval: identical text on both sides gives 100%, shuffled targets about chance; centring per
language removes a language offset; misaligned files are named."""
import random

import pytest
import torch

from tests.eval.eval_bodies import eval_lines, trained_run


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    from xlmr_mp.eval.common import load_eval_model
    run = trained_run(str(tmp_path_factory.getbasetemp() / "eval_tp2_run"))
    return load_eval_model(run["root"])


def _lines(n=120):
    lines = list(dict.fromkeys(eval_lines("en", 2 * n, seed=3) + eval_lines("fr", 2 * n, seed=3)))[:n]
    assert len(lines) == n
    return lines


def _run(em, tmp_path, files, **settings):
    from xlmr_mp.eval.api import EvalOptions
    from xlmr_mp.eval.retrieval import run
    for lang, lines in files.items():
        (tmp_path / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run(em, EvalOptions(data=str(tmp_path), progress=False, predictions="x",
                               settings={k: str(v) for k, v in settings.items()}))


def test_identical_text_gives_100(em, tmp_path):
    lines = _lines()
    res = _run(em, tmp_path, {"en": lines, "xx": lines})
    assert res.languages == {"xx": 100.0}
    assert res.extra["en_to_x"]["xx"] == res.extra["x_to_en"]["xx"] == 100.0
    assert res.extra["layer"] == 2                                   # the middle of 4 layers by default
    assert res.baselines["chance"]["xx"] == pytest.approx(100 / 120)
    assert len(res.predictions) == 120 and all(p["pred"] == p["gold"] for p in res.predictions)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_shuffled_targets_give_about_chance(em, tmp_path, layer):
    lines = _lines()
    perm = list(range(len(lines)))
    random.Random(1).shuffle(perm)
    fixed = sum(i == p for i, p in enumerate(perm))                  # lines that stayed where they were
    res = _run(em, tmp_path, {"en": lines, "yy": [lines[p] for p in perm]}, layer=layer)
    # the identical sentence is found at its new place, which is the gold index only for fixed points
    assert res.extra["en_to_x"]["yy"] == pytest.approx(100 * fixed / len(lines))
    assert res.languages["yy"] <= 100 * (fixed + 2) / len(lines)


def test_centring_removes_a_language_offset():
    from xlmr_mp.eval.retrieval import centred_unit, top1_accuracy
    g = torch.Generator().manual_seed(0)
    src = torch.randn(200, 16, generator=g, dtype=torch.float64)
    tgt = src + 0.3 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 20.0 * torch.randn(16, generator=g, dtype=torch.float64)
    assert top1_accuracy(centred_unit(src), centred_unit(tgt)) > 95
    assert top1_accuracy(centred_unit(tgt), centred_unit(src)) > 95
    plain = lambda x: x / x.norm(dim=1, keepdim=True)                # noqa: E731 - no centring
    assert top1_accuracy(plain(tgt), plain(src)) < 50                # the offset decides which line is nearest
    c = centred_unit(tgt)
    assert c.mean(0).abs().max() < 0.05 and torch.allclose(c.norm(dim=1), torch.ones(200, dtype=torch.float64))


def test_misaligned_or_missing_files_are_named(em, tmp_path):
    from xlmr_mp.eval.api import EvalError
    lines = _lines(20)
    with pytest.raises(EvalError, match=r"zz\.txt: 19 lines but .*en\.txt has 20"):
        _run(em, tmp_path, {"en": lines, "zz": lines[:-1]})
    with pytest.raises(EvalError, match="layer=9"):
        _run(em, tmp_path, {"en": lines, "zz": lines}, layer=9)
    (tmp_path / "en.txt").unlink()
    (tmp_path / "zz.txt").unlink()
    with pytest.raises(EvalError, match="no en.txt"):
        _run(em, tmp_path, {"fr": lines})
