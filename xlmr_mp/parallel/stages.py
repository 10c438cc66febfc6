"""A model cut into pipeline stages (with the sequence-parallel gradient hooks), and the loss the
last stage returns.

    chunks = build_pipeline_stages(cfg.model, groups, cfg.parallel, init_seed=cfg.train.seed,
                                   model_cls=XLMRModel)
    pipe = PipelineSchedule(chunks, groups, cfg.parallel, n_microbatches, masked_lm_loss_sum, ...)

A stage is a contiguous range of encoder layers (`parallel/layout.py` decides which) plus the
embeddings on global stage 0 and the masked-LM head on the last global stage; each chunk is a
`model_cls` (the trainer passes `XLMRModel`: this module knows no model) whose parameters keep
their global names.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from xlmr_mp.errors import ConfigError
from xlmr_mp.parallel.grads import attach_sequence_parallel_grad_sync
from xlmr_mp.parallel.layout import local_stage_indices, sequence_parallel_active, stage_layout, validate_pipeline_config


def masked_lm_loss_sum(chunk: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """Sum of the masked-token cross entropy of one micro-batch (a 0-d tensor) on the last stage
    (x: input_ids on the first stage, hidden states elsewhere): `PipelineSchedule`'s `loss_fn`."""
    loss_sum, _ = chunk.loss_and_count(x, attention_mask=attention_mask, labels=labels)
    return loss_sum


def build_pipeline_stages(model_cfg, groups, parallel_cfg, init_seed: Optional[int] = None, *,
                          model_cls) -> list[nn.Module]:
    """This rank's model chunks (one per virtual stage, chunk order), each a `model_cls` (`XLMRModel`:
    called as model_cls(model_cfg, tp_group=, layer_ids=, has_embeddings=, has_head=, init_seed=[,
    sequence_parallel=True])) holding
    its global stage's layers, the embeddings on global stage 0 and the head on the last one.
    Parameters keep global names and are drawn from per-parameter generators seeded by
    (`init_seed`, global name), so they equal the single-process model built with the same seed
    (the tied decoder copy starts equal to the embedding; `sync_tied_embedding_weight` re-asserts
    it after loading). Pass the run's seed explicitly: the default, `torch.initial_seed()`,
    differs between pipeline stages once `seed_parallel_rng` has run.

    With `parallel_cfg.sequence_parallel` (and TP > 1) the chunks are built sequence-parallel and
    get the TP gradient-sum hooks (`parallel/grads.py`) that `PipelineSchedule.step` arms; build
    the chunks before a DP reducer, so these hooks run first."""
    validate_pipeline_config(model_cfg, parallel_cfg)
    pp_size = groups.pp_size if groups is not None else 1
    pp_rank = groups.pp_rank if groups is not None else 0
    if pp_size != parallel_cfg.pipeline:
        raise ConfigError(f"parallel.pipeline={parallel_cfg.pipeline} but the pipeline group has {pp_size} ranks")
    layout = stage_layout(model_cfg, parallel_cfg)
    last = len(layout) - 1
    tp_group = groups.tp_group if groups is not None else None
    tp_size = groups.tp_size if groups is not None else 1
    if tp_size != parallel_cfg.tensor:
        raise ConfigError(f"parallel.tensor={parallel_cfg.tensor} but the tensor-parallel group has {tp_size} ranks")
    sp = {"sequence_parallel": True} if sequence_parallel_active(parallel_cfg) else {}
    chunks = []
    for g in local_stage_indices(pp_rank, pp_size, parallel_cfg.virtual_stages):
        chunk = model_cls(model_cfg, tp_group=tp_group, layer_ids=layout[g], has_embeddings=(g == 0),
                          has_head=(g == last), init_seed=init_seed, **sp)
        chunk.pipeline_stage_index = g
        if sp:
            attach_sequence_parallel_grad_sync(chunk, tp_group)
        chunks.append(chunk)
    return chunks
