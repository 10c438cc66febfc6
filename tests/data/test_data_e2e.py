"""End to end with the project's preprocessing tools: tiny corpus -> tools/train_spm.py ->
tools/preprocess_data.py -> the MLM loader (whole-word masking, language mix from the real token
counts) and per-language validation with character counts."""
import numpy as np
import pytest
import torch

from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus

LANGS = ["en", "fr", "zh", "ur", "sw"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    make_tiny_corpus(d / "corpus", languages=LANGS, scale=0.5)
    model = train_tiny_spm(d / "corpus", d / "spm", vocab_size=800)
    run_tool("preprocess_data", "--input", d / "corpus", "--tokenizer", model, "--output-dir", d / "out",
             "--split", "90,10,0", "--workers", 1, "--quiet")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    return dict(out=str(d / "out"), model=model, sp=sp, vocab=sp.get_piece_size() + 2)


def _run_config(prepared, *extra):
    from xlmr_mp.config import load_config
    return load_config("preset:tiny", [f"data.path={prepared['out']}", f"data.tokenizer={prepared['model']}",
                                                    f"model.vocab_size={prepared['vocab']}", *extra])


def test_train_loader_on_preprocessed_data(prepared):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from xlmr_mp.data.blend import sampling_weights
    from xlmr_mp.data.loader import build_train_loader
    cfg = _run_config(prepared, "data.whole_word_mask=true", "train.global_batch=32", "train.micro_batch=16")
    loader = build_train_loader(cfg, 0, 1)
    assert loader.languages == sorted(LANGS)
    tokens = []
    for lang in loader.languages:
        ds = IndexedDataset(f"{prepared['out']}/{lang}/train")  # keep it alive while reading its index
        tokens.append(int(ds.sequence_lengths.sum()))
        del ds
    np.testing.assert_allclose(loader.q, sampling_weights(tokens, 0.3))
    sp, V = prepared["sp"], prepared["vocab"]
    is_start = np.array([False] * 4 + [sp.id_to_piece(i).startswith("\u2581") for i in range(3, V - 2)] + [False])
    counts = np.zeros(len(LANGS))
    for _ in range(20):
        b = next(loader)
        counts += np.bincount(b["lang"].numpy(), minlength=len(LANGS))
        ids, lab, att = b["input_ids"], b["labels"], b["attention_mask"]
        orig = torch.where(lab != -100, lab, ids)
        for r in range(ids.shape[0]):
            n = int(att[r].sum())
            seq = orig[r, :n].numpy()
            assert seq[0] == 0 and np.all(seq[1:] != 0)
            assert seq[-1] == 2 or n == cfg.data.seq_length  # only a split long sentence fills a block
            assert sp.decode([int(t) - 1 for t in seq if 3 < t < V - 1]).strip()  # real text
            sel = (lab[r, :n] != -100).numpy()
            for p in range(2, n):  # whole words: a continuation piece shares its word's fate
                if seq[p] > 3 and seq[p - 1] > 3 and not is_start[seq[p]]:
                    assert sel[p] == sel[p - 1]
    assert np.abs(counts / counts.sum() - loader.q).max() * counts.sum() <= 2.0


def test_validation_per_language_with_chars(prepared):
    from xlmr_mp.data.loader import build_validation_loader
    cfg = _run_config(prepared)
    val = build_validation_loader(cfg, 0, 1, batch_size=4)
    assert set(val.languages) <= set(LANGS) and val.languages
    sp = prepared["sp"]
    for lang in val.languages:
        total = 0
        for b in val.batches(lang):
            lab = b["labels"]
            ids = [int(t) - 1 for t in lab[lab != -100]]
            # a byte-fallback piece counts as a character when it starts a UTF-8 sequence
            want = sum((not 0x80 <= int(sp.id_to_piece(i)[1:-1], 16) <= 0xBF) if sp.is_byte(i)
                       else len(sp.id_to_piece(i)) for i in ids)
            assert int(b["masked_chars"].sum()) == want
            total += int(b["masked_chars"].sum())
            assert torch.all(b["lang"] == val.languages.index(lang))
        assert total > 0
