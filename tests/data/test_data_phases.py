"""Data and batch phases (xlmr_mp/data/phases.py): phase lists keyed by step or tokens, validated before anything
is allocated; per-step values; batch warmup arithmetic; branch histories; wsd and 1-sqrt LR."""
import math

import pytest

from xlmr_mp.config import ConfigError, load_config
from xlmr_mp.optim import LRSchedule
from xlmr_mp.data.phases import BatchRule, BatchSizes, RunPhases, phase_fields

from tests.support.train_bodies import TINY


def _cfg(*ov):
    return load_config(TINY, list(ov))


def _rs(*ov, unit=4):
    return RunPhases.from_config(_cfg(*ov), unit)


def test_stepped_and_linear_alpha_per_step():
    r = _rs("data.alpha_schedule=[{step: 0, alpha: 0.7}, {step: 10, alpha: 0.5}, {step: 30, alpha: 0.3}]")
    assert [r.alpha(s) for s in (0, 9, 10, 29, 30, 10 ** 6)] == [0.7, 0.7, 0.5, 0.5, 0.3, 0.3]
    assert [s for s, _, _ in r.blend_segments()] == [0, 10, 30]
    r = _rs("data.alpha_schedule=[{step: 0, alpha: 0.7}, {step: 10, alpha: 0.5}]", "data.alpha_interpolation=linear",
            "data.alpha_update_steps=4")
    assert [round(r.alpha(s), 12) for s in (0, 3, 4, 7, 8, 9, 10, 99)] == [0.7, 0.7, 0.62, 0.62, 0.54, 0.54, 0.5, 0.5]
    assert [s for s, _, _ in r.blend_segments()] == [0, 4, 8, 10]


def test_mask_and_language_schedules_and_logged_values():
    r = _rs("data.mask_schedule=[{step: 0, mask_prob: 0.3}, {step: 5, mask_prob: 0.15}]",
            "data.language_schedule=[{step: 0, languages: [en, fr]}, {step: 3, languages: [en, fr, sw]}]")
    assert r.values(2, 3) == {"alpha": 0.3, "mask_prob": 0.3, "global_batch": 8, "active_languages": 2}
    assert r.values(5, 3) == {"alpha": 0.3, "mask_prob": 0.15, "global_batch": 8, "active_languages": 3}
    assert r.all_languages() == ("en", "fr", "sw")
    assert [(s, l) for s, _, l in r.blend_segments()] == [(0, ("en", "fr")), (3, ("en", "fr", "sw"))]
    lin = _rs("data.mask_schedule=[{step: 0, mask_prob: 0.3}, {step: 10, mask_prob: 0.1}]", "data.mask_interpolation=linear")
    assert math.isclose(lin.mask_prob(5), 0.2) and lin.mask_prob(10) == 0.1


def test_tokens_keys_resolve_to_the_first_step_reaching_them():
    # tiny: global batch 8, seq 64 -> 512 tokens per step
    r = _rs("data.alpha_schedule=[{tokens: 0, alpha: 0.7}, {tokens: 5000, alpha: 0.3}]")
    assert r.alpha(9) == 0.7 and r.alpha(10) == 0.3          # 10 * 512 = 5120 >= 5000 > 9 * 512
    r = _rs("data.alpha_schedule=[{step: 0, alpha: 0.7}, {tokens: 5120, alpha: 0.3}]")
    assert r.alpha(9) == 0.7 and r.alpha(10) == 0.3


def test_batch_warmup_grows_in_units_and_samples_tile_the_stream():
    rule = BatchRule(32, unit=4, seq_length=10, warmup=(8, 2000))
    bs = BatchSizes([(0, rule)])
    sizes = [bs.global_batch(s) for s in range(30)]
    assert sizes[0] == 8 and sizes[-1] == 32 and all(g % 4 == 0 for g in sizes)
    assert sizes == sorted(sizes) and len(set(sizes)) > 3
    pos = 0
    for s in range(30):                                       # each step starts where the last ended
        assert bs.sample_start(s) == pos and bs.step_of_sample(pos) == (s, 0)
        # the batch is the rule's value at the tokens consumed before the step
        assert bs.global_batch(s) == rule.at_tokens(pos * 10)
        pos += sizes[s]
    assert rule.at_tokens(2000) == 32 and rule.at_tokens(1999) < 32


def test_branch_history_keeps_the_parent_before_the_branch_step():
    parent = phase_fields(_cfg("data.alpha_schedule=[{step: 0, alpha: 0.7}, {step: 20, alpha: 0.3}]"), 4)
    same = RunPhases([(0, parent), (12, parent)])
    ref = RunPhases([(0, parent)])
    assert same.blend_segments() == ref.blend_segments() and same.batch.runs == ref.batch.runs
    other = phase_fields(_cfg("data.language_schedule=[{step: 0, languages: [en]}]"), 4)
    br = RunPhases([(0, parent), (12, other)])
    assert [(s, a, l) for s, a, l in br.blend_segments()] == [(0, 0.7, None), (12, 0.3, ("en",))]
    assert [br.alpha(s) for s in (11, 12, 25)] == [0.7, 0.3, 0.3]


@pytest.mark.parametrize("override,needle", [
    ("data.alpha_schedule=[{step: 5, alpha: 0.7}]", "must start at step 0"),
    ("data.alpha_schedule=[{step: 0, alpha: 0.7}, {step: 0, alpha: 0.5}]", "increasing order"),
    ("data.alpha_schedule=[{step: 0, alpha: 1.5}]", "data.alpha_schedule[0].alpha=1.5"),
    ("data.alpha_schedule=[{step: 0, value: 0.5}]", "missing 'alpha'"),
    ("data.alpha_schedule=[{step: 0, tokens: 0, alpha: 0.5}]", "exactly one of step or tokens"),
    ("data.mask_schedule=[{step: 0, mask_prob: 0}]", "data.mask_schedule[0].mask_prob=0"),
    ("data.language_schedule=[{step: 0, languages: []}]", "non-empty list of language names"),
    ("data.alpha_interpolation=cubic", "data.alpha_interpolation='cubic'"),
    ("train.batch_warmup={start: 6, tokens: 100}", "train.batch_warmup.start=6 is not a multiple"),
    ("train.batch_warmup={start: 4}", "train.batch_warmup="),
    ("optim.decay=wsd", "optim.decay=wsd needs optim.decay_steps"),
    ("optim.decay=exp", "optim.decay='exp'"),
])
def test_bad_schedules_fail_at_config_time_naming_the_option(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert needle in str(e.value)


def test_every_warmup_batch_size_must_suit_the_pipeline_schedule():
    """RunConfig.validate checks each global batch of the warmup with the layout's micro-batch rule
    (parallel/layout.py), which data/phases.py does not import."""
    ov = ["parallel.pipeline=2", "train.micro_batch=2", "train.global_batch=16"]
    load_config(TINY, ov + ["train.batch_warmup={start: 4, tokens: 1000}"], world_size=2)
    with pytest.raises(ConfigError, match=r"train.batch_warmup: a global batch of 2 is 1 micro-batches per step: "
                                          r"1F1B needs at least parallel.pipeline=2"):
        load_config(TINY, ov + ["train.batch_warmup={start: 2, tokens: 1000}"], world_size=2)


def test_language_schedule_must_be_within_data_languages():
    with pytest.raises(ConfigError, match=r"names \['sw'\], not in data.languages"):
        load_config(TINY, ["data.languages=[en, fr]", "data.language_schedule=[{step: 0, languages: [en, sw]}]"])


def test_wsd_and_1_sqrt_learning_rates():
    lr = LRSchedule(1.0, 10, 100, "wsd", min_lr=0.1, decay_steps=20, wsd_decay="1-sqrt")
    assert lr(0) == 0.1 and lr(9) == 1.0                         # warmup
    assert all(lr(s) == 1.0 for s in range(10, 81))              # stable
    for s in (81, 90, 99):
        assert math.isclose(lr(s), 0.1 + 0.9 * (1 - math.sqrt((s - 80) / 20)))
    assert lr(100) == 0.1
    frac = LRSchedule(1.0, 10, 100, "wsd", decay_fraction=0.2, wsd_decay="linear")
    assert frac(80) == 1.0 and math.isclose(frac(90), 0.5)
    one = LRSchedule(1.0, 10, 110, "1-sqrt")
    assert math.isclose(one(35), 1 - math.sqrt(0.25)) and one(110) == 0.0
    old = LRSchedule(1.0, 10, 110, "linear")                     # today's schedule unchanged
    assert old(60) == 1.0 * (1 - 50 / 100) and old(5) == 0.6


def test_mmbert_like_preset_resolves():
    import os
    cfg = load_config(os.path.join(os.path.dirname(TINY), "mmbert_like.yaml"), world_size=32)
    r = RunPhases.from_config(cfg, cfg.train.micro_batch * cfg.parallel.data)
    seg = r.blend_segments()
    assert [(a, len(l)) for _, a, l in seg] == [(0.7, 60), (0.5, 110), (0.3, 129)]
    assert seg[2][0] == 1_450_000 and 0.7 < seg[1][0] / cfg.train.train_steps < 0.8    # tokens 4.8e12
    assert [r.mask_prob(s) for s, _, _ in seg] == [0.3, 0.15, 0.05]
    assert r.global_batch(0) == 1024 and r.global_batch(10 ** 6) == 8192
    lr = LRSchedule.from_config(cfg.optim, cfg.train.train_steps)
    assert lr(1_449_999) == cfg.optim.lr and lr(1_475_000) < cfg.optim.lr
