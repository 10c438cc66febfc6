"""Hugging Face `XLMRobertaForMaskedLM` <-> xlmr_mp full state dicts, through one explicit name map.

HF directories: config.json plus model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin. Conversions work on FULL state dicts (real vocabulary, unsharded); shard them
with xlmr_mp.model.sharding / write them with xlmr_mp.checkpoint.model_io at any TP/PP.
"""
from __future__ import annotations

import json
import os

import torch

from xlmr_mp.atomic import atomic_dir
from xlmr_mp.checkpoint.model_io import TOKEN_TYPE, constant_buffers
from xlmr_mp.model.config import ModelConfig

# ours -> HF, for names outside the layers ({i} is the global layer index inside them).
HF_NAME_MAP = {
    "embeddings.word_embeddings.weight": "roberta.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "roberta.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings": "roberta.embeddings.token_type_embeddings.weight",
    "embeddings.layernorm.weight": "roberta.embeddings.LayerNorm.weight",
    "embeddings.layernorm.bias": "roberta.embeddings.LayerNorm.bias",
    "layers.{i}.attention.out.weight": "roberta.encoder.layer.{i}.attention.output.dense.weight",
    "layers.{i}.attention.out.bias": "roberta.encoder.layer.{i}.attention.output.dense.bias",
    "layers.{i}.attention_layernorm.weight": "roberta.encoder.layer.{i}.attention.output.LayerNorm.weight",
    "layers.{i}.attention_layernorm.bias": "roberta.encoder.layer.{i}.attention.output.LayerNorm.bias",
    "layers.{i}.ffn.fc1.weight": "roberta.encoder.layer.{i}.intermediate.dense.weight",
    "layers.{i}.ffn.fc1.bias": "roberta.encoder.layer.{i}.intermediate.dense.bias",
    "layers.{i}.ffn.fc2.weight": "roberta.encoder.layer.{i}.output.dense.weight",
    "layers.{i}.ffn.fc2.bias": "roberta.encoder.layer.{i}.output.dense.bias",
    "layers.{i}.ffn_layernorm.weight": "roberta.encoder.layer.{i}.output.LayerNorm.weight",
    "layers.{i}.ffn_layernorm.bias": "roberta.encoder.layer.{i}.output.LayerNorm.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layernorm.weight": "lm_head.layer_norm.weight",
    "lm_head.layernorm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
# Fused QKV (per-head interleaved, see model/encoder.py) <- HF's separate projections.
HF_QKV = ("roberta.encoder.layer.{i}.attention.self.query.{p}",
          "roberta.encoder.layer.{i}.attention.self.key.{p}",
          "roberta.encoder.layer.{i}.attention.self.value.{p}")
HF_DECODER_WEIGHT = "lm_head.decoder.weight"   # tied to the word embedding
HF_DECODER_BIAS = "lm_head.decoder.bias"       # tied to lm_head.bias


class HFConversionError(ValueError):
    """An HF directory or config we cannot convert; the message names the file and field."""


# ----------------------------------------------------------------------------- configs

def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF XLM-R/RoBERTa config.json dict (checks what we do not support)."""
    def need(key):
        if key not in hf:
            raise HFConversionError(f"{source}: missing field {key!r}")
        return hf[key]
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise HFConversionError(f"{source}: hidden_act={act!r}; only exact 'gelu' is supported")
    pet = hf.get("position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise HFConversionError(f"{source}: position_embedding_type={pet!r}; only 'absolute' is supported")
    cfg = ModelConfig(
        vocab_size=need("vocab_size"), hidden_size=need("hidden_size"), num_layers=need("num_hidden_layers"),
        num_heads=need("num_attention_heads"), ffn_size=need("intermediate_size"),
        max_positions=need("max_position_embeddings"), pad_id=hf.get("pad_token_id", 1),
        dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layernorm_eps=hf.get("layer_norm_eps", 1e-5), init_std=hf.get("initializer_range", 0.02))
    cfg.validate()
    return cfg


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """HF config.json dict for an XLMRobertaForMaskedLM with our shape."""
    return {
        "architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": cfg.max_positions, "type_vocab_size": 1,
        "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout, "layer_norm_eps": cfg.layernorm_eps,
        "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_id, "bos_token_id": 0, "eos_token_id": 2,
        "position_embedding_type": "absolute", "torch_dtype": "float32", "tie_word_embeddings": True,
    }


# ----------------------------------------------------------------------------- state dicts

def _qkv_interleave(q, k, v, heads):
    """[H_out, ...] x3 -> per-head interleaved [3 H_out, ...]."""
    d = q.shape[0] // heads
    return torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(3 * q.shape[0], *q.shape[1:])


def _qkv_split(qkv, heads):
    h_out = qkv.shape[0] // 3
    parts = qkv.reshape(heads, 3, h_out // heads, *qkv.shape[1:]).unbind(dim=1)
    return [p.reshape(h_out, *qkv.shape[1:]).clone() for p in parts]


def hf_to_full_state(hf_sd: dict, cfg: ModelConfig) -> dict:
    """Our full state dict from an HF XLMRobertaForMaskedLM state dict."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in hf_sd.items()}
    out = {}

    def take(hf_name):
        if hf_name not in sd:
            raise HFConversionError(f"HF weights lack {hf_name!r} (is this an XLMRobertaForMaskedLM checkpoint?)")
        return sd[hf_name]

    for ours, theirs in HF_NAME_MAP.items():
        names = [(ours.format(i=i), theirs.format(i=i)) for i in range(cfg.num_layers)] if "{i}" in ours \
            else [(ours, theirs)]
        for o, t in names:
            if o == "lm_head.bias" and t not in sd and HF_DECODER_BIAS in sd:
                t = HF_DECODER_BIAS
            if o == "embeddings.token_type_embeddings":
                # one zero row in released checkpoints; token type 0 is the only one XLM-R uses
                tt = sd.get(t)
                out[o] = tt[:1].clone() if tt is not None else torch.zeros(1, cfg.hidden_size)
                continue
            out[o] = take(t).clone()
    for i in range(cfg.num_layers):
        for p in ("weight", "bias"):
            q, k, v = (take(n.format(i=i, p=p)) for n in HF_QKV)
            out[f"layers.{i}.attention.qkv.{p}"] = _qkv_interleave(q, k, v, cfg.num_heads)
    if HF_DECODER_WEIGHT in sd and not torch.equal(sd[HF_DECODER_WEIGHT], out["embeddings.word_embeddings.weight"]):
        raise HFConversionError(f"{HF_DECODER_WEIGHT} differs from the word embedding: XLM-R ties them; an "
                                f"untied decoder cannot be represented")
    return out


def full_state_to_hf(full: dict, cfg: ModelConfig) -> dict:
    """HF XLMRobertaForMaskedLM state dict from our full state dict (real vocabulary)."""
    out = {}
    full = dict(full)
    full.setdefault(TOKEN_TYPE, constant_buffers(cfg)[TOKEN_TYPE])     # trainer checkpoints omit it
    for ours, theirs in HF_NAME_MAP.items():
        names = [(ours.format(i=i), theirs.format(i=i)) for i in range(cfg.num_layers)] if "{i}" in ours \
            else [(ours, theirs)]
        for o, t in names:
            if o not in full:
                raise HFConversionError(f"state dict lacks {o!r}; cannot export a model without it")
            out[t] = full[o][: cfg.vocab_size].clone() if o in ("embeddings.word_embeddings.weight", "lm_head.bias") \
                else full[o].clone()
    for i in range(cfg.num_layers):
        for p in ("weight", "bias"):
            for name, t in zip(HF_QKV, _qkv_split(full[f"layers.{i}.attention.qkv.{p}"], cfg.num_heads)):
                out[name.format(i=i, p=p)] = t
    out[HF_DECODER_WEIGHT] = out[HF_NAME_MAP["embeddings.word_embeddings.weight"]].clone()
    out[HF_DECODER_BIAS] = out["lm_head.bias"].clone()
    return out


# ----------------------------------------------------------------------------- directories

def read_hf_dir(path: str) -> tuple:
    """(config dict, state dict) of an HF model directory (safetensors, sharded safetensors or .bin)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFConversionError(f"{path} has no config.json; give a Hugging Face model directory")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    st, idx, binf = (os.path.join(path, n) for n in
                     ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.isfile(st):
        from safetensors.torch import load_file
        sd = load_file(st)
    elif os.path.isfile(idx):
        from safetensors.torch import load_file
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(path, name)))
    elif os.path.isfile(binf):
        sd = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise HFConversionError(f"{path} has no model.safetensors, model.safetensors.index.json or "
                                f"pytorch_model.bin")
    return hf_cfg, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_hf(path: str) -> tuple:
    """(ModelConfig, our full state dict) from an HF XLMRobertaForMaskedLM directory."""
    hf_cfg, sd = read_hf_dir(path)
    cfg = model_config_from_hf(hf_cfg, os.path.join(path, "config.json"))
    return cfg, hf_to_full_state(sd, cfg)


def save_hf(path: str, full: dict, cfg: ModelConfig, tokenizer=None) -> str:
    """Write an HF directory (config.json + model.safetensors) that transformers loads; atomic.
    With `tokenizer` (an XLMRTokenizer of the model's vocabulary) also its files
    (xlmr_mp/tokenizer/hf.py), checked to give our ids before the directory is renamed into place."""
    from safetensors.torch import save_file
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise HFConversionError(f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} ids but the model's "
                                f"vocabulary is {cfg.vocab_size}: it belongs to another model")
    with atomic_dir(path) as tmp:       # renamed onto `path` when complete
        hf_sd = {k: v.contiguous() for k, v in full_state_to_hf(full, cfg).items()}
        save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from_model(cfg), f, indent=2)
        if tokenizer is not None:
            from xlmr_mp.tokenizer.hf import save_hf_tokenizer
            save_hf_tokenizer(tokenizer, tmp)
    return path
