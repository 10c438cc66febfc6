"""Tiny per-language IndexedDatasets for the data-pipeline tests (written with megatron-core)."""
import os

import numpy as np
import torch


def write_language(prefix: str, n_docs: int, rng: np.random.Generator, vocab_size: int,
                   max_len: int = 40, dtype=np.uint16):
    """Random documents of random sentences ending in </s> (2), ids in [4, vocab-2]; returns them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.integers(1, max_len))
            sent = np.concatenate([rng.integers(4, vocab_size - 1, n), [2]]).astype(np.int64)
            builder.add_item(torch.from_numpy(sent))
            doc.append(sent)
        builder.end_document()
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


def write_corpus(root: str, docs_per_lang: dict, vocab_size: int = 1000, seed: int = 0, max_len: int = 40,
                 splits=("train", "valid")):
    """root/<lang>/<split>.{bin,idx} for each language with the given number of documents."""
    rng = np.random.default_rng(seed)
    out = {}
    for lang, n in docs_per_lang.items():
        for split in splits:
            d = write_language(os.path.join(root, lang, split), n if split == "train" else max(2, n // 10),
                               rng, vocab_size, max_len)
            out[(lang, split)] = d
    return out
