"""Hugging Face parity at TP 1: our logits on a random tiny XLMRobertaForMaskedLM (built here, no
download) within 1e-5, with and without padding; export back and reload in transformers."""
import json
import os

import pytest
import torch

from tests.support.model_bodies import tiny_batch, tiny_hf_model


@pytest.fixture(scope="module")
def hf_and_ours():
    from xlmr_mp.checkpoint.hf import hf_to_full_state, model_config_from_hf
    from xlmr_mp.checkpoint.model_io import local_state_for
    from xlmr_mp.model.xlmr import XLMRModel
    hf = tiny_hf_model(seed=3)
    cfg = model_config_from_hf(hf.config.to_dict())
    full = hf_to_full_state(hf.state_dict(), cfg)
    model = XLMRModel(cfg, init_seed=0)
    model.load_state_dict(local_state_for(model, full))
    model.strip_vocab_padding = True
    return hf, cfg, full, model.eval()


def test_logits_match_hf_with_padding(hf_and_ours):
    hf, cfg, full, model = hf_and_ours
    ids, mask, _ = tiny_batch(seed=4, vocab=cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
        assert ours.shape == theirs.shape == (*ids.shape, cfg.vocab_size)
        assert (ours - theirs).abs().max().item() < 1e-5
        # padding really is masked: changing a pad position's token id changes nothing real
        ids2 = ids.clone()
        ids2[1, -1] = 7
        ours2 = model(ids2, mask)
        n = int(mask[1].sum())
        assert (ours2[1, :n] - ours[1, :n]).abs().max().item() < 1e-6
        assert (ours2[1, n:] - ours[1, n:]).abs().max().item() > 0
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-5


def test_name_map_roundtrip_is_exact(hf_and_ours):
    from xlmr_mp.checkpoint.hf import full_state_to_hf
    hf, cfg, full, _ = hf_and_ours
    back = full_state_to_hf(full, cfg)
    sd = hf.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_export_reloads_in_transformers(hf_and_ours, tmp_path):
    from transformers import XLMRobertaForMaskedLM
    from xlmr_mp.checkpoint.hf import save_hf
    hf, cfg, full, model = hf_and_ours
    save_hf(str(tmp_path / "hf"), full, cfg)
    assert sorted(os.listdir(tmp_path)) == ["hf"]          # no temporary left behind
    reloaded = XLMRobertaForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask, _ = tiny_batch(seed=5, vocab=cfg.vocab_size)
    with torch.no_grad():
        assert (reloaded(input_ids=ids, attention_mask=mask).logits - model(ids, mask)).abs().max().item() < 1e-5
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["layer_norm_eps"] == cfg.layernorm_eps


def test_unsupported_hf_config_is_named():
    from xlmr_mp.checkpoint.hf import HFConversionError, model_config_from_hf
    from tests.support.model_bodies import TINY_HF
    bad = dict(TINY_HF, hidden_act="relu", num_hidden_layers=2)
    with pytest.raises(HFConversionError, match="hidden_act"):
        model_config_from_hf(bad, "x/config.json")
    with pytest.raises(HFConversionError, match="num_hidden_layers"):
        model_config_from_hf({k: v for k, v in TINY_HF.items() if k != "num_hidden_layers"})
