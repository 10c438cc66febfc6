"""Train the multilingual SentencePiece unigram model of XLM-R on alpha-sampled sentences.

    xlmr-train-spm --input DIR --output-prefix P --vocab-size 250000 --alpha 0.3

Input: DIR/<lang>.txt | .jsonl, optionally .gz / .xz / .zst, DIR/<lang>.zst (JSONL), DIR/<lang>.parquet
(column --text-key), folders DIR/<lang>/ of those, or Parquet with --lang-key (see xlmr_mp.data.corpus_io).
Sampling (XLM-R / XLM): p_i = language i's share of sentences (or bytes, --share-unit),
q_i = p_i^alpha / sum_j p_j^alpha, and language i contributes n_i = q_i * --sample-size
sentences (at most all it has, minus its held-out lines), drawn uniformly without replacement in
two streaming passes (count, then select), so memory holds only the sample.
Writes (temporary names, renamed when complete):
  P.model     SentencePiece model (unk/bos/eos = spm ids 0/1/2)
  P.vocab     SentencePiece's piece/score listing
  P.dict.txt  fairseq/HF dictionary: '<piece> <count>' for spm pieces 3..size-1 in order, count =
              occurrences when encoding the training sample; fairseq puts line k at id 4+k, so
              <s>=0 <pad>=1 </s>=2 <unk>=3, piece i -> i+1, <mask> = size+1, vocab = size+2.
Report: per-language counts, shares, sampling probabilities and sample sizes, then per-language
unknown-token rate and byte-fallback rate on held-out lines not used for training.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
import unicodedata
import zlib

import numpy as np

from xlmr_mp.data.corpus_io import BAD_LINE_POLICIES, CorpusError, find_language_files, iter_sentences

CJK = ("zh", "zh_Hant", "ja", "ko", "yue", "wuu")


def sampling_probs(counts: np.ndarray, alpha: float) -> np.ndarray:
    """q_i proportional to p_i^alpha, p_i = counts_i / sum(counts)."""
    p = counts / counts.sum()
    q = np.where(p > 0, p, 0.0) ** alpha
    q[p == 0] = 0.0
    return q / q.sum()


def plan_sample(n_sentences, shares, alpha, sample_size, heldout):
    """Per language: (held-out lines, training sample size), from shares (sentences or bytes)."""
    q = sampling_probs(np.asarray(shares, dtype=np.float64), alpha)
    plan = []
    for n, qi in zip(n_sentences, q):
        h = min(heldout, n // 10)
        want = int(round(qi * sample_size))
        plan.append((h, max(0, min(want, n - h))))
    return q, plan


def _read_options(args, lang):
    return dict(max_line_bytes=args.max_line_bytes, on_bad_line=args.on_bad_line, json_key=args.text_key,
                lang_key=args.lang_key, lang=lang)


def _count_pass(files, args):
    from tqdm import tqdm
    counts, sizes = [], []
    for lang, path in tqdm(files.items(), desc="counting", unit="lang", disable=args.quiet, mininterval=1.0):
        n = b = 0
        for s in iter_sentences(path, **_read_options(args, lang)):
            n += 1
            b += len(s.encode("utf-8"))
        if n == 0:
            raise CorpusError(f"{path}: no sentences for language {lang!r}; remove it or pass --languages without it")
        counts.append(n)
        sizes.append(b)
    return counts, sizes


def _select_pass(files, counts, plan, args):
    """Streaming selection of the planned indices; returns {lang: (train list, heldout list)}."""
    from tqdm import tqdm
    out = {}
    for (lang, path), n, (h, k) in tqdm(list(zip(files.items(), counts, plan)), desc="sampling", unit="lang",
                                        disable=args.quiet, mininterval=1.0):
        rng = np.random.default_rng([args.seed, zlib.crc32(lang.encode())])
        chosen = rng.choice(n, size=h + k, replace=False) if h + k < n else rng.permutation(n)[:h + k]
        role = {int(i): (r < h) for r, i in enumerate(chosen)}
        train, held = [], []
        for i, s in enumerate(iter_sentences(path, **_read_options(args, lang))):
            r = role.get(i)
            if r is None:
                continue
            (held if r else train).append(s)
        out[lang] = (train, held)
    return out


def required_characters(selected, coverage, limit):
    """Characters each language needs to reach `coverage` of its own (NFKC) sampled text.

    A global --character-coverage lets the long tail of a large script (CJK) fall out of the
    vocabulary when many languages share it; the union of per-language needs keeps them. Capped at
    `limit` characters (the ones most frequent within some language win).
    """
    score = {}
    for lang, (train, _) in selected.items():
        cnt = collections.Counter()
        for s in train:
            cnt.update(unicodedata.normalize("NFKC", s))
        for ch in (" ", "\t"):
            cnt.pop(ch, None)
        total = sum(cnt.values())
        acc = 0
        for ch, c in cnt.most_common():
            if acc >= coverage * total:
                break
            acc += c
            if ch.isprintable():
                score[ch] = max(score.get(ch, 0.0), c / total)
    chars = sorted(score, key=lambda ch: (-score[ch], ch))
    return "".join(sorted(chars[:limit]))


def evaluate(sp, heldout):
    """Per language: (pieces, unk rate, byte-fallback rate, chars per piece) on held-out sentences."""
    byte_ids = np.array([i for i in range(sp.get_piece_size()) if sp.is_byte(i)], dtype=np.int64)
    res = {}
    for lang, lines in heldout.items():
        if not lines:
            res[lang] = (0, float("nan"), float("nan"), float("nan"))
            continue
        ids = np.fromiter((i for p in sp.encode(lines) for i in p), dtype=np.int64)
        n = max(ids.size, 1)
        unk = np.count_nonzero(ids == sp.unk_id()) / n
        byte = np.isin(ids, byte_ids).sum() / n if byte_ids.size else 0.0
        res[lang] = (ids.size, unk, byte, sum(map(len, lines)) / n)
    return res


def train(args) -> int:
    import sentencepiece as spm
    from xlmr_mp.tokenizer.spm import write_fairseq_dict

    langs = [l for l in args.languages.split(",") if l] if args.languages else None
    files = find_language_files(args.input, langs, args.text_key, args.lang_key)
    t0 = time.perf_counter()
    counts, sizes = _count_pass(files, args)
    shares = counts if args.share_unit == "sentences" else sizes
    q, plan = plan_sample(counts, shares, args.alpha, args.sample_size, args.heldout)
    p = np.asarray(shares, dtype=np.float64) / sum(shares)
    print(f"alpha={args.alpha} share unit={args.share_unit} sample size={args.sample_size:,} "
          f"languages={len(files)}")
    print(f"{'lang':<8} {'sentences':>11} {'MB':>8} {'p_i':>8} {'q_i':>8} {'sampled':>9} {'held-out':>9}")
    for (lang, _), n, b, pi, qi, (h, k) in zip(files.items(), counts, sizes, p, q, plan):
        full = " (all)" if k == n - h and k < int(round(qi * args.sample_size)) else ""
        print(f"{lang:<8} {n:>11,} {b / 1e6:>8.2f} {pi:>8.4f} {qi:>8.4f} {k:>9,} {h:>9,}{full}")
    selected = _select_pass(files, counts, plan, args)
    sample = [s for lang in files for s in selected[lang][0]]
    random.Random(args.seed).shuffle(sample)
    print(f"sample: {len(sample):,} sentences, {sum(map(len, sample)) / 1e6:.1f} M characters "
          f"(counting+sampling {time.perf_counter() - t0:.1f} s)", flush=True)

    required = ""
    if args.per_language_coverage > 0:
        limit = max(0, args.vocab_size // 2 - (259 if args.byte_fallback else 3))
        required = required_characters(selected, args.per_language_coverage, limit)
        print(f"per-language character coverage {args.per_language_coverage}: {len(required):,} required "
              f"characters (at most {limit:,}, half the vocabulary)", flush=True)

    prefix = args.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for ext in (".model", ".dict.txt", ".vocab"):
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    print(f"training SentencePiece unigram, {args.vocab_size:,} pieces, {args.num_threads} thread(s) "
          f"(no progress output from its C++ trainer; --verbose shows its log) ...", flush=True)
    t1 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_prefix=tmp, model_type="unigram",
        vocab_size=args.vocab_size, character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback, num_threads=args.num_threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=args.max_sentence_length, normalization_rule_name=args.normalization,
        required_chars=required,
        hard_vocab_limit=not args.soft_vocab_limit,
        minloglevel=0 if args.verbose else 2)
    train_s = time.perf_counter() - t1
    sp = spm.SentencePieceProcessor(model_file=tmp + ".model")
    counts_piece = np.bincount(np.fromiter((i for p in sp.encode(sample, num_threads=args.num_threads) for i in p),
                                           dtype=np.int64), minlength=sp.get_piece_size())
    write_fairseq_dict(sp, tmp + ".dict.txt", counts_piece)
    os.replace(tmp + ".dict.txt", prefix + ".dict.txt")
    os.replace(tmp + ".vocab", prefix + ".vocab")
    os.replace(tmp + ".model", prefix + ".model")
    print(f"trained {sp.get_piece_size():,} pieces in {train_s:.1f} s -> {prefix}.model, {prefix}.vocab, "
          f"{prefix}.dict.txt (dictionary size {sp.get_piece_size() + 2:,} with <s> <pad> </s> <unk> <mask>)")

    ev = evaluate(sp, {lang: selected[lang][1] for lang in files})
    print(f"held-out evaluation (lines not in the sample; byte fallback {'on' if args.byte_fallback else 'off'}):")
    print(f"{'lang':<8} {'lines':>7} {'pieces':>9} {'unk%':>8} {'byte%':>8} {'chars/piece':>12}")
    all_p = all_u = 0
    for lang in files:
        n, unk, byte, cpp = ev[lang]
        all_p += n
        all_u += unk * n if n else 0
        cjk = "  CJK" if lang in CJK else ""
        print(f"{lang:<8} {len(selected[lang][1]):>7,} {n:>9,} {100 * unk:>8.4f} {100 * byte:>8.4f} {cpp:>12.2f}{cjk}")
    print(f"overall unknown-token rate: {100 * all_u / max(all_p, 1):.4f}%  "
          f"(total {time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="directory of <lang>.txt / <lang>.jsonl [.gz|.xz|.zst] / "
                   "<lang>.zst / <lang>.parquet / <lang>/ folders of those")
    p.add_argument("--text-key", "--json-key", dest="text_key", default="text", metavar="KEY",
                   help="text field of JSONL input / text column of Parquet input (default text)")
    p.add_argument("--lang-key", default=None, metavar="COLUMN",
                   help="Parquet column holding each row's language: read every .parquet under --input "
                        "(default: language from the file or folder name)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab, PREFIX.dict.txt")
    p.add_argument("--vocab-size", type=int, default=250000, help="SentencePiece pieces (default 250000 -> 250002 ids)")
    p.add_argument("--alpha", type=float, default=0.3, help="sampling exponent, q_i ~ p_i^alpha (default 0.3)")
    p.add_argument("--languages", default=None, help="comma list (default: every language file in --input)")
    p.add_argument("--sample-size", type=int, default=2_000_000, help="training sentences in total (default 2M)")
    p.add_argument("--share-unit", choices=("sentences", "bytes"), default="sentences", help="what p_i counts")
    p.add_argument("--heldout", type=int, default=1000,
                   help="held-out lines per language for the unknown-rate report (at most 10%% of its lines)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters the vocabulary must cover (default 0.9995, as for CJK-heavy data)")
    p.add_argument("--per-language-coverage", type=float, default=0.9995,
                   help="also keep the characters covering this share of EACH language's sampled text, so "
                        "scripts with long tails (CJK) keep their characters in a shared vocabulary "
                        "(default 0.9995; 0 = global --character-coverage only)")
    p.add_argument("--byte-fallback", dest="byte_fallback", action="store_true", default=True,
                   help="rare characters become UTF-8 byte pieces instead of <unk> (default on)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    p.add_argument("--num-threads", type=int, default=1, help="SentencePiece trainer threads")
    p.add_argument("--max-sentence-length", type=int, default=4192, help="longer training sentences are dropped (bytes)")
    p.add_argument("--normalization", default="nmt_nfkc", help="SentencePiece normalization rule (default nmt_nfkc)")
    p.add_argument("--soft-vocab-limit", action="store_true", help="allow fewer pieces than --vocab-size on small data")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--on-bad-line", choices=BAD_LINE_POLICIES, default="error")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20)
    p.add_argument("--verbose", action="store_true", help="SentencePiece's own training log")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not 0 < args.alpha <= 1:
            raise CorpusError(f"--alpha {args.alpha}: must be in (0, 1]")
        if args.vocab_size < 16:
            raise CorpusError(f"--vocab-size {args.vocab_size}: too small")
        if args.sample_size < 1:
            raise CorpusError(f"--sample-size {args.sample_size}: must be >= 1")
        if not 0 < args.character_coverage <= 1:
            raise CorpusError(f"--character-coverage {args.character_coverage}: must be in (0, 1]")
        if not 0 <= args.per_language_coverage <= 1:
            raise CorpusError(f"--per-language-coverage {args.per_language_coverage}: must be in [0, 1]")
        return train(args)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # SentencePiece trainer errors (e.g. vocab too large for the sample)
        print(f"error: SentencePiece training failed: {e}\n  hint: lower --vocab-size, raise --sample-size, "
              f"or pass --soft-vocab-limit", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
