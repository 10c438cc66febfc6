"""Cross-lingual sentence retrieval on line-aligned files: `DIR/<lang>.txt`, line i of every file
a translation of line i of `DIR/<pivot>.txt` (pivot en by default; the FLORES-200 devtest layout).

Each line (tokenized alone, `<s> pieces </s>`, cut to the model's positions) is embedded as the mean
over its tokens of the hidden states after `layer` encoder layers (default: the middle one,
num_layers // 2; 0 = the embedding output). The embeddings of each language are centred (their
mean subtracted) and L2-normalised; en->X accuracy is the share of en lines whose most
cosine-similar X line is their translation, X->en the converse. The headline per language is the
mean of the two directions (in %); chance is 100 / lines.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

from xlmr_mp.eval.api import EvalError, EvalModel, EvalOptions, TaskResult
from xlmr_mp.eval.common import (encode_lines, hidden_states, length_sorted_batches, max_tokens, mean_pool,
                                 num_layers, pad_batch, progress, read_lines, select_languages, task_settings)
from xlmr_mp.eval.mbpc import available_languages

DEFAULTS = {"layer": -1, "batch_size": 32, "pivot": "en", "max_batch_tokens": 16384}


@torch.no_grad()
def embed_lines(model, tok, lines: Sequence[str], layer: int, batch_size: int = 32,
                max_batch_tokens: Optional[int] = None, device: str = "cpu", show: bool = False,
                desc: str = "embed") -> torch.Tensor:
    """[N, H] float64 mean-pooled hidden states after `layer` layers, one row per line (input order)."""
    seqs = encode_lines(tok, lines, max_tokens(model))
    out = torch.zeros(len(seqs), model.cfg.hidden_size, dtype=torch.float64)
    batches = length_sorted_batches([len(s) for s in seqs], batch_size, max_batch_tokens)
    for batch in progress(batches, total=len(batches), desc=desc, enabled=show, unit="batch"):
        ids, mask = pad_batch([seqs[i] for i in batch], tok.pad_id, device)
        pooled = mean_pool(hidden_states(model, ids, mask, layer).float(), mask)
        out[torch.as_tensor(batch)] = pooled.double().cpu()
    return out


def centred_unit(x: torch.Tensor) -> torch.Tensor:
    """Rows minus their mean, scaled to unit L2 norm."""
    x = x - x.mean(0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def top1_accuracy(src: torch.Tensor, tgt: torch.Tensor) -> float:
    """% of rows i of `src` whose most cosine-similar row of `tgt` is row i (both centred unit rows)."""
    sim = src @ tgt.T
    return 100.0 * float((sim.argmax(1) == torch.arange(len(src))).double().mean())


def resolve_layer(layer: int, model) -> int:
    n = num_layers(model)
    layer = n // 2 if layer < 0 else layer
    if layer > n:
        raise EvalError(f"layer={layer}: the model has {n} layers (0 = embeddings, {n} = last)")
    return layer


def run(em: EvalModel, opts: EvalOptions) -> TaskResult:
    s = task_settings(opts.settings, DEFAULTS, "retrieval")
    layer = resolve_layer(s["layer"], em.model)
    pivot = s["pivot"]
    avail = available_languages(opts.data)
    if pivot not in avail:
        raise EvalError(f"--data {opts.data}: no {pivot}.txt (the pivot language; set pivot=LANG to use another)")
    langs = [l for l in select_languages(avail, opts.languages, opts.data, "{lang}.txt") if l != pivot]
    if not langs:
        raise EvalError(f"--languages: retrieval needs at least one language besides the pivot {pivot}")
    pivot_path = os.path.join(opts.data, f"{pivot}.txt")
    pivot_lines = read_lines(pivot_path)

    def embed(lines, name):
        return centred_unit(embed_lines(em.model, em.tokenizer, lines, layer, s["batch_size"], s["max_batch_tokens"],
                                        em.device, opts.progress, f"embed {name}"))
    p = embed(pivot_lines, pivot)
    fwd, bwd, both, preds = {}, {}, {}, []
    for lang in langs:
        path = os.path.join(opts.data, f"{lang}.txt")
        lines = read_lines(path)
        if len(lines) != len(pivot_lines):
            raise EvalError(f"{path}: {len(lines)} lines but {pivot_path} has {len(pivot_lines)}; retrieval needs "
                            f"line-aligned files")
        x = embed(lines, lang)
        fwd[lang], bwd[lang] = top1_accuracy(p, x), top1_accuracy(x, p)
        both[lang] = (fwd[lang] + bwd[lang]) / 2
        if opts.predictions:
            hits = (p @ x.T).argmax(1).tolist()
            preds += [{"lang": lang, "id": i, "pred": int(h), "gold": i, "direction": f"{pivot}->{lang}"}
                      for i, h in enumerate(hits)]
    chance = 100.0 / len(pivot_lines)
    return TaskResult(task="retrieval", metric="top1_accuracy", languages=both,
                      baselines={"chance": {l: chance for l in langs}},
                      extra={f"{pivot}_to_x": fwd, f"x_to_{pivot}": bwd, "layer": layer, "lines": len(pivot_lines)},
                      predictions=preds, config=dict(s, layer=layer))
