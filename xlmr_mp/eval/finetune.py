"""Fine-tuning with zero-shot cross-lingual transfer, shared by sib200, xnli, udpos and ner.

A task module parses its files into a `TaskData` (train and dev of the training language, one
test split per language) and calls `finetune(em, opts, data, settings)`, which

1. checks the data before anything trains (empty dev set, dev/test labels never seen in training:
   EvalError naming the file and line), encodes every split once (batched SentencePiece),
2. per seed: copies the pretrained encoder, adds a fresh HF-exact head (`heads.py`), trains with
   AdamW, linear warmup then linear decay, gradient clipping, on length-bucketed batches; scores
   the dev set after each epoch and keeps the best epoch (dev of the training language only),
3. tests every language with that epoch's weights; reports mean and std over seeds beside the
   majority-class baseline (most frequent training label) and chance, the first seed's
   predictions, and (opts.export_hf) the first seed's model as an HF directory.

Token tasks label the first sub-word of each word (the rest are -100); a sentence longer than
`max_length` is cut into chunks of whole words, so every word is predicted.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import max_tokens, progress
from xlmr_mp.eval.conll import entity_f1
from xlmr_mp.eval.heads import SEQUENCE, TOKEN, Classifier, encoder_from, export_hf
from xlmr_mp.ids import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, UNK_ID

# Settings every fine-tuning task takes (key=value on the command line); tasks override defaults.
FINETUNE_DEFAULTS: Dict[str, Any] = dict(
    epochs=3, lr=5e-5, batch_size=32, eval_batch_size=64, max_length=128, warmup=0.1,
    weight_decay=0.01, dropout=None, clip=1.0, train_limit=0)
# dropout=None: the model's own hidden dropout, for the encoder and the head (what transformers does
# with a config's hidden_dropout_prob); a number sets both.
ACCURACY, F1 = "accuracy (%)", "entity F1 (%)"
# 97.5% quantiles of Student's t for 1..10 degrees of freedom (95% confidence intervals over seeds)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass
class SeqItem:
    """One sequence-classification example: one text or a pair, its label, where it was read."""
    id: str
    texts: tuple
    label: str
    where: str


@dataclass
class Split:
    """The examples of one language and split (SeqItem or conll.TaggedSentence), and their file(s)."""
    lang: str
    path: str
    items: list


@dataclass
class TaskData:
    task: str
    kind: str                                  # heads.SEQUENCE | heads.TOKEN
    metric: str                                # ACCURACY | F1 (F1: IOB2 entity F1 of token tags)
    train: Split
    dev: Split
    tests: Dict[str, Split]
    labels: Optional[List[str]] = None         # label order (default: sorted training labels)
    files: Dict[str, Any] = field(default_factory=dict)   # the files chosen, for the result's config


# ----------------------------------------------------------------------------- checks

def _labels_of(item) -> List[str]:
    return [item.label] if isinstance(item, SeqItem) else list(item.tags)


def check_data(data: TaskData) -> List[str]:
    """The label list (data.labels, else the sorted training labels); EvalError for an empty train or
    dev set, or a training / dev / test label outside it (test labels the training never shows)."""
    if not data.train.items:
        raise EvalError(f"{data.train.path}: no training examples for {data.train.lang}; give a non-empty "
                        f"training file")
    if not data.dev.items:
        raise EvalError(f"{data.dev.path}: empty dev set for {data.dev.lang} (the epoch is chosen on it); give "
                        f"a dev file with examples")
    if not data.tests:
        raise EvalError(f"{data.task}: no test set to evaluate; check --data and --languages")
    labels = list(data.labels) if data.labels else sorted({l for it in data.train.items for l in _labels_of(it)})
    known = set(labels)
    for split in [data.train, data.dev] + list(data.tests.values()):
        if not split.items:
            raise EvalError(f"{split.path}: no test examples for {split.lang}; remove the language from "
                            f"--languages or give a non-empty file")
        for it in split.items:
            bad = [l for l in _labels_of(it) if l not in known]
            if bad:
                role = "train" if split is data.train else "dev" if split is data.dev else "test"
                raise EvalError(f"{it.where}: label {bad[0]!r} never occurs in the training data "
                                f"({data.train.path}: {', '.join(labels)}); the label sets of train and "
                                f"{split.lang} {role} differ: fix the data or give matching files")
    return labels


# ----------------------------------------------------------------------------- encoding

@dataclass
class Encoded:
    """A split as model inputs: ids per example; labels ([N] for sequences; for tokens, per
    example the first-piece positions and the label of each word, and which sentence / first
    word it is, since long sentences become several examples)."""
    ids: List[np.ndarray]
    lengths: np.ndarray
    y: Optional[np.ndarray] = None
    positions: Optional[List[np.ndarray]] = None
    tags: Optional[List[np.ndarray]] = None
    sentence: Optional[np.ndarray] = None
    n_sentences: int = 0


def pair_lengths(la: int, lb: int, budget: int):
    """Pieces kept of each side of a pair over `budget`, as the Hugging Face fast tokenizers'
    'longest_first' truncation: a side that fits in its half is kept whole and the other takes the
    rest; otherwise the first side keeps budget // 2 and the second the remainder."""
    if la + lb <= budget:
        return la, lb
    half = budget // 2
    if la <= half:
        return la, budget - la
    if lb <= budget - half:
        return budget - lb, lb
    return half, budget - half


def _pieces(tokenizer, texts: Sequence[str]):
    """(flat int64 ids, start offsets [N + 1]) of each text's pieces, no <s> / </s>."""
    flat, lens = tokenizer.encode_flat(list(texts), add_eos=False)
    return flat.astype(np.int64), np.concatenate([[0], np.cumsum(lens)])


def encode_sequences(tokenizer, items: Sequence[SeqItem], label_ids: Dict[str, int], max_length: int) -> Encoded:
    """`<s> A </s>` or `<s> A </s></s> B </s>` (XLM-R pairs), cut to max_length ids (pairs as HF cuts them)."""
    n_texts = len(items[0].texts)
    cols = [_pieces(tokenizer, [it.texts[k] for it in items]) for k in range(n_texts)]
    bos, eos = np.array([BOS_ID]), np.array([EOS_ID])
    ids = []
    for i in range(len(items)):
        (fa, oa) = cols[0]
        a = fa[oa[i]:oa[i + 1]]
        if n_texts == 1:
            ids.append(np.concatenate([bos, a[: max_length - 2], eos]))
        else:
            (fb, ob) = cols[1]
            b = fb[ob[i]:ob[i + 1]]
            ka, kb = pair_lengths(len(a), len(b), max_length - 4)
            ids.append(np.concatenate([bos, a[:ka], eos, eos, b[:kb], eos]))
    return Encoded(ids=ids, lengths=np.array([len(x) for x in ids], dtype=np.int64),
                   y=np.array([label_ids[it.label] for it in items], dtype=np.int64), n_sentences=len(items))


def encode_words(tokenizer, sentences, label_ids: Dict[str, int], max_length: int) -> Encoded:
    """Each word encoded on its own (as HF's is_split_into_words); a word with no piece becomes
    <unk>; sentences over max_length ids are split between words."""
    words = [w for s in sentences for w in s.words]
    flat, lens = tokenizer.encode_flat(words, add_eos=False)
    flat = flat.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    budget = max_length - 2
    out = Encoded(ids=[], lengths=np.zeros(0), positions=[], tags=[], sentence=None, n_sentences=len(sentences))
    sent_of, w = [], 0
    for k, s in enumerate(sentences):
        n = len(s.words)
        pieces = [flat[starts[j]:starts[j + 1]][:budget] if lens[j] else np.array([UNK_ID]) for j in range(w, w + n)]
        tags = np.array([label_ids[t] for t in s.tags], dtype=np.int64)
        w += n
        a = 0
        while a < n:                      # greedy chunks of whole words, each at most `budget` pieces
            b, used = a, 0
            while b < n and (b == a or used + len(pieces[b]) <= budget):
                used += len(pieces[b])
                b += 1
            body = np.concatenate(pieces[a:b])
            offs = np.concatenate([[0], np.cumsum([len(p) for p in pieces[a:b]])[:-1]]) + 1
            out.ids.append(np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int64))
            out.positions.append(offs.astype(np.int64))
            out.tags.append(tags[a:b])
            sent_of.append(k)
            a = b
    out.lengths = np.array([len(x) for x in out.ids], dtype=np.int64)
    out.sentence = np.array(sent_of, dtype=np.int64)
    return out


def collate(enc: Encoded, idx: Sequence[int], kind: str):
    """(input_ids [B, S], attention_mask [B, S], labels [B] or [B, S]) for examples idx, right-padded."""
    width = int(enc.lengths[list(idx)].max())
    ids = np.full((len(idx), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64) if kind == TOKEN else None
    for r, i in enumerate(idx):
        n = len(enc.ids[i])
        ids[r, :n] = enc.ids[i]
        mask[r, :n] = 1
        if kind == TOKEN:
            labels[r, enc.positions[i]] = enc.tags[i]
    y = torch.from_numpy(labels) if kind == TOKEN else torch.from_numpy(enc.y[list(idx)])
    return torch.from_numpy(ids), torch.from_numpy(mask), y


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50) -> List[np.ndarray]:
    """One epoch: a random order cut into pools of `pool` batches, each pool sorted by length and
    cut into batches, then the batches shuffled (little padding, random order)."""
    order = rng.permutation(len(lengths))
    batches = []
    for p in range(0, len(order), pool * batch_size):
        chunk = order[p:p + pool * batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(n: int, batch_size: int, pool: int = 50) -> int:
    full, rest = divmod(n, pool * batch_size)
    return full * pool + math.ceil(rest / batch_size)


# ----------------------------------------------------------------------------- predict and score

@torch.no_grad()
def predict(clf: Classifier, enc: Encoded, batch_size: int, device: str = "cpu", show: bool = False,
            desc: str = "predict") -> list:
    """Predicted label ids: an array [N] (sequences) or, per sentence, an array per word (tokens)."""
    clf.eval()
    order = np.argsort(-enc.lengths, kind="stable")
    if clf.kind == SEQUENCE:
        out = np.zeros(len(enc.ids), dtype=np.int64)
    else:
        out = [None] * len(enc.ids)
    starts = range(0, len(order), batch_size)
    for p in progress(starts, total=len(starts), desc=desc, enabled=show, unit="batch"):
        idx = order[p:p + batch_size]
        ids, mask, _ = collate(enc, idx, clf.kind)
        logits = clf(ids.to(device), mask.to(device))
        best = logits.argmax(-1).cpu().numpy()
        if clf.kind == SEQUENCE:
            out[idx] = best
        else:
            for r, i in enumerate(idx):
                out[i] = best[r, enc.positions[i]]
    if clf.kind == SEQUENCE:
        return out
    per_sentence = [[] for _ in range(enc.n_sentences)]
    for i, k in enumerate(enc.sentence):              # chunks are in sentence order
        per_sentence[k].append(out[i])
    return [np.concatenate(p) for p in per_sentence]


def gold_of(enc: Encoded) -> list:
    if enc.y is not None:
        return enc.y
    per_sentence = [[] for _ in range(enc.n_sentences)]
    for i, k in enumerate(enc.sentence):
        per_sentence[k].append(enc.tags[i])
    return [np.concatenate(p) for p in per_sentence]


def score(metric: str, gold: list, pred: list, labels: List[str]) -> float:
    """Accuracy over examples (sequences) or words (tokens), or entity F1, in percent."""
    if metric == F1:
        return 100.0 * entity_f1([[labels[t] for t in g] for g in gold], [[labels[t] for t in p] for p in pred])
    if isinstance(gold, np.ndarray):
        return 100.0 * float((gold == pred).mean())
    g, p = np.concatenate(gold), np.concatenate(pred)
    return 100.0 * float((g == p).mean())


def baselines(metric: str, train_gold: list, tests: Dict[str, list], labels: List[str]) -> Dict[str, Dict[str, float]]:
    """Majority class (the most frequent training label everywhere) and chance (accuracy: 1 / number
    of labels; F1: uniformly random tags, a fixed draw) per test language."""
    flat = train_gold if isinstance(train_gold, np.ndarray) else np.concatenate(train_gold)
    major = int(np.bincount(flat, minlength=len(labels)).argmax())
    out = {"majority": {}, "chance": {}}
    rng = np.random.default_rng(0)
    for lang, gold in tests.items():
        const = np.full(len(gold), major) if isinstance(gold, np.ndarray) else [np.full(len(g), major) for g in gold]
        out["majority"][lang] = score(metric, gold, const, labels)
        if metric == F1:
            out["chance"][lang] = score(metric, gold, [rng.integers(0, len(labels), len(g)) for g in gold], labels)
        else:
            out["chance"][lang] = 100.0 / len(labels)
    return out


# ----------------------------------------------------------------------------- training

def _check_settings(s: Dict[str, Any], em: EvalModel) -> None:
    limit = max_tokens(em.model)
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if s[key] < 1:
            raise EvalError(f"{key}={s[key]} must be >= 1")
    if not 8 <= s["max_length"] <= limit:
        raise EvalError(f"max_length={s['max_length']}: the model takes 8 to {limit} ids "
                        f"(model.max_positions={em.model.cfg.max_positions})")
    if not 0 <= s["warmup"] < 1:
        raise EvalError(f"warmup={s['warmup']} must be in [0, 1) (a fraction of the training steps)")
    if s["dropout"] is not None and (isinstance(s["dropout"], str) or not 0 <= s["dropout"] < 1):
        raise EvalError(f"dropout={s['dropout']} must be a number in [0, 1) (default: the model's own dropout)")
    if s["lr"] <= 0:
        raise EvalError(f"lr={s['lr']} must be > 0")


def train_seed(clf: Classifier, pretrained: Dict[str, torch.Tensor], train: Encoded, dev: Encoded, dev_gold,
               metric: str, labels: List[str], s: Dict[str, Any], seed: int, device: str, show: bool, desc: str):
    """Fine-tune from `pretrained` with `seed`; leaves clf at the best dev epoch.
    Returns (dev score per epoch, best epoch (0-based), training tokens per second)."""
    from types import SimpleNamespace
    from xlmr_mp.optim import LRSchedule, build_adamw, param_groups
    clf.encoder.load_state_dict(pretrained, strict=True)
    clf.reset_head(seed)
    torch.manual_seed(seed)                            # dropout draws
    rng = np.random.default_rng(seed)                  # data order
    hyper = SimpleNamespace(lr=s["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=s["weight_decay"])
    opt = build_adamw(param_groups(clf.named_parameters(), s["weight_decay"]), hyper, "fused")
    per_epoch = steps_per_epoch(len(train.ids), s["batch_size"])
    total = per_epoch * s["epochs"]
    sched = LRSchedule(s["lr"], int(round(s["warmup"] * total)), total, "linear")
    params = [p for p in clf.parameters() if p.requires_grad]
    history, best, best_state, best_epoch, step, tokens, seconds = [], -math.inf, None, 0, 0, 0, 0.0
    for epoch in range(s["epochs"]):
        clf.train()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        bar = progress(train_batches(train.lengths, s["batch_size"], rng), total=per_epoch,
                       desc=f"{desc} epoch {epoch + 1}/{s['epochs']}", enabled=show, unit="batch")
        for idx in bar:
            ids, mask, y = collate(train, idx, clf.kind)
            sched.apply(opt, step)
            loss = clf.loss(clf(ids.to(device), mask.to(device)), y.to(device))
            loss.backward()
            if s["clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, s["clip"], foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            step += 1
            tokens += int(train.lengths[idx].sum())
        seconds += time.perf_counter() - t0
        dev_pred = predict(clf, dev, s["eval_batch_size"], device, show, f"{desc} dev")
        dev_score = score(metric, dev_gold, dev_pred, labels)
        history.append({"epoch": epoch + 1, "dev": dev_score, "train_loss": float(loss_sum) / max(per_epoch, 1)})
        if show:
            print(f"{desc} epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, dev {dev_score:.2f}, "
                  f"{tokens / max(seconds, 1e-9):.0f} train tokens/s", file=sys.stderr, flush=True)
        if dev_score > best:
            best, best_epoch = dev_score, epoch
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
    clf.load_state_dict(best_state)
    return history, best_epoch, tokens / max(seconds, 1e-9)


def _prediction_rows(split: Split, gold, pred, labels: List[str], seed: int) -> List[dict]:
    rows = []
    for it, g, p in zip(split.items, gold, pred):
        if isinstance(it, SeqItem):
            rows.append({"lang": split.lang, "id": it.id, "pred": labels[int(p)], "gold": labels[int(g)], "seed": seed})
        else:
            rows.append({"lang": split.lang, "id": it.id, "pred": [labels[int(t)] for t in p],
                         "gold": [labels[int(t)] for t in g], "seed": seed})
    return rows


def check_export(path: str, tokenizer) -> None:
    """Before training: EvalError when --export-hf cannot be written or the tokenizer cannot be
    exported (its HF files are written to a scratch directory and checked to give our ids)."""
    import shutil
    import tempfile
    from xlmr_mp.tokenizer import TokenizerError
    from xlmr_mp.tokenizer.hf import save_hf_tokenizer
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise EvalError(f"--export-hf {path}: cannot create it ({parent} is not a writable directory)")
    scratch = tempfile.mkdtemp(prefix="xlmr_mp_export_check_")
    try:
        save_hf_tokenizer(tokenizer, scratch)
    except TokenizerError as e:
        raise EvalError(f"--export-hf {path}: {e}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def finetune(em: EvalModel, opts: EvalOptions, data: TaskData, s: Dict[str, Any]) -> TaskResult:
    """Train on data.train (epoch chosen on data.dev), test every split of data.tests, per seed."""
    t_start = time.perf_counter()
    _check_settings(s, em)
    labels = check_data(data)
    label_ids = {name: i for i, name in enumerate(labels)}
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise EvalError(f"--seeds {','.join(map(str, opts.seeds))}: give one or more different fine-tuning seeds")
    if opts.export_hf:
        check_export(opts.export_hf, em.tokenizer)
    encode = encode_sequences if data.kind == SEQUENCE else encode_words
    tok, n = em.tokenizer, s["max_length"]
    train_items = data.train.items
    if s["train_limit"] and s["train_limit"] < len(train_items):   # a fixed sample, the same for every seed
        keep = np.sort(np.random.default_rng(0).permutation(len(train_items))[: s["train_limit"]])
        train_items = [train_items[i] for i in keep]
    train, dev = encode(tok, train_items, label_ids, n), encode(tok, data.dev.items, label_ids, n)
    tests = {lang: encode(tok, sp.items, label_ids, n) for lang, sp in data.tests.items()}
    dev_gold, test_gold = gold_of(dev), {lang: gold_of(e) for lang, e in tests.items()}
    base = baselines(data.metric, gold_of(train), test_gold, labels)

    device = em.device or "cpu"
    dropout = em.model.cfg.dropout if s["dropout"] is None else float(s["dropout"])
    clf = Classifier(encoder_from(em.model, s["dropout"]), data.kind, len(labels), dropout).to(device)
    pretrained = {k: v.detach().clone() for k, v in clf.encoder.state_dict().items()}
    per_seed, history, best_epoch, speed, predictions = {}, {}, {}, {}, []
    for k, seed in enumerate(opts.seeds):
        desc = f"{data.task} seed {seed}"
        history[str(seed)], best_epoch[str(seed)], speed[str(seed)] = train_seed(
            clf, pretrained, train, dev, dev_gold, data.metric, labels, s, seed, device, opts.progress, desc)
        per_seed[str(seed)] = {}
        for lang, enc in tests.items():
            pred = predict(clf, enc, s["eval_batch_size"], device, opts.progress, f"{desc} test {lang}")
            per_seed[str(seed)][lang] = score(data.metric, test_gold[lang], pred, labels)
            if k == 0:
                predictions.extend(_prediction_rows(data.tests[lang], test_gold[lang], pred, labels, seed))
        if k == 0 and opts.export_hf:
            export_hf(opts.export_hf, clf, labels, tok)
    langs = list(tests)
    values = {lang: np.array([per_seed[str(sd)][lang] for sd in opts.seeds]) for lang in langs}
    mean = {lang: float(v.mean()) for lang, v in values.items()}
    std = {lang: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for lang, v in values.items()}
    m = len(opts.seeds)
    t = _T975[m - 2] if 2 <= m <= 11 else 1.96
    ci = {lang: (t * std[lang] / math.sqrt(m) if m > 1 else 0.0) for lang in langs}
    config = dict(s, dropout=dropout, train_language=data.train.lang, seeds=list(opts.seeds), labels=labels,
                  train_file=data.train.path, dev_file=data.dev.path,
                  test_files={lang: sp.path for lang, sp in data.tests.items()}, **data.files)
    extra = {"dev_history": history, "best_epoch": {sd: e + 1 for sd, e in best_epoch.items()}, "ci95": ci,
             "train_tokens_per_s": speed, "n_train": len(train_items), "n_dev": len(data.dev.items),
             "n_test": {lang: len(sp.items) for lang, sp in data.tests.items()},
             "seconds_total": time.perf_counter() - t_start}
    return TaskResult(task=data.task, metric=data.metric, languages=mean, higher_is_better=True, seeds=per_seed,
                      std=std, baselines=base, extra=extra, predictions=predictions, config=config)
