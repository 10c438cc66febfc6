"""The training data loader: XLM-R language mixing, packing and masking, sharded across DP ranks.

Layout. Global batch b is blended samples [b*G, (b+1)*G) of the run's stream (blend.py). DP rank
r takes the contiguous slice [b*G + r*G/DP, b*G + (r+1)*G/DP) and yields it as G/(DP*micro)
micro-batches of `micro_batch` sequences, in order. The concatenation of the DP slices is the
DP=1 global batch, so DP=1 with accumulation sees the same samples as DP=2.

Samples. Position t of the stream is (language i, block j, pass e); its sequence is
`<s>` + block tokens, padded with `<pad>` to seq_length, masked by masking.Masker with the key
(seed, i, e, j). Everything is a pure function of (config, seed, t): the samples are identical
whatever num_workers is, and resuming only needs the number of samples consumed.

Batch (CPU tensors): input_ids [B,S] int64, attention_mask [B,S] int64 (1 = real token),
labels [B,S] int64 (original id at masked positions, -100 elsewhere), lang [B] int64.

Phases (xlmr_mp/data/phases.py): with data.alpha_schedule / language_schedule the stream is a
PhasedBlend (one phase per run of steps with one alpha and language set, from the first sample
of its first step); data.mask_schedule sets each step's mask rate; train.batch_warmup makes step
s take G_s = phases.global_batch(s) samples from phases.sample_start(s), i.e. G_s / (micro x
DP) micro-batches per rank (`micro_batches_at(s)`). Without any schedule option the stream is the
static index (one BlendSpec) and every step takes train.global_batch samples.

Resume: `state_dict()` -> {"samples_consumed": global samples consumed by all DP ranks together,
"schedule_history": [[from_step, schedule options], ...], ...}; `load_state_dict()` continues
from there (the next batch is bitwise the one that would have followed). At a global-batch
boundary the DP size and micro batch may change on resume. `load_state_dict(state, branch=True)`
(checkpoint.branch_from) keeps the saved history before the saved step and this loader's own
phases from it on; a plain resume with other schedule options is refused.

Validation: `ValidationLoader` iterates one language's valid split in block order with a fixed
masking key (pass 0), sharded across DP ranks by batch. Bits per character: each validation batch
carries `masked_chars` [B] (characters of the original pieces at masked positions, the word-start
marker counting as the space it stands for) when a SentencePiece model is known; the trainer sums
the masked-token NLL (nats) and the chars over the language's batches and reports
bits_per_char = nll / ln(2) / chars (`bits_per_char()`): the cost in bits of the characters it had to predict.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from xlmr_mp.data.blend import BlendSpec, PhasedBlend, blend_window, sampling_weights
from xlmr_mp.data.config import DataConfig
from xlmr_mp.data.dataset import MultilingualCorpus
from xlmr_mp.data.masking import IGNORE_INDEX, Masker, sample_key, sentencepiece_tables

BOS_ID, PAD_ID = 0, 1


def make_masker(cfg: DataConfig, vocab_size: int, mask_id: Optional[int] = None,
                is_word_start: Optional[np.ndarray] = None) -> Masker:
    """The Masker of a DataConfig; mask_id defaults to the last dictionary id (vocab_size - 1)."""
    if cfg.whole_word_mask and is_word_start is None and cfg.tokenizer:
        is_word_start, _ = sentencepiece_tables(cfg.tokenizer, vocab_size)
    return Masker(vocab_size, vocab_size - 1 if mask_id is None else mask_id, cfg.mask_prob,
                  cfg.mask_replace_prob, cfg.random_replace_prob, cfg.whole_word_mask, cfg.span_mask,
                  cfg.span_mean_length, is_word_start)


def collate(blocks: Sequence[np.ndarray], keys: Sequence[int], langs: Sequence[int], masker: Masker,
            seq_length: int, char_lengths: Optional[np.ndarray] = None,
            mask_prob: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """`<s>` + block, masked with its key (at mask_prob, default the masker's), padded to seq_length
    -> the shared batch dict."""
    n = len(blocks)
    ids = np.full((n, seq_length), PAD_ID, dtype=np.int64)
    labels = np.full((n, seq_length), IGNORE_INDEX, dtype=np.int64)
    attn = np.zeros((n, seq_length), dtype=np.int64)
    chars = np.zeros(n, dtype=np.int64)
    for r, (block, key) in enumerate(zip(blocks, keys)):
        if len(block) >= seq_length:
            raise ValueError(f"block of {len(block)} tokens does not fit seq_length={seq_length} with <s>")
        seq = np.concatenate([[BOS_ID], block])
        masked, lab = masker(seq, key) if mask_prob is None else masker(seq, key, mask_prob)
        ids[r, :len(seq)] = masked
        labels[r, :len(seq)] = lab
        attn[r, :len(seq)] = 1
        if char_lengths is not None:
            chars[r] = int(char_lengths[seq[lab != IGNORE_INDEX]].sum())
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
             "labels": torch.from_numpy(labels), "lang": torch.as_tensor(np.asarray(langs, dtype=np.int64))}
    if char_lengths is not None:
        batch["masked_chars"] = torch.from_numpy(chars)
    return batch


class BlendedSamples:
    """The blended, masked stream of a corpus: `batch(start, count)` -> batch dict of positions
    [start, start + count). Picklable (worker processes re-open the token files).

    phases (xlmr_mp.data.phases.RunPhases): with an alpha or language schedule the stream is a
    PhasedBlend with one phase per (alpha, language set) run of steps, starting at the first sample
    of its first step; without (static), the single BlendSpec index."""

    def __init__(self, corpus: MultilingualCorpus, cfg: DataConfig, masker: Masker, seed: int, phases=None):
        self.corpus, self.masker, self.seed = corpus, masker, int(seed)
        self.seq_length = cfg.seq_length
        self.phased: Optional[PhasedBlend] = None
        sizes = np.asarray(corpus.sizes(cfg.share_unit), dtype=np.float64)
        if phases is None or phases.is_static():
            alpha = cfg.alpha if phases is None else phases.alpha(0)
            self.q = sampling_weights(sizes, alpha)
            self.spec = BlendSpec(self.q, corpus.num_blocks(), self.seed)
            return
        starts, shares = [], []
        for step, alpha, langs in phases.blend_segments():
            q = np.zeros(len(sizes))
            on = np.arange(len(sizes)) if langs is None else np.array([corpus.languages.index(x) for x in langs])
            q[on] = sampling_weights(sizes[on], alpha)
            starts.append(phases.sample_start(step))
            shares.append(q)
        self.phased = PhasedBlend(starts, shares, corpus.num_blocks(), self.seed)
        self.q = shares[0]

    def indices(self, start: int, count: int):
        """(language, block, pass) int64 arrays of positions [start, start + count)."""
        if self.phased is not None:
            lang, block, epoch = self.phased.window(start, count)
        else:
            lang, block, epoch = blend_window(self.spec, start, count, with_epoch=True)
        return lang.astype(np.int64), block.astype(np.int64), epoch

    def batch(self, start: int, count: int, mask_prob: Optional[float] = None) -> Dict[str, torch.Tensor]:
        lang, block, epoch = self.indices(start, count)
        ds = self.corpus.datasets
        blocks = [ds[i].block(j) for i, j in zip(lang.tolist(), block.tolist())]
        keys = [sample_key(self.seed, i, e, j) for i, e, j in zip(lang.tolist(), epoch.tolist(), block.tolist())]
        return collate(blocks, keys, lang, self.masker, self.seq_length, mask_prob=mask_prob)


class _MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset: micro-batch index m of one DP rank -> its batch dict.

    With phases, step s has G_s = phases.global_batch(s) samples from phases.sample_start(s)
    and G_s / (micro x DP) micro-batches per rank (batch warmup), at the step's mask rate."""

    def __init__(self, samples: BlendedSamples, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int,
                 phases=None):
        self.samples, self.dp_rank, self.dp_size = samples, dp_rank, dp_size
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.accumulation = global_batch // (micro_batch * dp_size)
        self.phases = phases
        self.runs = []      # (first step, first micro index, micro-batches per step) per batch-size run
        if phases is not None:
            m = 0
            for step, _, g, n in phases.batch.runs:
                if g % (micro_batch * dp_size):
                    raise ValueError(f"global batch {g} at step {step} is not divisible by train.micro_batch="
                                     f"{micro_batch} x DP {dp_size}; keep the batch schedule's unit on resume")
                self.runs.append((step, m, g // (micro_batch * dp_size)))
                if n is not None:
                    m += n * (g // (micro_batch * dp_size))
            self._micro0 = [r[1] for r in self.runs]

    def step_of(self, m: int):
        """(step, micro-batch within the step) of micro index m."""
        if self.phases is None:
            return divmod(m, self.accumulation)
        import bisect
        s0, m0, per = self.runs[bisect.bisect_right(self._micro0, m) - 1]
        d, j = divmod(m - m0, per)
        return s0 + d, j

    def micro_index(self, step: int, j: int = 0) -> int:
        if self.phases is None:
            return step * self.accumulation + j
        import bisect
        s0, m0, per = self.runs[bisect.bisect_right([r[0] for r in self.runs], step) - 1]
        return m0 + (step - s0) * per + j

    def micro_batches_at(self, step: int) -> int:
        if self.phases is None:
            return self.accumulation
        return self.phases.global_batch(step) // (self.micro_batch * self.dp_size)

    def start_of(self, m: int) -> int:
        b, j = self.step_of(m)
        if self.phases is None:
            return b * self.global_batch + self.dp_rank * (self.global_batch // self.dp_size) + j * self.micro_batch
        g = self.phases.global_batch(b)
        return self.phases.sample_start(b) + self.dp_rank * (g // self.dp_size) + j * self.micro_batch

    def __getitem__(self, m: int) -> Dict[str, torch.Tensor]:
        if self.phases is None:
            return self.samples.batch(self.start_of(int(m)), self.micro_batch)
        step, _ = self.step_of(int(m))
        return self.samples.batch(self.start_of(int(m)), self.micro_batch, self.phases.mask_prob(step))

    def __len__(self) -> int:  # effectively endless
        return 1 << 62


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _worker_init(_):
    torch.set_num_threads(1)


class MLMLoader:
    """Endless iterator of one DP rank's micro-batches (see the module docstring).

    cfg: DataConfig (path, languages, alpha, share_unit, seq_length, masking, num_workers);
    dp_rank/dp_size: this rank's data-parallel coordinates; micro_batch: sequences per yielded
    batch; global_batch: sequences per optimizer step over all DP ranks (a multiple of
    micro_batch * dp_size); vocab_size: dictionary size; mask_id: defaults to vocab_size - 1;
    seed: defaults to cfg.seed; corpus: an already opened MultilingualCorpus (else opened from cfg).
    """

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int,
                 vocab_size: int, mask_id: Optional[int] = None, seed: Optional[int] = None,
                 split: str = "train", corpus: Optional[MultilingualCorpus] = None,
                 is_word_start: Optional[np.ndarray] = None, batch_warmup: Optional[dict] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"MLMLoader: dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"train.global_batch={global_batch} is not divisible by train.micro_batch="
                             f"{micro_batch} x DP {dp_size}; change train.global_batch or train.micro_batch")
        from xlmr_mp.data.phases import RunPhases, data_phase_fields
        self.cfg = cfg
        self.fields = data_phase_fields(cfg, global_batch, batch_warmup, micro_batch * dp_size)
        phases = RunPhases([(0, self.fields)])     # validates the schedule options
        if corpus is None:
            corpus = MultilingualCorpus(cfg.path, split, cfg.seq_length - 1, cfg.languages, cfg.break_mode,
                                        cache=cfg.block_cache)
        self.corpus, self.languages = corpus, corpus.languages
        self.masker = make_masker(cfg, vocab_size, mask_id, is_word_start)
        self.seed = cfg.seed if seed is None else seed
        self._layout = (dp_rank, dp_size, micro_batch, global_batch)
        self._build(phases)
        self._micro = 0
        self._it: Optional[Iterator] = None

    def _build(self, phases) -> None:
        """(Re)build the stream for `phases` (a RunPhases; a plain run without any schedule
        option takes the static code path)."""
        used = phases.all_languages()
        if used is not None:
            missing = [x for x in used if x not in self.languages]
            if missing:
                raise ValueError(f"data.language_schedule names {missing}, which {self.cfg.path} does not have "
                                 f"(languages: {list(self.languages)}); fix the schedule or data.languages")
        self.phases = phases
        active = None if phases.is_trivial() else phases
        self.samples = BlendedSamples(self.corpus, self.cfg, self.masker, self.seed, active)
        self.dataset = _MicroBatches(self.samples, *self._layout, phases=active)
        self.q = self.samples.q

    @property
    def accumulation_steps(self) -> int:
        return self.dataset.accumulation

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches this rank yields for optimizer step `step` (varies under batch warmup)."""
        return self.dataset.micro_batches_at(step)

    def schedule_values(self, step: int) -> Dict[str, float]:
        """alpha, mask_prob, global_batch and active_languages of step `step` (what the trainer logs)."""
        return self.phases.values(step, len(self.languages))

    @property
    def samples_consumed(self) -> int:
        """Global samples consumed (all DP ranks together)."""
        d = self.dataset
        b, j = d.step_of(self._micro)
        return self.phases.sample_start(b) + j * d.micro_batch * d.dp_size

    def state_dict(self) -> dict:
        d = self.dataset
        step, j = d.step_of(self._micro)
        return {"samples_consumed": self.samples_consumed, "global_batch": d.global_batch,
                "seed": self.samples.seed, "languages": list(self.languages), "step": step,
                "schedule_history": [[s, dict(f)] for s, f in self.phases.history]}

    def load_state_dict(self, state: dict, branch: bool = False) -> None:
        """Continue after state["samples_consumed"] global samples. branch=True (checkpoint.branch_from):
        the saved schedule history up to the saved step, then this loader's own phases."""
        from xlmr_mp.data.phases import RunPhases, same_phases
        d = self.dataset
        consumed = int(state["samples_consumed"])
        if state.get("seed", self.samples.seed) != self.samples.seed:
            raise ValueError(f"loader state has seed {state['seed']} but data.seed={self.samples.seed}; "
                             f"resume with the run's seed")
        if state.get("languages", self.languages) != list(self.languages):
            raise ValueError("loader state was saved with another language list (data.languages/data.path)")
        saved = state.get("schedule_history")
        if saved is None:    # a checkpoint from before phases: a static run with this loader's batch
            saved = [[0, dict(self.fields, global_batch=state.get("global_batch", d.global_batch))]]
        saved = [(int(s), dict(f)) for s, f in saved]
        if branch:
            step = int(state.get("step", RunPhases(saved).batch.step_of_sample(consumed)[0]))
            if RunPhases(saved).sample_start(step) != consumed:
                raise ValueError(f"cannot branch at samples_consumed={consumed}: not the start of step {step}; "
                                 f"branch from a checkpoint saved at the end of a step")
            history = [h for h in saved if h[0] < step] + [(step, self.fields)]
        else:
            if not same_phases(saved[-1][1], self.fields):
                raise ValueError("the schedule options (data.alpha/alpha_schedule/language_schedule/mask_schedule, "
                                 "train.global_batch/batch_warmup) differ from the checkpoint's; to change them "
                                 "from this step on start a new run with checkpoint.branch_from=<checkpoint>")
            history = saved[:-1] + [(saved[-1][0], self.fields)]
        if [(s, f) for s, f in history] != [(s, f) for s, f in self.phases.history]:
            self._build(RunPhases(history))
            d = self.dataset
        step, off = self.phases.batch.step_of_sample(consumed)
        unit = d.micro_batch * d.dp_size
        if off % unit:
            raise ValueError(f"cannot resume at samples_consumed={consumed}: not a micro-batch boundary of "
                             f"global_batch={self.phases.global_batch(step)}, micro_batch={d.micro_batch}, "
                             f"DP={d.dp_size}; resume with the saved layout or from a global-batch boundary")
        self._micro = d.micro_index(step, off // unit)
        self._close()

    def _close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when collected

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._it is None:
            if self.cfg.num_workers == 0:
                self._it = (self.dataset[m] for m in itertools.count(self._micro))
            else:
                self._it = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_size=None, sampler=_CountFrom(self._micro),
                    num_workers=self.cfg.num_workers, worker_init_fn=_worker_init, prefetch_factor=4))
        batch = next(self._it)
        self._micro += 1
        return batch


class ValidationLoader:
    """Per-language validation batches: one language's valid split in block order, fixed masking.

    `batches(lang)` yields this DP rank's batches (every dp_size-th batch of `batch_size` blocks;
    the last may be shorter), each with `masked_chars` when char_lengths (or cfg.tokenizer) is known.
    """

    def __init__(self, cfg: DataConfig, vocab_size: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 mask_id: Optional[int] = None, split: str = "valid", corpus: Optional[MultilingualCorpus] = None,
                 char_lengths: Optional[np.ndarray] = None, is_word_start: Optional[np.ndarray] = None):
        if corpus is None:  # languages whose split is empty are left out
            corpus = MultilingualCorpus(cfg.path, split, cfg.seq_length - 1, cfg.languages, cfg.break_mode,
                                        drop_empty=True, cache=cfg.block_cache)
        if char_lengths is None and cfg.tokenizer:
            ws, char_lengths = sentencepiece_tables(cfg.tokenizer, vocab_size)
            is_word_start = ws if is_word_start is None else is_word_start
        self.corpus, self.cfg, self.batch_size = corpus, cfg, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.masker = make_masker(cfg, vocab_size, mask_id, is_word_start)
        self.char_lengths = char_lengths
        self.languages = corpus.languages

    def num_batches(self, lang: str) -> int:
        return math.ceil(len(self.corpus.datasets[self.languages.index(lang)]) / self.batch_size)

    def batches(self, lang: str, max_batches: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        if lang not in self.languages:
            raise KeyError(f"no {self.corpus.split} split for language {lang!r} (have {self.languages})")
        i = self.languages.index(lang)
        ds = self.corpus.datasets[i]
        n = self.num_batches(lang) if max_batches is None else min(max_batches, self.num_batches(lang))
        for k in range(self.dp_rank, n, self.dp_size):
            ids = range(k * self.batch_size, min(len(ds), (k + 1) * self.batch_size))
            yield collate([ds.block(j) for j in ids], [sample_key(self.cfg.seed, i, 0, j) for j in ids],
                          [i] * len(ids), self.masker, self.cfg.seq_length, self.char_lengths)


def bits_per_char(total_nll_nats: float, total_chars: int) -> float:
    """Bits per character of the masked text: summed masked-token NLL (nats) / ln 2 / its characters."""
    return float(total_nll_nats) / math.log(2) / max(int(total_chars), 1)


def build_train_loader(run_cfg, dp_rank: int, dp_size: int, path: Optional[str] = None,
                       corpus=None) -> MLMLoader:
    """MLMLoader from a RunConfig (data.*, train.micro_batch/global_batch, model.vocab_size); `corpus`:
    an opened corpus instead of data.path (the dry run's xlmr_mp.dry_run.SyntheticCorpus)."""
    cfg = run_cfg.data if corpus is not None else _with_path(run_cfg.data, path)
    vocab = _checked_vocab(run_cfg)
    return MLMLoader(cfg, dp_rank, dp_size, run_cfg.train.micro_batch, run_cfg.train.global_batch, vocab,
                     corpus=corpus, batch_warmup=run_cfg.train.batch_warmup)


def build_validation_loader(run_cfg, dp_rank: int, dp_size: int, batch_size: Optional[int] = None,
                            path: Optional[str] = None) -> ValidationLoader:
    """ValidationLoader from a RunConfig (batch size defaults to train.micro_batch)."""
    cfg = _with_path(run_cfg.data, path)
    return ValidationLoader(cfg, _checked_vocab(run_cfg), batch_size or run_cfg.train.micro_batch, dp_rank, dp_size)


def _with_path(cfg: DataConfig, path: Optional[str]) -> DataConfig:
    import dataclasses
    cfg = dataclasses.replace(cfg, path=path) if path else cfg
    if not cfg.path:
        raise ValueError("data.path is empty: set it to the output directory of tools/preprocess_data.py")
    return cfg


def _checked_vocab(run_cfg) -> int:
    vocab = int(run_cfg.model.vocab_size)
    if run_cfg.data.tokenizer:
        from xlmr_mp.tokenizer import XLMRTokenizer
        n = XLMRTokenizer(run_cfg.data.tokenizer).vocab_size
        if n != vocab:
            raise ValueError(f"model.vocab_size={vocab} but data.tokenizer={run_cfg.data.tokenizer} has {n} ids: "
                             f"set model.vocab_size={n} or leave it out (it is inferred from data.tokenizer)")
    return vocab
