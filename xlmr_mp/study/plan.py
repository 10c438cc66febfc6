"""Derived values of every cell: the run overrides it trains with, parameters (embedding / rest),
tokens, steps, sampling share q_i and epochs per language, tokenizer and dataset, estimated time.

Budgets (../shared/STUDY.md): `fixed_total` gives every cell T tokens; `fixed_per_language`
gives T_k = T * sum_{L_k} n_i^alpha / sum_{L_base} n_i^alpha, so each base language sees as many
tokens as in the base run, with n_i = characters of language i (after cap_lines: tokenizer-
independent, so tokenizers of different vocabularies get the same budget). A `characters` budget
is turned into tokens by the cell's dataset's characters per token. Steps = ceil(T / (global
batch x sequence length)), rounded up to a multiple of 10 from 50 steps on, so that the learning
curve (train.eval_interval = steps / 10) ends at the last step.
Sizes and epochs are exact once the cell's dataset is prepared, estimated (characters / 3) before.
With `evaluate_at` (fractions of the steps) the checkpoint interval is the fractions' common
divisor times the steps (rounded; curve_points), every checkpoint is kept, and each fraction's
point is the saved step nearest to it (its exact step and tokens are what results.csv records).
A branch (spec.py: parent, branch_at) trains with checkpoint.branch_from set to its parent's
checkpoint at branch_at; planning it checks that the parent keeps that checkpoint (SpecError naming
the key and the fix; with a budget, once the parent's dataset is built and its steps are exact).
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.study.prepare import DatasetSpec, Preparation, TokenizerSpec
from xlmr_mp.study.spec import Cell, SpecError, Study

EPOCH_WARNING = 8.0
EST_CHARS_PER_TOKEN = 3.0


@dataclass
class CellPlan:
    cell: Cell
    tokenizer: TokenizerSpec
    dataset: DatasetSpec
    overrides: List[str]
    shape: Dict[str, int]
    params_embedding: int
    params_rest: int
    tokens: int
    steps: int
    exact: bool                                  # sizes from the prepared dataset (not estimated)
    sizes: Dict[str, int]                        # train tokens per language
    q: Dict[str, float]
    epochs: Dict[str, float]
    est_seconds: Optional[float] = None
    warnings: List[str] = field(default_factory=list)
    curve: List[tuple] = field(default_factory=list)     # (fraction, step) of evaluate_at, ascending

    @property
    def params(self) -> int:
        return self.params_embedding + self.params_rest


def count_params(m) -> tuple:
    """(embedding, rest) parameter counts of an XLMRModel config at TP 1 (word embeddings = the
    padded V x H table; the tied decoder adds nothing; positions count as rest)."""
    from xlmr_mp.parallel.vocab import padded_vocab_size
    vp = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    h, f, L = m.hidden_size, m.ffn_size, m.num_layers
    layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    rest = m.max_positions * h + 2 * h + L * layer + (vp + h * h + h + 2 * h)
    return vp * h, rest


def solve_width(m, target: float) -> tuple:
    """hidden_size (a multiple of num_heads, ffn_size at the config's ratio to it) whose total
    parameter count is closest to `target`, then ffn_size trimmed so that the total lands within
    a few hundred parameters of it (a step of num_heads in width moves ~2% at 2M parameters);
    returns (hidden, ffn, params)."""
    import copy
    ratio = m.ffn_size / m.hidden_size
    best = None
    trial = copy.copy(m)
    for h in range(m.num_heads, 8193, m.num_heads):
        object.__setattr__(trial, "hidden_size", h)
        object.__setattr__(trial, "ffn_size", max(1, int(round(ratio * h))))
        p = sum(count_params(trial))
        if best is None or abs(p - target) < abs(best[2] - target):
            best = (h, trial.ffn_size, p)
        if p > target * 1.5:
            break
    h, f, p = best
    object.__setattr__(trial, "hidden_size", h)
    per_ffn = m.num_layers * (2 * h + 1)          # fc1 row + bias + fc2 column, every layer
    f = max(1, f + int(round((target - p) / per_ffn)))
    object.__setattr__(trial, "ffn_size", f)
    return h, f, sum(count_params(trial))


def curve_points(fractions: List[float], steps: int) -> tuple:
    """(checkpoint interval, [(fraction, step)]) of evaluate_at: the interval is g x steps rounded
    half up, g the largest fraction dividing every one of them (0.25 for quarters), and fraction f
    is step (f / g) x interval, capped at `steps` (f = 1 is always the last step)."""
    from fractions import Fraction
    fr = [Fraction(str(f)).limit_denominator(1000) for f in fractions]
    den = 1
    for x in fr:
        den = den * x.denominator // math.gcd(den, x.denominator)
    num = 0
    for x in fr:
        num = math.gcd(num, int(x * den))
    g = Fraction(num, den)
    interval = max(1, int(math.floor(g * steps + Fraction(1, 2))))
    points = [(f, steps if x == 1 else min(steps, int(x / g) * interval)) for f, x in zip(fractions, fr)]
    return interval, sorted(points, key=lambda p: p[1])


def kept_checkpoints(steps: int, interval: int, keep_last: int, start: int = 0) -> List[int]:
    """The checkpoint steps a run of `steps` steps started at step `start` keeps once complete: one
    every `interval` steps after `start` (0: none) and the last step, the last `keep_last` of them."""
    kept = [s for s in range(interval, steps, interval) if s > start] if interval else []
    return (kept + [steps])[-keep_last:]


def branch_checkpoint(out_dir: str, cell: Cell) -> str:
    """The checkpoint a branch starts from: its parent's at branch_at."""
    from xlmr_mp.checkpoint.format import step_dir_name
    return os.path.join(os.path.abspath(out_dir), "cells", cell.parent.name, "run", "checkpoints",
                        step_dir_name(cell.branch_at))


def check_branch(study: Study, prep: Preparation, cell: Cell, steps: int, out_dir: str) -> None:
    """SpecError unless the parent of branch `cell` keeps a checkpoint at branch_at and the branch
    trains past it (not checked while a budgeted parent's steps are estimates)."""
    from xlmr_mp.config import load_config
    parent = cell.parent
    pp = plan_cell(study, prep, parent, out_dir)
    pc = load_config(study.base_config, pp.overrides, validate=False)
    kept = kept_checkpoints(pp.steps, pc.checkpoint.interval, pc.checkpoint.keep_last, parent.branch_at or 0)
    if (pp.exact or not parent.budget) and cell.branch_at not in kept:
        raise SpecError(
            f"{study.path}: grid {cell.grid}: branch_at={cell.branch_at} is not a checkpoint step {parent.name} keeps "
            f"(it keeps {', '.join(map(str, kept))}: checkpoint.interval={pc.checkpoint.interval}, steps={pp.steps}, "
            f"checkpoint.keep_last={pc.checkpoint.keep_last}); set branch_at to one of them or set {parent.name}'s "
            f"checkpoint.interval and checkpoint.keep_last in its overrides")
    if cell.branch_at >= steps:
        raise SpecError(f"{study.path}: grid {cell.grid}: branch_at={cell.branch_at} leaves cell {cell.name} nothing "
                        f"to train (it trains {steps} steps); branch earlier or train longer")


def _round_steps(steps: int) -> int:
    return steps if steps < 50 else int(math.ceil(steps / 10) * 10)


def plan_cell(study: Study, prep: Preparation, cell: Cell, out_dir: str) -> CellPlan:
    """Everything derived for one cell (no training)."""
    from xlmr_mp.config import ConfigError, load_config
    from xlmr_mp.data.blend import sampling_weights
    ds = prep.dataset_for(cell)
    tok = ds.tokenizer
    shape_ov = [f"model.vocab_size={cell.vocab + 2}"]
    try:
        cfg = load_config(study.base_config, cell.run_overrides + shape_ov, validate=False)
        cfg.model.validate()
    except ConfigError as e:
        raise SpecError(f"{study.path}: cell {cell.name}: {e}") from None
    warnings = []
    if cell.fixed_params:
        h, f, p = solve_width(cfg.model, cell.fixed_params)
        cfg.model.hidden_size, cfg.model.ffn_size = h, f
        shape_ov += [f"model.hidden_size={h}", f"model.ffn_size={f}"]
    emb, rest = count_params(cfg.model)
    seq, gb = cfg.data.seq_length, cfg.train.global_batch
    # sizes: exact train tokens once the dataset exists
    exact_sizes = prep.train_tokens(ds)
    chars = {l: prep.language_stats(l, cell.cap_lines.get(l))["characters"] for l in cell.languages}
    if exact_sizes is not None:
        sizes = {l: exact_sizes[l] for l in cell.languages}
        all_chars = {l: prep.language_stats(l, tok.cap_lines.get(l))["characters"] for l in tok.languages}
        cpt = sum(all_chars.values()) / max(1, sum(exact_sizes.values()) / 0.98)
    else:
        sizes = {l: max(1, int(chars[l] / EST_CHARS_PER_TOKEN * 0.98)) for l in cell.languages}
        cpt = EST_CHARS_PER_TOKEN
    b = cell.budget
    if b:
        if "tokens" in b:
            total = float(b["tokens"])
        else:
            total = float(b["characters"]) / cpt
        if b["mode"] == "fixed_per_language":
            base = b["base_languages"]
            cbase = {l: prep.language_stats(l, cell.cap_lines.get(l))["characters"] for l in base}
            total *= (sum(chars[l] ** cell.alpha for l in cell.languages)
                      / sum(cbase[l] ** cell.alpha for l in base))
        steps = _round_steps(max(1, int(math.ceil(total / (gb * seq)))))
    else:
        steps = cfg.train.train_steps
    tokens = steps * gb * seq
    q = sampling_weights([sizes[l] for l in cell.languages], cell.alpha)
    qd = {l: float(x) for l, x in zip(cell.languages, q)}
    epochs = {l: qd[l] * tokens / sizes[l] for l in cell.languages}
    for l, e in epochs.items():
        if e > EPOCH_WARNING:
            warnings.append(f"{l} is seen {e:.1f} times (> {EPOCH_WARNING:g} epochs): it may be memorised")
    run_dir = os.path.join(os.path.abspath(out_dir), "cells", cell.name, "run")
    user_keys = {o.split("=", 1)[0] for o in cell.run_overrides}
    defaults = []
    if "optim.warmup_steps" not in user_keys:
        defaults.append(f"optim.warmup_steps={max(1, int(round(0.05 * steps)))}")
    if "train.eval_interval" not in user_keys:
        defaults.append(f"train.eval_interval={max(1, steps // 10)}")
    curve = []
    if cell.evaluate_at:
        if "checkpoint.interval" in user_keys or "checkpoint.keep_last" in user_keys:
            raise SpecError(f"{study.path}: cell {cell.name}: evaluate_at sets checkpoint.interval and "
                            f"checkpoint.keep_last itself; remove them from the overrides")
        interval, curve = curve_points(cell.evaluate_at, steps)
        if steps // interval > 40:
            warnings.append(f"evaluate_at keeps {steps // interval} checkpoints (interval {interval})")
        # every interval save kept (and a few saves on a signal); the runner deletes the others after training
        defaults += [f"checkpoint.interval={interval}", f"checkpoint.keep_last={steps // interval + 5}"]
    elif "checkpoint.interval" not in user_keys:
        defaults.append(f"checkpoint.interval={max(1, int(math.ceil(steps / 5)))}")
    defaults += ["logging.tensorboard=false", "train.device=cpu"]
    if not cell.evaluate_at:
        defaults.append("checkpoint.keep_last=1")
    derived = shape_ov + [f"data.path={prep.dataset_dir(ds)}", f"data.tokenizer={prep.tokenizer_dir(tok)}/spm.model",
                          "data.languages=[" + ",".join(cell.languages) + "]", f"data.alpha={cell.alpha}",
                          f"train.seed={cell.seed}", f"data.seed={cell.seed}", f"train.train_steps={steps}",
                          f"run_dir={run_dir}"]
    if cell.parent is not None:
        check_branch(study, prep, cell, steps, out_dir)
        derived.append(f"checkpoint.branch_from={branch_checkpoint(out_dir, cell)}")
    overrides = defaults + cell.run_overrides + derived      # the spec's own keys win over the defaults
    try:                                                      # the run config the trainer will validate
        load_config(study.base_config, overrides)
    except ConfigError as e:
        raise SpecError(f"{study.path}: cell {cell.name}: {e}") from None
    m = cfg.model
    shape = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
             "ffn_size": m.ffn_size, "vocab_size": m.vocab_size, "seq_length": seq, "global_batch": gb,
             "micro_batch": cfg.train.micro_batch}
    return CellPlan(cell=cell, tokenizer=tok, dataset=ds, overrides=overrides, shape=shape, params_embedding=emb,
                    params_rest=rest, tokens=tokens, steps=steps, exact=exact_sizes is not None, sizes=sizes,
                    q=qd, epochs=epochs, warnings=warnings, curve=curve)


def plan_study(study: Study, prep: Preparation, out_dir: str) -> List[CellPlan]:
    return [plan_cell(study, prep, c, out_dir) for c in study.cells]


# ----------------------------------------------------------------------------- time estimate

def _calibrate_shape(shape: dict, threads: int, seconds: float) -> float:
    """Seconds per optimizer step of this shape, from timing micro-steps for about `seconds`."""
    import torch
    from xlmr_mp.config import load_config
    from xlmr_mp import kernels
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = load_config(None, [f"model.{k}={shape[k]}" for k in ("hidden_size", "num_layers", "num_heads",
                                                                "ffn_size", "vocab_size")]
                      + [f"model.max_positions={shape['seq_length'] + 2}", "model.dropout=0.0",
                         "model.attention_dropout=0.0"], validate=False)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        model = XLMRModel(cfg.model)
        kernels.apply(model, "cpu")           # the trainer's CPU paths
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        mb, seq = shape["micro_batch"], shape["seq_length"]
        ids = torch.randint(4, shape["vocab_size"], (mb, seq), generator=g)
        labels = torch.where(torch.rand(mb, seq, generator=g) < 0.15, ids, torch.full_like(ids, IGNORE_INDEX))
        mask = torch.ones_like(ids)

        def micro():
            ls, n = model.loss_and_count(ids, mask, labels)
            (ls / n.clamp(min=1)).backward()
            opt.step()
            opt.zero_grad()
        micro()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            micro()
            n += 1
        per_micro = (time.perf_counter() - t0) / n
    finally:
        torch.set_num_threads(old)
    return per_micro * max(1, shape["global_batch"] // shape["micro_batch"])


def estimate_times(plans: List[CellPlan], out_dir: str, threads: int, total_seconds: float = 20.0,
                   log=print) -> None:
    """Fill est_seconds from a calibration of each distinct model shape on this machine, about
    `total_seconds` in all (cached in <out>/calibration.json per host, shape and threads)."""
    path = os.path.join(out_dir, "calibration.json")
    cache = json.load(open(path)) if os.path.exists(path) else {}
    host = socket.gethostname()
    shapes = {json.dumps(p.shape, sort_keys=True) for p in plans}
    todo = [s for s in sorted(shapes) if f"{host}|{threads}|{s}" not in cache]
    for s in todo:
        budget = max(1.0, total_seconds / max(1, len(todo)))
        log(f"[plan] calibrating {json.loads(s)} for {budget:.0f} s ({threads} thread(s))")
        cache[f"{host}|{threads}|{s}"] = _calibrate_shape(json.loads(s), threads, budget)
    if todo:
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    for p in plans:
        p.est_seconds = cache[f"{host}|{threads}|{json.dumps(p.shape, sort_keys=True)}"] * p.steps


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_plan(study: Study, plans: List[CellPlan], prep: Preparation, jobs: int) -> str:
    """The plan as text: one block per cell, then totals and the shared artefacts."""
    lines = [f"study {study.name}: {len(plans)} cells ({', '.join(study.grids)}); corpus {study.corpus}; "
             f"evaluate {', '.join(study.evaluate) or 'nothing'}"]
    for p in plans:
        c = p.cell
        sh = p.shape
        lines.append(f"\n{c.name}  [{', '.join(f'{a}={v}' for a, v in c.axis_values.items())}]"
                     + (f"  (also {', '.join(g for g, _ in c.aliases)})" if c.aliases else "")
                     + (f"  branch of {c.parent.name} at step {c.branch_at}" if c.parent else ""))
        lines.append(f"  shape H{sh['hidden_size']} L{sh['num_layers']} A{sh['num_heads']} F{sh['ffn_size']} "
                     f"V{sh['vocab_size']}; params {p.params:,} (embedding {p.params_embedding:,}, "
                     f"rest {p.params_rest:,})" + (f"; fixed_params target {c.fixed_params:,.0f}" if c.fixed_params else ""))
        lines.append(f"  tokens {p.tokens:,} = {p.steps} steps x {sh['global_batch']} x {sh['seq_length']}; "
                     f"budget {c.budget.get('mode', 'config steps') if c.budget else 'config steps'}; "
                     f"alpha {c.alpha:g}; seed {c.seed}; est. time {_fmt_time(p.est_seconds)}")
        lines.append(f"  tokenizer {c.tokenizer} tok-{p.tokenizer.key} ({len(p.tokenizer.languages)} languages, "
                     f"{p.tokenizer.vocab} pieces{', cap ' + json.dumps(p.tokenizer.cap_lines) if p.tokenizer.cap_lines else ''}); "
                     f"dataset data-{p.dataset.key}{'' if p.exact else ' (not built: sizes estimated)'}")
        lines.append("  " + "  ".join(f"{l}: q {p.q[l]:.3f} ep {p.epochs[l]:.2f}" for l in c.languages))
        if p.curve:
            lines.append("  evaluate_at (mbpc, retrieval): " + ", ".join(f"{f:g} -> step {s}" for f, s in p.curve))
        for w in p.warnings:
            lines.append(f"  WARNING: {w}")
    toks = {p.tokenizer.key for p in plans}
    dss = {p.dataset.key for p in plans}
    est = [p.est_seconds for p in plans if p.est_seconds is not None]
    lines.append(f"\n{len(toks)} tokenizer(s), {len(dss)} dataset(s) to share; total {sum(p.tokens for p in plans):,} "
                 f"tokens; est. {_fmt_time(sum(est)) if est else 'n/a'} of training "
                 f"({_fmt_time(sum(est) / max(1, jobs)) if est else 'n/a'} with {jobs} job(s))")
    return "\n".join(lines)
