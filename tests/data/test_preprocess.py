"""tools/preprocess_data.py + merge_datasets.py + the MMIDIDX writer + streaming corpus readers."""
import filecmp
import gzip
import json
import lzma
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from tests.support.prep import run_tool, train_tiny_spm
from xlmr_mp.data.corpus_io import (CorpusError, RawChunk, align_range_start, iter_documents, iter_raw_chunks,
                                    parse_chunk)
from xlmr_mp.data.indexed import IndexedWriter, read_documents, read_index
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
from xlmr_mp.tokenizer import XLMRTokenizer

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    corpus = d / "corpus"
    make_tiny_corpus(corpus, languages=["en", "ru", "zh", "hi", "ur"], scale=0.6)
    model = train_tiny_spm(corpus, d / "spm", vocab_size=800)
    out = d / "out_w1"
    r = run_tool("preprocess_data", "--input", corpus, "--tokenizer", model, "--output-dir", out,
                 "--split", "80,10,10", "--workers", 1, "--quiet")
    return dict(dir=d, corpus=corpus, model=model, out=out, stdout=r.stdout)


def _files(out):
    res = []
    for root, _, names in os.walk(out):
        for n in names:
            res.append(os.path.relpath(os.path.join(root, n), out))
    return sorted(res)


def _same_tree(a, b):
    """Same datasets byte for byte, and the same per-language summary (timings aside)."""
    fa, fb = _files(a), _files(b)
    assert fa == fb
    for f in fa:
        if f == "preprocess_summary.json":
            ja, jb = (json.load(open(os.path.join(x, f))) for x in (a, b))
            assert ja["languages"] == jb["languages"]
            continue
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_roundtrip_with_megatron_reader(setup):
    """Decoding every document gives back the SentencePiece-normalised input, in its split."""
    from xlmr_mp.cli import preprocess_data
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tok = XLMRTokenizer(setup["model"])
    cumulative = preprocess_data.parse_split("80,10,10")
    for lang in ("en", "ru", "zh", "hi", "ur"):
        expect = {s: [] for s in SPLITS}
        for doc in iter_documents(os.path.join(setup["corpus"], f"{lang}.txt")):
            expect[SPLITS[preprocess_data.document_split(doc[0], 1234, cumulative)]].append(
                [tok.normalize(s) for s in doc])
        assert all(expect[s] for s in SPLITS), "tiny corpus should fill every split"
        for split in SPLITS:
            prefix = os.path.join(setup["out"], lang, split)
            ds = IndexedDataset(prefix)
            assert ds.index.dtype == np.uint16                     # vocab 802 < 65500
            docs_idx = ds.document_indices
            assert len(docs_idx) - 1 == len(expect[split])
            got = []
            for d in range(len(docs_idx) - 1):
                sents = [ds[i] for i in range(docs_idx[d], docs_idx[d + 1])]
                for s in sents:
                    assert s[-1] == 2 and 2 not in s[:-1] and 0 not in s and 1 not in s   # </s> ends each
                got.append([tok.decode(s) for s in sents])
            assert got == expect[split], (lang, split)


def test_summary_reports_counts_and_unknown_rate(setup):
    out = setup["stdout"]
    assert "unk%" in out and "TOTAL" in out and "MB/s" in out and "tokens/s" in out
    summary = json.load(open(os.path.join(setup["out"], "preprocess_summary.json")))
    en = summary["languages"]["en"]
    n_docs = len(list(iter_documents(os.path.join(setup["corpus"], "en.txt"))))
    assert sum(en["documents"]) == n_docs and en["sentences"] == 480
    _, lengths, _ = read_index(os.path.join(setup["out"], "en", "train"))
    total = sum(int(read_index(os.path.join(setup["out"], "en", s))[1].sum()) for s in SPLITS)
    assert en["tokens"] == total and en["unk"] == 0


@pytest.mark.parametrize("workers", [2, 3])
def test_byte_identical_for_any_worker_count_and_chunking(setup, tmp_path, workers):
    out2 = tmp_path / f"w{workers}"
    run_tool("preprocess_data", "--input", setup["corpus"], "--tokenizer", setup["model"], "--output-dir", out2,
             "--split", "80,10,10", "--workers", workers, "--chunk-bytes", 1500, "--quiet")
    _same_tree(setup["out"], out2)
    # the coordinating process and its helper pool both encoded chunks, and the output is still identical
    sched = json.load(open(out2 / "preprocess_summary.json"))["timing"]["sched"]
    assert sched["local_chunks"] > 0 and sched["pool_chunks"] > 0, sched


def test_raw_chunk_by_reference_rereads_the_same_bytes(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes("".join(f"line {i} ünï\n" + ("\n" if i % 3 == 0 else "") for i in range(200)).encode())
    chunks = list(iter_raw_chunks(str(p), chunk_bytes=100))
    assert len(chunks) > 10 and all(c.offset >= 0 for c in chunks)
    for c in chunks:
        ref = c.by_reference()
        assert ref.data == b"" and ref.length == len(c.data) and ref.first_line == c.first_line
        assert ref.loaded(str(p)).data == c.data and c.loaded(str(p)) is c
    assert b"".join(c.data for c in chunks) == p.read_bytes()
    gz = tmp_path / "x.txt.gz"
    with gzip.open(gz, "wb") as f:
        f.write(p.read_bytes())
    for c in iter_raw_chunks(str(gz), chunk_bytes=100):      # compressed input keeps its bytes
        assert c.offset == -1 and c.by_reference() is c
    short = chunks[-1].by_reference()
    p.write_bytes(b"truncated\n")
    with pytest.raises(CorpusError, match="changed while being read"):
        short.loaded(str(p))


def test_mpi_ranks_byte_identical(setup, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    out = tmp_path / "mpi"
    run_tool("preprocess_data", "--input", setup["corpus"], "--tokenizer", setup["model"], "--output-dir", out,
             "--split", "80,10,10", "--range-bytes", 4000, "--chunk-bytes", 2000, "--quiet",
             prefix=["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3"], timeout=240)
    _same_tree(setup["out"], out)


def test_compressed_and_jsonl_inputs_give_same_datasets(setup, tmp_path):
    src = setup["corpus"]
    inp = tmp_path / "in"
    inp.mkdir()
    docs = {l: list(iter_documents(os.path.join(src, f"{l}.txt"))) for l in ("en", "ru", "zh")}
    raw = {l: open(os.path.join(src, f"{l}.txt"), "rb").read() for l in docs}
    with gzip.open(inp / "en.txt.gz", "wb") as f:
        f.write(raw["en"])
    with lzma.open(inp / "ru.txt.xz", "wb") as f:
        f.write(raw["ru"])
    with lzma.open(inp / "zh.jsonl.xz", "wt", encoding="utf-8") as f:
        for d in docs["zh"]:
            f.write(json.dumps({"id": 1, "text": "\n".join(d)}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    run_tool("preprocess_data", "--input", inp, "--tokenizer", setup["model"], "--output-dir", out,
             "--split", "80,10,10", "--workers", 2, "--chunk-bytes", 3000, "--quiet")
    for lang in docs:
        for s in SPLITS:
            for ext in (".bin", ".idx"):
                a = os.path.join(setup["out"], lang, s + ext)
                assert filecmp.cmp(a, os.path.join(out, lang, s + ext), shallow=False), (lang, s, ext)


def _bad_corpus(tmp_path, bad_line_bytes, line_no=7):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [f"Sentence number {i} is fine." for i in range(1, 21)]
    with open(d / "en.txt", "wb") as f:
        for i, line in enumerate(lines, 1):
            f.write(bad_line_bytes if i == line_no else line.encode())
            f.write(b"\n" if i % 4 else b"\n\n")
    return d


def test_invalid_utf8_names_file_and_line_or_is_skipped(setup, tmp_path):
    d = _bad_corpus(tmp_path, b"caf\xe9 au lait")
    # sentence 7 is on line 8 of the file (blank lines count): 1-4, blank 5, 6, 7, 8
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 check=False)
    assert r.returncode == 2
    assert "en.txt:8" in r.stderr and "UTF-8" in r.stderr and "--on-bad-line skip" in r.stderr
    # the same from chunks that helper processes re-read by offset (1 KiB chunks: many go to the pool)
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "en.txt", "wb") as f:
        for i in range(1, 401):
            f.write(b"caf\xe9 au lait\n" if i == 333 else f"Line {i} is fine enough.\n".encode())
    r = run_tool("preprocess_data", "--input", big, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 "--workers", 3, "--chunk-bytes", 1024, check=False)
    assert r.returncode == 2 and "en.txt:333" in r.stderr and "UTF-8" in r.stderr
    assert not os.path.exists(out / "en" / "train.idx") and not os.path.exists(out / "en" / "train.bin")
    assert not os.path.exists(out) or not [f for f in _files(out) if ".tmp" in f]
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 "--on-bad-line", "skip", "--split", "1,0,0")
    summary = json.load(open(out / "preprocess_summary.json"))["languages"]["en"]
    assert summary["skipped"] == 1 and summary["skipped_examples"][0][0] == 8
    assert summary["sentences"] == 19 and "skipped line 8" in r.stdout


def test_megabyte_line_is_reported_without_reading_it_whole(setup, tmp_path):
    d = _bad_corpus(tmp_path, b"x" * (3 << 20), line_no=10)
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 "--max-line-bytes", 100000, check=False)
    assert r.returncode == 2 and "en.txt:12" in r.stderr and "--max-line-bytes" in r.stderr
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 "--max-line-bytes", 100000, "--on-bad-line", "skip", "--split", "1,0,0")
    summary = json.load(open(out / "preprocess_summary.json"))["languages"]["en"]
    assert summary["skipped"] == 1 and summary["sentences"] == 19 and summary["skipped_examples"][0][0] == 12
    # the reader never holds the long line: peak memory stays near the chunk size
    tracemalloc.start()
    n = 0
    for raw in iter_raw_chunks(str(d / "en.txt"), chunk_bytes=1 << 16, max_line_bytes=100000, on_bad_line="skip"):
        n += len(parse_chunk(raw, "en.txt", on_bad_line="skip", max_line_bytes=100000).sentences)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 19 and peak < 1 << 20, peak


def test_missing_and_empty_language_files(setup, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "en.txt").write_text("Hello there.\n")
    (d / "fr.txt").write_text("")
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", tmp_path / "o",
                 "--languages", "en,de", check=False)
    assert r.returncode == 2 and "de" in r.stderr and "no file for language" in r.stderr
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", tmp_path / "o",
                 check=False)
    assert r.returncode == 2 and "fr.txt" in r.stderr and "empty" in r.stderr
    (d / "fr.txt").write_text("\n  \n\n")
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", tmp_path / "o",
                 "--languages", "fr", check=False)
    assert r.returncode == 2 and "fr.txt" in r.stderr and "no documents" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "fr" / "train.idx")
    r = run_tool("preprocess_data", "--input", tmp_path / "nope", "--tokenizer", setup["model"],
                 "--output-dir", tmp_path / "o", check=False)
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_failed_rerun_removes_stale_complete_pair(setup, tmp_path):
    d = _bad_corpus(tmp_path, b"fine line", line_no=3)
    out = tmp_path / "out"
    run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet")
    assert os.path.exists(out / "en" / "train.idx")
    with open(d / "en.txt", "ab") as f:
        f.write(b"bad \xff byte\n")
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 check=False)
    assert r.returncode == 2 and "en.txt:26" in r.stderr
    assert not any(f.startswith("en/") for f in _files(out)), _files(out)


def test_chunking_does_not_change_documents(tmp_path):
    text = b"a1\na2\n\n\n b1 \n\nc1\nc2\nc3\n  \nd1" + b"\n" * 3 + b"e1\n"
    p = tmp_path / "x.txt"
    p.write_bytes(text)
    ref = [["a1", "a2"], ["b1"], ["c1", "c2", "c3"], ["d1"], ["e1"]]
    for cb in (1024, 3, 4, 5, 7, 11):
        assert list(iter_documents(str(p), chunk_bytes=cb)) == ref, cb
    # range starts land after a blank line, so ranges hold whole documents
    starts = sorted({align_range_start(str(p), o, "txt") for o in range(len(text))})
    assert starts[0] == 0 and starts[-1] == len(text) and len(starts) >= 4
    for a in starts[1:-1]:
        assert text[:a].split(b"\n")[-2].strip() == b"", a      # the line before a is blank
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "s1\\ns2"}\n\n{"text": "t1"}\n', encoding="utf-8")
    assert list(iter_documents(str(j), chunk_bytes=5)) == [["s1", "s2"], ["t1"]]
    with pytest.raises(CorpusError, match=r"x.jsonl:2"):
        j.write_text('{"text": "s1"}\n{"txt": "t1"}\n', encoding="utf-8")
        list(iter_documents(str(j)))
    parsed = parse_chunk(RawChunk(b"\n\nq\n", 5), "f.txt")
    assert parsed.sentences == ["q"] and parsed.doc_start == [True] and not parsed.trailing_break


def test_indexed_writer_matches_megatron_builder_and_merges(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from xlmr_mp.cli.merge_datasets import merge_datasets
    rng = np.random.default_rng(0)
    docs = [[rng.integers(3, 70000, size=rng.integers(1, 9)) for _ in range(rng.integers(1, 5))] for _ in range(30)]
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.int32)
    for doc in docs:
        b.add_document(torch.tensor(np.concatenate(doc)), [len(s) for s in doc])
    b.finalize(str(tmp_path / "ref.idx"))
    parts = []
    for k, (lo, hi) in enumerate([(0, 10), (10, 11), (11, 30)]):
        w = IndexedWriter(str(tmp_path / f"p{k}"), np.int32)
        for doc in docs[lo:hi]:
            w.add_sequences(np.concatenate(doc), np.array([len(s) for s in doc]))
            w.end_document()
        w.finalize()
        parts.append(str(tmp_path / f"p{k}"))
    merge_datasets(parts, str(tmp_path / "merged"))
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"ref{ext}", tmp_path / f"merged{ext}", shallow=False)
    got = list(read_documents(str(tmp_path / "merged")))
    assert len(got) == 30 and all(np.array_equal(x, y) for g, d in zip(got, docs) for x, y in zip(g, d))
    w = IndexedWriter(str(tmp_path / "aborted"), np.uint16)
    w.add_sequences(np.array([5, 2]), np.array([2]))
    w.abort()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("aborted")]
    r = run_tool("merge_datasets", "--inputs", parts[0], str(tmp_path / "nothing"), "--output", tmp_path / "m2",
                 check=False)
    assert r.returncode == 2 and "nothing.bin: missing" in r.stderr


def test_killed_run_leaves_no_complete_looking_pair(setup, tmp_path):
    """SIGKILL in the middle of a language: its .bin/.idx never appear; a rerun cleans up and completes."""
    import signal
    import subprocess
    import sys
    import time
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(os.path.join(setup["corpus"], "ur.txt"), d / "ur.txt")
    block = open(os.path.join(setup["corpus"], "en.txt"), "rb").read()
    with open(d / "zz.txt", "wb") as f:                       # processed last, big enough to be caught
        for _ in range(max(1, (12 << 20) // len(block))):
            f.write(block + b"\n")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "..", "tools", "preprocess_data.py"),
           "--input", str(d), "--tokenizer", setup["model"], "--output-dir", str(out), "--quiet",
           "--chunk-bytes", "65536"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if (os.path.isdir(out / "zz") and any(".bin.tmp-" in n for n in os.listdir(out / "zz"))
                and os.path.exists(out / "ur" / "train.idx")):
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = os.listdir(out / "zz")
    assert not any(n.endswith((".bin", ".idx")) for n in left), left
    assert os.path.exists(out / "ur" / "train.idx")               # finished languages stay complete
    run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
             "--languages", "zz")
    assert sorted(os.listdir(out / "zz")) == [f"{s}.{e}" for s in ("test", "train", "valid") for e in ("bin", "idx")]


def test_mpi_bad_input_fails_every_rank_cleanly(setup, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    d = _bad_corpus(tmp_path, b"bad \xff byte", line_no=18)
    out = tmp_path / "out"
    r = run_tool("preprocess_data", "--input", d, "--tokenizer", setup["model"], "--output-dir", out, "--quiet",
                 "--range-bytes", 200, prefix=["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"],
                 check=False, timeout=240)
    assert r.returncode != 0 and "en.txt:22" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(out / "en" / "train.idx")
