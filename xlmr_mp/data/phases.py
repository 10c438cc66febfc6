"""Data and batch phases: the data.*_schedule options and train.batch_warmup, lists of phases keyed
by step (or by tokens), parsed, validated, evaluated per step. (The pipeline schedule is
parallel/schedule.py; the learning-rate schedule optim.LRSchedule.)

A phase option is a list of phases, each a mapping with its start (`step: N` or `tokens: N`;
the first phase starts at 0) and its value:

    data.alpha_schedule:    [{step: 0, alpha: 0.7}, {step: 3000, alpha: 0.5}, {tokens: 2.0e9, alpha: 0.3}]
    data.language_schedule: [{step: 0, languages: [en, fr]}, {step: 3000, languages: [en, fr, sw]}]
    data.mask_schedule:     [{step: 0, mask_prob: 0.3}, {step: 3000, mask_prob: 0.15}]

`tokens` counts sequence slots (samples x data.seq_length, padding included) consumed before the
step, so a tokens key resolves to one step whatever the data; a phase starts at the first step
whose tokens reach it. data.alpha_interpolation / data.mask_interpolation: `stepped` (the phase's
value until the next phase) or `linear` (from the phase's value to the next phase's, the last
phase constant); a linear alpha changes every data.alpha_update_steps steps (each value is a
phase of the blended index), a linear mask rate every step.

`train.batch_warmup: {start: B0, tokens: N}`: the global batch grows linearly in consumed tokens
from B0 to train.global_batch over the first N tokens, in multiples of train.micro_batch x DP
(the step's number of micro-batches varies; the loss is still normalised by the step's global
masked-token count).

A run's phase options form a history: [(0, the run's own)], or for a branch (checkpoint.branch_from)
the parent's history followed by (branch step, the branch's). At step s the entry with the
largest start <= s decides every value, so the steps before a branch are exactly the parent's
and a branch with the parent's options is the parent (see `RunPhases`).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from xlmr_mp.errors import ConfigError

INTERPOLATIONS = ("stepped", "linear")


# ----------------------------------------------------------------------------- parsing

def parse_phases(raw: Any, option: str, value_key: str, check) -> List[Tuple[str, int, Any]]:
    """[(kind 'step'|'tokens', start, value)] from a YAML phase list, validated (errors name the option)."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"{option} must be a non-empty list of phases like [{{step: 0, {value_key}: ...}}, ...]")
    out = []
    for i, ph in enumerate(raw):
        where = f"{option}[{i}]"
        if not isinstance(ph, dict):
            raise ConfigError(f"{where}={ph!r} must be a mapping like {{step: 0, {value_key}: ...}}")
        keys = set(ph)
        kinds = keys & {"step", "tokens"}
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of step or tokens (got {sorted(keys)})")
        if value_key not in ph:
            raise ConfigError(f"{where}: missing {value_key!r} (got {sorted(keys)})")
        extra = keys - {"step", "tokens", value_key}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}; a phase has step|tokens and {value_key}")
        kind = kinds.pop()
        at = ph[kind]
        if isinstance(at, str):
            try:
                at = float(at)
            except ValueError:
                raise ConfigError(f"{where}.{kind}={ph[kind]!r} is not a number") from None
        if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0 or (isinstance(at, float)
                                                                                  and not at.is_integer()):
            raise ConfigError(f"{where}.{kind}={ph[kind]!r} must be a whole number >= 0")
        at = int(at)
        if i == 0 and at != 0:
            raise ConfigError(f"{where} starts at {kind} {at}: the first phase must start at {kind} 0")
        if out and out[-1][0] == kind and at <= out[-1][1]:
            raise ConfigError(f"{where}.{kind}={at} is not after the previous phase's {out[-1][1]}: "
                              f"phases must be in increasing order")
        out.append((kind, at, check(ph[value_key], f"{where}.{value_key}")))
    return out


def _check_alpha(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ConfigError(f"{where}={v!r} must be a number in (0, 1]")
    return float(v)


def _check_mask(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(f"{where}={v!r} must be a number in (0, 1)")
    return float(v)


def _check_languages(v, where):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}={v!r} must be a non-empty list of language names")
    if len(set(v)) != len(v):
        raise ConfigError(f"{where} lists a language twice: {list(v)}")
    return tuple(v)


def parse_batch_warmup(raw: Any, global_batch: int, unit: int) -> Optional[Tuple[int, int]]:
    """(start batch, tokens) of train.batch_warmup, or None; start is a multiple of `unit`."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict) or set(raw) != {"start", "tokens"}:
        raise ConfigError(f"train.batch_warmup={raw!r} must be a mapping {{start: B0, tokens: N}}")
    start, tokens = raw["start"], raw["tokens"]
    if isinstance(tokens, str):                 # YAML reads 5.0e10 (no sign in the exponent) as a string
        try:
            tokens = float(tokens)
        except ValueError:
            raise ConfigError(f"train.batch_warmup.tokens={tokens!r} is not a number") from None
    if isinstance(tokens, float) and tokens.is_integer():
        tokens = int(tokens)
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ConfigError(f"train.batch_warmup.start={start!r} must be an integer >= 1")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"train.batch_warmup.tokens={tokens!r} must be an integer >= 1")
    if start % unit:
        raise ConfigError(f"train.batch_warmup.start={start} is not a multiple of train.micro_batch x DP = {unit}")
    if start > global_batch:
        raise ConfigError(f"train.batch_warmup.start={start} > train.global_batch={global_batch}")
    return int(start), int(tokens)


# ----------------------------------------------------------------------------- one value's phases

class PhaseValue:
    """A value per optimizer step: phases (start step, value), stepped or linear (see module doc)."""

    def __init__(self, starts: Sequence[int], values: Sequence[Any], interpolate: str = "stepped", every: int = 1):
        self.starts, self.values = [int(s) for s in starts], list(values)
        self.interpolate, self.every = interpolate, max(int(every), 1)

    @classmethod
    def constant(cls, value) -> "PhaseValue":
        return cls([0], [value])

    def _phase(self, step: int) -> int:
        return bisect.bisect_right(self.starts, step) - 1

    def __call__(self, step: int):
        p = self._phase(step)
        if self.interpolate == "stepped" or p == len(self.starts) - 1:
            return self.values[p]
        s0, s1 = self.starts[p], self.starts[p + 1]
        s = s0 + (step - s0) // self.every * self.every
        return self.values[p] + (self.values[p + 1] - self.values[p]) * (s - s0) / (s1 - s0)

    def change_points(self, lo: int, hi: Optional[int]) -> List[int]:
        """Steps in [lo, hi) where the value may change (phase starts, linear updates)."""
        pts = set()
        for p, s0 in enumerate(self.starts):
            if self.interpolate == "linear" and p + 1 < len(self.starts):
                pts.update(range(s0, self.starts[p + 1], self.every))
            pts.add(s0)
        return sorted(s for s in pts if s >= lo and (hi is None or s < hi))


# ----------------------------------------------------------------------------- global batch per step

class BatchRule:
    """Global batch as a function of tokens consumed: fixed, or the linear warmup of train.batch_warmup."""

    def __init__(self, global_batch: int, unit: int, seq_length: int, warmup: Optional[Tuple[int, int]] = None):
        self.target, self.unit, self.seq, self.warmup = int(global_batch), int(unit), int(seq_length), warmup

    def at_tokens(self, tokens: int) -> int:
        if self.warmup is None or tokens >= self.warmup[1]:
            return self.target
        b0, n = self.warmup
        g = b0 + (self.target - b0) * tokens // n
        return min(self.target, max(b0, g // self.unit * self.unit))

    def steps_at(self, g: int, tokens: int) -> Optional[int]:
        """Steps spent at batch g from `tokens` consumed until the batch grows (None: never)."""
        if g >= self.target or self.warmup is None:
            return None
        b0, n = self.warmup
        need = g + self.unit - b0          # tokens t with (target - b0) * t // n >= need
        t_next = -(-need * n // (self.target - b0))
        return max(1, -(-(t_next - tokens) // (g * self.seq)))

    def key(self) -> tuple:
        return (self.target, self.unit, self.seq, self.warmup)


class BatchSizes:
    """Global batch and first sample of every step under a history of BatchRules [(from_step, rule)]:
    runs of steps with one batch size, (first step, first sample, batch, steps or None)."""

    def __init__(self, history: Sequence[Tuple[int, BatchRule]]):
        self.runs: List[Tuple[int, int, int, Optional[int]]] = []
        step, sample = 0, 0
        for k, (frm, rule) in enumerate(history):
            until = history[k + 1][0] if k + 1 < len(history) else None
            while until is None or step < until:
                g = rule.at_tokens(sample * rule.seq)
                n = rule.steps_at(g, sample * rule.seq)
                if until is not None:
                    n = until - step if n is None else min(n, until - step)
                self._add(step, sample, g, n)
                if n is None:
                    break
                step, sample = step + n, sample + n * g
        self._steps = [r[0] for r in self.runs]
        self._samples = [r[1] for r in self.runs]

    def _add(self, step, sample, g, n):
        if self.runs and self.runs[-1][2] == g:        # same batch as the run before: extend it
            s0, x0, _, n0 = self.runs[-1]
            self.runs[-1] = (s0, x0, g, None if n is None else n0 + n)
        else:
            self.runs.append((step, sample, g, n))

    def _run(self, step: int):
        return self.runs[bisect.bisect_right(self._steps, step) - 1]

    def global_batch(self, step: int) -> int:
        return self._run(step)[2]

    def sample_start(self, step: int) -> int:
        """First stream position of step `step` (samples consumed by the steps before it)."""
        s0, x0, g, _ = self._run(step)
        return x0 + (step - s0) * g

    def step_of_sample(self, position: int) -> Tuple[int, int]:
        """(step, offset in the step's global batch) of stream position `position`."""
        s0, x0, g, _ = self.runs[bisect.bisect_right(self._samples, position) - 1]
        d, r = divmod(position - x0, g)
        return s0 + d, r

    def first_step_with_tokens(self, tokens: int, seq_length: int) -> int:
        samples = -(-int(tokens) // seq_length)
        step, off = self.step_of_sample(samples)
        return step + (1 if off else 0)


# ----------------------------------------------------------------------------- a run's phases

def data_phase_fields(data_cfg, global_batch: int, batch_warmup: Optional[dict], unit: int) -> Dict[str, Any]:
    """The phase-defining options as plain data (stored in checkpoints for branches);
    `unit` = train.micro_batch x DP."""
    d = data_cfg
    return {"alpha": d.alpha, "alpha_schedule": d.alpha_schedule, "alpha_interpolation": d.alpha_interpolation,
            "alpha_update_steps": d.alpha_update_steps, "languages": None if d.languages is None else list(d.languages),
            "language_schedule": d.language_schedule, "mask_prob": d.mask_prob, "mask_schedule": d.mask_schedule,
            "mask_interpolation": d.mask_interpolation, "seq_length": d.seq_length,
            "global_batch": int(global_batch), "batch_warmup": batch_warmup, "unit": int(unit)}


def phase_fields(cfg, unit: int) -> Dict[str, Any]:
    """data_phase_fields of a RunConfig."""
    return data_phase_fields(cfg.data, cfg.train.global_batch, cfg.train.batch_warmup, unit)


def same_phases(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two phase_fields define the same phases (the unit only matters under a batch warmup)."""
    if a.get("batch_warmup") is None and b.get("batch_warmup") is None:
        a, b = {k: v for k, v in a.items() if k != "unit"}, {k: v for k, v in b.items() if k != "unit"}
    return a == b


class _Entry:
    """One history entry's phases; token-keyed phases resolved with the run's BatchSizes."""

    def __init__(self, f: Dict[str, Any], batch: Optional[BatchSizes]):
        self.f = f
        seq = int(f["seq_length"])

        def build(raw, option, key, check, const, interpolate="stepped", every=1):
            if raw is None:
                return PhaseValue.constant(const), []
            phases = parse_phases(raw, option, key, check)
            if any(kind == "tokens" for kind, _, _ in phases) and batch is None:
                return None, phases
            starts = [at if kind == "step" else batch.first_step_with_tokens(at, seq) for kind, at, _ in phases]
            for i in range(1, len(starts)):
                if starts[i] <= starts[i - 1]:
                    raise ConfigError(f"{option}[{i}] resolves to step {starts[i]}, not after phase {i - 1}'s "
                                      f"step {starts[i - 1]}: phases must be in increasing order")
            return PhaseValue(starts, [v for _, _, v in phases], interpolate, every), phases

        for name in ("alpha_interpolation", "mask_interpolation"):
            if f[name] not in INTERPOLATIONS:
                raise ConfigError(f"data.{name}={f[name]!r}: choose stepped or linear")
        if int(f["alpha_update_steps"]) < 1:
            raise ConfigError(f"data.alpha_update_steps={f['alpha_update_steps']} must be >= 1")
        self.alpha, _ = build(f["alpha_schedule"], "data.alpha_schedule", "alpha", _check_alpha, float(f["alpha"]),
                              f["alpha_interpolation"], int(f["alpha_update_steps"]))
        langs = None if f["languages"] is None else tuple(f["languages"])
        self.languages, lphases = build(f["language_schedule"], "data.language_schedule", "languages",
                                        _check_languages, langs)
        if langs is not None:
            for i, (_, _, v) in enumerate(lphases):
                missing = [x for x in v if x not in langs]
                if missing:
                    raise ConfigError(f"data.language_schedule[{i}] names {missing}, not in data.languages={list(langs)}; "
                                      f"add them to data.languages or set data.languages=null")
        self.mask, _ = build(f["mask_schedule"], "data.mask_schedule", "mask_prob", _check_mask,
                             float(f["mask_prob"]), f["mask_interpolation"])
        self.batch_rule = BatchRule(f["global_batch"], f["unit"], seq,
                                    parse_batch_warmup(f["batch_warmup"], int(f["global_batch"]), int(f["unit"])))

    def all_languages(self) -> Optional[tuple]:
        """Every language the entry ever uses (None: the corpus's)."""
        if self.f["language_schedule"] is None:
            return None if self.f["languages"] is None else tuple(self.f["languages"])
        seen = []
        for v in self.languages.values:
            seen += [x for x in v if x not in seen]
        return tuple(seen)


class RunPhases:
    """Every per-step value of a run: alpha, active languages, mask rate, global batch, first sample.

    history: [(from_step, phase_fields)] in increasing from_step, the first at 0 (see the module
    doc). Validates everything on construction (ConfigError naming the option)."""

    def __init__(self, history: Sequence[Tuple[int, Dict[str, Any]]]):
        if not history or history[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(history, history[1:])):
            raise ValueError(f"RunPhases: history steps {[h[0] for h in history]} must start at 0 and increase")
        self.history = [(int(s), dict(f)) for s, f in history]
        self._from = [s for s, _ in self.history]
        rules = [(s, _Entry(f, None).batch_rule) for s, f in self.history]
        self.batch = BatchSizes(rules)
        self.entries = [_Entry(f, self.batch) for _, f in self.history]

    @classmethod
    def from_config(cls, cfg, unit: int, history: Optional[Sequence] = None, branch_step: Optional[int] = None):
        """The run's phases; with a parent `history` and `branch_step`, the branch's."""
        own = phase_fields(cfg, unit)
        if history is None:
            return cls([(0, own)])
        kept = [(s, f) for s, f in history if s < branch_step]
        return cls(kept + [(branch_step, own)])

    def _entry(self, step: int) -> _Entry:
        return self.entries[bisect.bisect_right(self._from, step) - 1]

    def alpha(self, step: int) -> float:
        return float(self._entry(step).alpha(step))

    def languages(self, step: int) -> Optional[tuple]:
        """Active language names at `step` (None: all of the corpus)."""
        return self._entry(step).languages(step)

    def mask_prob(self, step: int) -> float:
        return float(self._entry(step).mask(step))

    def global_batch(self, step: int) -> int:
        return self.batch.global_batch(step)

    def sample_start(self, step: int) -> int:
        return self.batch.sample_start(step)

    def all_languages(self) -> Optional[tuple]:
        """The union of the languages any step uses, in first-use order (None: the corpus's)."""
        out: List[str] = []
        for e in self.entries:
            a = e.all_languages()
            if a is None:
                return None
            out += [x for x in a if x not in out]
        return tuple(out)

    def blend_segments(self) -> List[Tuple[int, float, Optional[tuple]]]:
        """Maximal runs of steps with one (alpha, languages): [(first step, alpha, languages)]."""
        pts = set()
        for k, e in enumerate(self.entries):
            lo, hi = self._from[k], (self._from[k + 1] if k + 1 < len(self._from) else None)
            pts.add(lo)
            pts.update(e.alpha.change_points(lo, hi))
            pts.update(e.languages.change_points(lo, hi))
        out: List[Tuple[int, float, Optional[tuple]]] = []
        for s in sorted(pts):
            v = (self.alpha(s), self.languages(s))
            if not out or (out[-1][1], out[-1][2]) != v:
                out.append((s, v[0], v[1]))
        return out

    def is_trivial(self) -> bool:
        """No schedule option anywhere in the history: the loader keeps its static code path."""
        return len(self.history) == 1 and all(self.history[0][1].get(k) is None for k in
                                              ("alpha_schedule", "language_schedule", "mask_schedule", "batch_warmup"))

    def is_static(self) -> bool:
        """One alpha and every language all run long: the static index applies (it is indexed by
        stream position, so the batch schedule does not matter)."""
        seg = self.blend_segments()
        return len(seg) == 1 and seg[0][2] is None

    def values(self, step: int, n_corpus_languages: int) -> Dict[str, float]:
        """What the trainer logs per step."""
        langs = self.languages(step)
        return {"alpha": self.alpha(step), "mask_prob": self.mask_prob(step),
                "global_batch": self.global_batch(step),
                "active_languages": n_corpus_languages if langs is None else len(langs)}

    def resolved(self, until_step: Optional[int] = None) -> Dict[str, Any]:
        """The step-keyed phases (tokens resolved), for the run directory."""
        return {"history_from_steps": self._from,
                "blend_phases": [{"step": s, "sample": self.sample_start(s), "alpha": a,
                                  "languages": None if l is None else list(l)} for s, a, l in self.blend_segments()],
                "batch_runs": [{"step": s, "sample": x, "global_batch": g, "steps": n} for s, x, g, n in self.batch.runs],
                "mask_phases": [{"step": s, "mask_prob": self.mask_prob(s)} for s in
                                sorted({p for e in self.entries for p in e.mask.starts})]}


def validate_run_phases(cfg) -> RunPhases:
    """Parse and check every phase option of a RunConfig (data.*_schedule, train.batch_warmup)
    before anything is allocated; returns the run's phases. Whether each warmup batch size suits
    the pipeline schedule is the layout's rule: RunConfig.validate checks `batch.runs` with it."""
    dp = max(int(cfg.parallel.data or 1), 1)
    unit = cfg.train.micro_batch * dp
    if cfg.train.batch_warmup is not None and math.gcd(cfg.train.global_batch, unit) != unit:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not a multiple of "
                          f"train.micro_batch x DP = {unit}")
    return RunPhases.from_config(cfg, unit)
