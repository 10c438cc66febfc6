"""XLM-R dynamic masking: a pure function of (seed, language, pass, block).

Of the maskable tokens of a sequence, mask_prob (15%) are selected (count rounded
probabilistically, as fairseq's MaskTokensDataset); each selected token becomes `<mask>` with
probability mask_replace_prob (80%), a random non-special token with random_replace_prob (10%),
and stays unchanged otherwise (10%). Labels hold the original id at selected positions, -100
elsewhere. Special tokens (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`) are never selected:
`<unk>` carries nothing to predict. Random replacements are drawn from the non-special ids
[4, mask_id). The random stream is Philox keyed by a hash of (seed, language, pass, block), so
every pass over a block masks it differently and any sample can be regenerated on its own.

Options: whole-word masking (`is_word_start[id]` table: pieces starting with SentencePiece's
'\u2581'; a word = a word-start token and the non-start tokens after it) selects whole words;
span masking selects runs of units (tokens, or words with whole-word masking) with geometric
lengths of mean span_mean_length until mask_prob of the units are selected.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from xlmr_mp.data.blend import mix64
from xlmr_mp.ids import IGNORE_INDEX, NUM_SPECIAL  # noqa: F401 (re-exported)

WORD_START = "\u2581"


def sample_key(seed: int, lang: int, epoch: int, block: int) -> int:
    """128-bit Philox key of one sample (seed, language, pass over the language, block)."""
    m = (1 << 64) - 1
    h = mix64(mix64(mix64(int(lang) & m) ^ (int(epoch) & m)) ^ (int(block) & m))
    return (mix64(int(seed) & m) << 64) | h


class Masker:
    """Masks token sequences; see the module docstring. `vocab_size` = dictionary size (mask_id + 1)."""

    def __init__(self, vocab_size: int, mask_id: int, mask_prob: float = 0.15,
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                 whole_word_mask: bool = False, span_mask: bool = False, span_mean_length: float = 3.0,
                 is_word_start: Optional[np.ndarray] = None):
        if not NUM_SPECIAL < mask_id < vocab_size:
            raise ValueError(f"Masker: mask_id={mask_id} must be in ({NUM_SPECIAL}, vocab_size={vocab_size})")
        if whole_word_mask:
            if is_word_start is None:
                raise ValueError("data.whole_word_mask=true needs data.tokenizer (the SentencePiece "
                                 "model) to know which pieces start a word")
            is_word_start = np.asarray(is_word_start, dtype=bool)
            if len(is_word_start) < vocab_size:
                raise ValueError(f"is_word_start has {len(is_word_start)} entries < vocab_size={vocab_size}")
        if span_mask and span_mean_length < 1:
            raise ValueError(f"data.span_mean_length={span_mean_length} must be >= 1")
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.mask_prob, self.mask_replace_prob, self.random_replace_prob = mask_prob, mask_replace_prob, random_replace_prob
        self.whole_word_mask, self.span_mask, self.span_mean_length = whole_word_mask, span_mask, span_mean_length
        self.is_word_start = is_word_start

    def _rng(self, key: int) -> np.random.Generator:
        """Generator(Philox(key=key)) at counter 0: one bit generator re-keyed per call rather than a new
        Generator per sample (the cheaper of the two: bench/results/README.md)."""
        if getattr(self, "_bitgen", None) is None:
            self._bitgen = np.random.Philox(key=0)
            self._gen = np.random.Generator(self._bitgen)
            self._state = self._bitgen.state
        st = self._state
        st["state"]["key"] = np.array([key & ((1 << 64) - 1), key >> 64], dtype=np.uint64)
        st["state"]["counter"] = np.zeros(4, dtype=np.uint64)
        st["buffer_pos"], st["has_uint32"], st["uinteger"] = 4, 0, 0
        self._bitgen.state = st
        return self._gen

    def maskable(self, tokens: np.ndarray) -> np.ndarray:
        """Positions that may be masked: every non-special token."""
        return (tokens >= NUM_SPECIAL) & (tokens != self.mask_id) & (tokens < self.vocab_size)

    def __call__(self, tokens: np.ndarray, key: int, mask_prob: Optional[float] = None):
        """tokens int64 [S] -> (masked input int64 [S], labels int64 [S]); a pure function of key
        (and of mask_prob, which defaults to self.mask_prob: data.mask_schedule passes the step's)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        mask_prob = self.mask_prob if mask_prob is None else mask_prob
        rng = self._rng(key)
        cand = np.nonzero(self.maskable(tokens))[0]
        # units: groups of candidate positions masked together (tokens, or whole words)
        if self.whole_word_mask and len(cand):
            starts = self.is_word_start[tokens[cand]]
            starts[0] = True
            starts[1:] |= np.diff(cand) > 1  # a special token between two candidates ends a word
            unit_of = np.cumsum(starts) - 1
            n_units = int(unit_of[-1]) + 1
        else:
            unit_of = np.arange(len(cand))
            n_units = len(cand)
        budget = int(mask_prob * n_units + rng.random())
        if self.span_mask:
            chosen_units = self._spans(rng, n_units, budget)
        else:
            chosen_units = np.zeros(n_units, dtype=bool)
            chosen_units[rng.choice(n_units, budget, replace=False)] = True
        pos = cand[chosen_units[unit_of]] if n_units else cand
        labels = np.full_like(tokens, IGNORE_INDEX)
        labels[pos] = tokens[pos]
        out = tokens.copy()
        u = rng.random(len(pos))
        to_mask = u < self.mask_replace_prob
        to_rand = (u >= self.mask_replace_prob) & (u < self.mask_replace_prob + self.random_replace_prob)
        out[pos[to_mask]] = self.mask_id
        out[pos[to_rand]] = rng.integers(NUM_SPECIAL, self.mask_id, int(to_rand.sum()))
        return out, labels

    def _spans(self, rng: np.random.Generator, n_units: int, budget: int) -> np.ndarray:
        chosen = np.zeros(n_units, dtype=bool)
        done, tries = 0, 0
        p = 1.0 / self.span_mean_length
        while done < budget and tries < 4 * budget + 16:
            tries += 1
            length = min(int(rng.geometric(p)), budget - done)
            start = int(rng.integers(0, n_units))
            seg = chosen[start:start + length]
            done += int((~seg).sum())
            seg[:] = True
        return chosen


def sentencepiece_tables(sp_model: str, vocab_size: Optional[int] = None):
    """(is_word_start bool[V], char_length int32[V]) over dictionary ids of the tokenizer at sp_model
    (P.model, with P.dict.txt beside it when present), built by the tokenizer from its own dictionary
    (XLMRTokenizer.word_start_table / char_length_table), so they agree with the preprocessed ids."""
    from xlmr_mp.tokenizer import XLMRTokenizer
    tok = XLMRTokenizer(sp_model)
    return tok.word_start_table(vocab_size), tok.char_length_table(vocab_size)
