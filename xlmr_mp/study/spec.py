"""Study spec (YAML): the grid of cells a scaling study trains and evaluates.

    name, corpus, eval_data, base_config (or preset), overrides, axes, exclude, budget, tokenizer,
    fixed_params, cap_lines, evaluate            (the contract; see launch/studies/*.yaml)
    grids, spm, eval_languages, eval_settings, description, evaluate_at     (extensions)

The grid is the product of the axes; each axis value is named (a list names values by their text).
An axis is a study key (`languages`, `vocab`, `alpha`, `seed`, `tokenizer`, `cap_lines`,
`fixed_params`, `budget`, `budget.mode`, `budget.tokens`, `budget.characters`) or any run-config key
(`optim.lr`); an axis whose values are mappings (`width: {H64: {model.hidden_size: 64, ...}}`) sets
several keys per value. `grids` is a list of sub-studies (name, axes, exclude and any cell-level key
of their own) whose cells share preparation; cells equal in every setting are trained once.
`evaluate_at` (top level or per grid): fractions of a cell's steps, e.g. [0.25, 0.5, 0.75, 1.0], whose
checkpoints are kept and evaluated with mbpc and retrieval (learning curves; plan.curve_points).
A grid's `overrides` is a list of key=value strings or a mapping key: value (lists and mappings as
values, e.g. a data.alpha_schedule); `label` names its cells in figures.
Branches: a grid with `parent` (a cell of an earlier grid) and `branch_at` (a step) makes cells that
start from the parent's checkpoint at that step (checkpoint.branch_from) with the parent's run
overrides, then the grid's own; they train the parent's model on the parent's data (same languages,
vocabulary, tokenizer, cap_lines, fixed_params) and run after it. plan.py checks that the parent
keeps a checkpoint at branch_at.
Unknown keys, empty language sets and languages missing from the corpus fail here, naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOP_KEYS = ("name", "description", "corpus", "eval_data", "base_config", "preset", "overrides", "axes", "exclude",
            "budget", "tokenizer", "fixed_params", "cap_lines", "evaluate", "grids", "spm",
            "eval_languages", "eval_settings", "evaluate_at")
GRID_KEYS = ("name", "axes", "exclude", "overrides", "budget", "tokenizer", "fixed_params", "cap_lines",
             "evaluate_at", "label", "parent", "branch_at")
BRANCH_SAME = ("languages", "vocab", "tokenizer", "cap_all", "fixed_params")   # a branch's cell keeps its parent's
# set by the runner (the cell's directory, its prepared dataset and tokenizer, its languages, the parent's
# checkpoint of a branch), never by a spec
DERIVED_KEYS = ("run_dir", "data.path", "data.tokenizer", "data.languages", "checkpoint.dir", "checkpoint.branch_from")
CELL_KEYS = ("languages", "vocab", "alpha", "seed", "tokenizer", "cap_lines", "fixed_params", "budget",
             "budget.mode", "budget.tokens", "budget.characters", "budget.base_languages")
BUDGET_KEYS = ("mode", "tokens", "characters", "base_languages")
BUDGET_MODES = ("fixed_total", "fixed_per_language")
TOKENIZER_MODES = ("shared", "per_set")
SPM_KEYS = ("sample_size", "alpha", "character_coverage", "seed")
EVAL_TASKS = ("mbpc", "retrieval", "sib200", "xnli", "udpos", "ner")


class SpecError(ValueError):
    """A bad study spec; the message names the file, the key and the fix."""


@dataclass
class Cell:
    """One point of the grid: what it trains, named by its axis values."""
    name: str
    grid: str
    axis_values: Dict[str, str]            # axis -> value name (the grid's axes only)
    languages: List[str]
    vocab: int
    alpha: float
    seed: int
    tokenizer: str                         # shared | per_set
    cap_lines: Dict[str, float]            # of the cell's languages (line counts, or fractions in (0, 1])
    cap_all: Dict[str, float]              # as given (a shared tokenizer's union is capped by it)
    fixed_params: Optional[float]
    budget: Dict[str, Any]
    run_overrides: List[str]               # key=value from overrides and run-config axes, in order
    aliases: List[tuple] = field(default_factory=list)   # (grid, axis_values) of identical cells
    evaluate_at: List[float] = field(default_factory=list)   # fractions of the steps (learning curves)
    label: str = ""                        # its name in figures (default: the cell's name)
    parent: Optional["Cell"] = None        # a branch: started from parent's checkpoint at step branch_at
    branch_at: Optional[int] = None
    branch_points: List[int] = field(default_factory=list)   # steps other cells branch from (kept)

    def key(self) -> dict:
        """Every setting that determines the cell's training (not its names); a branch's includes
        its parent's name and key and the branch step."""
        k = {"languages": self.languages, "vocab": self.vocab, "alpha": self.alpha, "seed": self.seed,
             "tokenizer": self.tokenizer, "cap_lines": self.cap_lines, "cap_all": self.cap_all,
             "fixed_params": self.fixed_params,
             "budget": self.budget, "run_overrides": self.run_overrides}
        if self.parent is not None:
            k["branch"] = {"parent": self.parent.name, "parent_key": self.parent.key(), "at": self.branch_at}
        return k


@dataclass
class Study:
    name: str
    path: str
    corpus: str
    eval_data: str
    base_config: str
    evaluate: List[str]
    cells: List[Cell]
    axes: Dict[str, List[str]]             # every axis of every grid -> value names (ordered)
    grids: List[str]
    spm: Dict[str, Any]
    eval_languages: Optional[List[str]]
    eval_settings: List[str]
    description: str = ""
    corpus_languages: List[str] = field(default_factory=list)
    # every cell of the spec, whatever `cells` is narrowed to (select_cells): what the study shares
    # between cells (a shared tokenizer's languages) is a function of the spec, not of a selection
    all_cells: List[Cell] = field(default_factory=list)

    def __post_init__(self):
        if not self.all_cells:
            self.all_cells = list(self.cells)


def select_cells(study: Study, names: List[str]) -> Study:
    """The study narrowed to the named cells, in that order (`--cells`): `cells` is the selection,
    `all_cells` stays the spec's, so shared artefacts keep the keys the whole study gives them.
    SpecError naming an unknown cell and the cells there are."""
    by_name = {c.name: c for c in study.cells}
    bad = [n for n in names if n not in by_name]
    if bad:
        raise SpecError(f"--cells: no cell {bad[0]!r} in {study.path} (cells: {', '.join(by_name)})")
    return dataclasses.replace(study, cells=[by_name[n] for n in names], all_cells=list(study.all_cells))


def _resolve_path(value: str, spec_path: str, key: str, must_exist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{spec_path}: {key} must be a path")
    if os.path.isabs(value):
        cands = [value]
    else:
        cands = [os.path.abspath(value), os.path.join(REPO, value),
                 os.path.join(os.path.dirname(os.path.abspath(spec_path)), value)]
    for c in cands:
        if os.path.exists(c):
            return os.path.abspath(c)
    if must_exist:
        raise SpecError(f"{spec_path}: {key}={value!r} does not exist (relative paths are tried against the "
                        f"current directory, the repository root and the spec's folder)")
    return os.path.abspath(cands[0])


def check_keys(d: Any, valid, where: str, spec_path: str) -> None:
    """SpecError unless `d` is a mapping whose keys are all in `valid` (the message lists them)."""
    if not isinstance(d, dict):
        raise SpecError(f"{spec_path}: {where} must be a mapping")
    bad = [k for k in d if k not in valid]
    if bad:
        raise SpecError(f"{spec_path}: unknown key {where + '.' if where != 'top level' else ''}{bad[0]} "
                        f"(valid keys{' of ' + where if where != 'top level' else ''}: {', '.join(valid)})")


def run_config_key_error(key: str) -> Optional[str]:
    """None when `key` (dotted) names a run-config field, else the reason with the valid names."""
    from xlmr_mp.config import RunConfig
    obj: Any = RunConfig()
    parts = key.split(".")
    for i, p in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if p not in names:
            where = ".".join(parts[:i]) or "the run config"
            return f"{where} has no field {p!r} (valid: {', '.join(names)})"
        obj = getattr(obj, p)
        if i < len(parts) - 1 and not dataclasses.is_dataclass(obj):
            return f"{'.'.join(parts[:i + 1])} has no sub-options"
    if dataclasses.is_dataclass(obj):
        return f"{key} is a section; name one of its fields ({', '.join(f.name for f in dataclasses.fields(obj))})"
    return None


def _check_setting(key: str, where: str, spec_path: str) -> None:
    if key in CELL_KEYS:
        return
    if "." not in key:
        raise SpecError(f"{spec_path}: {where}: unknown key {key!r} (valid: {', '.join(CELL_KEYS)}, "
                        f"or a run-config key such as model.hidden_size or optim.lr)")
    err = run_config_key_error(key)
    if err:
        raise SpecError(f"{spec_path}: {where}: unknown key {key!r}: {err}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def _axis_values(name: str, raw: Any, spec_path: str) -> Dict[str, Dict[str, Any]]:
    """axis -> {value name: {setting key: value}}, validated."""
    where = f"axes.{name}"
    if isinstance(raw, dict):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = [(_fmt(v), v) for v in raw]
    else:
        raise SpecError(f"{spec_path}: {where} must be a list of values or a mapping of named values")
    if not items:
        raise SpecError(f"{spec_path}: {where} has no values")
    out = {}
    for vname, v in items:
        if isinstance(v, dict) and name not in ("cap_lines", "budget"):
            if not v:
                raise SpecError(f"{spec_path}: {where}.{vname} is an empty mapping")
            for k in v:
                _check_setting(str(k), f"{where}.{vname}", spec_path)
            out[vname] = {str(k): x for k, x in v.items()}
        else:
            _check_setting(name, where, spec_path)
            out[vname] = {name: v}
    return out


def base_config_path(raw: dict, path: str) -> str:
    """The run config a spec's runs start from, as a file: `preset: NAME` (a shipped preset,
    xlmr_mp/presets/) or `base_config: FILE` (or `base_config: preset:NAME`); exactly one of them."""
    from xlmr_mp.presets import PREFIX, preset_path
    if ("preset" in raw) == ("base_config" in raw):
        raise SpecError(f"{path}: give exactly one of preset: NAME (e.g. preset: tiny) and base_config: FILE")
    ref = f"{PREFIX}{raw['preset']}" if "preset" in raw else raw["base_config"]
    if isinstance(ref, str) and ref.startswith(PREFIX):
        try:
            return preset_path(ref[len(PREFIX):])
        except ValueError as e:
            raise SpecError(f"{path}: {'preset' if 'preset' in raw else 'base_config'}: {e}") from None
    return _resolve_path(ref, path, "base_config")


def load_spec(path: str, check_corpus: bool = True) -> Study:
    """Read and validate a study spec; expand its grids into cells (duplicates merged)."""
    from xlmr_mp.config import ConfigError, load_config, read_yaml
    raw = read_yaml(path, SpecError, "study spec", "shipped studies: launch/studies/*.yaml")
    check_keys(raw, TOP_KEYS, "top level", path)
    for req in ("name", "corpus"):
        if req not in raw:
            raise SpecError(f"{path}: missing key {req!r}")
    if not raw.get("axes") and not raw.get("grids"):
        raise SpecError(f"{path}: give axes (or grids, each with its axes)")
    corpus = _resolve_path(raw["corpus"], path, "corpus")
    base_config = base_config_path(raw, path)
    evaluate = raw.get("evaluate") or []
    if not isinstance(evaluate, list) or any(t not in EVAL_TASKS for t in evaluate):
        raise SpecError(f"{path}: evaluate must be a list of tasks from {', '.join(EVAL_TASKS)} (got {evaluate!r})")
    eval_data = ""
    curves = raw.get("evaluate_at") or any(isinstance(g, dict) and g.get("evaluate_at") for g in raw.get("grids") or [])
    if evaluate or curves:
        if "eval_data" not in raw:
            raise SpecError(f"{path}: {'evaluate lists tasks' if evaluate else 'evaluate_at is set'} but eval_data "
                            f"is not set (e.g. ../shared/corpus/eval)")
        eval_data = _resolve_path(raw["eval_data"], path, "eval_data")
    spm = {"sample_size": 300000, "alpha": 0.3, "character_coverage": 0.9995, "seed": 1234}
    if raw.get("spm") is not None:
        check_keys(raw["spm"], SPM_KEYS, "spm", path)
        spm.update(raw["spm"])
    ov = raw.get("overrides") or []
    if not isinstance(ov, list) or any(not isinstance(o, str) or "=" not in o for o in ov):
        raise SpecError(f"{path}: overrides must be a list of key=value strings")
    try:
        load_config(base_config, list(ov), validate=False)
    except ConfigError as e:
        raise SpecError(f"{path}: overrides: {e}") from None

    corpus_langs = _corpus_languages(corpus)
    grid_raws = raw.get("grids") or [{"name": raw["name"]}]
    if not isinstance(grid_raws, list):
        raise SpecError(f"{path}: grids must be a list of mappings")
    cells: Dict[str, Cell] = {}
    by_key: Dict[str, Cell] = {}
    all_axes: Dict[str, List[str]] = {}
    grid_names = []
    for gi, g in enumerate(grid_raws):
        check_keys(g, GRID_KEYS, f"grids[{gi}]", path)
        gname = str(g.get("name", f"g{gi}"))
        grid_names.append(gname)
        axes_raw = dict(raw.get("axes") or {})
        axes_raw.update(g.get("axes") or {})
        axes = {a: _axis_values(a, v, path) for a, v in axes_raw.items()}
        excl = list(raw.get("exclude") or []) + list(g.get("exclude") or [])
        for ei, e in enumerate(excl):
            check_keys(e, list(axes), f"exclude[{ei}]", path)
            for a, vn in e.items():
                if str(vn) not in axes[a]:
                    raise SpecError(f"{path}: exclude[{ei}].{a}={vn!r} is not a value of axes.{a} "
                                    f"(values: {', '.join(axes[a])})")
        for a, vs in axes.items():
            lst = all_axes.setdefault(a, [])
            lst.extend(v for v in vs if v not in lst)
        defaults = {k: copy.deepcopy(g.get(k, raw.get(k))) for k in ("budget", "tokenizer", "fixed_params", "cap_lines")}
        where_g = f"grids[{gi}] ({gname})"
        parent, branch_at = _branch(g, where_g, cells, grid_raws[gi + 1:], path)
        g_over = (list(parent.run_overrides) if parent else list(ov)) \
            + _grid_overrides(g.get("overrides"), path, f"{where_g}.overrides")
        ev_at = _evaluate_at(g.get("evaluate_at", raw.get("evaluate_at")), path, f"grid {gname}", bool(eval_data))
        names = list(axes)
        for combo in itertools.product(*[list(axes[a].items()) for a in names]):
            av = {a: vn for a, (vn, _) in zip(names, combo)}
            if any(all(av[a] == str(v) for a, v in e.items()) for e in excl):
                continue
            settings = copy.deepcopy(defaults)
            run_ov = list(g_over)
            for _, vals in combo:
                for k, v in vals.items():
                    if k in CELL_KEYS:
                        if k.startswith("budget."):
                            b = dict(settings.get("budget") or {})
                            b[k.split(".", 1)[1]] = v
                            settings["budget"] = b
                        else:
                            settings[k] = copy.deepcopy(v)
                    else:
                        run_ov.append(f"{k}={_override_text(v)}")
            where = f"grid {gname}, cell " + ", ".join(f"{a}={vn}" for a, vn in av.items())
            named = {vn: vals["languages"] for vn, vals in axes.get("languages", {}).items() if "languages" in vals}
            varying = [a for a in names if len(axes[a]) > 1]
            cell = _make_cell(gname, av, settings, run_ov, corpus_langs, corpus, path, where, named, varying)
            cell.evaluate_at = list(ev_at)
            cell.label = str(g.get("label", ""))
            for o in run_ov:
                if o.split("=", 1)[0].strip() in DERIVED_KEYS:
                    raise SpecError(f"{path}: {where}: {o.split('=', 1)[0].strip()} is set by the runner (the cell's "
                                    f"directory, dataset, tokenizer and languages; a grid's parent and branch_at); "
                                    f"remove it from the overrides")
            if parent is not None:
                _check_branch(cell, parent, path, f"{where_g}.parent")
                cell.parent, cell.branch_at = parent, branch_at
                if branch_at not in parent.branch_points:
                    parent.branch_points.append(branch_at)
            key = repr(sorted(cell.key().items()))
            if key in by_key:        # trained once; its learning curve has every grid's points
                by_key[key].aliases.append((gname, av))
                by_key[key].evaluate_at = sorted(set(by_key[key].evaluate_at) | set(ev_at))
                continue
            if cell.name in cells:
                raise SpecError(f"{path}: two different cells are both named {cell.name!r}; give the axis values "
                                f"distinct names")
            cells[cell.name] = by_key[key] = cell
    if not cells:
        raise SpecError(f"{path}: the grid is empty (every cell excluded?)")
    ev_langs = raw.get("eval_languages")
    if ev_langs is not None and not (isinstance(ev_langs, list) and ev_langs):
        raise SpecError(f"{path}: eval_languages must be a non-empty list of codes (or left out: the cell's)")
    es = raw.get("eval_settings") or []
    if not isinstance(es, list) or any("=" not in str(x) for x in es):
        raise SpecError(f"{path}: eval_settings must be a list of key=value strings")
    return Study(name=str(raw["name"]), path=os.path.abspath(path), corpus=corpus, eval_data=eval_data,
                 base_config=base_config, evaluate=list(evaluate), cells=list(cells.values()), axes=all_axes,
                 grids=grid_names, spm=spm, eval_languages=ev_langs, eval_settings=[str(x) for x in es],
                 description=str(raw.get("description", "")), corpus_languages=corpus_langs)


def _branch(g: dict, where: str, cells: Dict[str, Cell], later: List[Any], path: str) -> tuple:
    """(parent cell, branch_at) of a grid with parent and branch_at, (None, None) without them."""
    if "parent" not in g and "branch_at" not in g:
        return None, None
    if ("parent" in g) != ("branch_at" in g):
        raise SpecError(f"{path}: {where}: a branch needs both parent and branch_at (it has only "
                        f"{'parent' if 'parent' in g else 'branch_at'}); give both, or neither for cells trained "
                        f"from scratch")
    name, at = g["parent"], g["branch_at"]
    if isinstance(at, bool) or not isinstance(at, int) or at < 1:
        raise SpecError(f"{path}: {where}.branch_at={at!r} must be a step (an integer >= 1) at which the parent "
                        f"keeps a checkpoint")
    if name in cells:
        return cells[name], at
    later_names = [str(x.get("name")) for x in later if isinstance(x, dict)]
    if name == g.get("name"):
        raise SpecError(f"{path}: {where}.parent={name!r} is the grid itself; name a cell of an earlier grid")
    if name in later_names:
        raise SpecError(f"{path}: {where}.parent={name!r} comes later in grids; a branch starts from its parent's "
                        f"checkpoint: move the grid {name!r} before {g.get('name')!r}")
    raise SpecError(f"{path}: {where}.parent={name!r} is not a cell of an earlier grid (cells so far: "
                    f"{', '.join(cells) or 'none'}); name one of them")


def _check_branch(cell: Cell, parent: Cell, path: str, where: str) -> None:
    """SpecError unless `cell` trains the parent's model on the parent's data (BRANCH_SAME)."""
    for k in BRANCH_SAME:
        mine, theirs = getattr(cell, k), getattr(parent, k)
        if mine != theirs:
            key = "cap_lines" if k == "cap_all" else k
            raise SpecError(f"{path}: {where}={parent.name!r}: cell {cell.name} has {key}={mine!r} but its parent "
                            f"has {theirs!r}; a branch continues the parent's model on its data: give it the "
                            f"parent's {key}")


def _grid_overrides(raw: Any, path: str, where: str) -> List[str]:
    """key=value strings of a grid's overrides: a list of them (kept as written) or a mapping
    key: value (each key a run-config field; lists and mappings written as YAML flow text)."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        for k in raw:
            err = run_config_key_error(str(k))
            if err:
                raise SpecError(f"{path}: {where}: unknown key {str(k)!r}: {err}")
        return [f"{k}={_override_text(v)}" for k, v in raw.items()]
    if not isinstance(raw, list) or any(not isinstance(o, str) or "=" not in o for o in raw):
        raise SpecError(f"{path}: {where} must be a list of key=value strings or a mapping key: value")
    return list(raw)


def _evaluate_at(raw: Any, path: str, where: str, has_eval_data: bool) -> List[float]:
    """The sorted fractions of evaluate_at (each in (0, 1]); SpecError naming the key otherwise."""
    if raw is None:
        return []
    vals = [_num(v) for v in raw] if isinstance(raw, list) else None
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in vals):
        raise SpecError(f"{path}: {where}: evaluate_at={raw!r}: give a list of fractions of the cell's steps in "
                        f"(0, 1], e.g. [0.25, 0.5, 0.75, 1.0]")
    if not has_eval_data:
        raise SpecError(f"{path}: {where}: evaluate_at needs eval_data (mbpc and retrieval run on each point; "
                        f"e.g. eval_data: ../shared/corpus/eval)")
    return sorted({float(v) for v in vals})


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _override_text(v: Any) -> str:
    """A YAML value as the text of a key=value override: lists and mappings in flow style on one
    line, keys in the spec's order, YAML anchors written out."""
    if isinstance(v, (list, dict)):
        return yaml.dump(v, Dumper=_NoAliases, default_flow_style=True, sort_keys=False,
                         width=float("inf")).strip()
    return str(v)


def _corpus_languages(corpus: str) -> List[str]:
    from xlmr_mp.data.corpus_io import CorpusError, find_language_files
    try:
        return sorted(find_language_files(corpus, None))
    except CorpusError as e:
        raise SpecError(f"corpus: {e}") from None


def _num(v: Any) -> Any:
    """YAML 1.1 reads 3.0e6 as a string: accept numeric strings where numbers are expected."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _make_cell(gname, av, s, run_ov, corpus_langs, corpus, path, where, named_sets, varying) -> Cell:
    langs = s.get("languages")
    if langs is None:
        raise SpecError(f"{path}: {where}: no languages (add a languages axis, e.g. languages: {{L7: [en, fr]}})")
    if not isinstance(langs, list) or not langs:
        raise SpecError(f"{path}: {where}: languages is an empty language set; list at least one code")
    if len(set(langs)) != len(langs):
        raise SpecError(f"{path}: {where}: languages lists a code twice: {langs}")
    missing = [l for l in langs if l not in corpus_langs]
    if missing:
        raise SpecError(f"{path}: {where}: languages {missing} are not in the corpus {corpus} "
                        f"(no <lang>.txt; it has {len(corpus_langs)} languages)")
    vocab = s.get("vocab")
    if not isinstance(vocab, int) or vocab < 16:
        raise SpecError(f"{path}: {where}: vocab must be an integer number of SentencePiece pieces "
                        f"(add a vocab axis, e.g. vocab: {{V16k: 16000}}); got {vocab!r}")
    alpha = _num(s.get("alpha", 0.3))
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise SpecError(f"{path}: {where}: alpha={alpha!r} must be in (0, 1]")
    seed = s.get("seed", 1)
    if not isinstance(seed, int):
        raise SpecError(f"{path}: {where}: seed={seed!r} must be an integer")
    tok = s.get("tokenizer") or "shared"
    if tok not in TOKENIZER_MODES:
        raise SpecError(f"{path}: {where}: tokenizer={tok!r}: choose {' or '.join(TOKENIZER_MODES)}")
    cap = s.get("cap_lines") or {}
    if not isinstance(cap, dict):
        raise SpecError(f"{path}: {where}: cap_lines must map language -> lines (or a fraction in (0, 1))")
    for l, n in cap.items():
        if l not in corpus_langs:
            raise SpecError(f"{path}: {where}: cap_lines.{l}: language {l!r} is not in the corpus {corpus}")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0 or (isinstance(n, float) and n > 1):
            raise SpecError(f"{path}: {where}: cap_lines.{l}={n!r}: give a line count >= 1 or a fraction in (0, 1]")
    cap_all = {l: cap[l] for l in sorted(cap)}
    cap = {l: cap[l] for l in sorted(cap) if l in langs}      # only the cell's own languages matter
    fp = _num(s.get("fixed_params"))
    if fp is not None and (not isinstance(fp, (int, float)) or fp <= 0):
        raise SpecError(f"{path}: {where}: fixed_params={fp!r} must be a positive parameter count")
    budget = dict(s.get("budget") or {})
    if budget:
        check_keys(budget, BUDGET_KEYS, "budget", path)
        mode = budget.setdefault("mode", "fixed_total")
        if mode not in BUDGET_MODES:
            raise SpecError(f"{path}: {where}: budget.mode={mode!r}: choose {' or '.join(BUDGET_MODES)}")
        if ("tokens" in budget) == ("characters" in budget):
            raise SpecError(f"{path}: {where}: budget needs exactly one of tokens or characters")
        for k in ("tokens", "characters"):
            if k in budget:
                budget[k] = _num(budget[k])
        amount = budget.get("tokens", budget.get("characters"))
        if not isinstance(amount, (int, float)) or amount <= 0:
            raise SpecError(f"{path}: {where}: budget amount {amount!r} must be > 0")
        if mode == "fixed_per_language":
            base = budget.get("base_languages")
            if isinstance(base, str) and base in named_sets:
                base = list(named_sets[base])
            if not isinstance(base, list) or not base:
                raise SpecError(f"{path}: {where}: budget.base_languages={budget.get('base_languages')!r}: "
                                f"give a value name of axes.languages (e.g. L7) or a list of codes")
            missing = [l for l in base if l not in corpus_langs]
            if missing:
                raise SpecError(f"{path}: {where}: budget.base_languages {missing} are not in the corpus {corpus}")
            budget["base_languages"] = base
    name = "-".join([gname] + [av[a] for a in av if a in varying]) if varying else gname
    name = "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in name)
    return Cell(name=name, grid=gname, axis_values=dict(av), languages=list(langs), vocab=vocab,
                alpha=float(alpha), seed=seed, tokenizer=tok, cap_lines=cap, cap_all=cap_all,
                fixed_params=float(fp) if fp is not None else None, budget=budget, run_overrides=run_ov)
