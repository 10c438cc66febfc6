import os
import unicodedata

from xlmr_mp.data.corpus_io import iter_documents
from xlmr_mp.fixtures.demo_corpus import DEFAULT_SIZES, make_tiny_corpus, tiny_languages


def _scripts(text):
    names = set()
    for ch in text:
        if ch.isalpha():
            names.add(unicodedata.name(ch, "?").split()[0])
    return names


def test_languages_scripts_and_sizes(tmp_path):
    paths = make_tiny_corpus(tmp_path)
    assert set(paths) == set(tiny_languages()) and len(paths) >= 6
    assert sorted(os.listdir(tmp_path)) == sorted(f"{l}.txt" for l in paths)  # no temporary files left
    expect = {"en": "LATIN", "ru": "CYRILLIC", "zh": "CJK", "ur": "ARABIC", "hi": "DEVANAGARI"}
    for lang, script in expect.items():
        text = open(paths[lang], encoding="utf-8").read()
        assert script in _scripts(text), (lang, _scripts(text))
    counts = {l: sum(len(d) for d in iter_documents(p)) for l, p in paths.items()}
    assert counts == DEFAULT_SIZES
    assert max(counts.values()) >= 5 * min(counts.values())  # sizes differ, so alpha sampling matters
    docs = list(iter_documents(paths["en"]))
    assert len(docs) > 20 and all(1 <= len(d) <= 8 for d in docs)
    assert len({s for d in docs for s in d}) > 0.95 * counts["en"]  # sentences are (nearly) all distinct


def test_deterministic_and_scaled(tmp_path):
    a = make_tiny_corpus(tmp_path / "a", languages=["zh", "sw"], seed=3)
    b = make_tiny_corpus(tmp_path / "b", languages=["zh", "sw"], seed=3)
    c = make_tiny_corpus(tmp_path / "c", languages=["zh", "sw"], seed=4)
    d = make_tiny_corpus(tmp_path / "d", languages=["sw"], scale=2.5)
    for l in ("zh", "sw"):
        assert open(a[l], "rb").read() == open(b[l], "rb").read()
        assert open(a[l], "rb").read() != open(c[l], "rb").read()
    assert sum(len(x) for x in iter_documents(d["sw"])) == 200
