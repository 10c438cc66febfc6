"""Stage layout, pipeline option validation, and the PP=1 path of PipelineSchedule (single process)."""
import pytest

from xlmr_mp.config import ConfigError, ParallelConfig
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.parallel.layout import (local_stage_indices, schedule_kind, stage_layer_counts, stage_layer_ids,
                                     validate_pipeline_config)


def test_even_split_covers_every_layer_once_in_order():
    for layers, stages in [(4, 2), (24, 4), (5, 4), (7, 3), (12, 1)]:
        ids = stage_layer_ids(layers, stages)
        assert [i for s in ids for i in s] == list(range(layers))
        counts = [len(s) for s in ids]
        assert max(counts) - min(counts) <= 1


def test_leftover_layers_go_to_middle_stages_first():
    assert stage_layer_counts(5, 4) == [1, 2, 1, 1]
    assert stage_layer_counts(6, 4) == [1, 2, 2, 1]


def test_first_last_fewer_moves_layers_to_the_middle():
    assert stage_layer_counts(24, 4, first_last_fewer=1) == [5, 7, 7, 5]
    assert stage_layer_counts(24, 4, first_last_fewer=2) == [5, 7, 7, 5]   # 26/4 not integral: balanced work
    assert stage_layer_counts(24, 4, first_last_fewer=0) == [6, 6, 6, 6]
    assert stage_layer_counts(8, 2, first_last_fewer=3) == [4, 4]          # two stages: both are ends
    assert sum(stage_layer_counts(24, 8, first_last_fewer=2)) == 24


def test_explicit_stage_layers_are_used_verbatim():
    assert stage_layer_ids(24, 4, stage_layers=[5, 7, 7, 5]) == [
        list(range(0, 5)), list(range(5, 12)), list(range(12, 19)), list(range(19, 24))]
    assert stage_layer_ids(4, 2, stage_layers=[0, 4]) == [[], [0, 1, 2, 3]]


def test_interleaved_chunks_follow_megatron_order():
    ids = stage_layer_ids(8, 2, virtual_stages=2)
    assert ids == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert local_stage_indices(0, 2, 2) == [0, 2]      # rank 0: layers 0-1 and 4-5
    assert local_stage_indices(1, 2, 2) == [1, 3]
    assert local_stage_indices(3, 4, 3) == [3, 7, 11]


@pytest.mark.parametrize("stages, stage_layers, match", [
    (2, [2, 1, 1], r"parallel\.stage_layers=.*3 entries.*= 2"),
    (2, [3, 3], r"parallel\.stage_layers=.*sums to 6 but model\.num_layers=4"),
    (3, [2, -1, 3], r"parallel\.stage_layers\[1\]=-1"),
    (3, [2, 0, 2], r"parallel\.stage_layers\[1\]=0"),
])
def test_bad_stage_layers_name_the_option(stages, stage_layers, match):
    with pytest.raises(ConfigError, match=match):
        stage_layer_counts(4, stages, stage_layers=stage_layers)


def test_too_few_layers_for_the_stages():
    with pytest.raises(ConfigError, match="model.num_layers=2 < 4 pipeline stages"):
        stage_layer_counts(2, 4)
    assert stage_layer_counts(8, 4, first_last_fewer=5) == [0, 4, 4, 0]   # ends keep only embedding / head


def _cfgs(**par):
    return ModelConfig(num_layers=4, hidden_size=32, num_heads=4, ffn_size=64), ParallelConfig(**par)


def test_validate_pipeline_config():
    m, p = _cfgs(pipeline=2, virtual_stages=2, schedule="interleaved")
    validate_pipeline_config(m, p, n_microbatches=4)
    assert schedule_kind(p) == "interleaved"
    with pytest.raises(ConfigError, match="virtual_stages=2 needs parallel.pipeline >= 2"):
        validate_pipeline_config(*_cfgs(pipeline=1, virtual_stages=2, schedule="interleaved"))
    with pytest.raises(ConfigError, match="1F1B needs at least parallel.pipeline=4 micro-batches"):
        validate_pipeline_config(*_cfgs(pipeline=4), n_microbatches=2)
    with pytest.raises(ConfigError, match="interleaved 1F1B needs the micro-batches per step"):
        validate_pipeline_config(*_cfgs(pipeline=2, virtual_stages=2, schedule="interleaved"), n_microbatches=5)
    with pytest.raises(ConfigError, match="gpipe supports one chunk"):
        validate_pipeline_config(*_cfgs(pipeline=2, virtual_stages=2, schedule="gpipe"))
    assert schedule_kind(ParallelConfig(pipeline=2, schedule="gpipe")) == "gpipe"


def test_first_last_fewer_is_a_config_option():
    from xlmr_mp.config import load_config
    from xlmr_mp.parallel.layout import stage_layout
    cfg = load_config(None, ["model.num_layers=24", "model.hidden_size=64", "model.num_heads=4",
                             "model.ffn_size=128", "parallel.pipeline=4", "parallel.first_last_fewer=1"], None)
    assert [len(s) for s in stage_layout(cfg.model, cfg.parallel)] == [5, 7, 7, 5]
    with pytest.raises(ConfigError, match="parallel.first_last_fewer=-1"):
        load_config(None, ["parallel.first_last_fewer=-1"], None)


def _tiny_model():
    from tests.parallel.pipeline_bodies import tiny_model_cfg
    from xlmr_mp.model.xlmr import XLMRModel
    return XLMRModel(tiny_model_cfg(), init_seed=3)


def test_pp1_schedule_is_the_plain_accumulation_loop():
    import torch
    from tests.parallel.pipeline_bodies import make_micro_batches
    from xlmr_mp.parallel.stages import masked_lm_loss_sum
    from xlmr_mp.parallel.schedule import PipelineSchedule
    model, ref = _tiny_model(), _tiny_model()
    mbs = make_micro_batches(3, vocab=120, seed=1)
    n = float(sum(int((m["labels"] != -100).sum()) for m in mbs))
    loss = PipelineSchedule([model], None, ParallelConfig(), 3, masked_lm_loss_sum).step(mbs, n, loss_scale=4.0)
    expected = 0.0
    for mb in mbs:
        s, _ = ref.loss_and_count(mb["input_ids"], mb["attention_mask"], mb["labels"])
        (s / n * 4.0).backward()
        expected += (s / n).item()
    assert loss == expected
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), k
    ls, count = PipelineSchedule([model], None, ParallelConfig(), 3, masked_lm_loss_sum).evaluate(mbs)
    assert count == n and abs(ls / n - expected) < 1e-6 and model.training


def test_schedule_rejects_bad_micro_batches():
    from tests.parallel.pipeline_bodies import make_micro_batches
    from xlmr_mp.parallel.stages import masked_lm_loss_sum
    from xlmr_mp.parallel.schedule import PipelineSchedule
    sched = PipelineSchedule([_tiny_model()], None, ParallelConfig(), 2, masked_lm_loss_sum)
    mbs = make_micro_batches(2, vocab=120)
    with pytest.raises(ValueError, match="expected 2 micro-batches"):
        sched.step(mbs[:1], 10.0)
    with pytest.raises(ValueError, match="global_num_masked=0"):
        sched.step(mbs, 0)
    short = dict(mbs[1], labels=mbs[1]["labels"][:, :8])
    with pytest.raises(ValueError, match="micro-batch 1 labels has shape"):
        sched.step([mbs[0], short], 10.0)
    with pytest.raises(KeyError, match="micro-batch 0 has no 'labels'"):
        sched.step([{k: v for k, v in mbs[0].items() if k != "labels"}, mbs[1]], 10.0)
    with pytest.raises(ConfigError, match="1F1B needs at least parallel.pipeline=4"):
        from xlmr_mp.parallel.layout import check_micro_batch_count
        check_micro_batch_count("1f1b", 4, 3)
