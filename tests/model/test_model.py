"""Single-process model checks: presets, initialisation, pipeline-stage construction, the gathered
masked-LM loss against a full projection, recompute, and input errors."""
import pytest
import torch
import torch.nn.functional as F

from tests.support.model_bodies import tiny_batch
from xlmr_mp.config import ConfigError
from xlmr_mp.model.config import PRESETS, ModelConfig
from xlmr_mp.model.xlmr import XLMRModel


def tiny_cfg(**kw):
    base = dict(vocab_size=120, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64, max_positions=40,
                dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def test_presets_fill_shapes_and_explicit_values_win():
    c = ModelConfig(preset="xl")
    c.validate()
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_size) == (36, 2560, 32, 10240)
    c = ModelConfig(preset="xxl")
    c.validate()
    assert (c.num_layers, c.hidden_size, c.num_heads, c.ffn_size) == (48, 4096, 32, 16384)
    c = ModelConfig(preset="base", num_layers=2)
    c.validate()
    assert (c.num_layers, c.hidden_size) == (2, 768)
    from xlmr_mp.config import load_config
    rc = load_config(None, ["model.preset=large", "model.hidden_size=512", "model.num_heads=8"])
    assert (rc.model.num_layers, rc.model.hidden_size, rc.model.num_heads) == (24, 512, 8)
    assert PRESETS["bert-base-150k"]["vocab_size"] == 150002
    for name in ("width-768", "width-960", "width-1152"):
        c = ModelConfig(preset=name)
        c.validate()
        assert c.hidden_size == int(name.split("-")[1]) and c.head_dim == 64
    with pytest.raises(ConfigError, match="model.preset"):
        ModelConfig(preset="huge").validate()
    # values read back from a checkpoint are final even where they equal the dataclass default
    c = ModelConfig.resolved(preset="xl", hidden_size=1024, num_heads=16, ffn_size=4096, num_layers=2)
    c.validate()
    assert (c.hidden_size, c.num_layers) == (1024, 2)


def test_checkpoint_meta_keeps_overrides_of_a_preset(tmp_path):
    from xlmr_mp.checkpoint.model_io import load_full_model_state, save_model_checkpoint
    from xlmr_mp.config import load_config
    from xlmr_mp.model.sharding import local_to_full
    cfg = load_config(None, ["model.preset=xl", "model.hidden_size=1024", "model.num_heads=16",
                             "model.ffn_size=64", "model.num_layers=1", "model.vocab_size=50"]).model
    assert cfg.hidden_size == 1024
    m = XLMRModel(cfg, init_seed=0)
    save_model_checkpoint(str(tmp_path / "ck"), local_to_full([m.state_dict()], cfg), cfg)
    cfg2, full = load_full_model_state(str(tmp_path / "ck"))
    assert cfg2.hidden_size == 1024 and cfg2.num_layers == 1 and cfg2.preset == "xl"
    assert full["embeddings.word_embeddings.weight"].shape == (50, 1024)


def test_initialisation():
    cfg = tiny_cfg(vocab_size=3000, hidden_size=64, ffn_size=128)
    m = XLMRModel(cfg, init_seed=1)
    emb = m.embeddings.word_embeddings.weight
    assert m.padded_vocab == 3000 and emb.shape == (3000, 64)
    assert torch.all(emb[cfg.pad_id] == 0) and torch.all(m.embeddings.position_embeddings.weight[cfg.pad_id] == 0)
    assert abs(emb.std().item() - 0.02) < 1e-3 and abs(m.layers["0"].ffn.fc1.weight.std().item() - 0.02) < 2e-3
    assert torch.all(m.layers["1"].attention.qkv.bias == 0) and torch.all(m.lm_head.bias == 0)
    assert torch.all(m.layers["2"].ffn_layernorm.weight == 1)
    assert torch.all(m.embeddings.token_type_embeddings == 0)
    assert "embeddings.token_type_embeddings" not in dict(m.named_parameters())
    m2 = XLMRModel(cfg, init_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert not torch.equal(XLMRModel(cfg, init_seed=2).layers["0"].ffn.fc1.weight, m.layers["0"].ffn.fc1.weight)


def test_pipeline_stages_compose_to_the_whole_model():
    cfg = tiny_cfg()
    whole = XLMRModel(cfg, init_seed=4)
    first = XLMRModel(cfg, layer_ids=[0, 1], has_head=False, init_seed=4)
    last = XLMRModel(cfg, layer_ids=[2], has_embeddings=False, init_seed=4)
    assert "layers.2.attention.qkv.weight" in dict(last.named_parameters())
    assert torch.equal(last.lm_head.decoder_weight, whole.embeddings.word_embeddings.weight)
    ids, mask, labels = tiny_batch(seed=1, vocab=cfg.vocab_size)
    hidden = first(ids, mask)
    assert hidden.shape == (*ids.shape, cfg.hidden_size)
    torch.testing.assert_close(last(hidden, mask, labels), whole(ids, mask, labels), rtol=0, atol=0)
    with pytest.raises(TypeError, match="hidden"):
        last(ids, mask)


def test_gathered_head_loss_equals_full_projection_loss():
    cfg = tiny_cfg()
    m = XLMRModel(cfg, init_seed=5)
    ids, mask, labels = tiny_batch(seed=2, vocab=cfg.vocab_size)
    loss = m(ids, mask, labels)
    loss.backward()
    g_ours = m.layers["0"].attention.qkv.weight.grad.clone()
    m.zero_grad()
    logits = m(ids, mask)                                   # every position
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_ours, m.layers["0"].attention.qkv.weight.grad)
    s, n = m.loss_and_count(ids, mask, labels)
    assert n.item() == (labels != -100).sum().item()
    torch.testing.assert_close(s / n, loss)


def test_recompute_modes_give_identical_gradients_with_dropout():
    cfg = tiny_cfg(dropout=0.3, attention_dropout=0.3)
    m = XLMRModel(cfg, init_seed=6).train()
    ids, mask, labels = tiny_batch(seed=3, vocab=cfg.vocab_size)
    grads = {}
    for mode in ("none", "full", "selective"):
        m.zero_grad()
        m.set_recompute(mode)
        torch.manual_seed(0)
        m(ids, mask, labels).backward()
        grads[mode] = [p.grad.clone() for p in m.parameters()]
    for mode in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"]))
    with pytest.raises(ValueError, match="recompute"):
        m.set_recompute("everything")


def test_input_errors_are_clear():
    cfg = tiny_cfg(max_positions=10)
    m = XLMRModel(cfg, init_seed=0)
    with pytest.raises(ValueError, match="model.max_positions"):
        m(torch.full((1, 12), 5))
    m(torch.full((1, 8), 5))                                 # 8 tokens need positions 2..9
    with pytest.raises(ConfigError, match="model.num_heads"):
        XLMRModel(tiny_cfg(num_heads=5))
    with pytest.raises(ValueError, match="layer_ids"):
        XLMRModel(tiny_cfg(), layer_ids=[3])


def test_no_masked_tokens_and_fully_padded_rows_stay_finite():
    cfg = tiny_cfg()
    m = XLMRModel(cfg, init_seed=7)
    ids, mask, _ = tiny_batch(seed=6, vocab=cfg.vocab_size)
    loss = m(ids, mask, torch.full_like(ids, -100))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in m.parameters())
    ids[2], mask[2] = cfg.pad_id, 0                           # a row of padding only
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m.eval()(ids, mask)[..., : cfg.vocab_size]).all()


def test_an_unpadded_batch_builds_no_attention_bias(monkeypatch):
    """A CPU attention mask of all ones means no padding key: encode builds and adds no bias (the
    same outputs as no mask at all); a padded one still gets its bias."""
    import xlmr_mp.model.xlmr as xlmr
    from tests.support.model_case import padded_batch, tiny_model
    model = tiny_model(dropout=0.0).eval()
    ids, mask, _ = padded_batch()
    seen = []
    real = xlmr.attention_bias
    monkeypatch.setattr(xlmr, "attention_bias", lambda m, dtype: seen.append(m) or real(m, dtype))
    with torch.no_grad():
        full = model.encode(ids, torch.ones_like(mask))
        none = model.encode(ids, None)
        model.encode(ids, mask)
    assert seen[0] is None and seen[1] is None and seen[2] is mask
    torch.testing.assert_close(full, none, rtol=0, atol=0)
