"""Evaluate a model: masked bits per character, retrieval, and zero-shot transfer fine-tuning.

    xlmr-evaluate TASK --model PATH --data PATH [--languages en,fr,...] [--train-language en]
        [--out results.json] [--predictions preds.jsonl] [--export-hf DIR] [--seeds 1,2,3]
        [--tokenizer P.model] [--whole-word] [--device cpu] [--no-progress] [key=value ...]

TASK: mbpc | retrieval | sib200 | xnli | udpos | ner (xlmr_mp/eval/<task>.py; key=value settings
are the task's, e.g. batch_size=32 k=7 layer=2 lr=2e-5 epochs=3; an unknown key lists the valid ones).
PATH: one of our checkpoints (a step directory or a root with `latest`, any TP/PP layout; the
tokenizer is the run's data.tokenizer unless --tokenizer) or a Hugging Face XLMRobertaForMaskedLM
directory with its sentencepiece.bpe.model.
--out writes the JSON report (and the bar plot beside it, .png); --predictions one JSON line per
test example; the per-language table goes to stdout. Bad input stops with `error: ...` (exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

FINE_TUNING = ("sib200", "xnli", "udpos", "ner")


def _csv(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def parse_args(argv):
    from xlmr_mp.eval import TASKS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--model", required=True, help="checkpoint step dir / root with `latest`, or an HF directory")
    p.add_argument("--data", required=True, help="the task's data directory (or file)")
    p.add_argument("--languages", default=None, help="comma-separated languages (default: every one present)")
    p.add_argument("--train-language", default="en", help="fine-tuning tasks: the language trained on (default en)")
    p.add_argument("--out", default=None, help="JSON report path (a .png bar plot is written beside it)")
    p.add_argument("--predictions", default=None, help="JSONL path: one line per test example")
    p.add_argument("--export-hf", default=None, help="fine-tuning tasks: write the fine-tuned model (first seed) "
                                                     "as an HF directory")
    p.add_argument("--seeds", default="1", help="fine-tuning seeds, comma-separated (default 1)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the run's data.tokenizer, or "
                                                     "the HF directory's sentencepiece.bpe.model)")
    p.add_argument("--whole-word", action="store_true", help="mbpc: mask whole words (same as whole_word=true)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("settings", nargs="*", help="task settings key=value")
    return p.parse_intermixed_args(argv)


def build_options(args):
    from xlmr_mp.eval.api import EvalError, EvalOptions
    settings = {}
    for kv in args.settings:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise EvalError(f"{kv!r}: task settings are key=value (e.g. batch_size=32)")
        settings[key] = value
    if args.whole_word:
        if args.task != "mbpc":
            raise EvalError("--whole-word applies to mbpc only")
        settings["whole_word"] = "true"
    if args.export_hf and args.task not in FINE_TUNING:
        raise EvalError(f"--export-hf applies to the fine-tuning tasks ({', '.join(FINE_TUNING)}); export a "
                        f"pretrained checkpoint with xlmr-convert xlmr-to-hf")
    try:
        seeds = [int(s) for s in _csv(args.seeds) or []]
    except ValueError:
        raise EvalError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds:
        raise EvalError("--seeds: give at least one seed")
    if not os.path.exists(args.data):
        raise EvalError(f"--data {args.data}: does not exist")
    for opt, path in (("--out", args.out), ("--predictions", args.predictions)):
        if path and os.path.isdir(path):
            raise EvalError(f"{opt} {path}: is a directory; give a file path")
    return EvalOptions(data=args.data, languages=_csv(args.languages), train_language=args.train_language,
                       seeds=seeds, predictions=args.predictions, export_hf=args.export_hf, settings=settings,
                       progress=not args.no_progress)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from xlmr_mp.eval import task_module
    from xlmr_mp.eval.api import EvalError
    from xlmr_mp.eval.common import load_eval_model
    from xlmr_mp.eval.report import build_report, format_table, plot_path_for, write_json, write_plot, \
        write_predictions
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        opts = build_options(args)
        mod = task_module(args.task)
        em = load_eval_model(args.model, tokenizer=args.tokenizer, device=args.device)
        result = mod.run(em, opts)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = build_report(result, em, opts, time.time() - t0, ["xlmr-evaluate"] + list(argv or sys.argv[1:]))
    print(format_table(report), flush=True)
    if args.out:
        write_json(args.out, report)
        png = write_plot(plot_path_for(args.out), report)
        print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    if args.predictions:
        write_predictions(args.predictions, result.predictions)
        print(f"wrote {args.predictions} ({len(result.predictions)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
