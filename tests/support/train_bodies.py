"""Rank bodies for the trainer's multi-process tests (spawned processes import this module)."""
import torch
import torch.distributed as dist

from xlmr_mp.config import OptimConfig


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _run(net, opt, reducer, steps, rows):
    """Each step: the global batch is 4 rows; this process handles `rows` in micro-batches of 1."""
    for s in range(steps):
        x, y = _batches(s)
        if reducer is not None:
            reducer.start_step(len(rows))
        for i in rows:
            loss = ((net(x[i:i + 1]) - y[i:i + 1]) ** 2).sum() / 4.0
            loss.backward()
        if reducer is not None:
            # overlap: every bucket was launched from the hooks during the last backward
            assert not reducer.enabled or reducer._next == len(reducer.buckets)
            reducer.finish()
        opt.step()
        opt.zero_grad()


def dp_reference(steps):
    from xlmr_mp.parallel.data_parallel import DistributedAdamW
    net = _tiny_net()
    opt = DistributedAdamW(list(net.named_parameters()), OptimConfig(lr=1e-2))
    _run(net, opt, None, steps, rows=[0, 1, 2, 3])
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def dp_rank_body(rank, world_size, steps, zero, reduce_scatter=False):
    from xlmr_mp.parallel.data_parallel import DistributedAdamW, FlatBuffers, GradReducer
    net = _tiny_net()
    named = list(net.named_parameters())
    flat = FlatBuffers(named, None, bucket_mb=1e-4)                   # tiny buckets: several of them
    reducer = GradReducer(flat, None, reduce_scatter=reduce_scatter)
    assert len(reducer.buckets) > 1
    opt = DistributedAdamW(flat, OptimConfig(lr=1e-2), dp_group=None, shard=zero)
    _run(net, opt, reducer, steps, rows=[2 * rank, 2 * rank + 1])
    out = {n: p.detach().clone() for n, p in net.named_parameters()}
    out["__owned__"] = list(opt.state_by_name().keys())
    out["__state_elems__"] = sum(pc.b - pc.a for pc in opt.pieces)
    return out


# ----------------------------------------------------------------------------- trainer end-to-end

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))
TINY = __import__("os").path.join(ROOT, "xlmr_mp", "presets", "tiny.yaml")


class SyntheticBatches:
    """Deterministic masked-LM global batches (random tokens, variable lengths, 15% masked); DP rank
    r of D reads its contiguous slice, in micro-batches of `micro`. Global batch b depends only on
    (seed, b), so every layout sees the same data; `state_dict` holds the position."""

    def __init__(self, vocab, seq, global_batch, micro, dp_rank=0, dp_size=1, seed=0):
        self.v, self.s, self.G, self.m = vocab, seq, global_batch, micro
        self.r, self.d, self.seed = dp_rank, dp_size, seed
        self.b, self.i = 0, 0

    def global_batch(self, b):
        g = torch.Generator().manual_seed(self.seed * 100003 + b)
        ids = torch.randint(4, min(self.v - 1, 104), (self.G, self.s), generator=g)  # learnable: a 100-token unigram
        lens = torch.randint(self.s // 2, self.s + 1, (self.G,), generator=g)
        pos = torch.arange(self.s)[None]
        attn = (pos < lens[:, None]).long()
        ids[:, 0] = 0
        ids[torch.arange(self.G), lens - 1] = 2
        ids = torch.where(attn.bool(), ids, torch.ones_like(ids))
        mask = (torch.rand(self.G, self.s, generator=g) < 0.15) & attn.bool() & (pos > 0)
        mask[:, 1] = True
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        inp = torch.where(mask, torch.full_like(ids, self.v - 1), ids)
        lang = torch.arange(self.G) % 3
        return {"input_ids": inp, "attention_mask": attn, "labels": labels, "lang": lang}

    def __iter__(self):
        return self

    def __next__(self):
        gb = self.global_batch(self.b)
        per = self.G // self.d
        lo = self.r * per + self.i * self.m
        mb = {k: v[lo:lo + self.m].clone() for k, v in gb.items()}
        self.i += 1
        if self.i * self.m >= per:
            self.b, self.i = self.b + 1, 0
        return mb

    def state_dict(self):
        return {"batch": self.b, "micro": self.i}

    def load_state_dict(self, sd):
        self.b, self.i = sd["batch"], sd["micro"]


def default_run_dir() -> str:
    """This test's run directory under the session's temporary root (tests/conftest.py sets both
    variables; spawned ranks inherit them, so every rank of a test agrees), never the repo's runs/."""
    import os
    import tempfile
    root = os.environ.get("XLMR_MP_TEST_RUNS") or os.path.join(tempfile.gettempdir(), "xlmr_mp-test-runs")
    return os.path.join(root, os.environ.get("XLMR_MP_TEST_NAME", "no-test-name"))


def compile_overrides() -> list:
    """["train.compile=true"] under XLMR_MP_TEST_COMPILE=1 (the layout tests compiled: slow), else []:
    for tests that launch `python -m xlmr_mp.train` themselves (tiny_cfg adds it on its own)."""
    import os
    return ["train.compile=true"] if os.environ.get("XLMR_MP_TEST_COMPILE") == "1" else []


def tiny_cfg(overrides=(), world_size=None):
    """The tiny preset with `overrides`; run_dir defaults to default_run_dir() (the preset's runs/tiny
    is where the README's Training command writes)."""
    from xlmr_mp.config import load_config
    overrides = list(overrides)
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.insert(0, f"run_dir={default_run_dir()}")
    # first, so that a test's own train.compile (test_train_compile's eager run) wins
    overrides = compile_overrides() + overrides
    return load_config(TINY, overrides, world_size=world_size)


def make_trainer(cfg, seed=0):
    import torch.distributed as dist
    from xlmr_mp.parallel.state import init_parallel
    from xlmr_mp.train import Trainer
    groups = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    loader = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_length, cfg.train.global_batch,
                              cfg.train.micro_batch, groups.dp_rank, groups.dp_size, seed)
    return Trainer(cfg, groups, torch.device("cpu"), loader), groups


def local_params(tr):
    return {n: p.detach().clone() for n, p in tr.named}


def train_rank_body(rank, world_size, overrides, steps, run_dir):
    """Train `steps` steps of the tiny config at the layout in `overrides`; return losses, params, coords."""
    from xlmr_mp.parallel.state import destroy_parallel
    cfg = tiny_cfg(list(overrides) + [f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    tr, g = make_trainer(cfg)
    metrics = [tr.train_step() for _ in range(steps)]
    out = {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
           "params": local_params(tr), "tp_rank": g.tp_rank, "tp_size": g.tp_size, "pp_rank": g.pp_rank,
           "dp_rank": g.dp_rank}
    destroy_parallel()
    return out


def make_indexed_data(root, langs=("en", "fr", "sw"), vocab=1002, docs=(40, 4), seed=0):
    """Tiny preprocessed data in the contract format (<root>/<lang>/{train,valid}.{bin,idx},
    megatron-core MMIDIDX, uint16, each sentence ending in </s>=2): learnable token statistics
    (each language draws from its own Zipf-like range), written with megatron's builder."""
    import os
    import warnings
    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(seed)
    for li, lang in enumerate(langs):
        os.makedirs(os.path.join(root, lang), exist_ok=True)
        lo = 4 + 50 * li
        for split, n_docs in zip(("train", "valid"), docs):
            prefix = os.path.join(root, lang, split)
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for _ in range(n_docs):
                for _ in range(int(rng.integers(2, 6))):
                    n = int(rng.integers(4, 20))
                    toks = lo + np.minimum(rng.zipf(1.5, n) - 1, 99)
                    toks = np.minimum(toks, vocab - 2)
                    builder.add_item(torch.from_numpy(np.append(toks, 2).astype(np.int64)))
                builder.end_document()
            builder.finalize(prefix + ".idx")
    return root


def fp16_inf_body(rank, world_size, run_dir):
    """fp16 trainer: a clean step, then a step whose gradient is forced to inf on rank 0 only:
    every rank must skip it, halve the scale and change nothing else; then training continues."""
    from xlmr_mp.parallel.state import destroy_parallel
    cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=2", "precision.dtype=fp16",
                    "precision.initial_loss_scale=1024", f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    tr, g = make_trainer(cfg)
    first = tr.train_step()
    params0 = {n: p.detach().clone() for n, p in tr.named}
    opt0 = tr.optimizer.state_by_name()
    handle = None
    if rank == 0:
        p = dict(tr.named)["layers.1.ffn.fc1.weight"]
        handle = p.register_hook(lambda grad: grad * float("inf"))
    bad = tr.train_step()
    if handle is not None:
        handle.remove()
    params1 = {n: p.detach().clone() for n, p in tr.named}
    opt1 = tr.optimizer.state_by_name()
    after = tr.train_step()
    params2 = {n: p.detach().clone() for n, p in tr.named}
    destroy_parallel()
    return {"first": first, "bad": bad, "after": after, "params_same": all(torch.equal(params0[n], params1[n]) for n in params0),
            "opt_same": opt0.keys() == opt1.keys() and all(torch.equal(opt0[n][k], opt1[n][k]) for n in opt0 for k in opt0[n]),
            "params_moved_after": any(not torch.equal(params1[n], params2[n]) for n in params1),
            "step": tr.step, "skipped_total": tr.scaler.skipped_steps}


def reshard_body(rank, world_size, overrides, load_path, steps_before_save, steps_after, ckpt_dir, run_dir):
    """Optionally load `load_path` (any layout), train, save into `ckpt_dir`, train on. Returns the
    losses, the params right after loading and right at saving, this rank's coordinates, the path."""
    from xlmr_mp.parallel.state import destroy_parallel
    cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=2"] + list(overrides)
                   + [f"checkpoint.dir={ckpt_dir}", f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    tr, g = make_trainer(cfg)
    if load_path:
        tr.load(load_path)
    loaded = local_params(tr)
    losses = [tr.train_step()["loss"] for _ in range(steps_before_save)]
    path = tr.save()
    saved = local_params(tr)
    losses += [tr.train_step()["loss"] for _ in range(steps_after)]
    out = {"losses": losses, "loaded": loaded, "saved": saved, "path": path, "step": tr.step,
           "tp_rank": g.tp_rank, "pp_rank": g.pp_rank, "dp_rank": g.dp_rank, "tp_size": g.tp_size,
           "scale": tr.scaler.scale}
    destroy_parallel()
    return out


def variants_body(rank, world_size, variants, steps, run_dir):
    """Losses of `steps` steps for each override list in `variants` (same data, same init)."""
    from xlmr_mp.parallel.state import destroy_parallel
    out = []
    for ov in variants:
        cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=4", "model.dropout=0.1",
                        "model.attention_dropout=0.1"] + list(ov) + [f"run_dir={run_dir}", "logging.jsonl=false"],
                       world_size)
        tr, _ = make_trainer(cfg)
        out.append([tr.train_step()["loss"] for _ in range(steps)])
        destroy_parallel()
    return out


def eval_body(rank, world_size, overrides, data_dir, steps, run_dir):
    """Validation metrics after `steps` training steps on real tiny data, at the layout in `overrides`."""
    from xlmr_mp.data.loader import build_train_loader, build_validation_loader
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    from xlmr_mp.train import Trainer
    cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=2", f"data.path={data_dir}", "train.eval_batches=3"]
                   + list(overrides) + [f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    g = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    tr = Trainer(cfg, g, torch.device("cpu"), build_train_loader(cfg, g.dp_rank, g.dp_size),
                 build_validation_loader(cfg, g.dp_rank, g.dp_size))
    losses = [tr.train_step()["loss"] for _ in range(steps)]
    ev = tr.evaluate()
    destroy_parallel()
    return {"losses": losses, "eval": ev}


def loss_scale_abort_body(rank, world_size, data_dir, run_dir):
    """fp16 run whose every step overflows: scale 4 -> 2 -> 1, then the abort saves and exits 3."""
    import json
    import os
    import xlmr_mp.train as T
    from xlmr_mp.train import train
    T.grads_have_inf = lambda params, group=None: True        # every step overflows (the trainer's own reference)
    cfg = tiny_cfg([f"data.path={data_dir}", f"run_dir={run_dir}", "precision.dtype=fp16",
                    "precision.initial_loss_scale=4", "precision.min_loss_scale=1", "train.eval_interval=0",
                    "checkpoint.interval=0"], world_size)
    try:
        train(cfg)
        code = 0
    except SystemExit as e:
        code = e.code
    ck = os.path.join(run_dir, "checkpoints")
    latest = open(os.path.join(ck, "latest")).read().strip()
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))] if rank == 0 else []
    return {"code": code, "latest": latest, "rows": rows}


def model_only_load_body(rank, world_size, ckpt, full):
    """Load a model-only checkpoint (tools/convert_checkpoint.py format) via checkpoint.load."""
    from xlmr_mp.model.sharding import local_to_full
    from xlmr_mp.parallel.state import destroy_parallel
    cfg = tiny_cfg(["train.global_batch=8", "train.micro_batch=2", f"checkpoint.load={ckpt}",
                    "logging.jsonl=false"], world_size)
    tr, g = make_trainer(cfg)
    tr.load(tr.resume_path())
    got = local_to_full([local_params(tr)], cfg.model)
    loss = tr.train_step()["loss"]
    destroy_parallel()
    return {"same": all(torch.equal(got[n], full[n]) for n in full), "loss": loss, "step": tr.step}
