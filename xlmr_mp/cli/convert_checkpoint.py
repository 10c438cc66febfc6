"""Convert between Hugging Face XLMRobertaForMaskedLM directories and xlmr_mp checkpoints.

    xlmr-convert hf-to-xlmr --input HF_DIR --output CKPT --tp 2 [--pp 1]
    xlmr-convert xlmr-to-hf --input CKPT --output HF_DIR [--tokenizer P.model]
    xlmr-convert reshard    --input CKPT --output CKPT2 --tp 4 --pp 2

HF_DIR: config.json plus model.safetensors (or a sharded index, or pytorch_model.bin).
CKPT: meta.json + model_tp{t}_pp{p}.pt (a step directory, or for --input a root with `latest`).
xlmr-to-hf also writes the tokenizer (the run's data.tokenizer or --tokenizer: sentencepiece.bpe.model,
tokenizer.json with byte fallback, tokenizer_config.json), checked to give our ids, so that
AutoTokenizer and AutoModelForMaskedLM load HF_DIR alone.
The vocabulary is padded to a multiple of --vocab-divisible-by x TP in the shards and stripped on
export. Outputs are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _log(msg: str) -> None:
    print(f"[convert_checkpoint] {msg}", flush=True)


def _check_tp(cfg, tp: int, pp: int) -> None:
    from xlmr_mp.config import ConfigError
    from xlmr_mp.parallel.layers import check_divisible
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp={tp} and --pp={pp} must be >= 1")
    for value, option in ((cfg.num_heads, "model.num_heads"), (cfg.hidden_size, "model.hidden_size"),
                          (cfg.ffn_size, "model.ffn_size")):
        try:
            check_divisible(value, tp, option)
        except ConfigError as e:
            raise ConfigError(f"--tp {tp}: {e}") from None
    if pp > cfg.num_layers:
        raise ConfigError(f"--pp {pp} is larger than the model's {cfg.num_layers} layers")


def hf_to_xlmr(args) -> None:
    from xlmr_mp.checkpoint.hf import load_hf
    from xlmr_mp.checkpoint.model_io import save_model_checkpoint
    t0 = time.time()
    cfg, full = load_hf(args.input)
    cfg.make_vocab_size_divisible_by = args.vocab_divisible_by
    _check_tp(cfg, args.tp, args.pp)
    n = sum(t.numel() for t in full.values())
    _log(f"read {args.input}: {len(full)} tensors, {n / 1e6:.1f}M values ({time.time() - t0:.1f}s)")
    save_model_checkpoint(args.output, full, cfg, tp=args.tp, pp=args.pp, step=args.step,
                          extra_meta={"converted_from": os.path.abspath(args.input)})
    _log(f"wrote {args.output} (tp={args.tp}, pp={args.pp}) in {time.time() - t0:.1f}s")


def _export_tokenizer(args, step_dir: str, meta: dict):
    """The XLMRTokenizer to export: --tokenizer, else the run's data.tokenizer; None (with a
    warning) when there is neither."""
    from xlmr_mp.checkpoint.load import run_tokenizer_path
    from xlmr_mp.tokenizer import TokenizerError, XLMRTokenizer
    path = args.tokenizer or run_tokenizer_path(step_dir, meta)
    if path is None:
        _log("warning: no tokenizer exported (the run's config has no data.tokenizer); give --tokenizer P.model "
             "so that AutoTokenizer.from_pretrained works on the output")
        return None
    origin = "--tokenizer" if args.tokenizer else f"{step_dir}/meta.json data.tokenizer"
    if not os.path.isfile(path):
        raise TokenizerError(f"{origin}: {path} does not exist; give the run's SentencePiece model with --tokenizer")
    return XLMRTokenizer(path)


def xlmr_to_hf(args) -> None:
    from xlmr_mp.checkpoint.hf import save_hf
    from xlmr_mp.checkpoint.model_io import load_full_model_state, read_meta, resolve_checkpoint_dir
    t0 = time.time()
    step_dir = resolve_checkpoint_dir(args.input)
    meta = read_meta(step_dir)
    cfg, full = load_full_model_state(step_dir)
    _log(f"read {step_dir}: {len(full)} tensors ({time.time() - t0:.1f}s)")
    tok = None if args.no_tokenizer else _export_tokenizer(args, step_dir, meta)
    save_hf(args.output, full, cfg, tokenizer=tok)
    what = "config.json + model.safetensors" + (f" + tokenizer of {tok.model_path}" if tok else "")
    _log(f"wrote {args.output} ({what}) in {time.time() - t0:.1f}s")


def reshard(args) -> None:
    from xlmr_mp.checkpoint.model_io import load_full_model_state, read_meta, save_model_checkpoint
    t0 = time.time()
    meta = read_meta(args.input)
    cfg, full = load_full_model_state(args.input)
    _check_tp(cfg, args.tp, args.pp)
    save_model_checkpoint(args.output, full, cfg, tp=args.tp, pp=args.pp, step=meta.get("step", 0))
    _log(f"resharded {args.input} (tp={meta['tp']}, pp={meta['pp']}) -> {args.output} "
         f"(tp={args.tp}, pp={args.pp}) in {time.time() - t0:.1f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-xlmr", help="HF XLMRobertaForMaskedLM directory -> xlmr_mp checkpoint")
    a.add_argument("--input", required=True)
    a.add_argument("--output", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--step", type=int, default=0)
    a.add_argument("--vocab-divisible-by", type=int, default=128,
                   help="model.make_vocab_size_divisible_by stored in the checkpoint (default 128)")
    a.set_defaults(fn=hf_to_xlmr)
    b = sub.add_parser("xlmr-to-hf", help="xlmr_mp checkpoint -> HF directory that transformers loads")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--tokenizer", default=None,
                   help="SentencePiece model (P.model, P.dict.txt beside it) to export; default: the run's data.tokenizer")
    b.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    b.set_defaults(fn=xlmr_to_hf)
    c = sub.add_parser("reshard", help="xlmr_mp checkpoint -> the same model at another TP / PP")
    c.add_argument("--input", required=True)
    c.add_argument("--output", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.set_defaults(fn=reshard)
    args = p.parse_args(argv)
    from xlmr_mp.checkpoint.hf import HFConversionError
    from xlmr_mp.checkpoint.model_io import CheckpointError
    from xlmr_mp.config import ConfigError
    from xlmr_mp.tokenizer import TokenizerError
    try:
        args.fn(args)
    except (HFConversionError, CheckpointError, TokenizerError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
