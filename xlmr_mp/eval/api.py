"""The contract between `tools/evaluate.py` and the task modules of `xlmr_mp/eval/`.

Every task module (`mbpc`, `retrieval`, `sib200`, `xnli`, `udpos`, `ner`) exposes

    def run(em: EvalModel, opts: EvalOptions) -> TaskResult

`tools/evaluate.py` loads the model once (`xlmr_mp.eval.common.load_eval_model`), calls the task's
`run`, and turns the `TaskResult` into the `--out` JSON (groups High/Low/All, baselines, seeds,
model, step, config, seconds), the `--predictions` JSONL, the stdout table and the bar plot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class EvalModel:
    """A model ready for evaluation: one process, TP 1, all layers, eval mode.

    `model` is an `xlmr_mp.model.xlmr.XLMRModel` (`model.encode(ids, mask)` -> last hidden
    [B, S, H]; `model(ids, mask)` -> MLM logits over the real vocabulary); `tokenizer` gives our
    fairseq/HF ids (`xlmr_mp.tokenizer.XLMRTokenizer`). Built from one of our checkpoints (any
    TP/PP layout) or from a Hugging Face `XLMRobertaForMaskedLM` directory."""
    model: Any
    tokenizer: Any
    source: str                       # the --model path as given
    kind: str                         # "xlmr_mp" | "hf"
    step: Optional[int] = None        # training step of our checkpoints, None for HF
    config: Dict[str, Any] = field(default_factory=dict)   # the model config as a plain dict
    device: str = "cpu"
    run_config: Dict[str, Any] = field(default_factory=dict)   # our checkpoints: the training run's config
    step_dir: Optional[str] = None    # our checkpoints: the resolved step directory


@dataclass
class EvalOptions:
    """What the command line gives a task (paths resolved, lists parsed)."""
    data: str                                   # --data
    languages: Optional[List[str]] = None       # --languages (None: every language present)
    train_language: str = "en"                  # --train-language (fine-tuning tasks)
    seeds: List[int] = field(default_factory=lambda: [1])    # --seeds
    predictions: Optional[str] = None           # --predictions path (tasks fill TaskResult.predictions)
    export_hf: Optional[str] = None             # --export-hf DIR (fine-tuning tasks, first seed)
    settings: Dict[str, str] = field(default_factory=dict)   # key=value extras (batch_size=32, lr=2e-5, ...)
    progress: bool = True                       # show progress bars


@dataclass
class TaskResult:
    """What a task returns. `languages` is the headline value per language (mean over seeds for
    fine-tuning tasks); `seeds` maps str(seed) -> {lang: value}; `baselines` maps a baseline name
    ("majority", "chance", ...) -> {lang: value}; `std` is the std over seeds per language;
    `extra` holds task-specific per-language figures (e.g. mbpc's bits per line, NLL per token,
    retrieval's both directions); `predictions` one dict per test example: lang, id, pred, gold."""
    task: str
    metric: str
    languages: Dict[str, float]
    higher_is_better: bool = True
    seeds: Dict[str, Dict[str, float]] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)
    baselines: Dict[str, Dict[str, float]] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    predictions: List[Dict[str, Any]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)    # the task's resolved settings


class EvalError(ValueError):
    """Bad evaluation input: the message names the file and line, or the option, and the fix."""
