"""The dry run at the full world size (xlmr_mp/dry_run.py, `python -m xlmr_mp.train --dry-run`).

- Each shipped SLURM launcher, run as SLURM would start it (its own #SBATCH size, the job's
  environment, a stand-in `scontrol`, XLMR_MP_DRY_RUN=1 so srun never starts), builds ranks 0, 1, a
  middle one and the last at 512 (Large) / 256 (Base) ranks from the config it resolved itself (the
  reference model is built from the config the launcher recorded, not from a copy); Large also with a
  TP 2 x PP 4 x 2 virtual stages layout given on its command line, one rank per (tp, pp).
- `--ranks all` at world 16 = TP 2 x PP 2 (2 virtual stages) x DP 4: every check over the whole world.
- Checks: the stages of one pipeline cover every layer exactly once and in order; the parameters of
  one rank per (tp, pp) add up to the single-process model (built on the meta device); DP ranks'
  samples are disjoint and cover each global batch exactly once, and are the same on every rank of a
  model-parallel group; with data.path, the indices are the blocks the real loader reads.
- A layout that does not divide exits 2 before any rank is built, naming the options; the launchers
  run the dry run before srun, and a failing one stops the job there.
"""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.tools.launchers import sbatch_opts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- running it

def _parse(stdout):
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"rank"')]
    summary = [json.loads(line)["summary"] for line in stdout.splitlines() if line.startswith('{"summary"')]
    return recs, (summary[0] if summary else None)


def _dry(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--dry-run", *map(str, args)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=timeout)
    return (p.returncode, *_parse(p.stdout), p.stderr)


def _fake_slurm_bin(tmp_path, srun_marker=None):
    """A directory with a stand-in `scontrol` (hostnames -> localhost) and `srun` (writes a marker)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo localhost\nexit 0\n')
    (d / "srun").write_text(f'#!/bin/bash\necho SRUN-STARTED; touch {srun_marker or "/dev/null"}\nexit 0\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return str(d)


def _launch(tmp_path, script, ranks, *args, dry_run_only=True, srun_marker=None):
    """Run launcher `script` as SLURM starts it at its own #SBATCH size; returns (process, world, run_dir)."""
    opts = sbatch_opts(script)
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    run_dir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=_fake_slurm_bin(tmp_path, srun_marker) + os.pathsep + env["PATH"], PYTHON=sys.executable,
               PYTHONPATH=ROOT, XLMR_MP_ROOT=ROOT, RUN_DIR=run_dir, OMP_NUM_THREADS="1",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="dry", SLURM_NTASKS=str(nodes * per_node),
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
               SLURM_JOB_NODELIST=f"n[1-{nodes}]", XLMR_MP_DRY_RUN_RANKS=ranks)
    if dry_run_only:
        env["XLMR_MP_DRY_RUN"] = "1"
    p = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p, nodes * per_node, run_dir


def _recorded_config(run_dir):
    """The config the launcher resolved and recorded (check_layout.py --record) for this job."""
    from xlmr_mp.config import load_config
    return load_config(os.path.join(run_dir, "launch", "job-4242-r0", "config.yaml"))


# ----------------------------------------------------------------------------- the checks

def _single_process_params(model_cfg, padded: bool):
    """Parameters of the whole model in one process (meta device): with the vocabulary padding of
    TP 1 (`padded`), or without any padding (the real parameter count)."""
    import dataclasses
    import torch
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = model_cfg if padded else dataclasses.replace(model_cfg, make_vocab_size_divisible_by=1)
    with torch.device("meta"):
        return sum(p.numel() for p in XLMRModel(cfg).parameters())


def check_grid(recs, summary):
    """Megatron's rank order: TP fastest, then DP, then PP."""
    tp, dp = summary["tp"], summary["dp"]
    for r in recs:
        assert r["rank"] == r["tp_rank"] + tp * r["dp_rank"] + tp * dp * r["pp_rank"], r["rank"]


def check_layers(recs, cfg):
    """Every pipeline (a (tp, dp) pair) whose ranks are all present: its chunks in global stage
    order hold layers 0..L-1, each once; chunk v of pipeline rank r is global stage v * PP + r."""
    pp, v, n_layers = cfg.parallel.pipeline, cfg.parallel.virtual_stages, cfg.model.num_layers
    pipes = defaultdict(dict)
    for r in recs:
        assert r["vp_stages"] == [k * pp + r["pp_rank"] for k in range(v)], r["rank"]
        pipes[(r["tp_rank"], r["dp_rank"])][r["pp_rank"]] = r
    complete = [p for p in pipes.values() if len(p) == pp]
    assert complete, "no pipeline with all its stages among the ranks built"
    for p in complete:
        chunks = sorted((s, layers) for r in p.values() for s, layers in zip(r["vp_stages"], r["layers"]))
        assert [s for s, _ in chunks] == list(range(pp * v))
        assert [i for _, layers in chunks for i in layers] == list(range(n_layers))
        assert all(layers for _, layers in chunks), "a stage without layers"
    return len(complete)


def check_params(recs, cfg):
    """The parameters of one rank per (tp, pp) add up to the single-process model (each replicated
    tensor once, no tied copy, no vocabulary padding); at TP = PP = 1 a rank holds exactly it."""
    one = {}
    for r in recs:
        one.setdefault((r["tp_rank"], r["pp_rank"]), r)
    assert len(one) == cfg.parallel.tensor * cfg.parallel.pipeline, sorted(one)
    assert sum(r["params_owned"] for r in one.values()) == _single_process_params(cfg.model, padded=False)
    if len(one) == 1:
        assert recs[0]["params"] == _single_process_params(cfg.model, padded=True)
    for r in recs:     # the same (tp, pp) holds the same stage on every DP rank
        assert (r["params"], r["params_owned"]) == (one[r["tp_rank"], r["pp_rank"]]["params"],
                                                    one[r["tp_rank"], r["pp_rank"]]["params_owned"])


def check_samples(recs, cfg, languages=None):
    """Per global batch b (the first two): each DP rank's samples are G / DP positions of
    [b G, (b+1) G), no two DP ranks share one, all DP ranks together cover the batch exactly once;
    every rank of one DP rank's model-parallel group reads the same samples."""
    g, dp = cfg.train.global_batch, cfg.parallel.data
    by_dp = {}
    for r in recs:
        assert len(r["samples"]) == len(r["blocks"]) == 2
        assert r["samples"] == by_dp.setdefault(r["dp_rank"], r)["samples"], "model-parallel ranks read different samples"
        assert r["blocks"] == by_dp[r["dp_rank"]]["blocks"]
    for b in range(2):
        seen = []
        for r in by_dp.values():
            s = r["samples"][b]
            assert len(s) == len(r["blocks"][b]) == g // dp
            assert all(b * g <= x < (b + 1) * g for x in s), (r["rank"], b)
            if languages is not None:
                assert {lang for lang, _, _ in r["blocks"][b]} <= set(languages)
            seen += s
        assert len(seen) == len(set(seen)), f"DP ranks share samples in batch {b}"
        if len(by_dp) == dp:
            assert sorted(seen) == list(range(b * g, (b + 1) * g))
    return len(by_dp)


def check_all(recs, summary, cfg):
    assert summary["ranks_failed"] == [] and summary["ranks_built"] == len(recs)
    assert summary["stage_layers"] and summary["world_size"] == cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
    check_grid(recs, summary)
    check_layers(recs, cfg)
    check_params(recs, cfg)
    check_samples(recs, cfg)
    from xlmr_mp.parallel.vocab import padded_vocab_size
    m = cfg.model
    assert {r["padded_vocab"] for r in recs} == {padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by,
                                                                   cfg.parallel.tensor)}
    check_planned_memory(recs, summary, cfg)


def check_planned_memory(recs, summary, cfg):
    """Each rank's planned GiB is the planner's for its own pipeline stage; the largest of them is
    the planner's whole-layout figure; different stages (embeddings, middle, head) plan differently.
    Returns {pp_rank: GiB}."""
    from xlmr_mp.cli.plan import GPUS, GiB, plan
    gpu, nodes = GPUS[summary["gpu"]], max(1, summary["world_size"] // 8)
    res = plan(cfg, gpu, nodes, 8, step_time=False)
    by_pp = {}
    for r in recs:
        own = plan(cfg, gpu, nodes, 8, step_time=False, pipeline_rank=r["pp_rank"])["memory"]["total"] / GiB
        assert r["planned_gib"] == pytest.approx(own, abs=1e-3)
        by_pp[r["pp_rank"]] = r["planned_gib"]
    if res["layout"]["stage"] in by_pp:
        assert max(by_pp.values()) == pytest.approx(res["memory"]["total"] / GiB, abs=1e-3)
    return by_pp


# ----------------------------------------------------------------------------- the shipped launchers

@pytest.mark.slow
@pytest.mark.parametrize("script", ["launch/xlmr_large.slurm", "launch/xlmr_base.slurm"])
def test_launcher_full_size_ranks(tmp_path, script):
    """Ranks 0, 1, a middle one and the last of the launcher's own layout at its full size."""
    opts = sbatch_opts(script)
    world = int(opts["nodes"]) * int(opts["ntasks-per-node"])
    assert world == {"launch/xlmr_large.slurm": 512, "launch/xlmr_base.slurm": 256}[script]
    ranks = [0, 1, world // 2, world - 1]
    p, world, run_dir = _launch(tmp_path, script, ",".join(map(str, ranks)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs, summary = _parse(p.stdout)
    cfg = _recorded_config(run_dir)
    assert [r["rank"] for r in recs] == ranks and summary["world_size"] == world
    assert (summary["tp"], summary["pp"], summary["dp"]) == (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data)
    check_all(recs, summary, cfg)
    assert "srun not started" in p.stdout


@pytest.mark.slow
def test_base_launcher_every_rank_covers_each_global_batch_once(tmp_path):
    """Every one of Base's 256 ranks (--ranks all through XLMR_MP_DRY_RUN_RANKS): the DP ranks'
    samples cover each of the first two global batches of 8192 exactly once."""
    p, world, run_dir = _launch(tmp_path, "launch/xlmr_base.slurm", "all")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs, summary = _parse(p.stdout)
    cfg = _recorded_config(run_dir)
    assert [r["rank"] for r in recs] == list(range(world)) and world == 256
    check_all(recs, summary, cfg)
    assert check_samples(recs, cfg) == cfg.parallel.data == 256


@pytest.mark.slow
def test_large_launcher_pipeline_layout_one_rank_per_tp_pp(tmp_path):
    """Large at 512 ranks with TP 2 x PP 4 x 2 virtual stages (DP 64) given on the launcher's command
    line: one rank per (tp, pp) of DP rank 0, a middle pipeline stage of a middle DP rank, the last."""
    tp, pp, world = 2, 4, 512
    dp = world // (tp * pp)
    ranks = sorted({t + tp * dp * s for t in range(tp) for s in range(pp)} | {1, tp * dp * 2 + tp * (dp // 2), world - 1})
    p, _, run_dir = _launch(tmp_path, "launch/xlmr_large.slurm", ",".join(map(str, ranks)),
                            f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "parallel.virtual_stages=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs, summary = _parse(p.stdout)
    cfg = _recorded_config(run_dir)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_stages, cfg.parallel.data) == (2, 4, 2, 64)
    assert [r["rank"] for r in recs] == ranks
    middle = [r for r in recs if r["rank"] == tp * dp * 2 + tp * (dp // 2)][0]
    assert (middle["pp_rank"], middle["dp_rank"], middle["vp_stages"]) == (2, dp // 2, [2, 6])
    assert not middle["embedding"] and not middle["head"]
    check_all(recs, summary, cfg)
    assert check_layers(recs, cfg) == 2          # (tp 0, dp 0) and (tp 1, dp 0)
    assert len(set(check_planned_memory(recs, summary, cfg).values())) == 4


# ----------------------------------------------------------------------------- every rank of a small layout

def test_all_ranks_tp_pp_dp_interleaved():
    """world 16 = TP 2 x PP 2 (2 virtual stages) x DP 4, every rank: all checks over the whole world."""
    rc, recs, summary, err = _dry("--preset", "base", "--world-size", 16, "--ranks", "all", "parallel.tensor=2",
                                  "parallel.pipeline=2", "parallel.virtual_stages=2", "train.global_batch=64",
                                  "train.micro_batch=4")
    assert rc == 0, err[-3000:]
    from xlmr_mp.config import load_config
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.virtual_stages=2",
                             "train.global_batch=64", "train.micro_batch=4"], world_size=16, preset="base")
    assert [r["rank"] for r in recs] == list(range(16))
    check_all(recs, summary, cfg)
    assert check_layers(recs, cfg) == 8              # every (tp, dp) pipeline
    assert len(set(check_planned_memory(recs, summary, cfg).values())) == 2    # embeddings / head stage
    assert check_samples(recs, cfg) == 4             # every DP rank: each batch covered exactly once
    assert summary["max_rank_seconds"] < 10, summary


@pytest.mark.slow
def test_samples_are_the_blocks_the_real_loader_reads(tmp_path):
    """With data.path the indices come from that corpus, and they are the blocks whose tokens the
    trainer's loader yields for that DP rank (unmasked positions of its real batches)."""
    from tests.support.corpus import write_corpus
    data = str(tmp_path / "data")
    write_corpus(data, {"en": 30, "fr": 20, "sw": 8}, vocab_size=1000)
    opts = [f"data.path={data}", "train.global_batch=8", "train.micro_batch=2"]
    rc, recs, summary, err = _dry("--preset", "tiny", "--world-size", 4, "--ranks", "all", "parallel.tensor=2", *opts)
    assert rc == 0, err[-3000:]
    from xlmr_mp.config import load_config
    from xlmr_mp.data.loader import build_train_loader
    from xlmr_mp.ids import IGNORE_INDEX
    cfg = load_config(None, ["parallel.tensor=2", *opts], world_size=4, preset="tiny")
    assert summary["corpus"] == data
    check_all(recs, summary, cfg)
    check_samples(recs, cfg, languages=["en", "fr", "sw"])
    for r in recs:
        loader = build_train_loader(cfg, r["dp_rank"], cfg.parallel.data)
        ds = {lang: d for lang, d in zip(loader.languages, loader.corpus.datasets)}
        for b in range(2):
            rows = [row for _ in range(loader.micro_batches_at(b)) for row in _rows(next(loader))]
            assert len(rows) == len(r["blocks"][b])
            for (lang, ids, labels), (want_lang, block, _) in zip(rows, r["blocks"][b]):
                assert loader.languages[lang] == want_lang
                tokens = [0, *ds[want_lang].block(block).tolist()]
                kept = [i for i, lab in enumerate(labels[:len(tokens)]) if lab == IGNORE_INDEX]
                assert [ids[i] for i in kept] == [tokens[i] for i in kept]


def _rows(batch):
    return zip(batch["lang"].tolist(), batch["input_ids"].tolist(), batch["labels"].tolist())


# ----------------------------------------------------------------------------- impossible layouts

def test_layout_not_dividing_the_world_exits_2_before_building_anything():
    rc, recs, summary, err = _dry("--preset", "base", "--world-size", 12, "parallel.tensor=2", "parallel.pipeline=4",
                                  timeout=120)
    assert rc == 2, err
    assert recs == [] and summary is None, "nothing may be built for an impossible layout"
    assert err.startswith("dry run: layout error (config preset:base): world size 12 is not divisible by "
                          "parallel.tensor x parallel.pipeline = 2 x 4"), err


@pytest.mark.parametrize("args, names", [
    ([64, "0", "parallel.pipeline=4", "parallel.virtual_stages=4"],
     ["model.num_layers=12 < 16 pipeline stages", "parallel.pipeline x parallel.virtual_stages"]),
    ([64, "0", "parallel.pipeline=2", "parallel.stage_layers=[5,5]"],
     ["parallel.stage_layers=[5, 5] sums to 10 but model.num_layers=12"]),
    ([256, "256"], ["--ranks '256': rank 256 is outside the world of --world-size 256"]),
    ([None, "0"], ["--dry-run needs --world-size N"]),
])
def test_impossible_layout_exits_2_naming_the_options(capsys, args, names):
    from xlmr_mp import dry_run
    world, ranks, *overrides = args
    assert dry_run.main(None, overrides, world, ranks, preset="base") == 2
    out, err = capsys.readouterr()
    assert out == "", "nothing may be built for an impossible layout"
    assert err.startswith("dry run: layout error") and all(n in err for n in names), err


# ----------------------------------------------------------------------------- the launchers' step

@pytest.mark.slow
def test_launcher_dry_runs_rank_0_before_srun_and_stops_when_it_fails(tmp_path):
    marker = tmp_path / "srun-started"
    p, world, _ = _launch(tmp_path, "launch/xlmr_base.slurm", "0", dry_run_only=False, srun_marker=marker)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs, summary = _parse(p.stdout)
    assert [r["rank"] for r in recs] == [0] and summary["world_size"] == world == 256
    assert p.stdout.index('{"rank":0') < p.stdout.index("SRUN-STARTED") and marker.exists()
    marker.unlink()
    p, _, _ = _launch(tmp_path, "launch/xlmr_base.slurm", "256", dry_run_only=False, srun_marker=marker)
    assert p.returncode == 2 and "dry run of rank(s) 256 at world size 256 failed" in p.stderr, p.stderr
    assert not marker.exists() and "SRUN-STARTED" not in p.stdout
