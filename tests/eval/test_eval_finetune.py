"""Fine-tuning with zero-shot transfer on tiny learnable tasks written here, with a tiny random model
and a tiny SentencePiece model: it learns (above the majority class), the epoch is chosen on the
training language's dev set only, runs are deterministic per seed, every word of a long sentence is
predicted, bad input stops before training, and an --export-hf directory reloaded in transformers
predicts exactly what the predictions recorded."""
import os
import random

import numpy as np
import pytest
import torch

from tests.support.prep import load_tool
from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions

KEYS = {"water": ["river", "water", "rain"], "school": ["school", "book", "teaches"],
        "market": ["market", "money", "sells"]}
FILL = "the a people city morning night village road country family work house time year world".split()
FAST = dict(epochs="12", lr="1e-3", batch_size="8", dropout="0.0")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.prep import train_tiny_spm
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    from xlmr_mp.tokenizer import XLMRTokenizer
    d = tmp_path_factory.mktemp("ft_tok")
    make_tiny_corpus(d / "corpus")
    return XLMRTokenizer(train_tiny_spm(d / "corpus", d / "m", vocab_size=600))


def tiny_model(tok, seed=1):
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                      max_positions=130, dropout=0.0, attention_dropout=0.0)
    return EvalModel(model=XLMRModel(cfg, init_seed=seed).eval(), tokenizer=tok, source="random", kind="xlmr_mp")


def sib_rows(rng, n, weights=None):
    out = []
    for k in range(n):
        lab = rng.choices(sorted(KEYS), weights=weights)[0]
        w = rng.sample(FILL, 5)
        w.insert(rng.randrange(6), rng.choice(KEYS[lab]))
        out.append((str(k), lab, " ".join(w) + "."))
    return out


def write_tsv(path, rows):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("index_id\tcategory\ttext\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))


@pytest.fixture()
def sib_dir(tmp_path):
    """en train/dev/test; fr test = en test (other ids); zz test: mostly 'water'."""
    rng = random.Random(0)
    write_tsv(tmp_path / "en" / "train.tsv", sib_rows(rng, 150, weights=[1, 1, 2]))   # majority: water
    write_tsv(tmp_path / "en" / "dev.tsv", sib_rows(rng, 30))
    test = sib_rows(rng, 30)
    write_tsv(tmp_path / "en" / "test.tsv", test)
    write_tsv(tmp_path / "fr" / "test.tsv", [("f" + a, b, c) for a, b, c in test])
    write_tsv(tmp_path / "zz" / "test.tsv", [(str(k), "water" if k < 16 else "school", "a city road.")
                                              for k in range(20)])
    return tmp_path


def test_sib200_learns_tests_every_language_and_reports_baselines(tokenizer, sib_dir):
    from xlmr_mp.eval import sib200
    r = sib200.run(tiny_model(tokenizer), EvalOptions(data=str(sib_dir), seeds=[1], settings=dict(FAST), progress=False))
    assert r.task == "sib200" and r.metric == "accuracy (%)" and sorted(r.languages) == ["en", "fr", "zz"]
    gold_en = [p["gold"] for p in r.predictions if p["lang"] == "en"]
    assert r.baselines["majority"]["en"] == pytest.approx(100 * gold_en.count("water") / len(gold_en))
    assert r.baselines["majority"]["zz"] == pytest.approx(80.0)           # train's majority (water) on zz
    assert r.baselines["chance"] == {l: pytest.approx(100 / 3) for l in ("en", "fr", "zz")}
    assert r.languages["en"] > r.baselines["majority"]["en"] + 20          # it learned the keywords
    assert r.languages["fr"] == r.languages["en"]                           # same text, scored on its own
    assert len(r.predictions) == 80 and {p["lang"] for p in r.predictions} == {"en", "fr", "zz"}
    en = {p["id"]: p for p in r.predictions if p["lang"] == "en"}
    fr = {p["id"][1:]: p for p in r.predictions if p["lang"] == "fr"}
    assert {k: v["pred"] for k, v in en.items()} == {k: v["pred"] for k, v in fr.items()}
    acc = 100 * np.mean([p["pred"] == p["gold"] for p in en.values()])
    assert r.languages["en"] == pytest.approx(acc)
    hist = [h["dev"] for h in r.extra["dev_history"]["1"]]
    assert r.extra["best_epoch"]["1"] == 1 + int(np.argmax(hist)) and len(hist) == 12
    assert r.config["labels"] == ["market", "school", "water"] and r.config["epochs"] == 12


def test_best_dev_epoch_is_restored(tokenizer, sib_dir, monkeypatch):
    """Dev scores 10, 50, 20, 50: the weights after epoch 2 are kept (a tie keeps the earlier epoch)."""
    from xlmr_mp.eval import finetune as ft
    from xlmr_mp.eval.common import task_settings
    from xlmr_mp.eval.heads import Classifier, encoder_from
    from xlmr_mp.eval.sib200 import DEFAULTS, load
    em = tiny_model(tokenizer)
    s = task_settings(dict(FAST, epochs="4"), DEFAULTS, "sib200")
    data = load(EvalOptions(data=str(sib_dir)))
    labels = ft.check_data(data)
    ids = {n: i for i, n in enumerate(labels)}
    train, dev = (ft.encode_sequences(tokenizer, sp.items, ids, 64) for sp in (data.train, data.dev))
    clf = Classifier(encoder_from(em.model, 0.0), "sequence", 3, 0.0)
    pre = {k: v.clone() for k, v in clf.encoder.state_dict().items()}
    snaps, real_predict, scores = [], ft.predict, iter([10.0, 50.0, 20.0, 50.0])

    def spy(model, enc, *args, **kw):
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, enc, *args, **kw)
    monkeypatch.setattr(ft, "predict", spy)
    monkeypatch.setattr(ft, "score", lambda *a: next(scores))
    hist, best, _ = ft.train_seed(clf, pre, train, dev, ft.gold_of(dev), ft.ACCURACY, labels, s, 1, "cpu", False, "t")
    assert [h["dev"] for h in hist] == [10.0, 50.0, 20.0, 50.0] and best == 1 and len(snaps) == 4
    final = clf.state_dict()
    assert all(torch.equal(final[k], snaps[1][k]) for k in final)
    assert not all(torch.equal(final[k], snaps[3][k]) for k in final)
    assert not torch.equal(final["encoder.layers.0.ffn.fc1.weight"], pre["layers.0.ffn.fc1.weight"])


def test_epoch_choice_ignores_test_labels(tokenizer, sib_dir, monkeypatch):
    """The epoch is scored on the dev split only; shuffling the test sets' gold labels changes no
    prediction and no chosen epoch."""
    from xlmr_mp.eval import finetune as ft, sib200
    from xlmr_mp.eval.sib200 import read_sib_tsv
    opts = EvalOptions(data=str(sib_dir), seeds=[3], settings=dict(FAST, epochs="4"), progress=False)
    dev_texts = [tokenizer.encode(it.texts[0], add_bos=True, add_eos=True)
                 for it in read_sib_tsv(str(sib_dir / "en" / "dev.tsv"))]
    real_train_seed, seen = ft.train_seed, []

    def spy(clf, pretrained, train, dev, *args, **kw):
        seen.append([x.tolist() for x in dev.ids])
        return real_train_seed(clf, pretrained, train, dev, *args, **kw)
    monkeypatch.setattr(ft, "train_seed", spy)
    a = sib200.run(tiny_model(tokenizer), opts)
    assert seen == [dev_texts]
    for lang in ("en", "fr"):
        path = sib_dir / lang / "test.tsv"
        rows = [l.split("\t") for l in path.read_text().splitlines()[1:]]
        labels = [r[1] for r in rows]
        random.Random(5).shuffle(labels)
        write_tsv(path, [(r[0], lab, r[2]) for r, lab in zip(rows, labels)])
    b = sib200.run(tiny_model(tokenizer), opts)
    assert [p["pred"] for p in a.predictions] == [p["pred"] for p in b.predictions]
    assert a.extra["best_epoch"] == b.extra["best_epoch"] and a.extra["dev_history"] == b.extra["dev_history"]
    assert [p["gold"] for p in a.predictions] != [p["gold"] for p in b.predictions]


def test_deterministic_per_seed_mean_and_std(tokenizer, sib_dir):
    from xlmr_mp.eval import sib200
    settings = dict(FAST, epochs="3", dropout="0.1")
    run = lambda seeds: sib200.run(tiny_model(tokenizer), EvalOptions(   # noqa: E731
        data=str(sib_dir), seeds=seeds, settings=settings, languages=["en", "zz"], progress=False))
    one, again, two = run([2]), run([2]), run([1, 2])
    assert one.seeds == again.seeds and one.predictions == again.predictions
    assert one.extra["dev_history"] == again.extra["dev_history"]
    assert two.seeds["2"] == one.seeds["2"]              # a seed's run does not depend on the seeds before it
    assert two.extra["dev_history"]["2"] == one.extra["dev_history"]["2"]          # (train losses included)
    assert two.extra["dev_history"]["1"] != two.extra["dev_history"]["2"]
    for lang in ("en", "zz"):
        vals = [two.seeds["1"][lang], two.seeds["2"][lang]]
        assert two.languages[lang] == pytest.approx(np.mean(vals))
        assert two.std[lang] == pytest.approx(np.std(vals, ddof=1))
    assert {p["seed"] for p in two.predictions} == {1}


def test_export_hf_predicts_what_predictions_recorded(tokenizer, sib_dir, tmp_path):
    """tools/evaluate.py sib200 on an HF directory: --export-hf reloaded in transformers (model and
    tokenizer from that directory alone) predicts exactly the --predictions lines; --out has the scores
    next to the majority and chance baselines."""
    import json
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from xlmr_mp.checkpoint.hf import save_hf
    from xlmr_mp.eval.sib200 import read_sib_tsv
    em = tiny_model(tokenizer)
    save_hf(str(tmp_path / "mlm"), em.model.state_dict(), em.model.cfg, tokenizer=tokenizer)
    tool = load_tool("evaluate")
    out, preds, exported = tmp_path / "r" / "sib.json", tmp_path / "r" / "p.jsonl", tmp_path / "exported"
    assert tool.main(["sib200", "--model", str(tmp_path / "mlm"), "--data", str(sib_dir), "--seeds", "1,2",
                      "--out", str(out), "--predictions", str(preds), "--export-hf", str(exported), "--no-progress"]
                     + [f"{k}={v}" for k, v in FAST.items()]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["baselines"]) == {"majority", "chance"} and sorted(rep["seeds"]) == ["1", "2"]
    assert rep["languages"]["en"] == pytest.approx((rep["seeds"]["1"]["en"] + rep["seeds"]["2"]["en"]) / 2)
    rows = [json.loads(l) for l in preds.read_text().splitlines()]
    recorded = {(p["lang"], p["id"]): p["pred"] for p in rows}
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    hf = AutoModelForSequenceClassification.from_pretrained(str(exported)).eval()
    assert sorted(hf.config.label2id) == rep["config"]["task"]["labels"]
    n = 0
    for lang in ("en", "fr", "zz"):
        items = read_sib_tsv(str(sib_dir / lang / "test.tsv"))
        enc = hf_tok([it.texts[0] for it in items], padding=True, return_tensors="pt")
        assert enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist() == \
            tokenizer.encode(items[0].texts[0], add_bos=True, add_eos=True)
        with torch.no_grad():
            pred = hf(**enc).logits.argmax(-1).tolist()
        for it, p in zip(items, pred):
            assert hf.config.id2label[p] == recorded[(lang, it.id)]
            n += 1
    assert n == len(recorded) == len(rows) == 80 and {p["seed"] for p in rows} == {1}
    assert len(set(recorded.values())) > 1                                  # not a constant predictor


# ----------------------------------------------------------------------------- token tasks

TAG_OF = {"the": "DET", "a": "DET", "people": "NOUN", "city": "NOUN", "river": "NOUN", "goes": "VERB",
          "reads": "VERB", "sees": "VERB", "with": "ADP", "from": "ADP", "green": "ADJ", "old": "ADJ", ".": "PUNCT"}


def conllu_text(rng, n, max_words=9, mwt=False):
    words = sorted(TAG_OF)
    out = []
    for k in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(2, max_words))]
        lines = [f"# sent_id = s{k}"]
        if mwt:
            lines.append(f"1-2\t{ws[0]}{ws[1]}\t_\t_\t_\t_\t_\t_\t_\t_")
        lines += [f"{i}\t{w}\t{w}\t{TAG_OF[w]}\t_\t_\t0\tdep\t_\t_" for i, w in enumerate(ws, 1)]
        out.append("\n".join(lines) + "\n\n")
    return "".join(out)


@pytest.fixture()
def ud_dir(tmp_path):
    rng = random.Random(1)
    files = {"UD_English-EWT/en_ewt-ud-dev.conllu": conllu_text(rng, 120),
             "UD_English-EWT/en_ewt-ud-test.conllu": conllu_text(rng, 20),
             "UD_English-PUD/en_pud-ud-test.conllu": conllu_text(rng, 20, max_words=30),
             "UD_French-PUD/fr_pud-ud-test.conllu": conllu_text(rng, 15, mwt=True)}
    for rel, text in files.items():
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_udpos_study_rule_learns_and_predicts_every_word(tokenizer, ud_dir, tmp_path):
    from transformers import AutoModelForTokenClassification
    from xlmr_mp.eval import udpos
    from xlmr_mp.eval.conll import read_conllu
    from xlmr_mp.eval.finetune import encode_words
    out = tmp_path / "exp"
    r = udpos.run(tiny_model(tokenizer), EvalOptions(data=str(ud_dir), seeds=[1], export_hf=str(out), progress=False,
                                                     settings=dict(FAST, epochs="6", max_length="16")))
    assert r.config["files"]["train"] == ["UD_English-EWT/en_ewt-ud-dev.conllu"]
    assert r.config["files"]["dev"] == ["UD_English-EWT/en_ewt-ud-test.conllu"]
    assert r.config["files"]["test"] == {"en": ["UD_English-PUD/en_pud-ud-test.conllu"],
                                         "fr": ["UD_French-PUD/fr_pud-ud-test.conllu"]}
    for lang in ("en", "fr"):
        assert r.languages[lang] > r.baselines["majority"][lang] + 20
    sents = read_conllu(str(ud_dir / "UD_English-PUD/en_pud-ud-test.conllu"))
    rows = [p for p in r.predictions if p["lang"] == "en"]
    assert [len(p["pred"]) for p in rows] == [len(s.words) for s in sents]   # long sentences: every word
    assert max(len(s.words) for s in sents) > 16
    # the exported token classifier, fed our ids, predicts the recorded tags
    hf = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    ids = {n: i for i, n in enumerate(r.config["labels"])}
    enc = encode_words(tokenizer, sents, ids, 16)
    got = [[] for _ in sents]
    with torch.no_grad():
        for x, pos, k in zip(enc.ids, enc.positions, enc.sentence):
            logits = hf(input_ids=torch.as_tensor(x)[None]).logits[0]
            got[k] += [hf.config.id2label[int(t)] for t in logits[pos].argmax(-1)]
    assert got == [p["pred"] for p in rows]


def test_encode_words_chunks_keep_whole_words(tokenizer):
    from xlmr_mp.eval.conll import TaggedSentence
    from xlmr_mp.eval.finetune import encode_words
    words = "people market government yesterday travels 人们 城市 x".split() * 3
    sent = TaggedSentence("s", words, ["NOUN"] * len(words), "f", 1)
    enc = encode_words(tokenizer, [sent], {"NOUN": 0}, 10)
    assert len(enc.ids) > 2 and all(len(x) <= 10 for x in enc.ids)
    firsts = [tokenizer.encode(w)[0] for w in words]
    assert [int(x[p]) for x, ps in zip(enc.ids, enc.positions) for p in ps] == firsts
    for x in enc.ids:
        assert x[0] == 0 and x[-1] == 2
    whole = encode_words(tokenizer, [sent], {"NOUN": 0}, 128)
    assert len(whole.ids) == 1
    assert whole.ids[0][1:-1].tolist() == [i for w in words for i in tokenizer.encode(w)]


def test_ner_end_to_end_f1_and_baselines(tokenizer, tmp_path):
    from xlmr_mp.eval import ner
    rng = random.Random(2)
    ents = {"river": "LOC", "water": "LOC", "children": "PER", "money": "ORG"}   # one piece each
    def text(n):
        out = []
        for _ in range(n):
            ws = [rng.choice(FILL + list(ents)) for _ in range(rng.randint(3, 8))]
            out.append("".join(f"{w} {'I-' + ents[w] if w in ents else 'O'}\n" for w in ws) + "\n")  # IOB1
        return "".join(out)
    for split, n in (("train", 120), ("dev", 20), ("test", 20)):
        (tmp_path / "en").mkdir(exist_ok=True)
        (tmp_path / "en" / split).write_text(text(n))
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "test").write_text(text(15))
    r = ner.run(tiny_model(tokenizer), EvalOptions(data=str(tmp_path), seeds=[1], progress=False, settings=dict(FAST)))
    assert r.metric == "entity F1 (%)" and sorted(r.languages) == ["en", "sw"]
    assert r.baselines["majority"] == {"en": 0.0, "sw": 0.0}
    assert r.languages["en"] > 50 and r.languages["en"] > r.baselines["chance"]["en"] + 20
    assert {"O", "B-LOC", "I-LOC", "B-PER", "B-ORG"} <= set(r.config["labels"])   # IOB1 read as IOB2
    assert all(t == "O" or t.startswith(("B-", "I-")) for p in r.predictions for t in p["pred"])


def test_xnli_pairs_encoded_as_xlmr(tokenizer, tmp_path):
    from xlmr_mp.eval import xnli
    from xlmr_mp.eval.finetune import SeqItem, encode_sequences
    it = SeqItem("1", ("the city river", "people reads"), "neutral", "x:1")
    enc = encode_sequences(tokenizer, [it], {"neutral": 0}, 64)
    a, b = tokenizer.encode("the city river"), tokenizer.encode("people reads")
    assert enc.ids[0].tolist() == [0] + a + [2, 2] + b + [2]
    short = encode_sequences(tokenizer, [SeqItem("1", ("the city river " * 5, "a"), "neutral", "x:1")], {"neutral": 0}, 12)
    assert len(short.ids[0]) == 12 and short.ids[0].tolist()[-3:] == [2] + tokenizer.encode("a") + [2]
    # truncated pairs are cut as the exported tokenizer (transformers, truncation=True) cuts them
    from transformers import AutoTokenizer
    from xlmr_mp.tokenizer.hf import save_hf_tokenizer
    save_hf_tokenizer(tokenizer, str(tmp_path))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for na, nb, length in [(10, 10, 19), (10, 10, 20), (12, 5, 14), (5, 12, 14), (20, 3, 12), (3, 20, 12),
                           (8, 8, 15), (6, 5, 14), (2, 2, 8), (30, 30, 64)]:
        pair = (" ".join(["river"] * na), " ".join(["water"] * nb))
        ours = encode_sequences(tokenizer, [SeqItem("1", pair, "neutral", "x:1")], {"neutral": 0}, length).ids[0]
        assert ours.tolist() == hf_tok(*pair, truncation=True, max_length=length)["input_ids"], (na, nb, length)
    rng = random.Random(3)
    head = "language\tgold_label\tsentence1\tsentence2\tpairID\n"
    lab = {"water": "entailment", "school": "neutral", "market": "contradiction"}
    hyp = {"water": "the river", "school": "he teaches", "market": "no money"}   # the label is in sentence 2
    rows = lambda lang, n: "".join(f"{lang}\t{lab[l]}\t{t}\t{hyp[l]}\t{lang}{k}\n"  # noqa: E731
                                   for k, l, t in sib_rows(rng, n))
    (tmp_path / "xnli.dev.tsv").write_text(head + rows("en", 20) + rows("fr", 5))
    (tmp_path / "xnli.test.tsv").write_text(head + rows("en", 20) + rows("fr", 20))
    (tmp_path / "multinli.train.en.tsv").write_text("premise\thypo\tlabel\n" + "".join(
        f"{t}\t{hyp[l]}\t{'contradictory' if lab[l] == 'contradiction' else lab[l]}\n" for _, l, t in sib_rows(rng, 100)))
    r = xnli.run(tiny_model(tokenizer), EvalOptions(data=str(tmp_path), progress=False, settings=dict(FAST, epochs="8")))
    assert sorted(r.languages) == ["en", "fr"] and r.config["labels"] == ["entailment", "neutral", "contradiction"]
    assert r.languages["en"] > r.baselines["majority"]["en"] + 20
    assert r.config["train_file"].endswith("multinli.train.en.tsv")


# ----------------------------------------------------------------------------- bad input, batching

def test_bad_input_stops_before_training(tokenizer, sib_dir, monkeypatch):
    from xlmr_mp.eval import finetune, sib200
    def boom(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(finetune, "train_seed", boom)
    em = tiny_model(tokenizer)
    run = lambda **kw: sib200.run(em, EvalOptions(data=str(sib_dir), progress=False, **kw))  # noqa: E731
    with pytest.raises(EvalError, match=r"max_length=600: the model takes 8 to 128 ids"):
        run(settings={"max_length": "600"})
    with pytest.raises(EvalError, match=r"epoks=3: unknown setting for sib200"):
        run(settings={"epoks": "3"})
    with pytest.raises(EvalError, match=r"lr=abc: expected a float"):
        run(settings={"lr": "abc"})
    with pytest.raises(EvalError, match=r"--seeds"):
        run(seeds=[])
    with pytest.raises(EvalError, match=r"--seeds 1,1: give one or more different"):
        run(seeds=[1, 1])
    with pytest.raises(EvalError, match=r"--train-language sw"):
        run(train_language="sw")
    with pytest.raises(EvalError, match=r"--export-hf .*: cannot create it"):
        run(export_hf=str(sib_dir / "en" / "train.tsv" / "exported"))
    write_tsv(sib_dir / "zz" / "test.tsv", [("1", "weather", "a city road.")])
    with pytest.raises(EvalError, match=r"zz/test\.tsv:2: label 'weather' never occurs in the training data"):
        run()
    write_tsv(sib_dir / "en" / "dev.tsv", [])
    with pytest.raises(EvalError, match=r"en/dev\.tsv: empty dev set"):
        run()


def test_train_batches_cover_each_example_once_with_little_padding():
    from xlmr_mp.eval.finetune import steps_per_epoch, train_batches
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, 1234)
    for bs in (1, 7, 32):
        batches = train_batches(lengths, bs, np.random.default_rng(1), pool=4)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1234))
        assert len(batches) == steps_per_epoch(1234, bs, pool=4) and max(len(b) for b in batches) == bs
    batches = train_batches(lengths, 32, np.random.default_rng(1))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()                           # length-bucketed
    again = train_batches(lengths, 32, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
