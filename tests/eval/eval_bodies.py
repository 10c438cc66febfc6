"""A tiny real training run for the evaluation tests: tiny corpus -> tools/train_spm.py ->
tools/preprocess_data.py -> the trainer at TP=2 (two gloo processes) -> a checkpoint root.

`trained_run(base_dir)` builds it once per test session (under pytest's temporary root) and returns
{root, spm, data, corpus, params (full state at the end of training), mbpc_tp2 (per-language NLL sums
the TP=2 model computed on the mbpc passes of EVAL_LINES)}.
"""
from __future__ import annotations

import json
import os

import torch

STEPS = 4
EVAL_LANGS = ("en", "zh", "ur")


def eval_lines(lang: str, n: int = 24, seed: int = 11):
    """Held-out-style lines of the tiny corpus generator (another seed than the training text)."""
    from xlmr_mp.fixtures.demo_corpus import tiny_documents
    return [s for d in tiny_documents(lang, n, seed=seed) for s in d][:n]


def train_tp2_body(rank, world_size, data_dir, spm, run_dir, eval_langs):
    """Train STEPS steps at TP=2 on real data, save; return the TP-local parameters and the NLL sums
    the TP=2 model (vocab-parallel cross-entropy) gives on the mbpc passes of eval_lines()."""
    from tests.support.train_bodies import tiny_cfg
    from xlmr_mp.data.loader import build_train_loader
    from xlmr_mp.eval.common import max_tokens
    from xlmr_mp.eval.mbpc import masked_inputs, plan_language
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    from xlmr_mp.tokenizer import XLMRTokenizer
    from xlmr_mp.train import Trainer
    cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=2", f"data.path={data_dir}", f"data.tokenizer={spm}",
                    "parallel.tensor=2", f"run_dir={run_dir}", "logging.jsonl=false", "optim.warmup_steps=1"],
                   world_size)
    g = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    tr = Trainer(cfg, g, torch.device("cpu"), build_train_loader(cfg, g.dp_rank, g.dp_size))
    for _ in range(STEPS):
        tr.train_step()
    path = tr.save()
    model = tr.chunks[0].eval()
    tok = XLMRTokenizer(spm)
    nll = {}
    with torch.no_grad():
        for lang in eval_langs:
            windows, items, _ = plan_language(tok, lang, eval_lines(lang), 7, max_tokens(model), False)
            total = 0.0
            for i in range(0, len(items), 16):
                ids, attn, lab = masked_inputs(windows, items, list(range(i, min(i + 16, len(items)))),
                                               tok.mask_id, tok.pad_id)
                loss_sum, _ = model.loss_and_count(ids, attn, lab)
                total += float(loss_sum)
            nll[lang] = total
    out = {"params": {n: p.detach().clone() for n, p in tr.named}, "tp_rank": g.tp_rank, "path": path, "nll": nll}
    destroy_parallel()
    return out


def trained_run(base_dir: str) -> dict:
    """The tiny TP=2 run (built once under base_dir; later calls reuse it)."""
    from tests.support.harness import run_distributed
    from tests.support.prep import run_tool, train_tiny_spm
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    try:
        from xlmr_mp.model.sharding import local_to_full
    except ImportError:                     # before the sharding table moved beside the model
        from xlmr_mp.parallel.shard import local_to_full
    done = os.path.join(base_dir, "run.pt")
    if os.path.exists(done):
        return torch.load(done, weights_only=False)
    os.makedirs(base_dir, exist_ok=True)
    corpus, spm_prefix = os.path.join(base_dir, "corpus"), os.path.join(base_dir, "spm")
    make_tiny_corpus(corpus, scale=0.5)
    spm = train_tiny_spm(corpus, spm_prefix, vocab_size=1000)
    data = os.path.join(base_dir, "data")
    run_tool("preprocess_data", "--input", corpus, "--tokenizer", spm, "--output-dir", data, "--split", "90,10,0",
             "--workers", 1, "--quiet")
    run_dir = os.path.join(base_dir, "run")
    res = run_distributed(train_tp2_body, 2, args=(data, spm, run_dir, EVAL_LANGS), timeout=300)
    from tests.support.train_bodies import tiny_cfg
    cfg = tiny_cfg().model
    params = local_to_full([r["params"] for r in sorted(res, key=lambda r: r["tp_rank"])], cfg)
    out = {"root": os.path.join(run_dir, "checkpoints"), "spm": spm, "data": data, "corpus": corpus,
           "params": params, "mbpc_tp2": res[0]["nll"], "mbpc_tp2_rank1": res[1]["nll"], "step_dir": res[0]["path"]}
    torch.save(out, done + ".tmp")
    os.replace(done + ".tmp", done)
    with open(os.path.join(base_dir, "run.json"), "w") as f:
        json.dump({k: v for k, v in out.items() if isinstance(v, str)}, f)
    return out
