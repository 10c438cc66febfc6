"""Study spec, plan and shared preparation (fast: no training). End to end: test_study_e2e.py."""
import os
import subprocess
import sys

import pytest

from tests.study.study_cells import TINY, corpus, write_spec  # noqa: F401 (corpus: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def _spec(tmp_path, corpus, **kw):
    return write_spec(tmp_path / "spec.yaml", corpus, **kw)


def _load(tmp_path, corpus, **kw):
    from xlmr_mp.study.spec import load_spec
    return load_spec(_spec(tmp_path, corpus, **kw))


def test_grid_is_the_product_of_the_axes(tmp_path, corpus):
    st = _load(tmp_path, corpus)
    assert [c.name for c in st.cells] == ["t-L2-1", "t-L2-2", "t-L3-1", "t-L3-2"]
    assert st.cells[2].languages == ["en", "sw", "fr"] and st.cells[3].seed == 2


@pytest.mark.parametrize("bad, match", [
    ({"axes": {"languages": {"L2": ["en"]}, "vocab": [500], "widht": [64]}}, r"widht.*valid: languages"),
    ({"axes": {"languages": {"L2": ["en"]}, "vocab": [500],
               "width": {"H8": {"model.hiden_size": 8}}}}, r"model\.hiden_size.*hidden_size"),
    ({"axes": {"languages": {"L0": []}, "vocab": [500]}}, r"languages=L0.*empty language set"),
    ({"axes": {"languages": {"L2": ["en", "xx"]}, "vocab": [500]}}, r"languages \['xx'\] are not in the corpus"),
    ({"tokenizr": "shared"}, r"unknown key tokenizr.*tokenizer"),
    ({"exclude": [{"languages": "L9"}]}, r"exclude\[0\]\.languages='L9' is not a value"),
    ({"exclude": [{"colour": "red"}]}, r"unknown key exclude\[0\]\.colour"),
    ({"cap_lines": {"qq": 3}}, r"cap_lines\.qq"),
    ({"budget": {"mode": "fixed_per_language", "tokens": 100}}, r"base_languages"),
])
def test_bad_spec_names_the_key(tmp_path, corpus, bad, match):
    from xlmr_mp.study.spec import SpecError
    with pytest.raises(SpecError, match=match):
        _load(tmp_path, corpus, **bad)


def test_bad_spec_fails_in_plan_cli(tmp_path, corpus):
    p = _spec(tmp_path, corpus, axes={"languages": {"L2": ["en"]}, "vocab": [500], "widht": [64]})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "study.py"), "plan", p, "--no-calibrate",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "widht" in r.stderr and "valid:" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_exclude_and_any_run_config_axis(tmp_path, corpus):
    st = _load(tmp_path, corpus, exclude=[{"languages": "L3", "seed": 2}],
               axes={"languages": {"L2": ["en", "sw"], "L3": ["en", "sw", "fr"]}, "vocab": [500],
                     "seed": [1, 2], "optim.lr": [5.0e-4, 1.0e-3]})
    names = [c.name for c in st.cells]
    assert len(names) == 6 and not any(n.startswith("t-L3-2") for n in names), names
    lrs = sorted({o for c in st.cells for o in c.run_overrides if o.startswith("optim.lr=")})
    assert lrs == ["optim.lr=0.0005", "optim.lr=0.001"]


def test_identical_cells_of_two_grids_train_once(tmp_path, corpus):
    grids = [{"name": "A", "axes": {"seed": [1, 2]}}, {"name": "B", "axes": {"seed": [1]}}]
    st = _load(tmp_path, corpus, grids=grids, axes={"languages": {"L2": ["en", "sw"]}, "vocab": [500]})
    assert [c.name for c in st.cells] == ["A-1", "A-2"]
    assert st.cells[0].aliases == [("B", {"languages": "L2", "vocab": "500", "seed": "1"})]


def test_param_count_matches_the_model_and_fixed_params_solves_width():
    import torch
    from xlmr_mp.config import load_config
    from xlmr_mp.model.xlmr import XLMRModel
    from xlmr_mp.study.plan import count_params, solve_width
    for v, h in ((4002, 168), (16002, 96), (32002, 56)):
        cfg = load_config(TINY, [f"model.vocab_size={v}", f"model.hidden_size={h}", "model.num_heads=2",
                                 f"model.ffn_size={4 * h}", "model.max_positions=130"])
        with torch.device("meta"):
            m = XLMRModel(cfg.model)
        assert sum(count_params(cfg.model)) == sum(p.numel() for p in m.parameters())
        assert count_params(cfg.model)[0] == m.embeddings.word_embeddings.weight.numel()
        for target in (2.0e6, 5.0e5):
            hs, f, p = solve_width(cfg.model, target)
            assert abs(p - target) <= 0.01 * target, (v, target, hs, p)
            assert hs % 2 == 0 and (target < 1e6 or abs(f / hs - 4) < 0.5)


def test_plan_budget_sizes_and_warnings(tmp_path, corpus):
    from xlmr_mp.study.plan import plan_study
    from xlmr_mp.study.prepare import Preparation
    st = _load(tmp_path, corpus, budget={"mode": "fixed_per_language", "tokens": 2.0e5, "base_languages": "L2"})
    prep = Preparation(st, str(tmp_path / "out"))
    plans = plan_study(st, prep, str(tmp_path / "out"))
    p2, p3 = plans[0], plans[2]
    c = {l: prep.language_stats(l)["characters"] for l in ("en", "sw", "fr")}
    want = 2.0e5 * sum(c[l] ** 0.3 for l in "en sw fr".split()) / sum(c[l] ** 0.3 for l in ("en", "sw"))
    assert p3.steps == -(-int(-(-want // 256)) // 10) * 10 and p2.steps == 790   # ceil(2e5 / 256) -> x10
    assert abs(sum(p3.q.values()) - 1) < 1e-12 and p3.q["en"] > p3.q["fr"] > p3.q["sw"]
    assert any("sw is seen" in w for w in p2.warnings)           # 8+ epochs of sw
    assert f"train.train_steps={p2.steps}" in p2.overrides and "data.languages=[en,sw]" in p2.overrides
    assert p2.tokenizer.key == p3.tokenizer.key                   # shared: one tokenizer on the union
    assert p2.tokenizer.languages == ["en", "fr", "sw"]


def test_cap_lines_text_and_keys(tmp_path, corpus):
    from xlmr_mp.study.prepare import Preparation
    st = _load(tmp_path, corpus, cap_lines={"sw": 10, "fr": 0.5}, tokenizer="per_set")
    prep = Preparation(st, str(tmp_path / "out"))
    cell = st.cells[2]                                            # L3: en sw fr
    tok = prep.tokenizer_for(cell)
    assert tok.cap_lines == {"fr": 0.5, "sw": 10}
    d = prep.ensure_text(tok)
    sw = [l for l in open(os.path.join(d, "sw.txt")) if l.strip()]
    sw_all = [l for l in open(os.path.join(corpus, "sw.txt")) if l.strip()]
    assert sw == sw_all[:10]
    fr = [l for l in open(os.path.join(d, "fr.txt")) if l.strip()]
    fr_all = [l for l in open(os.path.join(corpus, "fr.txt")) if l.strip()]
    assert fr == fr_all[:round(len(fr_all) / 2)]
    assert os.path.realpath(os.path.join(d, "en.txt")) == os.path.realpath(os.path.join(corpus, "en.txt"))
    assert prep.language_stats("sw", 10)["lines"] == 10
    other = _load(tmp_path, corpus, cap_lines={"sw": 11, "fr": 0.5}, tokenizer="per_set")
    assert Preparation(other, str(tmp_path / "out")).tokenizer_for(other.cells[2]).key != tok.key
    assert Preparation(other, str(tmp_path / "out")).tokenizer_for(other.cells[0]).key != \
        prep.tokenizer_for(st.cells[0]).key                      # sw is in L2 too


@pytest.mark.slow
def test_concurrent_cells_build_each_artefact_once(tmp_path, corpus):
    """Four cells at once, two tokenizer keys (per_set L2 and L3): each SentencePiece model and
    dataset is built exactly once, the other cells wait for it under its file lock."""
    import json
    import threading
    from xlmr_mp.study.prepare import Preparation
    st = _load(tmp_path, corpus, tokenizer="per_set", spm={"sample_size": 2000})
    prep = Preparation(st, str(tmp_path / "out"), log=lambda *_: None)
    errors = []

    def build(cell):
        try:
            prep.ensure_dataset(prep.dataset_for(cell))
        except Exception as e:        # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=build, args=(c,)) for c in st.cells]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    builds = [json.loads(l) for l in open(tmp_path / "out" / "prep" / "builds.jsonl")]
    assert sorted(b["kind"] for b in builds) == ["dataset", "dataset", "tokenizer", "tokenizer"], builds
    assert len({b["key"] for b in builds}) == 4
    for c in st.cells:
        assert prep.train_tokens(prep.dataset_for(c)) is not None
