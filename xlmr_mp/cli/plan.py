"""Memory per rank and step time of an XLM-R training layout, before any job runs.

    xlmr-plan --preset large --gpu V100-32 --nodes 64 \
        parallel.tensor=1 parallel.pipeline=1 train.global_batch=8192 [--json]

Memory per rank (the rank of the stage that needs most; bytes, also GiB in the text output):
  params        fp32 parameters of the stage (they are the master weights, precision.py)
  grads         fp32 gradient buffers (contiguous buckets, parallel/data_parallel.py)
  optimizer     Adam exp_avg + exp_avg_sq: 8 B/param, / DP under ZeRO-1 (parallel.distributed_optimizer)
  autocast      bf16/fp16 weight copies cached by autocast during a forward (2 B/param of matrices)
  activations   saved tensors of the micro-batches in flight (1F1B: PP - stage on stage `stage`),
                per layer and token: 4H + 5H/TP + 2F/TP elements with no recompute (flash / CPU
                attention: no S x S term; the math path adds heads/TP x S x 5 B on a GPU, 13 B for the
                CPU torch softmax), H with full
                recompute plus one layer recomputed, selective: the attention output not kept
  logits        the masked-LM loss (parallel/vocab.py): one [min(M, 1024), V/TP] fp32 logit chunk and
                the [V/TP, H] decoder gradient it accumulates in the forward
  buffers       transient in backward: the word embedding's dense gradient meeting the decoder
                gradient (first stage), pipeline send/recv buffers
  total         the larger of the backward peak (all of the above) and the optimizer step's
                (params + grads + optimizer + the ZeRO-1 all-gather slice)
Step time: model FLOPs (xlmr_mp.metrics.flops_per_token, x 4/3 with full recompute) at the GPU's
peak x --efficiency, tensor-parallel all-reduces (4 per layer per micro-batch, ring, intra-node
bandwidth), pipeline sends, the DP gradient reduction (ring: 2 (DP-1)/DP x the fp32 gradient bytes
through each node's network link, or NVLink within a node; not overlapped: an upper bound), the pipeline bubble (PP - 1) / (V x micro-batches), the optimizer
(memory bound, 7 x 4 B per local element at HBM bandwidth).

The `--json` output has the keys `memory` (the components above plus `total`, bytes), `fits`,
`gpu`, `layout`, `step_time_s` (compute, tp_comm, pp_comm, dp_comm, bubble, optimizer, total),
`tokens_per_s`, `mfu`, and `days_for_steps` (train.train_steps at that step time).
The model is checked against measured CPU peaks in tests/tools/test_plan.py (within 15%).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from xlmr_mp.presets import preset_names

GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    name: str
    mem_gib: float          # device memory
    bf16_tflops: float      # dense half-precision tensor-core peak (fp16 on V100: it has no bf16)
    fp32_tflops: float
    hbm_gbps: float         # HBM bandwidth, GB/s
    intra_gbps: float       # per-GPU NVLink bandwidth, one direction, GB/s
    inter_gbps: float       # the node's network bandwidth (all NICs, one direction), GB/s


# Vendor datasheet figures (SXM parts); inter-node: one 100 Gb/s EDR NIC per V100 node, one 200 Gb/s
# HDR NIC per A100 GPU, one 400 Gb/s NDR NIC per H100/H200 GPU (common builds; --inter-gbps overrides).
GPUS = {g.name: g for g in (
    GPU("V100-16", 16, 125, 15.7, 900, 150, 12.5),
    GPU("V100-32", 32, 125, 15.7, 900, 150, 12.5),
    GPU("A100-40", 40, 312, 19.5, 1555, 300, 200),
    GPU("A100-80", 80, 312, 19.5, 2039, 300, 200),
    GPU("H100", 80, 989, 67, 3350, 450, 400),
    GPU("H200", 141, 989, 67, 4800, 450, 400),
    GPU("CPU", 1e9, 0.16, 0.16, 10, 10, 10),      # this repository's test machine class (2 cores)
)}

LOSS_CHUNK_BYTES = 256 * 2 ** 20   # xlmr_mp.parallel.vocab.MLM_LOSS_CHUNK_BYTES (mirrored: no torch import here)


def loss_chunk_rows(local_vocab: int) -> int:
    """xlmr_mp.parallel.vocab.mlm_loss_chunk_rows without importing torch (tests/tools/test_plan.py checks
    that the two agree)."""
    return max(16, LOSS_CHUNK_BYTES // (4 * max(1, local_vocab)))


USABLE_FRACTION = 0.92      # device memory left after the CUDA context, NCCL buffers and fragmentation


def _padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    m = max(1, divisible_by) * tp
    return -(-vocab // m) * m


def stage_params(m, tp: int, n_layers: int, first: bool, last: bool) -> Dict[str, int]:
    """Parameter counts of one stage at TP: 'matrices' (weights that autocast casts) and 'total'."""
    H, F = m.hidden_size, m.ffn_size
    vp = _padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by, tp) // tp
    layer_w = (3 * H * H + H * H + F * H + H * F) // tp
    layer_b = 3 * H // tp + H + F // tp + H + 4 * H
    mats = n_layers * layer_w
    total = n_layers * (layer_w + layer_b)
    if first:
        total += vp * H + m.max_positions * H + 2 * H + H      # word, positions, LayerNorm, token-type buffer
    if last:
        total += H * H + H + 2 * H + vp                           # head dense, LayerNorm, output bias
        mats += H * H + vp * H
        if not first:
            total += vp * H                                       # the tied decoder copy
    return {"total": total, "matrices": mats, "vocab_rows": vp}


def in_flight(kind: str, pp: int, stage: int, n_micro: int, v: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once (per chunk's layers)."""
    if pp == 1:
        return 1
    if kind == "gpipe":
        return n_micro
    if kind == "interleaved":
        return min(n_micro * v, (pp - stage - 1) * 2 + (v - 1) * pp + 1) / v
    return min(n_micro, pp - stage)


def plan(cfg, gpu: GPU, nodes: int = 1, gpus_per_node: int = 8, efficiency: float = 0.45,
         inter_gbps: Optional[float] = None, attention: str = "auto", step_time: bool = True,
         pipeline_rank: Optional[int] = None) -> dict:
    """The planner's prediction for RunConfig `cfg` (parallel.* set; DP from nodes x gpus_per_node
    when parallel.data is 0). step_time=False: memory only (no torch import, for the launcher's
    layout check). pipeline_rank: the memory of that pipeline rank's stage (the dry run's per-rank
    figure) instead of the largest."""
    from xlmr_mp.parallel.layout import schedule_kind, stage_layer_counts
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, v = p.tensor, p.pipeline, p.virtual_stages
    world = nodes * gpus_per_node
    dp = p.data or max(1, world // (tp * pp))
    micro, seq = t.micro_batch, cfg.data.seq_length
    n_micro = max(1, t.global_batch // (micro * dp))
    # precision.dtype=auto is a half precision on every GPU (bf16, fp16 on V100) and fp32 on the CPU
    low = cfg.precision.dtype in ("bf16", "fp16") or (cfg.precision.dtype == "auto" and gpu.name != "CPU")
    act_b = 2 if low else 4
    H, F, heads = m.hidden_size, m.ffn_size, m.num_heads
    sp = bool(getattr(p, "sequence_parallel", False)) and tp > 1
    math_attention = attention == "math" or (attention == "auto" and (m.attention_dropout > 0 and gpu.name == "CPU"
                                                                       or gpu.name.startswith("V100") and low))
    counts = stage_layer_counts(m.num_layers, pp * v, p.stage_layers, p.first_last_fewer)
    kind = schedule_kind(p)
    tokens = micro * seq
    masked = max(1, round(tokens * cfg.data.mask_prob))
    best = None
    for r in (range(pp) if pipeline_rank is None else [pipeline_rank]):
        stages = [k * pp + r for k in range(v)]
        first, last = 0 in stages, (pp * v - 1) in stages
        n_layers = sum(counts[s] for s in stages)
        prm = stage_params(m, tp, n_layers, first, last)
        n = prm["total"]
        mem = {"params": 4 * n, "grads": 4 * n,
               "optimizer": 8 * n / (dp if p.distributed_optimizer else 1),
               "autocast": 2 * prm["matrices"] if low else 0}
        seq_tp = tp if sp else 1
        full_layer = (4 * H / seq_tp + 5 * H / tp + 2 * F / tp) * act_b
        score_b = 13 if gpu.name == "CPU" else 5     # per attention score: fp32 torch softmax chain, or the fused
        if math_attention:                           # kernel's fp16 probabilities + dropout mask + output
            full_layer += heads / tp * seq * score_b
        if t.recompute == "full":
            per_layer, extra = H / seq_tp * act_b, full_layer * tokens
        elif t.recompute == "selective":
            per_layer, extra = full_layer - H / tp * act_b - (heads / tp * seq * score_b if math_attention else 0), 0
        else:
            per_layer, extra = full_layer, 0
        held = in_flight(kind, pp, r, n_micro, v)
        act = per_layer * tokens * n_layers * held + extra
        if first:
            act += 2 * H * act_b * tokens * held                       # embedding sum + LayerNorm input
        logits = 0.0
        if last:
            act += 5 * H * 4 * masked                                  # head transform saved tensors
            logits = min(masked, loss_chunk_rows(prm["vocab_rows"])) * prm["vocab_rows"] * 4 + prm["vocab_rows"] * H * 4
            if low:
                logits += prm["vocab_rows"] * H * 2                    # the weight in the compute dtype
        buffers = 0.0
        if first:
            buffers += prm["vocab_rows"] * H * 4                       # dense embedding gradient
        if pp > 1:
            buffers += 2 * micro * seq / seq_tp * H * act_b * held
        mem.update(activations=act, logits=logits, buffers=buffers)
        static = mem["params"] + mem["grads"] + mem["optimizer"]
        gather = 4 * n / dp if p.distributed_optimizer and dp > 1 else 0.0   # ZeRO-1 all-gather slice, at the step
        mem["total"] = max(sum(mem.values()), static + gather)
        if best is None or mem["total"] > best[1]["total"]:
            best = (r, mem, n)
    stage, mem, n_local = best
    usable = gpu.mem_gib * GiB * USABLE_FRACTION
    res = {"gpu": gpu.name, "layout": {"tp": tp, "pp": pp, "dp": dp, "virtual_stages": v, "world": world,
                                       "nodes": nodes, "gpus_per_node": gpus_per_node, "micro_batch": micro,
                                       "micro_batches_per_step": n_micro, "zero": bool(p.distributed_optimizer),
                                       "recompute": t.recompute, "dtype": cfg.precision.dtype, "stage": stage,
                                       "attention": "math" if math_attention else "flash"},
           "memory": mem, "usable_bytes": usable, "fits": mem["total"] <= usable}
    if not step_time:
        return res
    # ---------------------------------------------------------------- step time
    from xlmr_mp.metrics import flops_per_token
    fpt = flops_per_token(m, seq, cfg.data.mask_prob) * (4.0 / 3.0 if t.recompute == "full" else 1.0)
    gb_tokens = t.global_batch * seq
    peak = (gpu.bf16_tflops if low else gpu.fp32_tflops) * 1e12
    compute = fpt * gb_tokens / (world * peak * efficiency)
    bw_intra = gpu.intra_gbps * 1e9
    bw_inter = (inter_gbps if inter_gbps is not None else gpu.inter_gbps) * 1e9
    layers_per_rank = m.num_layers / pp
    tp_bytes = micro * seq * H * act_b
    tp_comm = (4 * layers_per_rank * n_micro * 2 * (tp - 1) / tp * tp_bytes / bw_intra) if tp > 1 else 0.0
    pp_bw = bw_intra if tp * pp <= gpus_per_node else bw_inter
    pp_comm = (2 * n_micro * v * micro * seq * H * act_b / pp_bw) if pp > 1 else 0.0
    dp_bw = bw_inter if world > gpus_per_node else bw_intra
    dp_comm = (2 * (dp - 1) / dp * 4 * n_local / dp_bw) if dp > 1 else 0.0
    bubble = (compute + tp_comm) * (pp - 1) / (v * n_micro) if pp > 1 else 0.0
    optim_t = 7 * 4 * n_local / (dp if p.distributed_optimizer else 1) / (gpu.hbm_gbps * 1e9)
    total_t = compute + tp_comm + pp_comm + dp_comm + bubble + optim_t
    res.update({
        "step_time_s": {"compute": compute, "tp_comm": tp_comm, "pp_comm": pp_comm, "dp_comm": dp_comm,
                        "bubble": bubble, "optimizer": optim_t, "total": total_t},
        "tokens_per_s": gb_tokens / total_t, "mfu": fpt * gb_tokens / total_t / (world * peak),
        "efficiency": efficiency, "train_steps": t.train_steps,
        "days_for_steps": t.train_steps * total_t / 86400.0,
    })
    return res


def format_plan(res: dict) -> str:
    """The human-readable plan (memory in GiB, times in ms)."""
    lay, mem, st = res["layout"], res["memory"], res["step_time_s"]
    lines = [f"{res['gpu']} x {lay['world']} ({lay['nodes']} nodes x {lay['gpus_per_node']}): TP {lay['tp']} x PP {lay['pp']}"
             f" x DP {lay['dp']} (V={lay['virtual_stages']}), micro {lay['micro_batch']} x {lay['micro_batches_per_step']}"
             f", {lay['dtype']}, recompute {lay['recompute']}, ZeRO-1 {'on' if lay['zero'] else 'off'}, "
             f"attention {lay['attention']}",
             f"memory per rank (pipeline rank {lay['stage']}, the largest):"]
    for k in ("params", "grads", "optimizer", "autocast", "activations", "logits", "buffers", "total"):
        lines.append(f"  {k:<12s} {mem[k] / GiB:8.2f} GiB")
    lines.append(f"  usable       {res['usable_bytes'] / GiB:8.2f} GiB -> {'fits' if res['fits'] else 'DOES NOT FIT'}")
    lines.append("step time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in st.items()))
    lines.append(f"{res['tokens_per_s']:,.0f} tokens/s, MFU {100 * res['mfu']:.1f}% (efficiency {res['efficiency']:.2f} "
                 f"of peak on compute), {res['train_steps']:,} steps in {res['days_for_steps']:.1f} days")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, choices=preset_names(), help="a shipped preset (xlmr_mp/presets/)")
    ap.add_argument("--config", default=None, help="a YAML config file (or preset:NAME), applied over --preset")
    ap.add_argument("--gpu", default="A100-80", choices=sorted(GPUS))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--efficiency", type=float, default=0.45, help="achieved fraction of peak on the compute")
    ap.add_argument("--inter-gbps", type=float, default=None, help="per-node network bandwidth, GB/s")
    ap.add_argument("--attention", default="auto", choices=["auto", "flash", "math"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    a = ap.parse_args(argv)
    if not (a.preset or a.config):
        ap.error("give --preset NAME or --config FILE")
    from xlmr_mp.config import ConfigError, load_config
    try:
        cfg = load_config(a.config, list(a.overrides), world_size=a.nodes * a.gpus_per_node, preset=a.preset)
    except (ConfigError, FileNotFoundError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    res = plan(cfg, GPUS[a.gpu], a.nodes, a.gpus_per_node, a.efficiency, a.inter_gbps, a.attention)
    print(json.dumps(res, indent=1) if a.json else format_plan(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
