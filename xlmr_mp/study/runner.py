"""Run a study: every cell trains, then is evaluated, in `<out>/cells/<name>/`.

Per cell (one worker thread each, `--jobs` at a time, threads divided between them):
  lock `<cell>/.cell.lock` (another runner has it: skip) -> shared preparation (prepare.py, built
  once under file locks) -> exact plan -> `cell.json` -> `python -m xlmr_mp.train` (resumes from
  the cell's last checkpoint) -> `tools/evaluate.py TASK` per task (`eval/<task>.json`) ->
  `done.json`. A finished cell (done.json with the same settings) is skipped, so `run` is
  idempotent; a failing cell writes `failed.json` and its log is shown while the others go on.
Children run through `xlmr_mp.study.child` (they die with the runner, even on SIGKILL) in their
own session; SIGINT / SIGTERM make the runner stop starting cells and send SIGTERM to the
trainers, which save a checkpoint and exit 75: the next `run` continues from there.
A branch (a cell with a parent, spec.py) starts once its parent is done, from the parent's
checkpoint at branch_at, which the parent keeps; its parent failing fails it.
`--slurm`: preparation here, then one array task per unfinished cell (launch/scaling_study.slurm);
a branch is submitted once its parent is done.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from xlmr_mp.checkpoint.format import STEP_DIR_PATTERN
from xlmr_mp.run_lock import DirLock, RunDirLocked, is_locked
from xlmr_mp.study.plan import CellPlan, _fmt_time, branch_checkpoint, plan_cell
from xlmr_mp.study.prepare import Preparation, _atomic_json, _digest
from xlmr_mp.study.spec import REPO, Cell, Study
from xlmr_mp.study.timing import CellTiming, phases, read_timing, wait_cpu
from xlmr_mp.study.timing import total as timing_total

CURVE_TASKS = ("mbpc", "retrieval")     # evaluated on each evaluate_at checkpoint
STEP_DIR = re.compile("^" + STEP_DIR_PATTERN + "$")
EXIT_REQUEUE = 75
EXIT_LOCKED = 4
CELL_LOCK = ".cell.lock"
# --data of tools/evaluate.py per task, under the spec's eval_data
EVAL_SUBDIR = {"mbpc": "flores200_devtest", "retrieval": "flores200_devtest", "sib200": "sib200",
               "udpos": "ud", "xnli": "xnli", "ner": "ner"}


def retrieval_pivot(eval_settings: List[str]) -> str:
    """The pivot language of the retrieval task under a spec's eval_settings (its pivot=LANG setting,
    else the task's default)."""
    from xlmr_mp.eval.retrieval import DEFAULTS
    pivot = DEFAULTS["pivot"]
    for s in eval_settings:
        if s.startswith("pivot="):
            pivot = s.split("=", 1)[1]
    return pivot


def task_languages(task: str, data: str) -> Optional[List[str]]:
    """The languages an evaluation task has test data for under `data` (None: not known here);
    e.g. UD has no Swahili treebank, so udpos runs on a cell's other languages."""
    try:
        if task in ("mbpc", "retrieval"):
            from xlmr_mp.eval.mbpc import available_languages
            return sorted(available_languages(data))
        if task == "sib200":
            return sorted(d for d in os.listdir(data) if os.path.isfile(os.path.join(data, d, "test.tsv")))
        if task == "udpos":
            import contextlib
            import io
            from xlmr_mp.eval.udpos import DEFAULTS, choose_files
            with contextlib.redirect_stderr(io.StringIO()):       # its note on the training files
                return sorted(choose_files(data, "en", dict(DEFAULTS))["test"])
    except Exception:       # noqa: BLE001  the task itself reports bad data, naming the file
        return None
    return None


def cell_dir(out: str, name: str) -> str:
    return os.path.join(out, "cells", name)


def cell_hash(cell: Cell) -> str:
    return _digest(cell.key())


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cell_state(out: str, cell: Cell) -> str:
    """done | running | failed | interrupted | pending."""
    d = cell_dir(out, cell.name)
    done = read_json(os.path.join(d, "done.json"))
    if done and done.get("hash") == cell_hash(cell):
        return "done"
    if is_locked(d, CELL_LOCK):
        return "running"
    if os.path.exists(os.path.join(d, "failed.json")):
        return "failed"
    if os.path.exists(os.path.join(d, "run", "checkpoints", "latest")):
        return "interrupted"
    return "pending"


def last_jsonl(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for l in reversed(lines):
        try:
            return json.loads(l)
        except ValueError:
            continue
    return None


def trained_step(run_dir: str) -> int:
    from xlmr_mp.checkpoint.sharded import latest_checkpoint, read_meta
    try:
        p = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        return int(read_meta(p)["step"]) if p else 0
    except (OSError, ValueError, KeyError):
        return 0


class Runner:
    """Runs the cells of `study` under `out` with `jobs` cells at a time."""

    def __init__(self, study: Study, out: str, jobs: int = 1, threads: Optional[int] = None,
                 log=print, progress_every: float = 30.0, est: Optional[Dict[str, float]] = None,
                 python: str = sys.executable, order: str = "longest"):
        self.study, self.out, self.jobs = study, os.path.abspath(out), max(1, jobs)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.log, self.progress_every, self.python = log, progress_every, python
        self.est = est or {}
        self.order = order                    # longest | shortest | spec (needs est for the first two)
        self.prep = Preparation(study, self.out, workers=self.threads, log=log)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._procs: Dict[str, subprocess.Popen] = {}
        self.states: Dict[str, str] = {}
        self.started: Dict[str, float] = {}
        self.durations: Dict[str, float] = {}
        self.trained: List[str] = []          # cells whose trainer ran in this session

    # ------------------------------------------------------------------ children
    def _spawn(self, name: str, cmd: List[str], log_path: str, timing: Optional[CellTiming] = None,
               phases: tuple = (), measure: Optional[dict] = None) -> int:
        """Run cmd (its output appended to log_path) as the cell's child; its wall and CPU seconds
        are added to each of `phases` of `timing` (and set in `measure`)."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        with open(log_path, "a") as logf:
            logf.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
            logf.flush()
            with self._lock:
                if self.stopping.is_set():
                    return EXIT_REQUEUE
                p = subprocess.Popen([self.python, "-m", "xlmr_mp.study.child", str(os.getpid())] + cmd,
                                     stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)
                self._procs[name] = p
            t0 = time.time()
            try:
                rc, cpu = wait_cpu(p)
            finally:
                with self._lock:
                    self._procs.pop(name, None)
            if timing is not None:
                for ph in phases:
                    timing.add(ph, time.time() - t0, cpu)
            if measure is not None:
                measure.update(seconds=time.time() - t0, cpu=cpu)
            return rc

    def stop(self, signum=None, frame=None) -> None:
        """Stop starting cells; ask running trainers to save and exit (SIGTERM)."""
        if not self.stopping.is_set():
            self.log(f"[study] signal {signum}: stopping; running cells save a checkpoint (run again to continue)")
        self.stopping.set()
        with self._lock:
            for p in self._procs.values():
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell, allow_train: bool = True) -> str:
        d = cell_dir(self.out, cell.name)
        os.makedirs(d, exist_ok=True)
        try:
            lock = DirLock(d, "study runner", CELL_LOCK).acquire()
        except RunDirLocked as e:
            self.log(f"[study] {cell.name}: skipped, {e}")
            return "running elsewhere"
        try:
            if cell_state(self.out, cell) == "done":
                return "done"
            self._set_aside_stale(cell)
            t0 = time.time()
            self.started[cell.name] = t0
            self._set(cell.name, "running")
            timing = CellTiming(d)
            ds = self.prep.dataset_for(cell)
            built: List[dict] = []
            self.prep.ensure_dataset(ds, built)
            plan = plan_cell(self.study, self.prep, cell, self.out)
            timing.prepared(time.time() - t0, built)
            _atomic_json(os.path.join(d, "cell.json"), dict(cell_record(cell, plan), threads=self.threads))
            if self.stopping.is_set():
                return "interrupted"
            fail = os.path.join(d, "failed.json")
            if os.path.exists(fail):
                os.remove(fail)
            run_dir = os.path.join(d, "run")
            if trained_step(run_dir) < plan.steps:
                if not allow_train:
                    return "interrupted"
                if cell.parent is not None and trained_step(run_dir) == 0 \
                        and not os.path.isdir(branch_checkpoint(self.out, cell)):
                    return self._fail(cell, "train", -1, f"its parent's checkpoint {branch_checkpoint(self.out, cell)} "
                                                         f"is missing (is {cell.parent.name} done?)")
                self.trained.append(cell.name)
                cmd = [self.python, "-m", "xlmr_mp.train", "--config", self.study.base_config] + plan.overrides
                rc = self._spawn(cell.name, cmd, os.path.join(d, "train.log"), timing, ("train",))
                if rc == EXIT_REQUEUE or self.stopping.is_set():
                    return "interrupted"
                if rc == EXIT_LOCKED:
                    return self._fail(cell, "train", rc, "another trainer holds the run directory")
                if rc != 0 or trained_step(run_dir) < plan.steps:
                    return self._fail(cell, "train", rc, f"trained to step {trained_step(run_dir)} of {plan.steps}")
            train_s = time.time() - t0
            t1 = time.time()
            res = self.evaluate_all(cell, plan, timing)
            if res != "ok":
                return res
            done = {"hash": cell_hash(cell), "step": plan.steps, "train_seconds": round(train_s, 1),
                    "eval_seconds": round(time.time() - t1, 1), "timing": timing.data["seconds"],
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _atomic_json(os.path.join(d, "done.json"), done)
            self.durations[cell.name] = time.time() - t0
            return "done"
        except Exception as e:       # noqa: BLE001  a broken cell must not stop the others
            return self._fail(cell, "prepare", -1, f"{type(e).__name__}: {e}")
        finally:
            lock.release()

    def _set_aside_stale(self, cell: Cell) -> None:
        """A cell directory whose cell.json has another hash (the cell's settings changed since it
        ran) holds a model and evaluations of other settings: they are moved to stale-<old hash>/
        (never reused, never deleted), so the cell trains and evaluates afresh."""
        d = cell_dir(self.out, cell.name)
        rec = read_json(os.path.join(d, "cell.json"))
        if not rec or rec.get("hash") == cell_hash(cell):
            return
        names = [n for n in ("run", "eval", "done.json", "timing.json", "cell.json") if os.path.exists(os.path.join(d, n))]
        dest = os.path.join(d, f"stale-{rec.get('hash')}")
        os.makedirs(dest, exist_ok=True)
        for n in names:
            os.replace(os.path.join(d, n), os.path.join(dest, n))
        self.log(f"[study] {cell.name}: its settings changed since it ran (hash {rec.get('hash')} -> "
                 f"{cell_hash(cell)}); the old run and evaluations moved to {dest}")

    def evaluate_all(self, cell: Cell, plan: CellPlan, timing: CellTiming) -> str:
        """Every task on the last checkpoint (eval/<task>.json), then mbpc and retrieval on each
        evaluate_at checkpoint before the last step (eval/curve/<task>-step<N>.json), all in one
        process (evaluate_batch.py); finished ones are skipped. Then the checkpoints that are no
        curve point, no branch point of another cell and not the latest are deleted."""
        from xlmr_mp.checkpoint.format import step_dir_name
        d = cell_dir(self.out, cell.name)
        ck = os.path.join(d, "run", "checkpoints")
        jobs = [self._eval_job(cell, task, ck, task, None) for task in self.study.evaluate]
        steps = sorted({s for _, s in plan.curve if s < plan.steps})
        for step in steps:
            model = os.path.join(ck, step_dir_name(step))
            for task in CURVE_TASKS:
                job = self._eval_job(cell, task, model, f"curve/{task}-step{step}", "curve")
                if job and not os.path.isdir(model):
                    return self._fail(cell, f"evaluate {task}", -1,
                                      f"the checkpoint of step {step} (evaluate_at) was not kept: {model} is missing "
                                      f"(a cell trained before evaluate_at was set); delete {os.path.dirname(ck)} to "
                                      f"retrain it, or remove evaluate_at")
                jobs.append(job)
        jobs = [j for j in jobs if j]
        if jobs:
            res = self._run_batch(cell, jobs, timing)
            if res != "ok":
                return res
        if plan.curve:
            keep = {step_dir_name(s) for s in steps + list(cell.branch_points)}
            latest = os.path.basename(open(os.path.join(ck, "latest")).read().strip()) \
                if os.path.exists(os.path.join(ck, "latest")) else None
            for n in os.listdir(ck) if os.path.isdir(ck) else []:
                if STEP_DIR.match(n) and n not in keep and n != latest:
                    shutil.rmtree(os.path.join(ck, n), ignore_errors=True)
        return "ok"

    def _eval_job(self, cell: Cell, task: str, model: str, name: str, phase: Optional[str]) -> Optional[dict]:
        """The xlmr-evaluate run of `task` on `model` into eval/<name>.json (None: done already, none
        of the cell's languages has data for the task, or retrieval with no language but its pivot)."""
        d = cell_dir(self.out, cell.name)
        out = os.path.join(d, "eval", f"{name}.json")
        langs = [l for l in cell.languages if self.study.eval_languages is None or l in self.study.eval_languages]
        data = os.path.join(self.study.eval_data, EVAL_SUBDIR[task])
        if not os.path.exists(data):
            data = self.study.eval_data
        have = task_languages(task, data)
        if have is not None and [l for l in langs if l not in have]:
            if phase is None:
                self.log(f"[study] {cell.name}: {task} has no data for "
                         f"{', '.join(l for l in langs if l not in have)} under {data}: evaluated without them")
            langs = [l for l in langs if l in have]
        if task == "retrieval":
            pivot = retrieval_pivot(self.study.eval_settings)
            if not [l for l in langs if l != pivot]:      # e.g. a monolingual English cell
                if phase is None:
                    self.log(f"[study] {cell.name}: retrieval pairs each language with the pivot {pivot}; the cell's "
                             f"evaluation languages ({', '.join(langs) or 'none'}) hold no other: not evaluated")
                return None
        if not langs:
            return None
        tmp = out[:-len(".json")] + ".partial.json"
        argv = [task, "--model", model, "--data", data, "--languages", ",".join(langs), "--out", tmp,
                "--threads", str(self.threads), "--no-progress"] + list(self.study.eval_settings)
        same = lambda p: ((read_json(p) or {}).get("command") or [None])[1:] == argv   # noqa: E731
        if os.path.exists(tmp) and same(tmp):   # finished inside a batch that was stopped before its end
            if os.path.exists(tmp[:-len(".json")] + ".png"):
                os.replace(tmp[:-len(".json")] + ".png", out[:-len(".json")] + ".png")
            os.replace(tmp, out)
        if os.path.exists(out):
            if same(out):
                return None              # done with these inputs (task, model, data, languages, settings)
            self.log(f"[study] {cell.name}: {out} was made with other inputs (the spec's evaluation settings "
                     f"changed?): evaluated again")
        return {"argv": argv, "log": os.path.join(d, f"eval-{task}.log"), "out": out, "tmp": tmp, "task": task,
                "phase": phase}

    def _run_batch(self, cell: Cell, jobs: List[dict], timing: CellTiming) -> str:
        """Run `jobs` in one evaluate_batch process; each job's wall and CPU seconds go to its phase
        (its task, or curve), the process's start (interpreter, imports) to eval_start."""
        d = cell_dir(self.out, cell.name)
        os.makedirs(os.path.join(d, "eval", "curve"), exist_ok=True)
        jpath, tpath = os.path.join(d, "eval-batch-jobs.json"), os.path.join(d, "eval-batch-times.json")
        _atomic_json(jpath, [{"argv": j["argv"], "log": j["log"]} for j in jobs])
        if os.path.exists(tpath):
            os.remove(tpath)
        whole: Dict[str, float] = {}
        rc = self._spawn(cell.name, [self.python, "-m", "xlmr_mp.study.evaluate_batch", jpath, tpath],
                         os.path.join(d, "eval-batch.log"), measure=whole)
        times = read_json(tpath) or []
        for j, t in zip(jobs, times):
            ph = j["phase"] or j["task"]
            timing.add(ph, t["seconds"], t["cpu"])
            if j["phase"]:
                timing.add(f"{j['phase']}/{j['task']}", t["seconds"], t["cpu"])
            if t["rc"] == 0 and os.path.exists(j["tmp"]):
                if os.path.exists(j["tmp"][:-len(".json")] + ".png"):
                    os.replace(j["tmp"][:-len(".json")] + ".png", j["out"][:-len(".json")] + ".png")
                os.replace(j["tmp"], j["out"])
        if whole:
            timing.add("eval_start", max(0.0, whole["seconds"] - sum(t["seconds"] for t in times)),
                       max(0.0, whole["cpu"] - sum(t["cpu"] for t in times)))
        if self.stopping.is_set() and rc != 0:
            return "interrupted"
        bad = next((j for j, t in zip(jobs, times) if t["rc"] != 0), jobs[len(times)] if len(times) < len(jobs) else None)
        if rc != 0 or bad is not None or any(not os.path.exists(j["out"]) for j in jobs):
            j = bad or jobs[-1]
            return self._fail(cell, f"evaluate {j['task']}", rc, f"see the log (eval {' '.join(j['argv'][:3])})")
        return "ok"

    def _fail(self, cell: Cell, stage: str, rc: int, why: str) -> str:
        d = cell_dir(self.out, cell.name)
        log = os.path.join(d, "train.log" if stage == "train" else
                           (f"eval-{stage.split()[-1]}.log" if stage.startswith("evaluate") else "train.log"))
        os.makedirs(d, exist_ok=True)
        _atomic_json(os.path.join(d, "failed.json"), {"stage": stage, "exit": rc, "why": why, "log": log})
        tail = ""
        if os.path.exists(log):
            tail = "\n".join("    | " + l for l in open(log, errors="replace").read().splitlines()[-15:])
        self.log(f"[study] FAILED {cell.name} ({stage}, exit {rc}): {why}; log {log}\n{tail}")
        return "failed"

    def _set(self, name: str, state: str) -> None:
        with self._lock:
            self.states[name] = state

    # ------------------------------------------------------------------ the study
    def progress(self) -> str:
        n = {k: 0 for k in ("done", "running", "failed", "pending")}
        for s in self.states.values():
            n["pending" if s in ("pending", "interrupted") else ("running" if s.startswith("running") else s)] += 1
        eta = self._eta()
        return (f"[study] {n['done']}/{len(self.states)} done, {n['running']} running, {n['failed']} failed, "
                f"{n['pending']} pending; ETA {eta}")

    def _eta(self) -> str:
        left = [c for c, s in self.states.items() if s in ("pending", "interrupted", "running")]
        if not left:
            return "0m00s"
        ratio = [self.durations[c] / self.est[c] for c in self.durations if self.est.get(c)]
        scale = sum(ratio) / len(ratio) if ratio else 1.0
        now = time.time()
        total = 0.0
        for c in left:
            e = self.est.get(c)
            if e is None:
                if not self.durations:
                    return "n/a"
                e = sum(self.durations.values()) / len(self.durations)
                scale_c = 1.0
            else:
                scale_c = scale
            total += max(0.0, e * scale_c - (now - self.started[c] if self.states[c] == "running" and c in self.started else 0))
        return _fmt_time(total / min(self.jobs, len(left)))

    def _parent_state(self, cell: Cell) -> Optional[str]:
        """None for a cell trained from scratch, else its parent's state (this run's, or on disk)."""
        if cell.parent is None:
            return None
        return self.states.get(cell.parent.name) or cell_state(self.out, cell.parent)

    def _next(self, queue: List[Cell], active: set) -> Optional[Cell]:
        """The first queued cell that can start (a branch: once its parent is done); a branch whose
        parent cannot finish in this run (failed, interrupted, not scheduled) is failed here."""
        for c in list(queue):
            ps = self._parent_state(c)
            if ps is None or ps == "done":
                queue.remove(c)
                return c
            if c.parent.name in active or any(q.name == c.parent.name for q in queue):
                continue
            queue.remove(c)
            self._set(c.name, self._fail(c, "branch", -1, f"its parent {c.parent.name} is {ps}; run it first "
                                                          f"(a branch starts from its checkpoint at step {c.branch_at})"))
        return None

    def run(self) -> Dict[str, str]:
        """Run every unfinished cell (a branch after its parent); returns {cell: final state}."""
        cells = self.study.cells
        for c in cells:
            self.states[c.name] = cell_state(self.out, c)
        todo = [c for c in cells if self.states[c.name] != "done"]
        if self.order != "spec" and all(self.est.get(c.name) for c in todo):
            # longest first: the shortest makespan on N slots; shortest first: most cells by a deadline
            todo.sort(key=lambda c: -self.est[c.name] if self.order == "longest" else self.est[c.name])
        self.log(f"[study] {self.study.name}: {len(cells)} cells, {len(cells) - len(todo)} already done; "
                 f"{self.jobs} at a time, {self.threads} thread(s) each; study dir {self.out}")
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self.stop)
        try:
            with cf.ThreadPoolExecutor(max_workers=self.jobs) as ex:
                futs = {}
                queue = list(todo)
                while queue or futs:
                    while queue and len(futs) < self.jobs and not self.stopping.is_set():
                        c = self._next(queue, {f.name for f in futs.values()})
                        if c is None:
                            break
                        futs[ex.submit(self.run_cell, c)] = c
                    if not futs:
                        break
                    done, _ = cf.wait(list(futs), timeout=self.progress_every, return_when=cf.FIRST_COMPLETED)
                    for f in done:
                        c = futs.pop(f)
                        self._set(c.name, f.result())
                        self.log(f"[study] {c.name}: {self.states[c.name]}")
                    self.log(self.progress())
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return dict(self.states)


def cell_record(cell: Cell, plan: CellPlan) -> dict:
    """cell.json: the cell's settings and everything derived for it (what report.py reads)."""
    return {"name": cell.name, "grid": cell.grid, "axis_values": cell.axis_values, "aliases": cell.aliases,
            "hash": cell_hash(cell), "languages": cell.languages, "vocab": cell.vocab, "alpha": cell.alpha,
            "seed": cell.seed, "tokenizer_mode": cell.tokenizer, "cap_lines": cell.cap_lines,
            "fixed_params": cell.fixed_params, "budget": cell.budget, "shape": plan.shape,
            "params_embedding": plan.params_embedding, "params_rest": plan.params_rest, "tokens": plan.tokens,
            "steps": plan.steps, "sizes": plan.sizes, "q": plan.q, "epochs": plan.epochs,
            "tokenizer": plan.tokenizer.key, "tokenizer_languages": plan.tokenizer.languages,
            "dataset": plan.dataset.key, "overrides": plan.overrides, "warnings": plan.warnings,
            "evaluate_at": cell.evaluate_at, "curve": [list(p) for p in plan.curve], "label": cell.label or cell.name,
            "parent": cell.parent.name if cell.parent else None, "branch_at": cell.branch_at}


# ----------------------------------------------------------------------------- status

def status_rows(study: Study, out: str) -> List[dict]:
    rows = []
    for c in study.cells:
        d = cell_dir(out, c.name)
        st = cell_state(out, c)
        m = last_jsonl(os.path.join(d, "run", "metrics.jsonl")) or {}
        rec = read_json(os.path.join(d, "cell.json")) or {}
        tm = read_timing(d)
        done = read_json(os.path.join(d, "done.json")) or {}
        t = timing_total(tm) if tm else (done.get("train_seconds", 0) + done.get("eval_seconds", 0) if done else None)
        rows.append({"cell": c.name, "state": st, "step": m.get("step", trained_step(os.path.join(d, "run"))),
                     "steps": rec.get("steps"), "loss": m.get("loss"), "seconds": t, "timing": tm})
    return rows


def status_phases(study: Study) -> List[str]:
    return phases(study.evaluate, any(c.evaluate_at for c in study.cells))


def format_status(study: Study, out: str) -> str:
    """One line per cell: state, step, loss, then the seconds of each phase (timing.py) and the total."""
    rows = status_rows(study, out)
    cols = status_phases(study)
    short = {"prepare": "prep", "retrieval": "retr"}
    w = max(len(r["cell"]) for r in rows)
    lines = [f"{'cell':<{w}}  {'state':<11} {'step':>11} {'loss':>8} "
             + " ".join(f"{short.get(c, c):>9}" for c in cols) + f" {'time':>8} {'cpu':>8}"]
    for r in rows:
        step = f"{r['step'] or 0}/{r['steps'] if r['steps'] is not None else '?'}"
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        sec = (r["timing"] or {}).get("seconds", {})
        phase = []
        for c in cols:
            v = _fmt_time(sec[c]) if c in sec else "-"
            if c == "prepare" and c in sec:
                v += " b" if r["timing"].get("built") else " s"
            phase.append(f"{v:>9}")
        lines.append(f"{r['cell']:<{w}}  {r['state']:<11} {step:>11} {loss:>8} " + " ".join(phase)
                     + f" {_fmt_time(r['seconds']) if r['seconds'] is not None else '-':>8}"
                     + f" {_fmt_time(timing_total(r['timing'], 'cpu')) if timing_total(r['timing'], 'cpu') is not None else '-':>8}")
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if any(r["timing"] for r in rows):
        lines.append("time per phase (wall, every sitting added; cpu: CPU seconds of the cell's processes); "
                     "prep b = built its tokenizer/dataset, s = shared (made by another cell or an earlier run)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- SLURM

def slurm_submit(study: Study, out: str, sbatch_args: List[str], dry_run: bool = False, log=print) -> List[str]:
    """Prepare every dataset here, write `<out>/slurm/cells.txt` (one unfinished cell per line, in
    the sweep format of launch/scaling_study.slurm) and return (or run) the sbatch command."""
    prep = Preparation(study, out, workers=os.cpu_count() or 1, log=log)
    lines = []
    for c in study.cells:
        if cell_state(out, c) == "done":
            continue
        if c.parent is not None and cell_state(out, c.parent) != "done":
            log(f"[study] {c.name}: not submitted, a branch of {c.parent.name} (not done yet): submit again then")
            continue
        prep.ensure_dataset(prep.dataset_for(c))
        plan = plan_cell(study, prep, c, out)
        os.makedirs(cell_dir(out, c.name), exist_ok=True)
        _atomic_json(os.path.join(cell_dir(out, c.name), "cell.json"), cell_record(c, plan))
        for o in plan.overrides:
            if any(ch.isspace() for ch in o):
                raise ValueError(f"cell {c.name}: override {o!r} has white space; the sweep format cannot hold it")
        lines.append(" ".join([c.name] + plan.overrides))
    if not lines:
        log("[study] every cell is done; nothing to submit")
        return []
    sweep = os.path.join(out, "slurm", "cells.txt")
    os.makedirs(os.path.dirname(sweep), exist_ok=True)
    with open(sweep + ".tmp", "w") as f:
        f.write(f"# study {study.name}: {len(lines)} unfinished cells (tools/study.py run --slurm)\n")
        f.write("\n".join(lines) + "\n")
    os.replace(sweep + ".tmp", sweep)
    cmd = ["sbatch", f"--array=0-{len(lines) - 1}", f"--output={os.path.join(out, 'slurm', '%x-%A_%a.out')}",
           f"--export=ALL,SWEEP={sweep},CONFIG={study.base_config},STUDY_SPEC={study.path},STUDY_DIR={out}"] \
        + list(sbatch_args) + [os.path.join(REPO, "launch", "scaling_study.slurm")]
    log("[study] " + " ".join(cmd))
    if not dry_run:
        subprocess.run(cmd, check=True, cwd=REPO)
    return cmd


def finish_cell(study: Study, out: str, name: str, log=print) -> str:
    """After an array task trained a cell: evaluate it and mark it done (nothing while unfinished)."""
    cells = {c.name: c for c in study.cells}
    if name not in cells:
        raise KeyError(f"no cell {name!r} in {study.path}")
    r = Runner(study, out, jobs=1, log=log)
    return r.run_cell(cells[name], allow_train=False)
