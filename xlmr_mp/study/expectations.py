"""The pre-registered expectations of ../shared/STUDY.md as data, checked mechanically on a study's
results rows (report.collect): no verdict is written by hand.

Each expectation (Rule) is one row of report.md's expectation table: the claim as STUDY.md words it
(the "expected" column of its Studies table, and its "Honest expectations" list), the comparisons
that test it, and their metric (mbpc, lower is better; the same comparisons are repeated on the
secondary metrics retrieval, sib200 and udpos). "en/fr" is the group High, "sw/ur" the group Low,
an overall effect the group All (stats.GROUPS); a language named alone is that language.

A comparison is a difference of cell values (each cell picked by its grid and axis values, seeds
left out), computed per seed over the seeds every compared cell has (the seed fixes initialisation
and data order, so cells are paired by seed), then its mean and 95% interval over those seeds
(stats.ci95). Kinds:
    better / worse   a pair: the second cell better / worse than the first; or a difference of two
                     changes (the first change worse than the second: "hurts less at width 96")
    same             a pair whose values differ by at most the tolerance: 1% of the compared values
                     for bits-per-character metrics; 3 points for sib200, 1 point for retrieval
                     and udpos (accuracies in percent)
    flat_or_u        an ordered series of cells: U-shaped (the best inner cell better than both
                     ends) or flat (each neighbouring pair the same); the better of the two verdicts

Verdict rule (fixed before any result of the study was read; never tuned after):
- a comparison HOLDS when its mean difference points the expected way (for sib200 by at least
  3 points: smaller differences are noise at 204 test rows), or for `same` lies within the
  tolerance; it is SURE when it holds and, where it has two or more seeds, its 95% interval
  excludes zero (for `same`: lies inside the tolerance); with one seed, holding is sure.
- shown: every comparison of the expectation is sure.
- partly: not shown, but the pooled effect (the mean over its comparisons of their mean
  differences, turned so that positive is the expected way) holds.
- not shown: otherwise.
- not yet run: a compared cell has not finished (the comparisons measured so far are shown).
- no data: the cells finished but the metric has no value for the compared languages (e.g.
  retrieval has no en, en being the pivot; udpos has no sw).

Registered studies: REGISTERED[study name] (paper_small, the CPU tier of STUDY.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from xlmr_mp.study.stats import LOWER_IS_BETTER, ci95, per_seed, row_axes, value_of

SECONDARY = ("retrieval", "sib200", "udpos")
FLOOR = {"sib200": 3.0}                                  # a direction holds only beyond this many points
SAME_POINTS = {"sib200": 3.0, "retrieval": 1.0, "udpos": 1.0}
SAME_RELATIVE = 0.01                                     # metrics not in SAME_POINTS: 1% of the values
VERDICTS = ("shown", "partly", "not shown", "not yet run", "no data")


@dataclass(frozen=True)
class Ref:
    """One seed-less cell: its grid and the axis values that pick it there."""
    grid: str
    axes: Tuple[Tuple[str, str], ...]

    def label(self) -> str:
        return " ".join([self.grid] + [v for _, v in self.axes])


@dataclass(frozen=True)
class Comparison:
    """sum of weight x value over `terms`, per seed; `kind` says which way it should point."""
    terms: Tuple[Tuple[int, Ref], ...]
    what: str
    kind: str                      # better | worse | same


@dataclass(frozen=True)
class Rule:
    id: str
    claim: str                     # STUDY.md's words
    registered: str                # "expected (A)" for the Studies table, else likely / may / unlikely
    comparisons: Tuple[Comparison, ...] = ()
    series: Tuple[Ref, ...] = ()   # flat_or_u: the cells in axis order
    what: str = ""                 # flat_or_u: the language or group
    kind: str = "direction"        # direction (comparisons) | flat_or_u (series)
    metric: str = "mbpc"
    note: str = ""
    secondary: bool = True         # also evaluated on SECONDARY


def ref(grid: str, **axes: str) -> Ref:
    return Ref(grid, tuple(axes.items()))


def better(a: Ref, b: Ref, what: str) -> Comparison:
    """b better than a."""
    return Comparison(((1, b), (-1, a)), what, "better")


def worse(a: Ref, b: Ref, what: str) -> Comparison:
    """b worse than a."""
    return Comparison(((1, b), (-1, a)), what, "worse")


def same(a: Ref, b: Ref, what: str) -> Comparison:
    return Comparison(((1, b), (-1, a)), what, "same")


def worse_change(a1: Ref, b1: Ref, a2: Ref, b2: Ref, what: str) -> Comparison:
    """The change a1 -> b1 worse than the change a2 -> b2 (difference of differences)."""
    return Comparison(((1, b1), (-1, a1), (-1, b2), (1, a2)), what, "worse")


@dataclass
class Measured:
    """One comparison on the results: state ok | missing | no data; per-ref seed means; the
    difference's (mean, half-width, n); holds / sure as the module docstring defines them."""
    comparison: Comparison
    state: str
    means: Dict[Ref, float] = field(default_factory=dict)
    diff: tuple = (float("nan"), float("nan"), 0)
    tolerance: float = float("nan")
    oriented: float = float("nan")           # mean difference, positive = the expected way
    holds: bool = False
    sure: bool = False


@dataclass
class Outcome:
    rule: Rule
    metric: str
    verdict: str
    measured: List[Measured]
    missing: List[Ref]
    shape: str = ""                          # flat_or_u: which shape decided ("U", "flat")


# ----------------------------------------------------------------------------- evaluation

class Results:
    """The per-seed values of one metric, and which cells of the study exist and have finished."""

    def __init__(self, rows: List[dict], cells: Iterable[Tuple[str, dict]], metric: str):
        self.metric = metric
        self.study: Dict[str, List[dict]] = {}
        for grid, av in cells:
            av = {a: str(v) for a, v in av.items() if a != "seed"}
            if av not in self.study.setdefault(grid, []):
                self.study[grid].append(av)
        self.done = {(r["grid"], tuple(sorted(row_axes(r).items()))) for r in rows}
        self.values = {g: {tuple(sorted(k)): v for k, v in per_seed(rows, g, metric).items()} for g in self.study}

    def key(self, r: Ref) -> tuple:
        """The one study cell `r` picks (sorted axis items); ValueError for none or several."""
        hits = [av for av in self.study.get(r.grid, []) if all(av.get(a) == str(v) for a, v in r.axes)]
        if len(hits) != 1:
            raise ValueError(f"expectation cell {r.label()} picks {len(hits)} cells of the study (grid {r.grid}: "
                             f"{len(self.study.get(r.grid, []))} cells); it must pick exactly one")
        return tuple(sorted(hits[0].items()))

    def finished(self, r: Ref) -> bool:
        return (r.grid, self.key(r)) in self.done

    def seeds(self, r: Ref, what: str) -> Dict[str, float]:
        out = {}
        for seed, vals in self.values.get(r.grid, {}).get(self.key(r), {}).items():
            v = value_of(vals, what)
            if v is not None:
                out[str(seed)] = v
        return out


def good_sign(metric: str) -> int:
    return -1 if metric in LOWER_IS_BETTER else 1


def tolerance(metric: str, values: List[float]) -> float:
    if metric in SAME_POINTS:
        return SAME_POINTS[metric]
    return SAME_RELATIVE * sum(abs(v) for v in values) / len(values)


def measure(c: Comparison, res: Results) -> Measured:
    refs = [r for _, r in c.terms]
    if not all(res.finished(r) for r in refs):
        return Measured(c, "missing")
    by_ref = {r: res.seeds(r, c.what) for r in refs}
    common = sorted(set.intersection(*(set(v) for v in by_ref.values())), key=str)
    if not common:
        return Measured(c, "no data")
    diffs = [sum(w * by_ref[r][s] for w, r in c.terms) for s in common]
    m = Measured(c, "ok", means={r: sum(by_ref[r][s] for s in common) / len(common) for r in refs},
                 diff=ci95(diffs))
    mean, half, n = m.diff
    if c.kind == "same":
        m.tolerance = tolerance(res.metric, list(m.means.values()))
        m.oriented = m.tolerance - abs(mean)
        m.holds = abs(mean) <= m.tolerance
        m.sure = m.holds and (n < 2 or abs(mean) + half <= m.tolerance)
    else:
        sign = good_sign(res.metric) * (1 if c.kind == "better" else -1)
        m.oriented = sign * mean
        floor = FLOOR.get(res.metric)
        m.holds = m.oriented >= floor if floor else m.oriented > 0
        m.sure = m.holds and (n < 2 or m.oriented - half > 0)
    return m


def combine(ms: List[Measured], metric: str) -> str:
    """The verdict of one expectation's measured comparisons (module docstring)."""
    if any(m.state == "missing" for m in ms):
        return "not yet run"
    ok = [m for m in ms if m.state == "ok"]
    if not ok:
        return "no data"
    if all(m.sure for m in ok):
        return "shown"
    pooled = sum(m.oriented for m in ok) / len(ok)
    if all(m.comparison.kind == "same" for m in ok):
        return "partly" if pooled >= 0 else "not shown"
    floor = FLOOR.get(metric)
    return "partly" if (pooled >= floor if floor else pooled > 0) else "not shown"


def _shape(rule: Rule, res: Results) -> Outcome:
    refs = list(rule.series)
    missing = [r for r in refs if not res.finished(r)]
    flat = [same(a, b, rule.what) for a, b in zip(refs, refs[1:])]
    if missing:
        ms = [measure(c, res) for c in flat]
        return Outcome(rule, res.metric, "not yet run", ms, missing)
    seeds = [res.seeds(r, rule.what) for r in refs]
    common = set.intersection(*(set(s) for s in seeds))
    if not common:
        return Outcome(rule, res.metric, "no data", [], [])
    means = [sum(s[k] for k in common) / len(common) for s in seeds]
    inner = max(range(1, len(refs) - 1), key=lambda i: good_sign(res.metric) * means[i])
    u = [better(refs[0], refs[inner], rule.what), better(refs[-1], refs[inner], rule.what)]
    mu, mf = [measure(c, res) for c in u], [measure(c, res) for c in flat]
    vu, vf = combine(mu, res.metric), combine(mf, res.metric)
    rank = {"shown": 0, "partly": 1, "not shown": 2, "no data": 3}
    if rank[vf] < rank[vu]:
        return Outcome(rule, res.metric, vf, mf, [], "flat")
    return Outcome(rule, res.metric, vu, mu, [], "U")


def evaluate(rule: Rule, rows: List[dict], cells: Iterable[Tuple[str, dict]], metric: Optional[str] = None,
             res: Optional[Results] = None) -> Outcome:
    """The outcome of `rule` on results rows; `cells` = (grid, axis values) of every cell of the
    study, finished or not (to tell a cell not yet run from a rule naming no cell)."""
    res = res or Results(rows, cells, metric or rule.metric)
    if rule.kind == "flat_or_u":
        return _shape(rule, res)
    ms = [measure(c, res) for c in rule.comparisons]
    missing = sorted({r for m in ms if m.state == "missing" for _, r in m.comparison.terms if not res.finished(r)},
                     key=Ref.label)
    return Outcome(rule, res.metric, combine(ms, res.metric), ms, missing)


def evaluate_all(rules: List[Rule], rows: List[dict], cells: List[Tuple[str, dict]]) -> List[Tuple[Outcome, dict]]:
    """(primary outcome, {secondary metric: outcome}) of every rule."""
    cache: Dict[str, Results] = {}

    def res(metric):
        if metric not in cache:
            cache[metric] = Results(rows, cells, metric)
        return cache[metric]
    return [(evaluate(r, rows, cells, res=res(r.metric)),
             {m: evaluate(r, rows, cells, res=res(m)) for m in SECONDARY if m != r.metric and r.secondary})
            for r in rules]


# ----------------------------------------------------------------------------- report.md

MARK = {True: "✓", False: "✗"}


def _pair(a: Ref, b: Ref) -> str:
    """`A H64: L7→L15` for cells of one grid, `A H64 L15 → Ap_total L15` across grids."""
    if a.grid != b.grid:
        return f"{a.label()} → {b.label()}"
    da, db = dict(a.axes), dict(b.axes)
    common = [v for k, v in a.axes if db.get(k) == v]
    diff = [(v, db.get(k, "")) for k, v in a.axes if db.get(k) != v]
    return f"{' '.join([a.grid] + common)}: " + " ".join(f"{x}→{y}" for x, y in diff)


def comparison_label(c: Comparison) -> str:
    t = c.terms
    if len(t) == 2:
        return f"{_pair(t[1][1], t[0][1])} ({c.what})"
    return f"({_pair(t[1][1], t[0][1])}) − ({_pair(t[3][1], t[2][1])}) ({c.what})"


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def measured_text(m: Measured, label: bool = False) -> str:
    """`a → b, Δ mean ± half (n=k) ✓` (with the comparison's label first if `label`)."""
    lab = comparison_label(m.comparison) + ": " if label else ""
    if m.state != "ok":
        return f"{lab}{('not finished' if label else '-') if m.state == 'missing' else 'no data'}"
    mean, half, n = m.diff
    refs = [r for _, r in m.comparison.terms]
    vals = (f"{_num(m.means[refs[1]])} → {_num(m.means[refs[0]])}, " if len(refs) == 2 else "")
    ci = f" ± {_num(half)} (n={n})" if n > 1 else " (1 seed)"
    tol = f", tolerance {_num(m.tolerance)}" if m.comparison.kind == "same" else ""
    mark = MARK[m.holds] if (m.sure or not m.holds) else "(✓)"
    return f"{lab}{vals}Δ {mean:+.3f}{ci}{tol} {mark}"


def tested_by(o: Outcome) -> List[str]:
    """The metric and each comparison with the way it should point (one line each)."""
    r = o.rule
    if r.kind == "flat_or_u":
        return [f"{o.metric} of {r.what} over {', '.join(x.label() for x in r.series)}: U-shaped or flat"]
    return [f"{o.metric}:"] + [f"{comparison_label(c)} {c.kind}" for c in r.comparisons]


def expectation_table(outcomes: List[Tuple[Outcome, dict]]) -> List[str]:
    """report.md lines: one row per rule, then the count of each verdict."""
    lines = ["| id | STUDY.md | pre-registered | tested by | measured: cell means, Δ = mean ± 95% CI over seeds "
             "(line by line) | verdict | secondary metrics |", "|---|---|---|---|---|---|---|"]
    count: Dict[str, int] = {}
    for o, sec in outcomes:
        r = o.rule
        count[o.verdict] = count.get(o.verdict, 0) + 1
        shape = r.kind == "flat_or_u"
        meas = ([f"{o.shape}:"] if o.shape else []) + [measured_text(m, label=shape) for m in o.measured
                                                        if not (shape and m.state == "missing")]
        meas = ([] if shape else [""]) + meas      # aligned with tested_by's lines
        if o.missing:
            meas.append("not finished: " + ", ".join(x.label() for x in o.missing))
        claim = r.claim + (f" ({r.note})" if r.note else "")
        second = "; ".join(f"{m}: {s.verdict}" for m, s in sec.items()) or "-"
        lines.append(f"| {r.id} | {claim} | {r.registered} | {'<br>'.join(tested_by(o))} | {'<br>'.join(meas)} | "
                     f"**{o.verdict}** | {second} |")
    lines += ["", "Verdicts: " + ", ".join(f"{v} {count[v]}" for v in VERDICTS if v in count)
              + f" (of {len(outcomes)}).",
              "✓ a sure comparison, (✓) one that holds but whose interval includes zero, ✗ one that does not "
              "hold (the mean points the other way, or for sib200 less than 3 points the expected way, or for "
              "`same` lies outside the tolerance)."]
    return lines


def verdict_rule() -> str:
    """The verdict rule as the module docstring states it (one source for the code and report.md)."""
    doc = __doc__ or ""
    start = doc.index("Verdict rule")
    end = doc.index("\n\n", start)
    return doc[start:end].strip()


def section(rules: List[Rule], rows: List[dict], cells: List[Tuple[str, dict]]) -> List[str]:
    """The report.md section: the rule, the table, the metric conventions."""
    lines = ["## Pre-registered expectations", "",
             "Every expectation of ../shared/STUDY.md (the Studies table's \"expected\" column and the \"Honest "
             "expectations\"), encoded as data in `xlmr_mp/study/expectations.py` and checked mechanically on "
             "results.csv. Metric mbpc (bits per character, lower is better) at each cell's last step; the same "
             "comparisons on retrieval, sib200 and udpos in the last column (retrieval's High is fr alone: en is "
             "the pivot). en/fr = High, sw/ur = Low, All = the 7 languages. A difference is taken per seed "
             "(cells paired by seed) and its mean and 95% Student t interval are over those seeds; with one seed "
             "there is no interval. Trends at a tiny scale on a mostly translated corpus, not magnitudes.", "",
             ] + [" ".join(item.split()) if i == 0 else "- " + " ".join(item.split())
                  for i, item in enumerate(verdict_rule().split("\n- "))] + [""]
    return lines + expectation_table(evaluate_all(rules, rows, cells)) + [""]


# ----------------------------------------------------------------------------- paper_small (STUDY.md)

def _a(width: str, langs: str) -> Ref:
    return ref("A", width=width, languages=langs)


def _steps(grid: str, axis: str, values: List[str]) -> List[Tuple[Ref, Ref]]:
    return [(ref(grid, **{axis: a}), ref(grid, **{axis: b})) for a, b in zip(values, values[1:])]


_ALPHA_FALLS = _steps("C", "alpha", ["1", "0.7", "0.3", "0.01"])
_MORE_LANGS = [(_a(w, a), _a(w, b)) for w in ("H64", "H96") for a, b in (("L7", "L15"), ("L15", "L30"))]
_CAPACITY = [(_a("H64", "L7"), _a("H64", b), _a("H96", "L7"), _a("H96", b)) for b in ("L15", "L30")]
_C1 = tuple(better(a, b, "Low") for a, b in _ALPHA_FALLS)
_E1 = tuple(better(a, b, "Low") for a, b in _steps("E", "cap_lines", ["p25", "p50", "p100"]))
_B = tuple(better(ref("B", languages="L7"), ref("B", languages=l), l) for l in ("en", "fr", "de")) + \
    tuple(better(ref("B", languages=l), ref("B", languages="L7"), l) for l in ("sw", "ur"))
_A4 = tuple(worse(a, b, "High") for a, b in _MORE_LANGS)
_PERSET = (worse_change(ref("Ap_perset", languages="L7"), ref("Ap_perset", languages="L30"),
                        _a("H64", "L7"), _a("H64", "L30"), "All"),)

PAPER_SMALL: Tuple[Rule, ...] = (
    Rule("A.1", "en/fr mBPC worsens with more languages at width 64", "expected (A)",
         tuple(worse(a, b, "High") for a, b in _MORE_LANGS[:2])),
    Rule("A.2", "... less at 96 (the L7 → L15 / L30 worsening smaller at width 96 than at 64)", "expected (A)",
         tuple(worse_change(a1, b1, a2, b2, "High") for a1, b1, a2, b2 in _CAPACITY)),
    Rule("A.3", "sw/ur a small gain at L15", "expected (A)",
         tuple(better(_a(w, "L7"), _a(w, "L15"), "Low") for w in ("H64", "H96"))),
    Rule("A'.1", "fixed_total hurts en more (than fixed_per_language, width 64)", "expected (A')",
         tuple(worse(_a("H64", l), ref("Ap_total", languages=l), "en") for l in ("L15", "L30"))),
    Rule("A'.2", "per_set hurts more than shared (vocabulary dilution): the L7 → L30 worsening", "expected (A')",
         _PERSET),
    Rule("B.1", "monolingual better for en/fr/de", "expected (B)", _B[:3]),
    Rule("B.2", "L7 better for sw/ur", "expected (B)", _B[3:]),
    Rule("C.1", "sw/ur improve as alpha falls", "expected (C)", _C1),
    Rule("C.2", "en/fr worsen as alpha falls", "expected (C)", tuple(worse(a, b, "High") for a, b in _ALPHA_FALLS)),
    Rule("D.a", "likely flat or U-shaped at this scale (vocabulary at about 2.0M parameters)",
         "expected (D), low confidence", series=tuple(ref("Da", vocab=v) for v in ("V4k", "V8k", "V16k", "V32k")),
         what="All", kind="flat_or_u"),
    Rule("D.b", "likely flat or U-shaped at this scale (vocabulary at width 96)", "expected (D), low confidence",
         series=tuple(ref("Db", vocab=v) for v in ("V8k", "V16k", "V32k")), what="All", kind="flat_or_u"),
    Rule("E.1", "strong gain for sw/ur with their own data", "expected (E)", _E1,
         note="the direction is tested, not the strength"),
    Rule("E.2", "en unchanged", "expected (E)",
         tuple(same(a, b, "en") for a, b in _steps("E", "cap_lines", ["p25", "p50", "p100"]))),
    Rule("H.1", "the alpha trade-off on the low-resource side", "likely", _C1, note="as C.1"),
    Rule("H.2", "in-language data (E)", "likely", _E1, note="as E.1"),
    Rule("H.3", "monolingual vs multilingual by resource level", "likely", _B, note="B.1 and B.2"),
    Rule("H.4", "high-resource degradation with more languages", "likely", _A4, note="High, both widths"),
    Rule("H.5", "shared vs per-set tokenizer", "likely", _PERSET, note="as A'.2"),
    Rule("H.6", "the capacity interaction", "may",
         tuple(worse_change(a1, b1, a2, b2, "All") for a1, b1, a2, b2 in _CAPACITY),
         note="All: the worsening with languages smaller at width 96"),
    Rule("H.7", "sw/ur gain from L7 to L15", "may",
         tuple(better(_a(w, "L7"), _a(w, "L15"), "Low") for w in ("H64", "H96")), note="as A.3"),
    Rule("H.8", "the full rise-then-fall for Low", "unlikely",
         tuple(c for w in ("H64", "H96") for c in (better(_a(w, "L7"), _a(w, "L15"), "Low"),
                                                  worse(_a(w, "L15"), _a(w, "L30"), "Low")))),
    Rule("H.9", "the fixed-capacity vocabulary gain", "unlikely",
         tuple(better(a, b, "All") for a, b in _steps("Da", "vocab", ["V4k", "V8k", "V16k", "V32k"]))),
    Rule("H.10", "SIB-200 differences under 3 points", "unlikely", _C1 + _E1 + _B + _A4 + _PERSET, metric="sib200",
         secondary=False, note="the likely effects H.1-H.5 on SIB-200 accuracy; a difference under 3 points "
                               "counts as not holding"),
)


@dataclass(frozen=True)
class Registration:
    rules: Tuple[Rule, ...]
    listed_widths: Dict[str, Dict[int, int]]    # fixed_params grid -> vocabulary -> the width STUDY.md lists


REGISTERED = {"paper_small": Registration(PAPER_SMALL, {"Da": {4000: 168, 8000: 136, 16000: 96, 32000: 56}})}
