"""XLM-R: embeddings (offset learned positions), post-LN encoder layers, tied masked-LM head.

`XLMRModel(cfg, tp_group, layer_ids, has_embeddings, has_head)` builds the whole model or one
pipeline stage of it (a range of layers plus optionally the embeddings and / or the head).
Layers live in `layers` (nn.ModuleDict) keyed by their GLOBAL index, so parameter names are global
in every stage (`layers.7.attention.qkv.weight`).

Parameter names (HF XLMRobertaForMaskedLM equivalents in xlmr_mp/checkpoint/hf.py):
    embeddings.word_embeddings.weight        [V/TP (padded), H]   vocab-parallel
    embeddings.position_embeddings.weight    [max_positions, H]   row pad_id stays zero
    embeddings.token_type_embeddings         [1, H] buffer (not trained; zero, HF checkpoints carry it)
    embeddings.layernorm.{weight,bias}
    layers.{i}.attention.qkv.{weight,bias}   [3H/TP, H] per-head interleaved q,k,v (see encoder.py)
    layers.{i}.attention.out.{weight,bias}   [H, H/TP], bias replicated
    layers.{i}.attention_layernorm.{weight,bias}
    layers.{i}.ffn.fc1.{weight,bias}         [F/TP, H]
    layers.{i}.ffn.fc2.{weight,bias}         [H, F/TP], bias replicated
    layers.{i}.ffn_layernorm.{weight,bias}
    lm_head.dense.{weight,bias}, lm_head.layernorm.{weight,bias}
    lm_head.bias                             [V/TP (padded)] output bias of the tied decoder
    lm_head.decoder_weight                   only when has_head and not has_embeddings (last
                                             pipeline stage): a copy of the word embedding whose
                                             gradient the trainer all-reduces with the first stage

Layout: batch-first [B, S, H] everywhere, including between pipeline stages.

The model is the reference (plain torch + the TP layers of xlmr_mp/parallel, no device or kernel
branch). `xlmr_mp.kernels.apply` may replace, on an instance, `Embeddings.forward`,
`XLMRModel.encode_layers`, `MLMHead.masked_loss_sum` and the ops of model/encoder.py by fused
implementations of the same contracts. The one masked-LM loss is `loss_and_count` (its head part
`MLMHead.masked_loss_sum`, its cross-entropy parallel/vocab.py's `vocab_parallel_masked_lm_loss`).
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.model import functional
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.encoder import EncoderLayer, activation_dtype, attention_bias
from xlmr_mp.model.sharding import partition_dim, shard_tensor
from xlmr_mp.parallel.layers import check_divisible, mark_sequence_parallel
from xlmr_mp.parallel.mappings import gather_sequence, tp_rank_of, tp_size_of
from xlmr_mp.parallel.state import RecomputeRNG, tp_rng_context
from xlmr_mp.parallel.vocab import (VocabParallelEmbedding, mask_padded_logits, padded_vocab_size,
                                    parallel_lm_logits, vocab_parallel_masked_lm_loss, vocab_range)

RECOMPUTE_MODES = ("none", "full", "selective")


def position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """fairseq/HF positions: real tokens count from pad_id + 1, pads stay at pad_id."""
    mask = input_ids.ne(pad_id).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad_id


def padding_free(attention_mask: torch.Tensor) -> bool:
    """Whether a [B, S] attention mask on the host has no padding position, so that no attention
    bias is needed (SDPA then may take its flash kernel). A mask on a device counts as padded:
    reading it would be a host sync. The training schedule decides on the host copy before the batch
    moves (parallel/schedule.py: device_micro_batch), so an unpadded batch reaches no device mask."""
    return attention_mask.device.type == "cpu" and bool(attention_mask.all())


def masked_rows(labels: torch.Tensor, device: torch.device):
    """(rows, target ids, count) of the masked positions (label != -100) of flat labels [T]: rows
    [M] and targets [M] int64 on `device`, count a 0-d float tensor on `device`. Labels on the host
    (the training schedule leaves them there) are searched there, in numpy, and the results copied
    without blocking: nothing waits for the device. Labels already on a device are searched there
    (nonzero: one host sync, the count being data-dependent)."""
    if labels.device.type == "cpu":
        sel = torch.from_numpy(np.flatnonzero(labels.numpy() != IGNORE_INDEX))
    else:
        sel = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    target = labels.index_select(0, sel)
    count = torch.full((), float(sel.numel()), device=device)
    if sel.device != device:
        sel, target = sel.to(device, non_blocking=True), target.to(device, non_blocking=True)
    return sel, target, count


class Embeddings(nn.Module):
    """Token (vocab-parallel) + zero token-type row + offset learned positions, LayerNorm, dropout.
    With sequence parallelism the output is this TP rank's sequence shard [B, S/TP, H]."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.max_positions = cfg.max_positions
        self.dropout = cfg.dropout
        self.tp_size, self.tp_rank = tp_size_of(tp_group), tp_rank_of(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, tp_group, cfg.pad_id,
                                                      sequence_parallel=self.sequence_parallel)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.register_buffer("token_type_embeddings", torch.zeros(1, cfg.hidden_size))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        if self.sequence_parallel:
            mark_sequence_parallel(self.position_embeddings)
            mark_sequence_parallel(self.layernorm)

    def check_input(self, input_ids: torch.Tensor) -> None:
        """Raise TypeError / ValueError (naming the option to change) unless input_ids [B, S] are
        int64 / int32 ids whose positions fit model.max_positions."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"the first stage takes input_ids [B, S] int64, got {input_ids.dtype} "
                            f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] + self.pad_id >= self.max_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} needs {input_ids.shape[1] + self.pad_id + 1} "
                             f"position rows but model.max_positions={self.max_positions}; shorten "
                             f"data.seq_length or raise model.max_positions")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> embeddings [B, S, H] ([B, S/TP, H] under sequence parallelism)."""
        self.check_input(input_ids)
        pos = position_ids(input_ids, self.pad_id)
        if self.sequence_parallel:
            if input_ids.shape[1] % self.tp_size:
                raise ValueError(f"sequence parallelism needs the sequence length ({input_ids.shape[1]}) divisible "
                                 f"by parallel.tensor={self.tp_size}; change data.seq_length or set "
                                 f"parallel.sequence_parallel=false")
            pos = pos.chunk(self.tp_size, dim=1)[self.tp_rank]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings
        x = x + self.position_embeddings(pos)
        x = self.layernorm(x)
        if self.sequence_parallel and self.training and self.dropout > 0:
            with tp_rng_context(self.tp_size):
                return F.dropout(x, self.dropout, self.training)
        return F.dropout(x, self.dropout, self.training)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> tied decoder (+ output bias), on the local vocabulary shard."""

    bias_gelu = staticmethod(functional.bias_gelu)

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp_group=None, own_decoder: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.vocab_size = cfg.vocab_size
        self.vocab_start, end = vocab_range(padded_vocab, tp_rank_of(tp_group), tp_size_of(tp_group))
        self.eps = cfg.layernorm_eps
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.bias = nn.Parameter(torch.zeros(end - self.vocab_start))
        if own_decoder:
            self.decoder_weight = nn.Parameter(torch.empty(end - self.vocab_start, cfg.hidden_size))
        else:
            self.decoder_weight = None

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """dense -> GELU -> LayerNorm: h [..., H] -> [..., H], the decoder's input."""
        x = self.bias_gelu(F.linear(h, self.dense.weight), self.dense.bias)
        return self.layernorm(x)

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> local logits [..., V_local], padding ids at -inf."""
        logits = parallel_lm_logits(self.transform(h), decoder_weight, self.bias, self.tp_group)
        return mask_padded_logits(logits, self.vocab_size, self.vocab_start)

    def masked_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, decoder_weight: torch.Tensor):
        """(sum of the cross-entropy of the masked tokens (0-d fp32), their number (0-d float)) over
        the rows of hidden [T, H] whose label [T] is not -100 (global target ids), through the
        chunked vocab-parallel loss (parallel/vocab.py: the [M, V_local] fp32 logits are never held
        for the whole masked set). The transform runs on the masked rows only."""
        sel, target, count = masked_rows(labels, hidden.device)
        loss = vocab_parallel_masked_lm_loss(self.transform(hidden.index_select(0, sel)), decoder_weight, self.bias,
                                             target, self.tp_group, self.vocab_start, self.vocab_size)
        return loss, count


class XLMRModel(nn.Module):
    """XLM-R masked LM, whole or one pipeline stage, tensor-parallel over `tp_group` (None = TP 1).

    forward(x, attention_mask=None, labels=None):
      x: input_ids [B, S] int64 when has_embeddings, else hidden [B, S, H] from the previous stage.
      no head            -> hidden [B, S, H] ([B, S/TP, H], this rank's sequence shard, under
                            sequence parallelism: so also the hidden input of later stages)
      head, labels       -> mean masked-LM loss over positions with labels != -100 (scalar)
      head, no labels    -> logits [B, S, V_local] for every position (vocabulary shard when TP > 1,
                            padding ids at -inf; `strip_vocab_padding=True` at TP 1 cuts them off)
    `loss_and_count` gives (loss_sum, num_masked) for normalising by a global token count: the
    model's one masked-LM loss.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, layer_ids: Optional[Sequence[int]] = None,
                 has_embeddings: bool = True, has_head: bool = True, sequence_parallel: bool = False,
                 init_seed: Optional[int] = None):
        super().__init__()
        cfg.validate()
        tp = tp_size_of(tp_group)
        self.sequence_parallel = bool(sequence_parallel) and tp > 1
        check_divisible(cfg.num_heads, tp, "model.num_heads")
        check_divisible(cfg.hidden_size, tp, "model.hidden_size")
        check_divisible(cfg.ffn_size, tp, "model.ffn_size")
        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size = tp
        self.tp_rank = tp_rank_of(tp_group)
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.layer_ids = list(range(cfg.num_layers)) if layer_ids is None else [int(i) for i in layer_ids]
        bad = [i for i in self.layer_ids if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"layer_ids {bad} outside 0..{cfg.num_layers - 1} (model.num_layers={cfg.num_layers})")
        self.has_embeddings = has_embeddings
        self.has_head = has_head
        self.strip_vocab_padding = False
        self.recompute = "none"
        sp = self.sequence_parallel
        self.embeddings = Embeddings(cfg, self.padded_vocab, tp_group, sp) if has_embeddings else None
        self.layers = nn.ModuleDict({str(i): EncoderLayer(cfg, tp_group, sp) for i in self.layer_ids})
        self.lm_head = MLMHead(cfg, self.padded_vocab, tp_group, own_decoder=not has_embeddings) if has_head else None
        self.reset_parameters(torch.initial_seed() if init_seed is None else init_seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """normal(0, init_std) weights, zero biases, unit LayerNorm, zero padding rows. Each
        parameter's FULL tensor is drawn from its own generator seeded by (seed, global name),
        then sharded: the initial model is the same at every TP / PP layout, and the last stage's
        decoder copy equals the first stage's word embedding."""
        for name, p in self.named_parameters():
            full_name = "embeddings.word_embeddings.weight" if name == "lm_head.decoder_weight" else name
            p.copy_(self._init_full(full_name, seed).to(p.dtype) if self._needs_random(full_name)
                    else self._init_constant(name, p))
        if self.embeddings is not None:
            self.embeddings.token_type_embeddings.zero_()

    @staticmethod
    def _needs_random(name: str) -> bool:
        return name.endswith(".weight") and "layernorm" not in name

    def _init_constant(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(p) if "layernorm" in name and name.endswith(".weight") else torch.zeros_like(p)

    def _full_shape(self, name: str) -> tuple:
        c = self.cfg
        if name == "embeddings.word_embeddings.weight":
            return (c.vocab_size, c.hidden_size)
        if name == "embeddings.position_embeddings.weight":
            return (c.max_positions, c.hidden_size)
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        return {"attention.qkv.weight": (3 * c.hidden_size, c.hidden_size),
                "attention.out.weight": (c.hidden_size, c.hidden_size),
                "ffn.fc1.weight": (c.ffn_size, c.hidden_size),
                "ffn.fc2.weight": (c.hidden_size, c.ffn_size),
                "lm_head.dense.weight": (c.hidden_size, c.hidden_size)}[suffix]

    # Tensors split on dim 0 with more elements than this are drawn in blocks of INIT_BLOCK_ROWS rows,
    # each from its own generator, and only the blocks of this rank's rows are drawn: the large
    # vocabulary matrices (250k x 4096 = 4 GB in fp32 for XXL) are never materialised whole.
    BLOCK_INIT_MIN_NUMEL = 2 ** 27
    INIT_BLOCK_ROWS = 4096

    def _init_full(self, name: str, seed: int) -> torch.Tensor:
        """This rank's shard of parameter `name`'s deterministic initial value."""
        base = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)
        shape = self._full_shape(name)
        pad_rows = name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
        if partition_dim(name) == 0 and shape[0] * shape[1] > self.BLOCK_INIT_MIN_NUMEL:
            return self._init_rows_blockwise(name, shape, base, pad_rows)
        g = torch.Generator().manual_seed(base)
        full = torch.empty(shape).normal_(0.0, self.cfg.init_std, generator=g)
        if pad_rows:
            full[self.cfg.pad_id] = 0.0
        return shard_tensor(name, full, self.cfg, self.tp_size, self.tp_rank)

    def _init_rows_blockwise(self, name, shape, base, pad_rows) -> torch.Tensor:
        rows = shape[0]
        total = self.padded_vocab if name == "embeddings.word_embeddings.weight" else rows
        if total % self.tp_size:
            raise ValueError(f"{name}: {total} rows do not split over TP {self.tp_size}")
        per = total // self.tp_size
        r0, r1 = self.tp_rank * per, (self.tp_rank + 1) * per
        out = torch.zeros(per, shape[1])                       # rows >= `rows` are vocabulary padding
        bs = self.INIT_BLOCK_ROWS
        for k in range(r0 // bs, (min(r1, rows) + bs - 1) // bs):
            b0, b1 = k * bs, min((k + 1) * bs, rows)
            g = torch.Generator().manual_seed((base * 31 + k + 1) % (2 ** 63))
            block = torch.empty(b1 - b0, shape[1]).normal_(0.0, self.cfg.init_std, generator=g)
            lo, hi = max(b0, r0), min(b1, r1)
            out[lo - r0: hi - r0] = block[lo - b0: hi - b0]
        if pad_rows and r0 <= self.cfg.pad_id < r1:
            out[self.cfg.pad_id - r0] = 0.0
        return out

    # ------------------------------------------------------------------ recompute
    def set_recompute(self, mode: str) -> None:
        """Activation checkpointing: 'none', 'full' (whole layers) or 'selective' (attention core)."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={mode!r}: choose none, full or selective")
        self.recompute = mode
        for layer in self.layers.values():
            layer.attention.selective_recompute = mode == "selective"

    # ------------------------------------------------------------------ forward
    def decoder_weight(self) -> torch.Tensor:
        """The tied decoder matrix [V_local, H] (the word embedding, or the last stage's copy)."""
        if self.embeddings is not None:
            return self.embeddings.word_embeddings.weight
        return self.lm_head.decoder_weight

    def tied_embedding_weight(self) -> Optional[torch.Tensor]:
        """This chunk's copy of the tied embedding that the pipeline keeps equal across stages: the
        word embedding (embeddings without the head), the decoder copy (head without embeddings), or
        None (a chunk with both shares one tensor; a middle stage holds neither)."""
        if self.has_embeddings and not self.has_head:
            return self.embeddings.word_embeddings.weight
        if self.has_head and not self.has_embeddings:
            return self.lm_head.decoder_weight
        return None

    def encode(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings (first stage) and this stage's layers: -> hidden [B, S, H]."""
        if self.embeddings is not None:
            x = self.embeddings(x)
        elif x.dim() != 3 or not x.is_floating_point():
            raise TypeError(f"a stage without embeddings takes hidden [B, S, H] floats, got {x.dtype} "
                            f"{tuple(x.shape)}")
        if attention_mask is not None and padding_free(attention_mask):
            attention_mask = None      # no padding key: no bias to build and add (HF's SDPA path drops it too)
        bias = attention_bias(attention_mask, activation_dtype(x))      # in the compute dtype under autocast
        return self.encode_layers(x, bias)

    def encode_layers(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """This stage's layers in order (each checkpointed under train.recompute=full): x [B, S, H],
        key-padding bias [B, 1, 1, S] | None -> [B, S, H]."""
        recompute = self.recompute == "full" and torch.is_grad_enabled()
        for layer in self.layers.values():
            if recompute:
                x = checkpoint(layer, x, bias, use_reentrant=False, context_fn=RecomputeRNG())
            else:
                x = layer(x, bias)
        return x

    def loss_and_count(self, x, attention_mask=None, labels=None):
        """(sum of the masked-token cross-entropy (0-d fp32), number of masked tokens (0-d float)) of
        this micro-batch: x as in forward, labels [B, S] global ids, -100 where not masked. The head
        runs on the masked positions only. With gradient accumulation / DP, divide the summed loss
        by the GLOBAL number of masked tokens (every position weighs the same)."""
        if not self.has_head:
            raise RuntimeError("loss_and_count needs a model with the MLM head (has_head=True)")
        if labels is None:
            raise ValueError("loss_and_count needs labels [B, S] (-100 where not masked)")
        return self._masked_loss(self.encode(x, attention_mask), labels)

    def _masked_loss(self, hidden: torch.Tensor, labels: torch.Tensor):
        hidden = self._full_sequence(hidden)
        return self.lm_head.masked_loss_sum(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1),
                                            self.decoder_weight())

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.encode(x, attention_mask)
        if not self.has_head:
            return hidden
        if labels is not None:
            loss_sum, count = self._masked_loss(hidden, labels)
            return loss_sum / count.clamp(min=1.0)
        logits = self.lm_head(self._full_sequence(hidden), self.decoder_weight())
        if self.strip_vocab_padding:
            if self.tp_size != 1:
                raise RuntimeError("strip_vocab_padding needs TP 1 (the logits are vocabulary shards)")
            logits = logits[..., : self.cfg.vocab_size]
        return logits

    def _full_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """Sequence shards -> full sequence before the (replicated) head under sequence parallelism."""
        if not self.sequence_parallel:
            return hidden
        return gather_sequence(hidden, self.tp_group, grad_is_partial=False)

    # ------------------------------------------------------------------ helpers
    def partition_dims(self) -> dict:
        """{parameter name: TP partition dim or None} for every parameter of this stage."""
        return {n: partition_dim(n) for n, _ in self.named_parameters()}
