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

Resume: `state_dict()` -> {"samples_consumed": global samples consumed by all DP ranks together,
...}; `load_state_dict()` continues from there (the next batch is bitwise the one that would have
followed). At a global-batch boundary the DP size and micro batch may change on resume.

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

from xlmr_mp.data.blend import BlendSpec, blend_window, sampling_weights
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
            seq_length: int, char_lengths: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
    """`<s>` + block, masked with its key, padded to seq_length -> the shared batch dict."""
    n = len(blocks)
    ids = np.full((n, seq_length), PAD_ID, dtype=np.int64)
    labels = np.full((n, seq_length), IGNORE_INDEX, dtype=np.int64)
    attn = np.zeros((n, seq_length), dtype=np.int64)
    chars = np.zeros(n, dtype=np.int64)
    for r, (block, key) in enumerate(zip(blocks, keys)):
        if len(block) >= seq_length:
            raise ValueError(f"block of {len(block)} tokens does not fit seq_length={seq_length} with <s>")
        seq = np.concatenate([[BOS_ID], block])
        masked, lab = masker(seq, key)
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
    [start, start + count). Picklable (worker processes re-open the token files)."""

    def __init__(self, corpus: MultilingualCorpus, cfg: DataConfig, masker: Masker, seed: int):
        self.corpus, self.masker, self.seed = corpus, masker, int(seed)
        self.seq_length = cfg.seq_length
        self.q = sampling_weights(corpus.sizes(cfg.share_unit), cfg.alpha)
        self.spec = BlendSpec(self.q, corpus.num_blocks(), self.seed)

    def indices(self, start: int, count: int):
        """(language, block, pass) int64 arrays of positions [start, start + count)."""
        lang, block, epoch = blend_window(self.spec, start, count, with_epoch=True)
        return lang.astype(np.int64), block.astype(np.int64), epoch

    def batch(self, start: int, count: int) -> Dict[str, torch.Tensor]:
        lang, block, epoch = self.indices(start, count)
        ds = self.corpus.datasets
        blocks = [ds[i].block(j) for i, j in zip(lang.tolist(), block.tolist())]
        keys = [sample_key(self.seed, i, e, j) for i, e, j in zip(lang.tolist(), epoch.tolist(), block.tolist())]
        return collate(blocks, keys, lang, self.masker, self.seq_length)


class _MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset: micro-batch index m of one DP rank -> its batch dict."""

    def __init__(self, samples: BlendedSamples, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int):
        self.samples, self.dp_rank, self.dp_size = samples, dp_rank, dp_size
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.accumulation = global_batch // (micro_batch * dp_size)

    def start_of(self, m: int) -> int:
        b, j = divmod(m, self.accumulation)
        return b * self.global_batch + self.dp_rank * (self.global_batch // self.dp_size) + j * self.micro_batch

    def __getitem__(self, m: int) -> Dict[str, torch.Tensor]:
        return self.samples.batch(self.start_of(int(m)), self.micro_batch)

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
                 is_word_start: Optional[np.ndarray] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"MLMLoader: dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"train.global_batch={global_batch} is not divisible by train.micro_batch="
                             f"{micro_batch} x DP {dp_size}; change train.global_batch or train.micro_batch")
        self.cfg = cfg
        if corpus is None:
            corpus = MultilingualCorpus(cfg.path, split, cfg.seq_length - 1, cfg.languages, cfg.break_mode,
                                        cache=cfg.block_cache)
        masker = make_masker(cfg, vocab_size, mask_id, is_word_start)
        self.samples = BlendedSamples(corpus, cfg, masker, cfg.seed if seed is None else seed)
        self.dataset = _MicroBatches(self.samples, dp_rank, dp_size, micro_batch, global_batch)
        self.languages = corpus.languages
        self.q = self.samples.q
        self._micro = 0
        self._it: Optional[Iterator] = None

    @property
    def accumulation_steps(self) -> int:
        return self.dataset.accumulation

    @property
    def samples_consumed(self) -> int:
        """Global samples consumed (all DP ranks together)."""
        d = self.dataset
        b, j = divmod(self._micro, d.accumulation)
        return b * d.global_batch + j * d.micro_batch * d.dp_size

    def state_dict(self) -> dict:
        d = self.dataset
        return {"samples_consumed": self.samples_consumed, "global_batch": d.global_batch,
                "seed": self.samples.seed, "languages": list(self.languages)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after state["samples_consumed"] global samples."""
        d = self.dataset
        consumed = int(state["samples_consumed"])
        if state.get("seed", self.samples.seed) != self.samples.seed:
            raise ValueError(f"loader state has seed {state['seed']} but data.seed={self.samples.seed}; "
                             f"resume with the run's seed")
        if state.get("languages", self.languages) != list(self.languages):
            raise ValueError("loader state was saved with another language list (data.languages/data.path)")
        b, rem = divmod(consumed, d.global_batch)
        if rem % (d.micro_batch * d.dp_size) or state.get("global_batch", d.global_batch) != d.global_batch:
            raise ValueError(f"cannot resume at samples_consumed={consumed}: not a micro-batch boundary of "
                             f"global_batch={d.global_batch}, micro_batch={d.micro_batch}, DP={d.dp_size}; "
                             f"resume with the saved layout or from a global-batch boundary")
        self._micro = b * d.accumulation + rem // (d.micro_batch * d.dp_size)
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


def build_train_loader(run_cfg, dp_rank: int, dp_size: int, path: Optional[str] = None) -> MLMLoader:
    """MLMLoader from a RunConfig (data.*, train.micro_batch/global_batch, model.vocab_size)."""
    cfg = _with_path(run_cfg.data, path)
    vocab = _checked_vocab(run_cfg)
    return MLMLoader(cfg, dp_rank, dp_size, run_cfg.train.micro_batch, run_cfg.train.global_batch, vocab)


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
