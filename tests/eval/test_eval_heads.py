"""Fine-tuning heads: our sequence / token classification logits equal transformers' on a random tiny
XLM-R (eval mode and, for the head's dropout, train mode), and `export_hf` reloads in transformers."""
import json

import pytest
import torch

from tests.support.model_bodies import TINY_HF, tiny_batch


def _hf_classifier(kind, num_labels=5, seed=3, **overrides):
    from transformers import (XLMRobertaConfig, XLMRobertaForSequenceClassification,
                              XLMRobertaForTokenClassification)
    cls = XLMRobertaForSequenceClassification if kind == "sequence" else XLMRobertaForTokenClassification
    torch.manual_seed(seed)
    model = cls(XLMRobertaConfig(**dict(TINY_HF, num_labels=num_labels, **overrides))).eval()
    with torch.no_grad():  # HF inits biases / LayerNorms to constants; make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours_from(hf, kind, num_labels=5, dropout=0.0):
    from xlmr_mp.checkpoint.hf import model_config_from_hf
    from xlmr_mp.eval.heads import Classifier, load_encoder_hf_state
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = model_config_from_hf(hf.config.to_dict())
    enc = XLMRModel(cfg, has_head=False, init_seed=0)
    load_encoder_hf_state(enc, hf.state_dict())
    ours = Classifier(enc, kind, num_labels, dropout)
    ours.load_hf_head_state(hf.state_dict())
    return ours.eval()


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_logits_equal_transformers(kind):
    hf = _hf_classifier(kind)
    ours = _ours_from(hf, kind)
    ids, mask, _ = tiny_batch(seed=4, vocab=TINY_HF["vocab_size"])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask)
    assert mine.shape == theirs.shape == ((3, 5) if kind == "sequence" else (*ids.shape, 5))
    assert (mine - theirs).abs().max().item() < 1e-5
    assert theirs.std().item() > 1e-3                        # the logits are not trivially equal


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_head_dropout_matches_transformers_in_train_mode(kind):
    """Encoder dropout off, classifier dropout 0.3 on both sides: the same RNG draws give the same
    logits only when dropout sits where HF puts it (before dense and before out_proj / classifier)."""
    hf = _hf_classifier(kind, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.3)
    ours = _ours_from(hf, kind, dropout=0.3)
    hf.train()
    ours.train()
    ids, mask, _ = tiny_batch(seed=5, vocab=TINY_HF["vocab_size"])
    torch.manual_seed(11)
    theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(11)
    mine = ours(ids, mask)
    assert (mine - theirs).abs().max().item() < 1e-5
    with torch.no_grad():
        ours.eval()
        assert (ours(ids, mask) - mine).abs().max().item() > 1e-3   # dropout really was active


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_export_hf_reloads_with_same_logits(kind, tmp_path):
    import transformers
    from xlmr_mp.checkpoint.hf import hf_to_full_state, model_config_from_hf
    from xlmr_mp.checkpoint.model_io import local_state_for
    from xlmr_mp.eval.heads import Classifier, encoder_from, export_hf
    from xlmr_mp.model.xlmr import XLMRModel
    from tests.support.model_bodies import tiny_hf_model
    mlm = tiny_hf_model(seed=6)
    cfg = model_config_from_hf(mlm.config.to_dict())
    model = XLMRModel(cfg, init_seed=0)
    model.load_state_dict(local_state_for(model, hf_to_full_state(mlm.state_dict(), cfg)))
    ours = Classifier(encoder_from(model, dropout=0.1), kind, 4, 0.1)
    ours.reset_head(seed=2)
    labels = ["b", "a", "d", "c"]
    out = export_hf(str(tmp_path / "exp"), ours, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]       # no temporary left behind
    cls = transformers.AutoModelForSequenceClassification if kind == "sequence" \
        else transformers.AutoModelForTokenClassification
    back = cls.from_pretrained(out).eval()
    assert type(back).__name__ == ("XLMRobertaForSequenceClassification" if kind == "sequence"
                                   else "XLMRobertaForTokenClassification")
    assert back.config.id2label == dict(enumerate(labels))
    ids, mask, _ = tiny_batch(seed=7, vocab=cfg.vocab_size)
    with torch.no_grad():
        ours.eval()
        assert (back(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max().item() < 1e-5
    with open(tmp_path / "exp" / "config.json") as f:
        assert json.load(f)["num_labels"] == 4


def test_encoder_from_copies_weights_and_sets_dropout():
    from xlmr_mp import kernels
    from xlmr_mp.eval.heads import encoder_from
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.xlmr import XLMRModel
    cfg = ModelConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_positions=40,
                      dropout=0.0, attention_dropout=0.0)
    model = XLMRModel(cfg, init_seed=5).eval()
    kernels.apply(model, "cpu")                   # as load_model gives it; encoder_from applies them too
    enc = encoder_from(model, dropout=0.2).eval()
    assert enc.lm_head is None and enc.cfg.dropout == 0.2 and enc.cfg.attention_dropout == 0.2
    assert model.cfg.dropout == 0.0
    ids, mask, _ = tiny_batch(seed=1, vocab=100)
    with torch.no_grad():
        assert torch.equal(enc.encode(ids, mask), model.encode(ids, mask))
