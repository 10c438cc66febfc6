"""Parsers of the fine-tuning tasks on tiny files written here (SIB-200 TSV, XNLI TSV / MultiNLI
JSONL, CoNLL-U with multiword tokens and empty nodes, CoNLL NER), every bad-input case named by
file and line, file selection in the UD / NER layouts, and entity F1 with seqeval's definition."""
import json
import os

import pytest

from xlmr_mp.eval.api import EvalError, EvalOptions


def write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------- SIB-200

def test_sib_tsv_reads_quotes_and_header_order(tmp_path):
    from xlmr_mp.eval.sib200 import read_sib_tsv
    p = write(tmp_path / "en" / "train.tsv", 'category\tindex_id\ttext\nsports\t7\t"He said ""hi"", then left."\n'
                                            "\ntravel\t9\tA plain line.\n")
    items = read_sib_tsv(p)
    assert [(i.id, i.label, i.texts) for i in items] == [("7", "sports", ('He said "hi", then left.',)),
                                                         ("9", "travel", ("A plain line.",))]
    assert items[1].where == f"{p}:4"


@pytest.mark.parametrize("text, match", [
    ("index_id\tcategory\n1\tsports\n", r"train\.tsv:1: .*lacks column\(s\) text"),
    ("index_id\tcategory\ttext\n1\tsports\tok\n2\tsports\n", r"train\.tsv:3: 2 tab-separated fields"),
    ("index_id\tcategory\ttext\n1\t\tsome text\n", r"train\.tsv:2: empty category"),
    ("", r"train\.tsv:1: empty file"),
])
def test_sib_tsv_bad_rows_name_file_and_line(tmp_path, text, match):
    from xlmr_mp.eval.sib200 import read_sib_tsv
    with pytest.raises(EvalError, match=match):
        read_sib_tsv(write(tmp_path / "en" / "train.tsv", text))


def _sib_tree(root, langs=("en", "fr"), dev_rows=2):
    head = "index_id\tcategory\ttext\n"
    for lang in langs:
        for split, n in (("train", 4), ("dev", dev_rows), ("test", 3)):
            rows = "".join(f"{k}\t{'ab'[k % 2]}\t{lang} text {k}\n" for k in range(n))
            write(root / lang / f"{split}.tsv", head + rows)


def test_sib_load_languages_and_missing_train_language(tmp_path):
    from xlmr_mp.eval.sib200 import load
    _sib_tree(tmp_path)
    data = load(EvalOptions(data=str(tmp_path)))
    assert data.train.lang == "en" and sorted(data.tests) == ["en", "fr"] and len(data.dev.items) == 2
    assert list(load(EvalOptions(data=str(tmp_path), languages=["fr"])).tests) == ["fr"]
    with pytest.raises(EvalError, match=r"--train-language de: .*de/train\.tsv does not exist; .*en, fr"):
        load(EvalOptions(data=str(tmp_path), train_language="de"))
    with pytest.raises(EvalError, match=r"--languages: sw not found"):
        load(EvalOptions(data=str(tmp_path), languages=["fr", "sw"]))


def test_empty_dev_and_unseen_test_label_stop_before_training(tmp_path):
    from xlmr_mp.eval.finetune import check_data
    from xlmr_mp.eval.sib200 import load
    _sib_tree(tmp_path, dev_rows=0)
    with pytest.raises(EvalError, match=r"en/dev\.tsv: empty dev set"):
        check_data(load(EvalOptions(data=str(tmp_path))))
    _sib_tree(tmp_path)
    write(tmp_path / "fr" / "test.tsv", "index_id\tcategory\ttext\n1\ta\tx\n2\tzzz\ty\n")
    with pytest.raises(EvalError, match=r"fr/test\.tsv:3: label 'zzz' never occurs in the training data"):
        check_data(load(EvalOptions(data=str(tmp_path))))
    assert check_data(load(EvalOptions(data=str(tmp_path), languages=["en"]))) == ["a", "b"]


# ----------------------------------------------------------------------------- XNLI

XNLI_HEAD = "language\tgold_label\tsentence1_binary_parse\tsentence1\tsentence2\tpairID\n"


def test_xnli_tsv_languages_quotes_and_labels(tmp_path):
    from xlmr_mp.eval.xnli import read_nli_tsv
    p = write(tmp_path / "xnli.dev.tsv", XNLI_HEAD + 'en\tneutral\t_\tHe said "yes\tB one\t1\n'
                                                     "fr\tcontradiction\t_\tA deux\tB deux\t2\nen\t-\t_\tx\ty\t3\n")
    rows = read_nli_tsv(p)
    assert sorted(rows) == ["en", "fr"]
    assert [(i.id, i.label, i.texts) for i in rows["en"]] == [("1", "neutral", ('He said "yes', "B one"))]
    bad = write(tmp_path / "bad.tsv", XNLI_HEAD + "en\tmaybe\t_\ta\tb\t1\n")
    with pytest.raises(EvalError, match=r"bad\.tsv:2: gold_label 'maybe'"):
        read_nli_tsv(bad)
    with pytest.raises(EvalError, match=r"short\.tsv:2: 3 tab-separated fields, expected 6"):
        read_nli_tsv(write(tmp_path / "short.tsv", XNLI_HEAD + "en\tneutral\t_\n"))
    with pytest.raises(EvalError, match=r"nohead\.tsv:1: header lacks column\(s\) sentence2"):
        read_nli_tsv(write(tmp_path / "nohead.tsv", "language\tgold_label\tsentence1\nen\tneutral\ta\n"))


def test_xnli_mt_columns_and_jsonl_train(tmp_path):
    from xlmr_mp.eval.xnli import read_nli_jsonl, read_train
    mt = write(tmp_path / "multinli.train.fr.tsv", "premise\thypo\tlabel\nA\tB\tcontradictory\nC\tD\tentailment\n")
    assert [i.label for i in read_train(mt)] == ["contradiction", "entailment"]
    recs = [{"gold_label": "neutral", "sentence1": "a", "sentence2": "b", "pairID": "p1"},
            {"gold_label": "-", "sentence1": "c", "sentence2": "d", "pairID": "p2"}]
    jl = write(tmp_path / "multinli_1.0_train.jsonl", "".join(json.dumps(r) + "\n" for r in recs) + "{oops\n")
    with pytest.raises(EvalError, match=r"multinli_1\.0_train\.jsonl:3: not JSON"):
        read_nli_jsonl(jl)
    write(tmp_path / "multinli_1.0_train.jsonl", json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n")
    assert [(i.id, i.texts) for i in read_nli_jsonl(jl)] == [("p1", ("a", "b"))]


def test_xnli_load_finds_train_and_names_missing_pieces(tmp_path):
    from xlmr_mp.eval.xnli import DEFAULTS, load
    root = tmp_path / "XNLI-1.0"
    write(root / "xnli.dev.tsv", XNLI_HEAD + "en\tneutral\t_\ta\tb\t1\nfr\tneutral\t_\tc\td\t2\n")
    write(root / "xnli.test.tsv", XNLI_HEAD + "en\tneutral\t_\ta\tb\t3\nfr\tentailment\t_\tc\td\t4\n")
    opts = EvalOptions(data=str(root))
    with pytest.raises(EvalError, match=r"--train-language en: no training file found .*give one with train=PATH"):
        load(opts, dict(DEFAULTS))
    write(tmp_path / "multinli_1.0" / "multinli_1.0_train.jsonl",
          json.dumps({"gold_label": "neutral", "sentence1": "a", "sentence2": "b"}) + "\n")
    data = load(opts, dict(DEFAULTS))
    assert data.train.path.endswith("multinli_1.0_train.jsonl") and sorted(data.tests) == ["en", "fr"]
    assert [i.id for i in data.dev.items] == ["1"]
    with pytest.raises(EvalError, match=r"--train-language de: .*xnli\.dev\.tsv has no rows of de"):
        load(EvalOptions(data=str(root), train_language="de"), dict(DEFAULTS, train=data.train.path))


# ----------------------------------------------------------------------------- CoNLL-U

CONLLU = """# newdoc id = d1
# sent_id = s1
# text = Du lait.
1-2\tDu\t_\t_\t_\t_\t_\t_\t_\t_
1\tDe\tde\tADP\t_\t_\t3\tcase\t_\t_
2\tle\tle\tDET\t_\t_\t3\tdet\t_\t_
3\tlait\tlait\tNOUN\t_\t_\t0\troot\t_\t_
3.1\tgap\tgap\tVERB\t_\t_\t_\t_\t3:x\t_
4\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

# sent_id = s2
1\tOui\toui\tINTJ\t_\t_\t0\troot\t_\t_
"""


def test_conllu_multiword_tokens_and_empty_nodes(tmp_path):
    from xlmr_mp.eval.conll import read_conllu
    sents = read_conllu(write(tmp_path / "fr_x-ud-test.conllu", CONLLU))
    assert [(s.id, s.words, s.tags) for s in sents] == [
        ("s1", ["De", "le", "lait", "."], ["ADP", "DET", "NOUN", "PUNCT"]), ("s2", ["Oui"], ["INTJ"])]
    assert sents[0].line == 1 and sents[1].line == 11


@pytest.mark.parametrize("old, new, match", [
    ("2\tle\tle\tDET\t_\t_\t3\tdet\t_\t_", "2\tle\tle\tDET\t_\t_\t3\tdet\t_", r":6: 9 tab-separated columns"),
    ("3\tlait\tlait\tNOUN", "5\tlait\tlait\tNOUN", r":7: word id 5 out of order, expected 3"),
    ("3\tlait\tlait\tNOUN", "3\tlait\tlait\tNOM", r":7: UPOS 'NOM' is not one of the 17"),
    ("1-2\tDu", "2-3\tDu", r":4: multiword token '2-3' does not start at the next word \(1\)"),
    ("3\tlait\tlait\tNOUN", "x\tlait\tlait\tNOUN", r":7: word id 'x' is not an integer"),
    ("1\tOui\toui", "1-2\tOui-x\t_\t_\t_\t_\t_\t_\t_\t_\n1\tOui\toui", r":12: multiword token ends at word 2"),
])
def test_conllu_syntax_errors_name_file_and_line(tmp_path, old, new, match):
    from xlmr_mp.eval.conll import read_conllu
    assert old in CONLLU
    p = write(tmp_path / "fr_x-ud-test.conllu", CONLLU.replace(old, new, 1))
    with pytest.raises(EvalError, match=r"fr_x-ud-test\.conllu" + match):
        read_conllu(p)


def _ud_tree(root):
    one = "1\tA\ta\tNOUN\t_\t_\t0\troot\t_\t_\n\n"
    for rel in ("UD_English-EWT/en_ewt-ud-dev.conllu", "UD_English-EWT/en_ewt-ud-test.conllu",
                "UD_English-PUD/en_pud-ud-test.conllu", "UD_French-PUD/fr_pud-ud-test.conllu",
                "UD_Japanese-GSD/ja_gsd-ud-dev.conllu", "UD_Japanese-GSD/ja_gsd-ud-test.conllu"):
        write(root / rel, one)


def test_ud_file_choice_study_rule_and_overrides(tmp_path):
    from xlmr_mp.eval.udpos import DEFAULTS, choose_files
    _ud_tree(tmp_path)
    got = choose_files(str(tmp_path), "en", dict(DEFAULTS))
    rel = lambda ps: [os.path.relpath(p, tmp_path) for p in ps]  # noqa: E731
    assert rel(got["train"]) == ["UD_English-EWT/en_ewt-ud-dev.conllu"]          # the STUDY.md rule
    assert rel(got["dev"]) == ["UD_English-EWT/en_ewt-ud-test.conllu"]
    assert {l: rel(p) for l, p in got["test"].items()} == {
        "en": ["UD_English-PUD/en_pud-ud-test.conllu"], "fr": ["UD_French-PUD/fr_pud-ud-test.conllu"],
        "ja": ["UD_Japanese-GSD/ja_gsd-ud-test.conllu"]}
    # a real train file wins; its dev is then the dev file, and EWT test is tested again
    write(tmp_path / "UD_English-EWT/en_ewt-ud-train.conllu", "1\tA\ta\tNOUN\t_\t_\t0\troot\t_\t_\n")
    got = choose_files(str(tmp_path), "en", dict(DEFAULTS))
    assert rel(got["train"]) == ["UD_English-EWT/en_ewt-ud-train.conllu"]
    assert rel(got["dev"]) == ["UD_English-EWT/en_ewt-ud-dev.conllu"]
    assert sorted(rel(got["test"]["en"])) == ["UD_English-EWT/en_ewt-ud-test.conllu",
                                              "UD_English-PUD/en_pud-ud-test.conllu"]
    got = choose_files(str(tmp_path), "en", dict(DEFAULTS, train_files="UD_English-PUD/*.conllu",
                                                  dev_files="UD_Japanese-GSD/ja_gsd-ud-dev.conllu"))
    assert rel(got["train"]) == ["UD_English-PUD/en_pud-ud-test.conllu"] and "en" in got["test"]
    assert "UD_English-PUD/en_pud-ud-test.conllu" not in rel(got["test"]["en"])
    with pytest.raises(EvalError, match=r"train_files=nope\*: 'nope\*' matches no file"):
        choose_files(str(tmp_path), "en", dict(DEFAULTS, train_files="nope*"))
    with pytest.raises(EvalError, match=r"--train-language de: no de_\*-ud-train\.conllu .*with one: en, ja;"):
        choose_files(str(tmp_path), "de", dict(DEFAULTS))
    with pytest.raises(EvalError, match=r"dev_split=dev: no fr_\*-ud-dev\.conllu .*empty dev set"):
        choose_files(str(tmp_path), "fr", dict(DEFAULTS, train_files="UD_French-PUD/*.conllu"))


# ----------------------------------------------------------------------------- CoNLL NER

def test_ner_columns_iob1_to_iob2_docstart_and_prefix(tmp_path):
    from xlmr_mp.eval.conll import read_ner_columns
    p = write(tmp_path / "eng.train", "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n"
                                      "German JJ I-NP I-MISC\nBritish JJ I-NP B-MISC\n\nPeter NNP I-NP I-PER\n")
    sents = read_ner_columns(p)
    assert [(s.words, s.tags) for s in sents] == [
        (["EU", "rejects", "German", "British"], ["B-ORG", "O", "B-MISC", "B-MISC"]), (["Peter"], ["B-PER"])]
    wp = write(tmp_path / "fr" / "test", "fr:Paris\tB-LOC\nfr:est\tO\nfr:\tO\n")
    assert [s.words for s in read_ner_columns(wp, strip_prefix="fr")] == [["Paris", "est", "fr:"]]
    with pytest.raises(EvalError, match=r"bad:2: tag 'PER' is neither 'O' nor IOB"):
        read_ner_columns(write(tmp_path / "bad", "a O\nb PER\n"))
    with pytest.raises(EvalError, match=r"short:1: expected '<token> \.\.\. <tag>'"):
        read_ner_columns(write(tmp_path / "short", "lonely\n"))


def test_ner_layouts(tmp_path):
    from xlmr_mp.eval.ner import DEFAULTS, choose_files, find_files
    for split in ("train", "testa", "testb"):
        write(tmp_path / "conll" / f"eng.{split}", "EU B-ORG\n")
    write(tmp_path / "conll" / "deu.testb", "EU B-ORG\n")
    assert find_files(str(tmp_path / "conll")) == {
        "en": {"train": str(tmp_path / "conll/eng.train"), "dev": str(tmp_path / "conll/eng.testa"),
               "test": str(tmp_path / "conll/eng.testb")}, "de": {"test": str(tmp_path / "conll/deu.testb")}}
    for lang, splits in (("en", ("train", "dev", "test")), ("sw", ("test",))):
        for split in splits:
            write(tmp_path / "wikiann" / lang / (split + ".txt"), f"{lang}:x B-PER\n")
    train, dev, tests = choose_files(str(tmp_path / "wikiann"), "en", dict(DEFAULTS))
    assert train.endswith("en/train.txt") and dev.endswith("en/dev.txt") and sorted(tests) == ["en", "sw"]
    with pytest.raises(EvalError, match=r"--train-language sw: no dev file .*empty dev set"):
        choose_files(str(tmp_path / "wikiann"), "sw", dict(DEFAULTS, train_file=train))
    with pytest.raises(EvalError, match=r"test_files=fr: expected lang:path"):
        choose_files(str(tmp_path / "wikiann"), "en", dict(DEFAULTS, test_files="fr"))


# ----------------------------------------------------------------------------- entity F1

def test_entities_follow_seqeval_default_mode():
    from xlmr_mp.eval.conll import entities, to_iob2
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert entities(["I-PER", "I-PER", "B-PER", "I-LOC"]) == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3)]
    assert entities(["O", "I-MISC", "O", "B-ORG", "B-ORG"]) == [("MISC", 1, 1), ("ORG", 3, 3), ("ORG", 4, 4)]
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert entities(["O", "O"]) == [] and entities([]) == []
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]


def test_entity_f1_hand_computed():
    from xlmr_mp.eval.conll import entity_f1
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # PER right, LOC missed (tagged ORG), ORG right, one spurious MISC: 2 correct of 4 predicted, 3 gold
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-MISC"]]
    p, r = 2 / 4, 2 / 3
    assert entity_f1(gold, pred) == pytest.approx(2 * p * r / (p + r))
    # a span off by one word is wrong as a whole
    assert entity_f1([["B-PER", "I-PER"]], [["B-PER", "O"]]) == 0.0
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1([["O"]], [["O"]]) == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O"]], [["O", "O"]])


def test_entity_f1_equals_seqeval_when_installed():
    seqeval = pytest.importorskip("seqeval.metrics")
    import random
    from xlmr_mp.eval.conll import entity_f1
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for _ in range(30):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(5)]
        pred = [[rng.choice(tags) for _ in g] for g in gold]
        assert entity_f1(gold, pred) == pytest.approx(seqeval.f1_score(gold, pred))
