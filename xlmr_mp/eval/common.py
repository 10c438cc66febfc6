"""What every evaluation task shares: loading the model to evaluate, batching, hidden states.

    em = load_eval_model("runs/x/checkpoints")               # ours: step dir or root with `latest`
    em = load_eval_model("xlm-roberta-base/")                 # an HF XLMRobertaForMaskedLM directory
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size=32):
        ids, mask = pad_batch([seqs[i] for i in idx], em.tokenizer.pad_id)
        h = hidden_states(em.model, ids, mask, layer=2)       # [B, S, H] after layer 2

Both kinds of model run through the same `XLMRModel` code: HF weights are converted with the
name map of `xlmr_mp/checkpoint/hf.py`. The tokenizer is always our `XLMRTokenizer`, so ids are
the fairseq / HF XLM-R ids.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from xlmr_mp.eval.api import EvalError, EvalModel

HF_SPM_NAME = "sentencepiece.bpe.model"      # the file name of XLM-R's tokenizer in HF directories


# ----------------------------------------------------------------------------- model loading

def is_hf_dir(path: str) -> bool:
    """An HF model directory (config.json, no xlmr_mp meta.json / latest)."""
    return (os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "meta.json"))
            and not os.path.isfile(os.path.join(path, "latest")))


def load_tokenizer(path: str, option: str = "--tokenizer"):
    """XLMRTokenizer of `path` (P.model, with P.dict.txt beside it when present); EvalError if absent."""
    from xlmr_mp.tokenizer import TokenizerError, XLMRTokenizer
    if not os.path.isfile(path):
        raise EvalError(f"{option}: tokenizer {path} does not exist; give the run's SentencePiece model "
                        f"with --tokenizer P.model")
    try:
        return XLMRTokenizer(path)
    except TokenizerError as e:
        raise EvalError(f"{option}: {e}") from None


def check_vocab(tokenizer, vocab_size: int, where: str) -> None:
    """EvalError unless the tokenizer gives exactly the model's number of ids."""
    if tokenizer.vocab_size != vocab_size:
        raise EvalError(f"tokenizer {tokenizer.model_path} gives {tokenizer.vocab_size} ids but the model "
                        f"({where}) has a vocabulary of {vocab_size}: the tokenizer belongs to another model; "
                        f"give the run's own with --tokenizer")


def load_eval_model(path: str, tokenizer: Optional[str] = None, device: str = "cpu") -> EvalModel:
    """EvalModel of one of our checkpoints (step directory or root with `latest`, any TP/PP layout)
    or of an HF XLMRobertaForMaskedLM directory. The tokenizer is `tokenizer` when given, else the
    run's `data.tokenizer` (ours) or DIR/sentencepiece.bpe.model (HF)."""
    from xlmr_mp.checkpoint.hf import HFConversionError, load_hf
    from xlmr_mp.checkpoint.load import CheckpointError, load_model, model_from_full_state, run_tokenizer_path
    from xlmr_mp.checkpoint.model_io import read_meta, resolve_checkpoint_dir
    if not os.path.exists(path):
        raise EvalError(f"--model: {path} does not exist; give a checkpoint step directory, a checkpoint root "
                        f"with `latest`, or a Hugging Face XLMRobertaForMaskedLM directory")
    if is_hf_dir(path):
        try:
            cfg, full = load_hf(path)
            model = model_from_full_state(cfg, full, device)
        except (HFConversionError, CheckpointError, OSError) as e:
            raise EvalError(f"--model {path}: {e}") from None
        tok_path = tokenizer or os.path.join(path, HF_SPM_NAME)
        if tokenizer is None and not os.path.isfile(tok_path):
            raise EvalError(f"--model {path}: no {HF_SPM_NAME} in the directory; give its SentencePiece model "
                            f"with --tokenizer")
        tok = load_tokenizer(tok_path)
        check_vocab(tok, cfg.vocab_size, f"{path}/config.json")
        return EvalModel(model=model, tokenizer=tok, source=path, kind="hf", step=None,
                         config=dataclasses.asdict(cfg), device=device)
    try:
        step_dir = resolve_checkpoint_dir(path)
        meta = read_meta(step_dir)
        model = load_model(step_dir, device=device)
    except (CheckpointError, OSError) as e:
        raise EvalError(f"--model: {e}") from None
    run_config = meta.get("config") or {}
    tok_path = tokenizer or run_tokenizer_path(step_dir, meta)
    if tok_path is None:
        raise EvalError(f"--model {path}: the run's config has no data.tokenizer; give its SentencePiece model "
                        f"with --tokenizer P.model")
    tok = load_tokenizer(tok_path, "--tokenizer" if tokenizer else f"{step_dir}/meta.json data.tokenizer")
    check_vocab(tok, model.cfg.vocab_size, f"{step_dir}/meta.json")
    return EvalModel(model=model, tokenizer=tok, source=path, kind="xlmr_mp", step=int(meta.get("step", 0)),
                     config=dataclasses.asdict(model.cfg), device=device, run_config=run_config,
                     step_dir=step_dir)


# ----------------------------------------------------------------------------- options

def task_settings(settings: Dict[str, str], defaults: Dict[str, Any], task: str) -> Dict[str, Any]:
    """`defaults` updated with the key=value extras, each coerced to its default's type (bool, int,
    float, str; None defaults take ints, floats or strings); EvalError on an unknown key or a bad value."""
    out = dict(defaults)
    for key, raw in (settings or {}).items():
        if key not in defaults:
            raise EvalError(f"{key}={raw}: unknown setting for {task}; valid keys: "
                            f"{', '.join(f'{k}={v}' for k, v in defaults.items())}")
        d = defaults[key]
        try:
            if isinstance(d, bool):
                if str(raw).lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                out[key] = str(raw).lower() in ("1", "true", "yes")
            elif isinstance(d, int):
                out[key] = int(raw)
            elif isinstance(d, float):
                out[key] = float(raw)
            elif d is None:
                out[key] = _number_or_string(raw)
            else:
                out[key] = str(raw)
        except ValueError:
            raise EvalError(f"{key}={raw}: expected a {type(d).__name__} (default {d!r})") from None
    return out


def _number_or_string(raw: str):
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def select_languages(available: Iterable[str], requested: Optional[Sequence[str]], where: str,
                     layout: str = "{lang}") -> List[str]:
    """The languages to evaluate: every available one (sorted) when none are requested, else the
    requested ones in order; EvalError naming the missing file when one is not available."""
    available = sorted(set(available))
    if not requested:
        if not available:
            raise EvalError(f"--data {where}: no evaluation files found (expected {layout})")
        return available
    missing = [l for l in requested if l not in available]
    if missing:
        raise EvalError(f"--languages: {', '.join(missing)} not found under {where} (expected "
                        f"{', '.join(layout.format(lang=l) for l in missing)}); available: "
                        f"{', '.join(available) or 'none'}")
    return list(requested)


def progress(iterable, total: Optional[int] = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """tqdm progress bar on stderr (a plain iterator when disabled)."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- batching

def max_tokens(model) -> int:
    """Longest id sequence (with <s> and </s>) the model's position table allows."""
    return model.cfg.max_positions - model.cfg.pad_id - 1


def encode_lines(tokenizer, lines: Sequence[str], max_len: Optional[int] = None) -> List[List[int]]:
    """`<s> pieces </s>` ids of each line, the pieces cut to fit `max_len` ids in all."""
    out = []
    for ids in tokenizer.encode_batch(list(lines), add_bos=False, add_eos=False):
        if max_len is not None and len(ids) > max_len - 2:
            ids = ids[: max_len - 2]
        out.append([tokenizer.bos_id] + list(ids) + [tokenizer.eos_id])
    return out


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: Optional[int] = None) -> List[List[int]]:
    """Index lists covering every item once, longest first (ties by index), each with at most
    `batch_size` items and, when given, at most `max_batch_tokens` padded tokens."""
    if batch_size < 1:
        raise EvalError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_batch_tokens and width * (len(cur) + 1) > max_batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: str = "cpu"):
    """(input_ids [B, S] int64, attention_mask [B, S] int64) of right-padded sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def num_layers(model) -> int:
    return len(model.layers)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """Hidden states [B, S, H] after `layer` encoder layers (0 = the embedding output, L = the last
    layer's output; default L). The model must hold the embeddings and every layer (TP 1)."""
    from xlmr_mp.model.encoder import attention_bias
    n = num_layers(model)
    layer = n if layer is None else int(layer)
    if not 0 <= layer <= n:
        raise EvalError(f"layer={layer}: the model has layers 0..{n} (0 = embeddings)")
    x = model.embeddings(input_ids)
    bias = attention_bias(attention_mask, x.dtype)
    for i, block in enumerate(model.layers.values()):
        if i == layer:
            break
        x = block(x, bias)
    return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, H] -> [B, H]: mean over the positions where attention_mask is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def read_lines(path: str) -> List[str]:
    """Lines of a UTF-8 text file without their newline; EvalError naming the file and line on bad UTF-8."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                out.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); convert the file "
                                f"to UTF-8") from None
    return out
