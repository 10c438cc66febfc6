"""checkpoint/format.py, the one reader of the checkpoint layout: `latest` resolution (with the
re-save fallback), meta.json checks, safe file reads and the merge of model shards, each failure
naming the file."""
import json
import os

import pytest
import torch

from xlmr_mp.checkpoint.format import (CheckpointError, CheckpointNotFoundError, latest_checkpoint, load_file,
                                       merge_model_shards, model_file, read_meta, resolve_checkpoint_dir,
                                       step_dir_name, write_latest, write_meta)
from xlmr_mp.model.config import ModelConfig


def _cfg():
    return ModelConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, ffn_size=8, max_positions=8)


def _step(root, step, tp=1, pp=1, shards=None):
    d = os.path.join(root, step_dir_name(step))
    os.makedirs(d)
    write_meta(d, {"model": {}, "tp": tp, "pp": pp, "step": step})
    for (t, p), sd in (shards or {}).items():
        torch.save(sd, os.path.join(d, model_file(t, p)))
    return d


def test_latest_names_the_step_directory(tmp_path):
    root = str(tmp_path)
    assert latest_checkpoint(root) is None
    d = _step(root, 7)
    write_latest(root, d)
    assert open(os.path.join(root, "latest")).read() == "step_00000007\n"
    assert latest_checkpoint(root) == d == resolve_checkpoint_dir(root) and resolve_checkpoint_dir(d) == d
    assert read_meta(root)["step"] == 7 and read_meta(d)["format"] == "xlmr_mp-v1"
    os.rename(d, d + ".old")                     # the crash window of a re-save
    assert latest_checkpoint(root) == d + ".old"


def test_missing_checkpoints_name_the_path_and_are_file_not_found(tmp_path):
    root = str(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=f"{root} is not a complete xlmr_mp checkpoint"):
        resolve_checkpoint_dir(root)
    write_latest(root, "step_00000003")
    with pytest.raises(FileNotFoundError, match="latest names 'step_00000003'"):
        latest_checkpoint(root)


def test_damaged_meta_is_named_with_its_line(tmp_path):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text('{"format": "xlmr_mp-v1",\n "tp": }')
    with pytest.raises(CheckpointError, match=r"meta\.json:2: not valid JSON"):
        read_meta(str(d))
    (d / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format 'other', expected 'xlmr_mp-v1'"):
        read_meta(str(d))
    (d / "meta.json").write_text(json.dumps({"format": "xlmr_mp-v1", "model": {}, "tp": 1}))
    with pytest.raises(CheckpointError, match="missing field 'pp'"):
        read_meta(str(d))


def test_load_file_names_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_file(str(good))["w"], torch.ones(2))
    (tmp_path / "b.pt").write_bytes(good.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"b\.pt: cannot be read"):
        load_file(str(tmp_path / "b.pt"))
    torch.save([1, 2], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: holds a list, expected a dict"):
        load_file(str(tmp_path / "c.pt"))
    with pytest.raises(CheckpointNotFoundError, match=r"d\.pt is missing"):
        load_file(str(tmp_path / "d.pt"))


def test_merge_joins_tp_shards_and_stages(tmp_path):
    cfg = _cfg()
    w = torch.arange(32.0).reshape(8, 4)            # ffn.fc1.weight [F, H]: split on dim 0 under TP
    shards = {(t, 0): {"layers.0.ffn.fc1.weight": w.chunk(2)[t], "embeddings.layernorm.weight": torch.ones(4)}
              for t in range(2)}
    shards.update({(t, 1): {"lm_head.layernorm.weight": torch.full((4,), 2.0)} for t in range(2)})
    d = _step(str(tmp_path), 1, tp=2, pp=2, shards=shards)
    full = merge_model_shards(d, cfg)
    assert torch.equal(full["layers.0.ffn.fc1.weight"], w)
    assert sorted(full) == ["embeddings.layernorm.weight", "layers.0.ffn.fc1.weight", "lm_head.layernorm.weight"]
    os.remove(os.path.join(d, model_file(1, 1)))
    with pytest.raises(CheckpointNotFoundError, match=r"model_tp01_pp01\.pt is missing \(meta\.json says tp=2, pp=2\)"):
        merge_model_shards(d, cfg)
