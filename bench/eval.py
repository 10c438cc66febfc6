"""Benchmark the evaluation suite on CPU: seconds per language for mbpc, seconds per epoch for
SIB-200 fine-tuning, and fine-tuning training tokens/s against our pretraining step's tokens/s at
the same shape (the peer, measured in the same run).

    python bench/eval.py --shape tiny                          # tiny.yaml's model (4 x 64, 1002 ids)
    python bench/eval.py --shape base --lines 64 --sib-train 64 # XLM-R Base (12 x 768, 250002 ids)
    python bench/eval.py ... --out bench/results/eval_cpu.txt   # append the figures

Models are randomly initialised (speed does not depend on the weights). The tokenizer is a small
SentencePiece model trained here on the built-in tiny corpus; at the base shape the model keeps its
full 250002-row vocabulary (embedding, head and softmax cost as in XLM-R Base) and the ids fall in
the tokenizer's range. Text: ../shared/corpus/eval FLORES-200 devtest and SIB-200 en when present,
else tiny-corpus sentences (and synthetic SIB-style TSVs). mbpc is timed on --lines lines per
language and also given per 1012 lines (FLORES devtest), scaled linearly. The pretraining step is
the real trainer step (xlmr_mp.train.Trainer.train_step) on random masked-LM batches of
--pretrain-micro x min(128, max_positions - 2) tokens (the fine-tuning max_length); its tokens/s counts every position, the fine-tuning tokens/s counts
the non-padding tokens of the training batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import bench_log  # noqa: E402  (bench/, beside this script)

SHARED = os.path.join(ROOT, "..", "shared", "corpus", "eval")
FLORES_LINES = 1012


def model_overrides(shape: str) -> list:
    if shape == "tiny":
        return []                                   # the tiny preset's model
    return ["model.preset=base", "model.vocab_size=250002", "model.hidden_size=768", "model.num_layers=12",
            "model.num_heads=12", "model.ffn_size=3072", "model.max_positions=514", "model.dropout=0.0",
            "model.attention_dropout=0.0", "model.make_vocab_size_divisible_by=128"]


def run_config(shape: str, extra=()):
    from xlmr_mp.config import load_config
    return load_config("preset:tiny",
                       model_overrides(shape) + ["logging.jsonl=false", "logging.tensorboard=false",
                                                 "checkpoint.interval=0"] + list(extra))


def tiny_tokenizer(workdir: str):
    from xlmr_mp.cli import train_spm
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    from xlmr_mp.tokenizer import XLMRTokenizer
    make_tiny_corpus(os.path.join(workdir, "corpus"))
    assert train_spm.main(["--input", os.path.join(workdir, "corpus"), "--output-prefix",
                           os.path.join(workdir, "spm"), "--vocab-size", "1000", "--quiet"]) == 0
    return XLMRTokenizer(os.path.join(workdir, "spm.model"))


def eval_model(shape: str, tok):
    from xlmr_mp import kernels
    from xlmr_mp.eval.api import EvalModel
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = run_config(shape).model
    model = XLMRModel(cfg, init_seed=0).eval()
    model.strip_vocab_padding = True
    kernels.apply(model, "cpu")
    import dataclasses
    return EvalModel(model=model, tokenizer=tok, source=f"random {shape}", kind="xlmr_mp", step=0,
                     config=dataclasses.asdict(cfg))


def flores_lines(lang: str, n: int):
    from xlmr_mp.fixtures.demo_corpus import tiny_documents
    path = os.path.join(SHARED, "flores200_devtest", f"{lang}.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [l.rstrip("\n") for l in f][:n], "FLORES-200 devtest"
    lines = [s for d in tiny_documents(lang, n, seed=9) for s in d][:n]
    return lines, "tiny corpus"


def bench_mbpc(em, langs, n_lines: int, batch_size: int) -> list:
    from xlmr_mp.eval.mbpc import evaluate_lines
    rows = []
    for lang in langs:
        lines, src = flores_lines(lang, n_lines)
        t0 = time.perf_counter()
        r = evaluate_lines(em.model, em.tokenizer, lang, lines, batch_size=batch_size, show=False)
        s = time.perf_counter() - t0
        rows.append({"lang": lang, "lines": len(lines), "source": src, "seconds": s, "tokens": r["tokens"],
                     "per_1012": s * FLORES_LINES / len(lines), "scored_tokens_per_s": r["tokens"] / s})
    return rows


def sib_data(workdir: str, n_train: int):
    """(DIR, source): SIB-200 en from ../shared when present, else synthetic TSVs of tiny-corpus text."""
    shared = os.path.join(SHARED, "sib200")
    if os.path.isfile(os.path.join(shared, "en", "train.tsv")):
        return shared, "SIB-200 en"
    from xlmr_mp.fixtures.demo_corpus import tiny_documents
    d = os.path.join(workdir, "sib", "en")
    os.makedirs(d, exist_ok=True)
    sents = [s for doc in tiny_documents("en", 1100, seed=4) for s in doc]
    cats = ["science", "travel", "politics", "sports", "health", "entertainment", "geography"]
    for split, lo, hi in (("train", 0, 701), ("dev", 701, 800), ("test", 800, 1004)):
        with open(os.path.join(d, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("index_id\tcategory\ttext\n")
            for i in range(lo, hi):
                f.write(f"{i}\t{cats[i % 7]}\t{sents[i % len(sents)]}\n")
    return os.path.join(workdir, "sib"), "synthetic SIB-style TSVs"


def bench_sib(em, workdir: str, n_train: int, batch_size: int, max_length: int):
    try:
        from xlmr_mp.eval import sib200
    except ImportError:
        return None
    from xlmr_mp.eval.api import EvalOptions
    data, src = sib_data(workdir, n_train)
    opts = EvalOptions(data=data, languages=["en"], seeds=[1], progress=False,
                       settings={"epochs": "1", "train_limit": str(n_train), "batch_size": str(batch_size),
                                 "max_length": str(max_length)})
    t0 = time.perf_counter()
    res = sib200.run(em, opts)
    total = time.perf_counter() - t0
    tps = float(res.extra["train_tokens_per_s"]["1"])
    n = int(res.extra["n_train"])
    full = 701
    return {"source": src, "n_train": n, "seconds_total": total, "train_tokens_per_s": tps,
            "epoch_scale": full / n}


def bench_pretrain(shape: str, micro: int, steps: int) -> dict:
    from train_step import RandomBatches
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    from xlmr_mp.train import Trainer
    from xlmr_mp.distributed import init_distributed
    seq = min(128, run_config(shape).model.max_positions - 2)
    cfg = run_config(shape, [f"train.micro_batch={micro}", f"train.global_batch={micro}", f"data.seq_length={seq}",
                             f"optim.warmup_steps={steps + 2}"])
    init_distributed("auto", "cpu")
    groups = init_parallel(1, 1)
    tr = Trainer(cfg, groups, torch.device("cpu"), RandomBatches(cfg.model.vocab_size, seq, micro))
    tr.train_step()                                     # warm-up, not timed
    ms = [tr.train_step() for _ in range(steps)]
    secs = sum(m["step_time_s"] for m in ms)
    destroy_parallel()
    return {"tokens_per_s": steps * micro * seq / secs, "step_s": secs / steps, "micro": micro, "seq": seq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("tiny", "base"), default="tiny")
    p.add_argument("--languages", default="en,zh")
    p.add_argument("--lines", type=int, default=FLORES_LINES, help="mbpc lines per language (default 1012)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sib-train", type=int, default=701, help="SIB-200 training rows timed (default all 701)")
    p.add_argument("--pretrain-micro", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=None, help="append the figures to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import warnings
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as work:
        tok = tiny_tokenizer(work)
        em = eval_model(a.shape, tok)
        mb = bench_mbpc(em, a.languages.split(","), a.lines, a.batch_size)
        sib = bench_sib(em, work, a.sib_train, a.batch_size, min(128, em.model.cfg.max_positions - 2))
        pre = bench_pretrain(a.shape, a.pretrain_micro, a.pretrain_steps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cfg = run_config(a.shape).model
    lines = [f"# {bench_log.utc_stamp()}  commit {bench_log.commit()}  cpus {os.cpu_count()}"
             f"  threads {torch.get_num_threads()}  torch {torch.__version__}  load avg {load:.2f}",
             f"# command: python bench/eval.py {' '.join(sys.argv[1:] if argv is None else argv)}",
             f"shape={a.shape} layers={cfg.num_layers} hidden={cfg.hidden_size} vocab={cfg.vocab_size} "
             f"batch_size={a.batch_size}"]
    for r in mb:
        lines.append(f"mbpc {r['lang']}: {r['seconds']:.2f} s for {r['lines']} lines ({r['source']}, {r['tokens']} pieces, "
                     f"7 passes) = {r['per_1012']:.1f} s per 1012 lines; {r['scored_tokens_per_s']:.0f} scored pieces/s")
    if sib is None:
        lines.append("sib200: xlmr_mp.eval.sib200 not available")
    else:
        lines.append(f"sib200 en ({sib['source']}): 1 epoch on {sib['n_train']} rows + dev/test eval in "
                     f"{sib['seconds_total']:.1f} s (x{sib['epoch_scale']:.2f} rows for the full 701-row epoch); "
                     f"training {sib['train_tokens_per_s']:.0f} tokens/s")
    lines.append(f"pretraining step (peer, same shape, micro {pre['micro']} x {pre['seq']}, AdamW): {pre['tokens_per_s']:.0f} "
                 f"tokens/s, {pre['step_s']:.2f} s/step")
    if sib is not None:
        lines.append(f"ratio fine-tuning / pretraining tokens/s: {sib['train_tokens_per_s'] / pre['tokens_per_s']:.3f}")
    if a.note:
        lines.append(f"note: {a.note}")
    bench_log.emit("\n".join(lines), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
