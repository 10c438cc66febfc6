"""Fine-tuning heads on our encoder, exactly those of Hugging Face XLM-R, and their HF export.

    SequenceClassificationHead   = HF XLMRobertaClassificationHead: on <s>: dropout, dense, tanh,
                                   dropout, out_proj (XLMRobertaForSequenceClassification.classifier)
    TokenClassificationHead      = dropout, classifier (XLMRobertaForTokenClassification)
    Classifier(encoder, head)    the encoder (an XLMRModel without its MLM head) plus one of them

`export_hf(dir, classifier, labels)` writes a directory `transformers` loads with
XLMRobertaForSequenceClassification / XLMRobertaForTokenClassification (config.json with id2label,
model.safetensors); HF parameter names are `roberta.*` (no pooler) and `classifier.*`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlmr_mp import kernels
from xlmr_mp.atomic import atomic_dir
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.xlmr import XLMRModel

SEQUENCE, TOKEN = "sequence", "token"
HF_ARCH = {SEQUENCE: "XLMRobertaForSequenceClassification", TOKEN: "XLMRobertaForTokenClassification"}


class SequenceClassificationHead(nn.Module):
    """hidden [B, S, H] -> logits [B, C] from the first (<s>) position."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = F.dropout(hidden[:, 0, :], self.dropout, self.training)
        x = torch.tanh(self.dense(x))
        x = F.dropout(x, self.dropout, self.training)
        return self.out_proj(x)


class TokenClassificationHead(nn.Module):
    """hidden [B, S, H] -> logits [B, S, C] at every position."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_labels)
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(F.dropout(hidden, self.dropout, self.training))


class Classifier(nn.Module):
    """Encoder + classification head. forward(ids [B, S], mask [B, S]) -> logits ([B, C] for
    sequence tasks, [B, S, C] for token tasks); `loss(logits, labels)` is HF's cross-entropy
    (labels [B], or [B, S] with -100 where no word starts)."""

    def __init__(self, encoder: XLMRModel, kind: str, num_labels: int, dropout: float):
        super().__init__()
        if kind not in HF_ARCH:
            raise ValueError(f"kind={kind!r}: choose {SEQUENCE!r} or {TOKEN!r}")
        if encoder.tp_size != 1 or not encoder.has_embeddings or encoder.layer_ids != list(range(encoder.cfg.num_layers)):
            raise ValueError("a Classifier needs the whole encoder at TP 1 (one process, all layers)")
        self.encoder = encoder
        self.kind = kind
        self.num_labels = num_labels
        self.classifier_dropout = dropout
        h = encoder.cfg.hidden_size
        head = SequenceClassificationHead if kind == SEQUENCE else TokenClassificationHead
        self.head = head(h, num_labels, dropout)

    @torch.no_grad()
    def reset_head(self, seed: int) -> None:
        """HF's initialisation of the head: normal(0, initializer_range) weights, zero biases."""
        g = torch.Generator().manual_seed(int(seed))
        for name, p in self.head.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.empty(p.shape).normal_(0.0, self.encoder.cfg.init_std, generator=g))
            else:
                p.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.encoder.encode(input_ids, attention_mask))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------ HF names
    # ours -> HF: head.dense.* -> classifier.dense.* (sequence), head.proj.* -> classifier.* (token)
    def _hf_name(self, name: str) -> str:
        return "classifier." + (name[len("proj."):] if self.kind == TOKEN else name)

    def hf_head_state(self) -> Dict[str, torch.Tensor]:
        """The head's tensors under HF's names."""
        return {self._hf_name(k): v.detach().clone() for k, v in self.head.state_dict().items()}

    def load_hf_head_state(self, sd: Dict[str, torch.Tensor]) -> None:
        """Load the head from an HF ForSequence/ForTokenClassification state dict (`classifier.*`)."""
        names = {self._hf_name(k): k for k in self.head.state_dict()}
        missing = sorted(set(names) - set(sd))
        if missing:
            raise KeyError(f"HF state dict lacks {missing} (is it an {HF_ARCH[self.kind]}?)")
        self.head.load_state_dict({own: sd[theirs] for theirs, own in names.items()}, strict=True)


def encoder_from(model: XLMRModel, dropout: Optional[float] = None) -> XLMRModel:
    """A copy of `model`'s encoder (embeddings and layers, no MLM head) at TP 1, with hidden and
    attention dropout set to `dropout` (None keeps the model's), with the fused paths of its
    device applied (xlmr_mp.kernels.apply)."""
    fields = {f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    if dropout is not None:
        fields.update(dropout=float(dropout), attention_dropout=float(dropout))
    cfg = ModelConfig.resolved(**fields)
    enc = XLMRModel(cfg, has_head=False, init_seed=0)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    enc.load_state_dict(own, strict=True)
    device = next(model.parameters()).device
    enc = enc.to(device)
    kernels.apply(enc, device)
    return enc


def encoder_hf_state(encoder: XLMRModel) -> Dict[str, torch.Tensor]:
    """The encoder's tensors under HF's `roberta.*` names (real vocabulary rows only)."""
    from xlmr_mp.checkpoint.hf import full_state_to_hf
    cfg = encoder.cfg
    full = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
    # full_state_to_hf converts a whole masked LM; the MLM head it needs is not part of the export
    h = cfg.hidden_size
    full.update({"lm_head.dense.weight": torch.zeros(h, h), "lm_head.dense.bias": torch.zeros(h),
                 "lm_head.layernorm.weight": torch.zeros(h), "lm_head.layernorm.bias": torch.zeros(h),
                 "lm_head.bias": torch.zeros(cfg.vocab_size)})
    return {k: v for k, v in full_state_to_hf(full, cfg).items() if k.startswith("roberta.")}


def load_encoder_hf_state(encoder: XLMRModel, hf_sd: Dict[str, torch.Tensor]) -> None:
    """Load `roberta.*` tensors of an HF XLM-R classification model into our encoder."""
    from xlmr_mp.checkpoint.hf import hf_to_full_state
    from xlmr_mp.checkpoint.model_io import local_state_for
    cfg = encoder.cfg
    sd = {k: v for k, v in hf_sd.items() if k.startswith("roberta.")}
    h = cfg.hidden_size
    sd.update({"lm_head.dense.weight": torch.zeros(h, h), "lm_head.dense.bias": torch.zeros(h),
               "lm_head.layer_norm.weight": torch.zeros(h), "lm_head.layer_norm.bias": torch.zeros(h),
               "lm_head.bias": torch.zeros(cfg.vocab_size)})
    full = {k: v for k, v in hf_to_full_state(sd, cfg).items() if not k.startswith("lm_head.")}
    encoder.load_state_dict(local_state_for(encoder, full), strict=True)


def hf_config(classifier: Classifier, labels: List[str]) -> dict:
    """config.json for the exported XLMRobertaFor{Sequence,Token}Classification."""
    from xlmr_mp.checkpoint.hf import hf_config_from_model
    cfg = hf_config_from_model(classifier.encoder.cfg)
    cfg.update(architectures=[HF_ARCH[classifier.kind]], classifier_dropout=classifier.classifier_dropout,
               id2label={str(i): name for i, name in enumerate(labels)},
               label2id={name: i for i, name in enumerate(labels)}, num_labels=len(labels))
    cfg.pop("tie_word_embeddings", None)
    if classifier.kind == SEQUENCE:
        cfg["problem_type"] = "single_label_classification"
    return cfg


def export_hf(path: str, classifier: Classifier, labels: List[str], tokenizer=None) -> str:
    """Write `path` (atomically): config.json + model.safetensors for transformers'
    XLMRobertaFor{Sequence,Token}Classification and, with `tokenizer` (an XLMRTokenizer of the
    model's vocabulary), its HF tokenizer files (xlmr_mp.tokenizer.hf, checked to give our ids)."""
    from safetensors.torch import save_file
    if len(labels) != classifier.num_labels:
        raise ValueError(f"{len(labels)} label names for a head of {classifier.num_labels} labels")
    vocab = classifier.encoder.cfg.vocab_size
    if tokenizer is not None and tokenizer.vocab_size != vocab:
        raise ValueError(f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} ids but the model's "
                         f"vocabulary is {vocab}: it belongs to another model")
    sd = encoder_hf_state(classifier.encoder)
    sd.update({k: v.float().cpu() for k, v in classifier.hf_head_state().items()})
    with atomic_dir(path) as tmp:       # renamed onto `path` when complete
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(classifier, labels), f, indent=2)
        if tokenizer is not None:
            from xlmr_mp.tokenizer.hf import save_hf_tokenizer
            save_hf_tokenizer(tokenizer, tmp)
    return path
