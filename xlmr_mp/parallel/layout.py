"""The layout rules of a run, in one place: TP x PP x DP against the world size, the model shape,
the batch arithmetic, the sequence length and the pipeline schedule; and which encoder layers each
pipeline stage holds.

    validate_layout(cfg, world_size)     # the single entry point: RunConfig.validate / load_config(...,
                                         # world_size=...) and launch/tools/check_layout.py call it
    stage_layer_ids(num_layers, pp, virtual_stages, stage_layers, first_last_fewer)

Torch-free (it imports only `xlmr_mp.errors`), so the launchers check a layout in one CPU process in
seconds, before any training process allocates memory. Every error names the option and the fix.

A stage is a contiguous range of encoder layers (global indices) plus the embeddings on global
stage 0 and the masked-LM head on the last global stage. With `virtual_stages` V > 1 each rank
holds V chunks; chunk v of pipeline rank r is global stage v * PP + r (Megatron's interleaving,
the order `ScheduleInterleaved1F1B` expects).
"""
from __future__ import annotations

from typing import Optional, Sequence

from xlmr_mp.errors import ConfigError

SCHEDULES = ("1f1b", "interleaved", "gpipe")


# ----------------------------------------------------------------------------- stage layout

def stage_layer_counts(num_layers: int, num_stages: int, stage_layers: Optional[Sequence[int]] = None,
                       first_last_fewer: int = 0) -> list[int]:
    """Encoder layers per global stage: `stage_layers` when given (validated), else an even split
    in which the first and last stage count as carrying `first_last_fewer` extra layers (the
    250k-row embedding and the masked-LM head), so they get that many fewer when it balances."""
    if num_stages < 1:
        raise ConfigError(f"pipeline stages = {num_stages}; parallel.pipeline and parallel.virtual_stages must be >= 1")
    if first_last_fewer < 0:
        raise ConfigError(f"parallel.first_last_fewer={first_last_fewer} must be >= 0")
    if stage_layers is not None:
        counts = list(stage_layers)
        if len(counts) != num_stages:
            raise ConfigError(
                f"parallel.stage_layers={counts} has {len(counts)} entries; it needs one per pipeline stage, "
                f"parallel.pipeline x parallel.virtual_stages = {num_stages}")
        for i, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ConfigError(f"parallel.stage_layers[{i}]={c!r} must be an integer >= 0")
            if c == 0 and 0 < i < num_stages - 1:
                raise ConfigError(
                    f"parallel.stage_layers[{i}]=0: a middle stage without layers holds nothing; "
                    f"give it at least one layer or use fewer stages")
        if sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.stage_layers={counts} sums to {sum(counts)} but model.num_layers={num_layers}; "
                f"make the entries add up to the layer count")
        return counts
    if num_layers < num_stages:
        raise ConfigError(
            f"model.num_layers={num_layers} < {num_stages} pipeline stages (parallel.pipeline x "
            f"parallel.virtual_stages); use fewer stages or set parallel.stage_layers explicitly")
    ends = {0, num_stages - 1}
    extra = [first_last_fewer if (s in ends and num_stages > 1) else 0 for s in range(num_stages)]
    counts = [0] * num_stages
    for _ in range(num_layers):
        # water-filling: the next layer goes to the stage with the least work; ties prefer middle
        # stages (the ends carry the embedding / head), then the lower index.
        s = min(range(num_stages), key=lambda i: (counts[i] + extra[i], i in ends, i))
        counts[s] += 1
    return counts


def stage_layer_ids(num_layers: int, pp_size: int, virtual_stages: int = 1,
                    stage_layers: Optional[Sequence[int]] = None, first_last_fewer: int = 0) -> list[list[int]]:
    """Global encoder-layer indices of every global pipeline stage (PP x V stages, in model
    order). Chunk v of pipeline rank r is global stage v * pp_size + r."""
    counts = stage_layer_counts(num_layers, pp_size * virtual_stages, stage_layers, first_last_fewer)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def local_stage_indices(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """Global stage indices of the chunks held by pipeline rank `pp_rank`, chunk order."""
    return [v * pp_size + pp_rank for v in range(virtual_stages)]


def stage_layout(model_cfg, parallel_cfg) -> list[list[int]]:
    """`stage_layer_ids` of a run: the layers of every global stage from `model.*` and `parallel.*`."""
    return stage_layer_ids(model_cfg.num_layers, parallel_cfg.pipeline, parallel_cfg.virtual_stages,
                           parallel_cfg.stage_layers, parallel_cfg.first_last_fewer)


# ----------------------------------------------------------------------------- sequence parallelism

def sequence_parallel_active(parallel_cfg) -> bool:
    """Whether the stages shard activations along the sequence: parallel.sequence_parallel with
    parallel.tensor > 1 (at TP 1 the option changes nothing)."""
    return bool(getattr(parallel_cfg, "sequence_parallel", False)) and parallel_cfg.tensor > 1


def check_sequence_parallel(parallel_cfg, seq_length: Optional[int]) -> None:
    """Sequence parallelism splits every sequence into parallel.tensor equal shards."""
    if not sequence_parallel_active(parallel_cfg) or seq_length is None:
        return
    tp = parallel_cfg.tensor
    if seq_length % tp:
        lo, hi = seq_length - seq_length % tp, seq_length - seq_length % tp + tp
        raise ConfigError(
            f"data.seq_length={seq_length} is not divisible by parallel.tensor={tp}, which "
            f"parallel.sequence_parallel=true needs (each TP rank holds seq_length / tensor positions); "
            f"use data.seq_length={lo} or {hi}, or set parallel.sequence_parallel=false")


def stage_hidden_shape(batch: int, seq_length: int, model_cfg, parallel_cfg) -> tuple:
    """Shape of the hidden states one stage sends to the next for a [batch, seq_length] batch:
    [B, S, H], or this TP rank's sequence shard [B, S / TP, H] under sequence parallelism."""
    if sequence_parallel_active(parallel_cfg):
        check_sequence_parallel(parallel_cfg, seq_length)
        seq_length //= parallel_cfg.tensor
    return (batch, seq_length, model_cfg.hidden_size)


# ----------------------------------------------------------------------------- schedules

def schedule_kind(parallel_cfg) -> str:
    """'1f1b', 'interleaved' or 'gpipe' (virtual_stages > 1 always means interleaved)."""
    if parallel_cfg.virtual_stages > 1:
        return "interleaved"
    return "1f1b" if parallel_cfg.schedule == "interleaved" else parallel_cfg.schedule


def check_micro_batch_count(kind: str, pp: int, n: int) -> None:
    """Whether schedule `kind` can run `n` micro-batches per step over `pp` pipeline ranks."""
    if n < 1:
        raise ConfigError(f"{n} micro-batches per step; train.global_batch must be >= train.micro_batch x DP")
    if pp == 1:
        return
    if kind == "1f1b" and n < pp:
        raise ConfigError(
            f"1F1B needs at least parallel.pipeline={pp} micro-batches per step but gets {n} "
            f"(train.global_batch / (train.micro_batch x DP)); raise train.global_batch or lower train.micro_batch")
    if kind == "interleaved" and n % max(1, n // pp):
        raise ConfigError(
            f"interleaved 1F1B needs the micro-batches per step ({n}) to be a multiple of {max(1, n // pp)} "
            f"(= micro-batches // parallel.pipeline); use a multiple of parallel.pipeline={pp}")


def validate_pipeline_config(model_cfg, parallel_cfg, n_microbatches: Optional[int] = None,
                             seq_length: Optional[int] = None) -> None:
    """The pipeline rules: schedule and virtual stages, the stage layout against the model, the
    number of micro-batches per step (when given) and, with sequence parallelism, `data.seq_length`."""
    pp, v = parallel_cfg.pipeline, parallel_cfg.virtual_stages
    check_sequence_parallel(parallel_cfg, seq_length)
    if parallel_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={parallel_cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if v > 1 and pp < 2:
        raise ConfigError(
            f"parallel.virtual_stages={v} needs parallel.pipeline >= 2 (interleaving spreads chunks over "
            f"pipeline ranks); set parallel.virtual_stages=1")
    if v > 1 and parallel_cfg.schedule == "gpipe":
        raise ConfigError("parallel.schedule=gpipe supports one chunk per rank; set parallel.virtual_stages=1 "
                          "or parallel.schedule=interleaved")
    if parallel_cfg.schedule == "interleaved" and v < 2:
        raise ConfigError("parallel.schedule=interleaved needs parallel.virtual_stages >= 2")
    stage_layout(model_cfg, parallel_cfg)
    if n_microbatches is not None:
        check_micro_batch_count(schedule_kind(parallel_cfg), pp, n_microbatches)


# ----------------------------------------------------------------------------- world and batch

def data_parallel_size(world_size: int, tp: int, pp: int, data: int = 0) -> int:
    """world_size / (TP x PP), checked against an explicit `parallel.data` (0 = infer)."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tensor={tp} and parallel.pipeline={pp} must be >= 1")
    mp = tp * pp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
            f"{tp} x {pp} = {mp}; change the task count or the layout")
    dp = world_size // mp
    if data and data != dp:
        raise ConfigError(
            f"parallel.data={data} but world size {world_size} / (TP {tp} x PP {pp}) = {dp}; "
            f"set parallel.data=0 to infer it")
    return dp


def micro_batches_per_step(cfg) -> int:
    """Micro-batches each DP rank runs per optimizer step (gradient accumulation steps)."""
    return cfg.train.global_batch // (cfg.train.micro_batch * max(cfg.parallel.data, 1))


def validate_layout(cfg, world_size: Optional[int] = None) -> None:
    """Every cross-component rule of a run config whose components are valid on their own: TP
    against the model shape, TP x PP x DP against `world_size` (fills `parallel.data`; None = not
    known yet), the batch arithmetic, `data.seq_length` against the position table, and the
    pipeline rules; the micro-batch count per step once the DP size is known."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    for name in ("num_heads", "hidden_size", "ffn_size"):
        if getattr(m, name) % p.tensor:
            raise ConfigError(f"model.{name}={getattr(m, name)} is not divisible by parallel.tensor={p.tensor}")
    if world_size is not None:
        p.data = data_parallel_size(world_size, p.tensor, p.pipeline, p.data)
    dp = p.data or 1
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
            f"data-parallel size {dp} = {t.micro_batch * dp}; change train.global_batch or train.micro_batch")
    seq = cfg.data.seq_length
    longest = m.max_positions - m.pad_id - 1      # positions count from pad_id + 1
    if seq > longest:
        raise ConfigError(
            f"data.seq_length={seq} needs model.max_positions >= {seq + m.pad_id + 1} (positions start at "
            f"model.pad_id + 1 = {m.pad_id + 1}), but model.max_positions={m.max_positions}; use "
            f"data.seq_length={longest} or raise model.max_positions")
    validate_pipeline_config(m, p, micro_batches_per_step(cfg) if p.data else None, seq_length=seq)
