"""Which split (train / valid / test) a document goes to: a keyed hash of its first sentence
against cumulative fractions. Position-, worker- and rank-independent, so tools/preprocess_data.py
writes the same datasets for any --workers or MPI size, and the tiny corpus can check that every
language gets a validation document under the preprocessor's defaults."""
from __future__ import annotations

import bisect
import hashlib

import numpy as np

from xlmr_mp.data.corpus_io import CorpusError

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = "98,1,1"     # tools/preprocess_data.py --split
DEFAULT_SEED = 1234          # tools/preprocess_data.py --seed


def parse_split(text: str) -> np.ndarray:
    """'98,1,1' -> cumulative fractions [0.98, 0.99, 1.0]."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise CorpusError(f"--split {text!r}: expected three numbers like 98,1,1") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise CorpusError(f"--split {text!r}: expected three non-negative numbers like 98,1,1")
    c = np.cumsum(parts) / sum(parts)
    c[-1] = 1.0
    return c


def document_split(first_sentence: str, seed: int, cumulative) -> int:
    """Split index (0 train, 1 valid, 2 test) of a document, from a keyed hash of its first sentence."""
    h = hashlib.blake2b(first_sentence.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    u = int.from_bytes(h, "little") / 2.0 ** 64
    return min(bisect.bisect_right(cumulative, u), 2)
