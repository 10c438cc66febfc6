"""Packing sentences into blocks (fairseq 'complete' / 'complete_doc'), C++ == Python reference,
and the per-language packed dataset over megatron-core IndexedDatasets."""
import os

import numpy as np
import pytest

from tests.support.corpus import write_corpus
from xlmr_mp.data.blend import have_cpp
from xlmr_mp.data.dataset import MultilingualCorpus, PackedLanguageDataset
from xlmr_mp.data.packing import pack_blocks, pack_blocks_reference


def _random_sentences(seed, n=3000, max_len=70):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_len, n)
    sizes[rng.integers(0, n, 30)] = rng.integers(100, 300, 30)  # some longer than a block
    cuts = np.sort(rng.choice(np.arange(1, n), n // 7, replace=False))
    return sizes, np.concatenate([[0], cuts, [n]])


@pytest.mark.parametrize("mode", ["complete", "complete_doc"])
@pytest.mark.parametrize("block", [1, 63, 127])
def test_properties_and_cpp_equals_reference(mode, block):
    sizes, docs = _random_sentences(block)
    starts, lengths = pack_blocks_reference(sizes, docs, block, mode)
    if have_cpp():
        s2, l2 = pack_blocks(sizes, docs, block, mode, use_cpp=True)
        np.testing.assert_array_equal(starts, s2); np.testing.assert_array_equal(lengths, l2)
    assert lengths.max() <= block and lengths.min() >= 1
    # every token covered exactly once, in order
    assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(lengths)[:-1])
    assert lengths.sum() == sizes.sum()
    sent_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sent_ends = np.cumsum(sizes)
    block_ends = starts + lengths
    # a sentence that fits a block is never split: no block boundary strictly inside it
    inside = np.searchsorted(block_ends, sent_starts, side="right")
    for s in np.nonzero(sizes <= block)[0][:2000]:
        j = inside[s]
        assert block_ends[j] >= sent_ends[s], f"sentence {s} split"
    # greedy: the next sentence would not have fit (unless the block is a split piece)
    if mode == "complete_doc":  # no block crosses a document boundary
        doc_tok = np.cumsum(sizes)[docs[1:-1] - 1]
        assert np.all(np.isin(doc_tok, block_ends))


def test_long_sentence_is_split_and_tail_joins_next():
    starts, lengths = pack_blocks_reference([3, 10, 2], [0, 3], 4)
    assert lengths.tolist() == [3, 4, 4, 4]  # [s0] [s1 0:4] [s1 4:8] [s1 8:10 + s2]
    assert starts.tolist() == [0, 3, 7, 11]


def test_bad_options():
    with pytest.raises(ValueError, match="break_mode"):
        pack_blocks([1], [0, 1], 4, "eos")
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([1], [0, 1], 0)


def test_packed_dataset_blocks_are_complete_sentences(tmp_path):
    docs = write_corpus(str(tmp_path), {"xx": 40}, splits=("train",))[("xx", "train")]
    flat = [s for d in docs for s in d]
    ds = PackedLanguageDataset(str(tmp_path / "xx" / "train"), 63)
    assert ds.num_sentences == len(flat) and ds.num_tokens == sum(len(s) for s in flat)
    got = np.concatenate([ds.block(i) for i in range(len(ds))])
    np.testing.assert_array_equal(got, np.concatenate(flat))
    for i in range(len(ds)):
        b = ds.block(i)
        assert 1 <= len(b) <= 63 and b[-1] == 2  # sentences (max 40 tokens) are never split here
    corpus = MultilingualCorpus(str(tmp_path), "train", 63)
    assert corpus.languages == ["xx"] and corpus.sizes("sentences")[0] == len(flat)


def test_block_cache_is_reused_and_invalidated(tmp_path):
    write_corpus(str(tmp_path), {"xx": 30}, splits=("train",), seed=3)
    prefix = str(tmp_path / "xx" / "train")
    built = PackedLanguageDataset(prefix, 31)
    cache = prefix + ".blocks-31-complete.npy"
    assert os.path.isfile(cache) and os.path.isfile(cache[:-4] + ".json")
    assert not isinstance(built.bounds, np.memmap)
    loaded = PackedLanguageDataset(prefix, 31)
    assert isinstance(loaded.bounds, np.memmap) and len(loaded) == len(built)
    assert (loaded.num_tokens, loaded.num_sentences) == (built.num_tokens, built.num_sentences)
    assert all(np.array_equal(loaded.block(i), built.block(i)) for i in range(len(built)))
    import pickle
    clone = pickle.loads(pickle.dumps(loaded))  # what a spawned worker gets: re-opens the memmaps
    assert clone._bounds is None and np.array_equal(clone.block(len(built) - 1), built.block(len(built) - 1))
    write_corpus(str(tmp_path), {"xx": 12}, splits=("train",), seed=4)  # data rebuilt: cache is stale
    fresh = PackedLanguageDataset(prefix, 31)
    nocache = PackedLanguageDataset(prefix, 31, cache=False)
    assert len(fresh) == len(nocache) != len(built)
    assert all(np.array_equal(fresh.block(i), nocache.block(i)) for i in range(len(fresh)))


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        MultilingualCorpus(str(tmp_path / "nope"), "train", 63)
    write_corpus(str(tmp_path), {"xx": 3}, splits=("train",))
    with pytest.raises(FileNotFoundError, match="zz"):
        MultilingualCorpus(str(tmp_path), "train", 63, languages=["xx", "zz"])
    with open(tmp_path / "xx" / "train.bin", "r+b") as f:  # truncated .bin
        f.truncate(8)
    with pytest.raises(ValueError, match="incomplete or mismatched"):
        PackedLanguageDataset(str(tmp_path / "xx" / "train"), 63)
    with open(tmp_path / "xx" / "train.idx", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="not a valid megatron-core"):
        PackedLanguageDataset(str(tmp_path / "xx" / "train"), 63)
    os.remove(tmp_path / "xx" / "train.bin")
    with pytest.raises(FileNotFoundError, match="train.bin"):
        PackedLanguageDataset(str(tmp_path / "xx" / "train"), 63)


def test_empty_split_is_dropped_for_validation_only(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    write_corpus(str(tmp_path), {"xx": 5, "yy": 5}, splits=("train", "valid"))
    b = IndexedDatasetBuilder(str(tmp_path / "yy" / "valid.bin"), dtype=np.uint16)
    b.finalize(str(tmp_path / "yy" / "valid.idx"))  # a small language with no validation documents
    assert len(PackedLanguageDataset(str(tmp_path / "yy" / "valid"), 63)) == 0
    with pytest.raises(ValueError, match="empty valid split"):
        MultilingualCorpus(str(tmp_path), "valid", 63)
    assert MultilingualCorpus(str(tmp_path), "valid", 63, drop_empty=True).languages == ["xx"]
