"""Run configuration: small per-component dataclasses composed into one `RunConfig`.

Precedence: dataclass defaults, then a preset (xlmr_mp/presets/), then a YAML file, then `key.sub=value`
overrides.
`load_config()` validates everything before anything is allocated; errors name the option.
`dump_config()` writes the resolved config (YAML) into the run directory.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from xlmr_mp.atomic import atomic_write
from xlmr_mp.data.config import DataConfig
from xlmr_mp.data.phases import validate_run_phases
from xlmr_mp.errors import ConfigError
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.parallel.config import ParallelConfig
from xlmr_mp.parallel.layout import check_micro_batch_count, micro_batches_per_step, schedule_kind, validate_layout
from xlmr_mp.presets import preset_names, preset_path, resolve_config

__all__ = ["ConfigError", "ParallelConfig", "RunConfig", "load_config", "dump_config", "apply_overrides",
           "config_to_dict", "grad_accumulation_steps", "validate_layout"]


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 0.0
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01      # not applied to biases and LayerNorm weights
    clip_grad: float = 1.0          # global gradient-norm clip; 0 disables
    warmup_steps: int = 10000
    decay: str = "linear"           # linear | cosine | constant | 1-sqrt | wsd (warmup-stable-decay)
    decay_steps: int = 0            # wsd: decay over the last N steps (or:)
    decay_fraction: float = 0.0     # wsd: decay over the last fraction of train.train_steps
    wsd_decay: str = "1-sqrt"       # wsd decay shape: 1-sqrt | linear | cosine

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two values in [0, 1)")
        if self.decay not in ("linear", "cosine", "constant", "1-sqrt", "wsd"):
            raise ConfigError(f"optim.decay={self.decay!r}: choose linear, cosine, constant, 1-sqrt or wsd")
        if self.wsd_decay not in ("1-sqrt", "linear", "cosine"):
            raise ConfigError(f"optim.wsd_decay={self.wsd_decay!r}: choose 1-sqrt, linear or cosine")
        if self.decay_steps < 0 or not 0 <= self.decay_fraction <= 1:
            raise ConfigError("optim.decay_steps must be >= 0 and optim.decay_fraction in [0, 1]")
        if self.decay == "wsd" and not (self.decay_steps or self.decay_fraction):
            raise ConfigError("optim.decay=wsd needs optim.decay_steps=N or optim.decay_fraction=F (the decay phase)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"             # fp32 | bf16 | fp16 | auto (bf16 on sm_80+, fp16 on V100, fp32 on CPU)
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000   # steps without overflow before doubling the scale
    hysteresis: int = 1

    def validate(self) -> None:
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision.dtype={self.dtype!r}: choose auto (the device's best: bf16 on "
                              f"A100/H100, fp16 on V100, fp32 on CPU), fp32, bf16 or fp16")
        if self.min_loss_scale <= 0 or self.initial_loss_scale < self.min_loss_scale:
            raise ConfigError("precision.initial_loss_scale must be >= precision.min_loss_scale > 0")


@dataclass
class TrainConfig:
    global_batch: int = 8192        # sequences per optimizer step
    micro_batch: int = 16           # sequences per forward on one DP rank
    train_steps: int = 1_500_000
    seed: int = 1234
    recompute: str = "none"         # none | full | selective
    eval_interval: int = 2000
    eval_batches: int = 10
    device: str = "auto"            # auto | cpu | cuda
    compile: bool = False           # torch.compile each encoder layer and the MLM head (parallel/compile.py)
    batch_warmup: Optional[dict] = None  # {start: B0, tokens: N}: global batch B0 -> global_batch over N tokens

    def validate(self) -> None:
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ConfigError("train.global_batch and train.micro_batch must be >= 1")
        if self.recompute not in ("none", "full", "selective"):
            raise ConfigError(f"train.recompute={self.recompute!r}: choose none, full or selective")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r}: choose auto, cpu or cuda")


@dataclass
class CheckpointConfig:
    dir: str = ""                   # default: <run_dir>/checkpoints
    interval: int = 1000            # steps between saves; 0 = only at the end / on signal
    keep_last: int = 3
    load: str = ""                  # checkpoint dir to start from (any TP/PP/DP layout)
    resume: bool = True             # resume from <dir>/latest when it exists
    branch_from: str = ""           # a parent run's checkpoint: continue it with this run's schedules

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    jsonl: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Validate every component, then the layout rules (`parallel/layout.py`: world size, batch,
        sequence length, pipeline); fills `parallel.data` when `world_size` is given."""
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "validate"):
                sub.validate()
        validate_layout(self, world_size)
        phases = validate_run_phases(self)
        if self.train.batch_warmup is not None:     # every size of the warmup must suit the pipeline schedule
            unit = self.train.micro_batch * max(int(self.parallel.data or 1), 1)
            kind, pp = schedule_kind(self.parallel), self.parallel.pipeline
            for _, _, g, _ in phases.batch.runs:
                try:
                    check_micro_batch_count(kind, pp, g // unit)
                except ConfigError as e:
                    raise ConfigError(f"train.batch_warmup: a global batch of {g} is {g // unit} micro-batches "
                                      f"per step: {e}") from None


grad_accumulation_steps = micro_batches_per_step      # micro-batches per DP rank and optimizer step


# ----------------------------------------------------------------------------- YAML + overrides

def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/override value to the annotated type of `key`."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = [a for a in args if a is not type(None)][0]
        origin = typing.get_origin(typ)
    if isinstance(value, str) and typ not in (str,):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {e}") from None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            return str(value)
        if typ in (tuple, list) or origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return (tuple if (typ is tuple or origin is tuple) else list)(value)
        if typ is dict or origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def _apply(obj: Any, path: list, value: Any, full_key: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ConfigError(
            f"unknown option {full_key!r}: {type(obj).__name__} has no field {head!r} "
            f"(valid: {', '.join(sorted(names))})")
    cur = getattr(obj, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(cur):
            raise ConfigError(f"unknown option {full_key!r}: {head!r} has no sub-options")
        _apply(cur, path[1:], value, full_key)
        return
    if dataclasses.is_dataclass(cur):
        if not isinstance(value, dict):
            raise ConfigError(f"{full_key} is a section; give it a mapping or set {full_key}.<field>")
        for k, v in value.items():
            _apply(cur, [k], v, f"{full_key}.{k}")
        return
    setattr(obj, head, _coerce(value, _field_types(type(obj))[head], full_key))


def apply_overrides(cfg: RunConfig, overrides: list) -> RunConfig:
    """Apply `key.sub=value` strings to `cfg` in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip().split("."), value, key.strip())
    return cfg


def read_yaml(path: str, error: type, what: str, hint: str) -> Any:
    """The YAML document at `path` ({} when empty); a missing file or bad YAML raises `error` naming
    the file ("<what> <path> does not exist (<hint>)", "<path>: invalid YAML: ...")."""
    if not os.path.isfile(path):
        raise error(f"{what} {path} does not exist ({hint})")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise error(f"{path}: invalid YAML: {e}") from None


def _apply_file(cfg: RunConfig, path: str, nested: bool = False) -> None:
    """The YAML config at `path` onto cfg; a top-level `preset: NAME` in it applies that preset first."""
    data = read_yaml(path, ConfigError, "config file",
                     f"a preset is --preset NAME or --config preset:NAME, NAME one of {', '.join(preset_names())}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("preset", None)
    if base is not None:
        if nested or not isinstance(base, str):
            raise ConfigError(f"{path}: preset: {base!r} must name a shipped preset ({', '.join(preset_names())})")
        _apply_file(cfg, preset_path(base), nested=True)
    for k, v in data.items():
        _apply(cfg, [k], v, k)


def load_config(path: Optional[str] = None, overrides: Optional[list] = None,
                world_size: Optional[int] = None, validate: bool = True, preset: Optional[str] = None) -> RunConfig:
    """Defaults, then the shipped `preset` (xlmr_mp/presets/), then the YAML file at `path` (or
    `preset:NAME`), then overrides; validated unless told not to."""
    cfg = RunConfig()
    if preset:
        _apply_file(cfg, preset_path(preset))
    if path:
        _apply_file(cfg, resolve_config(path))
    apply_overrides(cfg, overrides or [])
    infer_vocab_size(cfg, given=any(o.split("=", 1)[0].strip() == "model.vocab_size" for o in overrides or []))
    if validate:
        cfg.validate(world_size)
    return cfg


def infer_vocab_size(cfg: RunConfig, given: bool = False) -> None:
    """model.vocab_size from data.tokenizer (its dictionary size: pieces + 2 for the standard layout),
    the id authority: it replaces a preset's or YAML's value; a value `given` on the command line
    that disagrees is an error naming both. Nothing happens without data.tokenizer, or when the file
    is not there (the loader reports a missing tokenizer when it opens it)."""
    path = cfg.data.tokenizer
    if not path or not os.path.isfile(path):
        return
    from xlmr_mp.tokenizer import TokenizerError, XLMRTokenizer
    try:
        n = XLMRTokenizer(path).vocab_size
    except TokenizerError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if given and cfg.model.vocab_size != n:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but data.tokenizer={path} has {n} ids; "
                          f"leave model.vocab_size out (it is inferred from data.tokenizer) or set model.vocab_size={n}")
    cfg.model.vocab_size = n


def config_to_dict(cfg: Any) -> dict:
    def conv(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, list):
            return [conv(i) for i in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (tmp name, then rename)."""
    with atomic_write(path) as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
