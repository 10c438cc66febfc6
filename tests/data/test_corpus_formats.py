"""Today's corpora: Parquet (FineWeb-2 / CulturaX) and zstd JSONL (HPLT) give the datasets and the
vocabulary of the same text written as plain lines; bad Parquet / zstd input stops with the place
and writes nothing. Every input is a tiny file the test writes (pyarrow, zstandard)."""
import filecmp
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from tests.support.prep import run_tool, train_tiny_spm  # noqa: E402
from xlmr_mp.data.corpus_io import (CorpusError, corpus_ranges, find_language_files, iter_documents,  # noqa: E402
                                    iter_raw_chunks, load_chunk, parse_chunk)
from xlmr_mp.cli.preprocess_data import DEFER_CHUNKS  # noqa: E402
from xlmr_mp.data.parquet_io import row_groups  # noqa: E402
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus  # noqa: E402

LANGS = ("en", "ru")


def write_parquet(path, texts, row_group_size=5, **columns):
    """texts as column `text` (or the name given by columns' keys), several small row groups."""
    cols = columns or {"text": texts}
    table = pa.table(dict(id=list(range(len(next(iter(cols.values()))))), **cols))
    pq.write_table(table, path, row_group_size=row_group_size)


def write_zst(path, data: bytes, frame_bytes=700):
    """data as consecutive zstd frames of frame_bytes of input each (cut mid-line); returns frame starts."""
    c = zstandard.ZstdCompressor(write_checksum=True)
    starts, pos = [], 0
    with open(path, "wb") as f:
        for i in range(0, len(data), frame_bytes):
            frame = c.compress(data[i:i + frame_bytes])
            starts.append(pos)
            pos += len(frame)
            f.write(frame)
    return starts


def write_mixed(path, docs):
    """One Parquet file of every language's documents, interleaved at random (each language's in order),
    with a `lang` column."""
    langs = list(np.random.default_rng(0).permutation([lang for lang in LANGS for _ in docs[lang]]))
    it = {lang: iter(docs[lang]) for lang in LANGS}
    write_parquet(path, None, row_group_size=6, text=[next(it[lang]) for lang in langs], lang=langs)


def jsonl(texts):
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    make_tiny_corpus(d / "txt", languages=list(LANGS), scale=0.4)
    model = train_tiny_spm(d / "txt", d / "spm", vocab_size=500)
    docs = {lang: ["\n".join(doc) for doc in iter_documents(str(d / "txt" / f"{lang}.txt"))] for lang in LANGS}
    out = d / "out_txt"
    prep(d / "txt", model, out)
    return dict(dir=d, model=model, docs=docs, txt_out=out)


def prep(corpus, model, out, *extra, check=True):
    return run_tool("preprocess_data", "--input", corpus, "--tokenizer", model, "--output-dir", out, "--quiet",
                    "--chunk-bytes", 1024, *extra, check=check)


def _datasets(out):
    return sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names
                  if n != "preprocess_summary.json")


def assert_same_output(a, b):
    """The same .bin/.idx files byte for byte, and the same per-language summary (timings aside; `bytes`
    counts the input read, which differs by format)."""
    files = _datasets(a)
    assert files == _datasets(b) and len(files) == 6 * len(LANGS)
    for f in files:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    ja, jb = (json.load(open(os.path.join(x, "preprocess_summary.json")))["languages"] for x in (a, b))
    for st in list(ja.values()) + list(jb.values()):
        st.pop("bytes")
    assert ja == jb


def _everything(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_and_zstd_give_the_plain_text_datasets(base, tmp_path, workers):
    """Several row groups and several zstd frames cut mid-line. --chunk-bytes 1024: en's row groups (5 rows,
    under 8 chunks of text) are decoded whole by the process that encodes them, a helper with 2 workers;
    ru's (20 rows, over 8 chunks) are decoded by the reading process in record batches that travel to it."""
    pqd, zd = tmp_path / "pq", tmp_path / "zst"
    pqd.mkdir(), zd.mkdir()
    for lang in LANGS:
        write_parquet(pqd / f"{lang}.parquet", base["docs"][lang], row_group_size=5 if lang == "en" else 20)
        sizes = [g.text_bytes for g in row_groups(str(pqd / f"{lang}.parquet"), "text")]
        defer = DEFER_CHUNKS * 1024
        assert (max(sizes) <= defer) if lang == "en" else (min(sizes) > defer)
        assert pq.ParquetFile(pqd / f"{lang}.parquet").metadata.num_row_groups >= (3 if lang == "en" else 2)
        assert len(write_zst(zd / (f"{lang}.jsonl.zst" if lang == "en" else f"{lang}.zst"),
                             jsonl(base["docs"][lang]))) >= 3
    for src in (pqd, zd):
        out = tmp_path / f"out_{src.name}"
        prep(src, base["model"], out, "--workers", workers)
        assert_same_output(base["txt_out"], out)


def test_deferred_row_groups_are_read_where_encoded(base, tmp_path):
    """With defer_bytes, a row group of at most that much text comes without data (the reading process
    decodes nothing and an encoder process gets only its place), larger ones come decoded in batches;
    loaded, the chunks give the sentences, boundaries, row numbers and bad-row errors of the eager read."""
    texts = list(base["docs"]["ru"]) + list(base["docs"]["en"])
    texts.insert(13, None)
    path = str(tmp_path / "ru.parquet")
    write_parquet(path, texts, row_group_size=5)

    def read(defer, **kw):
        sentences, starts, skipped, deferred = [], [], [], 0
        for raw in iter_raw_chunks(path, 1024, defer_bytes=defer, **kw):
            if raw.source is not None:
                assert raw.data == b"" and raw.docs is None
                deferred += 1
            chunk = parse_chunk(load_chunk(raw, path), path, "parquet")
            sentences += chunk.sentences
            starts += list(chunk.doc_start)
            skipped += chunk.skipped
        return sentences, starts, skipped, deferred

    eager = read(0, on_bad_line="skip")
    assert eager[3] == 0 and eager[2] == [(14, "no text (null in column 'text')")]
    deferred = read(4096, on_bad_line="skip")
    assert 0 < deferred[3] < pq.ParquetFile(path).metadata.num_row_groups       # both kinds in one file
    assert deferred[:3] == eager[:3]
    with pytest.raises(CorpusError, match=r"ru.parquet: row 14 \(row group 2\): no text \(null in column 'text'\)"):
        read(1 << 20)


def test_folders_of_shards_and_a_language_column(base, tmp_path):
    """DIR/<lang>/ holding shards (Parquet and .jsonl.zst, read in path order), and one mixed file whose
    `lang` column routes rows (--lang-key) give the same datasets as DIR/<lang>.txt."""
    shards = tmp_path / "shards"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for lang in LANGS:
        docs = base["docs"][lang]
        k = len(docs) // 2
        (shards / lang / "train").mkdir(parents=True)
        write_parquet(shards / lang / "train" / "000_00000.parquet", docs[:k], row_group_size=4)
        write_zst(shards / lang / "train" / "000_00001.jsonl.zst", jsonl(docs[k:]))
    write_mixed(mixed / "data.parquet", base["docs"])
    assert find_language_files(str(mixed), lang_key="lang") == {lang: str(mixed) for lang in LANGS}
    prep(shards, base["model"], tmp_path / "out_shards")
    assert_same_output(base["txt_out"], tmp_path / "out_shards")
    prep(mixed, base["model"], tmp_path / "out_mixed", "--lang-key", "lang", "--workers", 2)
    assert_same_output(base["txt_out"], tmp_path / "out_mixed")


def test_row_group_ranges_cover_the_file_in_order(base, tmp_path):
    """MPI ranges of a Parquet file are runs of whole row groups; reading them one after another gives
    the file's documents in order (the tool merges ranks' shards in range order)."""
    path = str(tmp_path / "en.parquet")
    write_parquet(path, base["docs"]["en"], row_group_size=3)
    ranges = corpus_ranges(path, range_bytes=400)
    n_groups = pq.ParquetFile(path).metadata.num_row_groups
    assert len(ranges) > 2 and ranges[0][0] == 0 and ranges[-1][1] == n_groups
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
    whole = list(iter_documents(path))
    assert [len(d) for d in whole] == [len(t.split("\n")) for t in base["docs"]["en"]]
    from xlmr_mp.data.corpus_io import parse_chunk
    pieces = []
    for a, b in ranges:
        for raw in iter_raw_chunks(path, 512, start=a, end=b):
            parsed = parse_chunk(raw, path, "parquet")
            assert raw.first_line == 1 + 3 * raw.group + (raw.first_line - 1 - 3 * raw.group)
            for s, new in zip(parsed.sentences, parsed.doc_start):
                if new:
                    pieces.append([])
                pieces[-1].append(s)
    assert pieces == whole


def test_mpi_ranks_on_parquet_byte_identical(base, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    pytest.importorskip("mpi4py")
    pqd = tmp_path / "pq"
    pqd.mkdir()
    for lang in LANGS:
        write_parquet(pqd / f"{lang}.parquet", base["docs"][lang], row_group_size=4)
    out = tmp_path / "mpi"
    run_tool("preprocess_data", "--input", pqd, "--tokenizer", base["model"], "--output-dir", out, "--quiet",
             "--range-bytes", 300, "--mpi", "on", prefix=["mpirun", "--allow-run-as-root", "--oversubscribe",
                                                           "-np", "2"], timeout=240)
    assert_same_output(base["txt_out"], out)


def test_vocabulary_from_parquet_is_the_plain_text_vocabulary(base, tmp_path):
    """SentencePiece training is deterministic here (same input twice: the same pieces and scores), and
    Parquet input gives the vocabulary and dictionary of the plain text. (The .model bytes differ: its
    trainer spec records the temporary output name.)"""
    pqd = tmp_path / "pq"
    pqd.mkdir()
    for lang in LANGS:
        write_parquet(pqd / f"{lang}.parquet", None, row_group_size=5, content=base["docs"][lang])
    (tmp_path / "mixed").mkdir()
    write_mixed(tmp_path / "mixed" / "data.parquet", base["docs"])
    a = train_tiny_spm(base["dir"] / "txt", tmp_path / "again", vocab_size=500)
    b = train_tiny_spm(pqd, tmp_path / "from_pq", vocab_size=500, extra=("--text-key", "content"))
    c = train_tiny_spm(tmp_path / "mixed", tmp_path / "from_mixed", vocab_size=500, extra=("--lang-key", "lang"))
    for ext in (".vocab", ".dict.txt"):
        assert filecmp.cmp(base["model"][:-6] + ext, a[:-6] + ext, shallow=False), "training is not deterministic"
        assert filecmp.cmp(base["model"][:-6] + ext, b[:-6] + ext, shallow=False), ext
        assert filecmp.cmp(base["model"][:-6] + ext, c[:-6] + ext, shallow=False), ext


def test_missing_column_names_file_columns_and_the_option(base, tmp_path):
    pqd = tmp_path / "pq"
    pqd.mkdir()
    write_parquet(pqd / "en.parquet", None, content=base["docs"]["en"])
    out = tmp_path / "out"
    r = prep(pqd, base["model"], out, check=False)
    assert r.returncode == 2, r.stderr
    assert f"{pqd / 'en.parquet'}: no column 'text' (--text-key text)" in r.stderr
    assert "columns present: id (int64), content (string); pass --text-key content" in r.stderr
    assert _everything(out) == [] if out.exists() else True
    r = run_tool("train_spm", "--input", pqd, "--output-prefix", tmp_path / "spm", "--vocab-size", 500, "--quiet",
                 check=False)
    assert r.returncode == 2 and "pass --text-key content" in r.stderr
    assert not list(tmp_path.glob("spm*"))
    with pytest.raises(CorpusError, match="no column 'lang' .--lang-key lang.; columns present"):
        find_language_files(str(pqd), text_key="content", lang_key="lang")


def _corrupt_row_group(path, group):
    """Overwrite the page header at the start of row group `group`'s text column chunk with garbage."""
    md = pq.ParquetFile(path).metadata
    col = md.row_group(group).column(md.schema.names.index("text"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 12)
    first = sum(md.row_group(i).num_rows for i in range(group))
    return first, md.row_group(group).num_rows


def test_corrupt_row_group_names_file_and_group_and_writes_nothing(base, tmp_path):
    pqd = tmp_path / "pq"
    pqd.mkdir()
    path = pqd / "en.parquet"
    write_parquet(path, base["docs"]["en"], row_group_size=6)
    first, n = _corrupt_row_group(path, 2)
    out = tmp_path / "out"
    r = prep(pqd, base["model"], out, "--workers", 2, check=False)
    assert r.returncode == 2, r.stderr
    assert f"{path}: row group 2 (rows {first + 1}-{first + n}) cannot be read" in r.stderr
    assert "download it again or remove it" in r.stderr and "nothing was written" in r.stderr
    assert _everything(out) == [] if out.exists() else True


def test_corrupt_or_cut_zstd_frame_names_file_and_offset(base, tmp_path):
    zd = tmp_path / "zst"
    zd.mkdir()
    path = zd / "en.jsonl.zst"
    starts = write_zst(path, jsonl(base["docs"]["en"]), frame_bytes=500)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[starts[2] + (starts[3] - starts[2]) // 2] ^= 0xFF           # inside frame 2: its checksum fails
    path.write_bytes(bytes(damaged))
    out = tmp_path / "out"
    r = prep(zd, base["model"], out, check=False)
    assert r.returncode == 2, r.stderr
    assert f"{path}: corrupt data" in r.stderr and f"in zstd frame 2 (it starts at byte offset {starts[2]};" in r.stderr
    assert "nothing was written" in r.stderr
    assert _everything(out) == [] if out.exists() else True
    path.write_bytes(good[:starts[3] + 5])                               # cut inside frame 3
    with pytest.raises(CorpusError, match=f"unexpected end of file .* in zstd frame 3 .it starts at byte offset "
                                          f"{starts[3]};"):
        list(iter_documents(str(path)))


def test_null_text_is_a_bad_row(base, tmp_path):
    pqd = tmp_path / "pq"
    pqd.mkdir()
    texts = list(base["docs"]["en"])
    texts.insert(7, None)
    write_parquet(pqd / "en.parquet", texts, row_group_size=5)
    with pytest.raises(CorpusError, match=r"en.parquet: row 8 \(row group 1\): no text \(null in column 'text'\)"):
        list(iter_documents(str(pqd / "en.parquet")))
    kept = list(iter_documents(str(pqd / "en.parquet"), on_bad_line="skip"))
    assert kept == [t.split("\n") for t in base["docs"]["en"]]


def test_invalid_utf8_or_overlong_line_is_a_bad_row(base, tmp_path):
    """A row whose bytes are not UTF-8 (a batch is decoded whole, then row by row to find it) and a row
    holding a line over --max-line-bytes are bad rows named by row and row group; skipped, the other rows
    keep their documents and boundaries (the bad rows hold several lines)."""
    docs = list(base["docs"]["en"])
    raw = [t.encode() for t in docs]
    raw.insert(7, b"first line\nbad \xff byte\nlast line")
    path = str(tmp_path / "en.parquet")
    pq.write_table(pa.table({"text": pa.array(raw, type=pa.binary()).view(pa.string())}), path, row_group_size=5)
    for chunk_bytes in (1 << 20, 256):
        with pytest.raises(CorpusError, match=r"en.parquet: row 8 \(row group 1\): invalid UTF-8 at byte 15 of "
                                              r"the text"):
            list(iter_documents(path, chunk_bytes=chunk_bytes))
        kept = list(iter_documents(path, on_bad_line="skip", chunk_bytes=chunk_bytes))
        assert kept == [t.split("\n") for t in docs]
    limit = max(len(line.encode()) for t in docs for line in t.split("\n"))
    texts = list(docs)
    texts.insert(9, "short\n" + "x" * (limit + 1) + "\nshort again")
    write_parquet(tmp_path / "long.parquet", texts, row_group_size=5)
    with pytest.raises(CorpusError, match=rf"long.parquet: row 10 \(row group 1\): a line of the text longer than "
                                          rf"--max-line-bytes {limit} \({limit + 1} bytes\)"):
        list(iter_documents(str(tmp_path / "long.parquet"), max_line_bytes=limit))
    kept = list(iter_documents(str(tmp_path / "long.parquet"), max_line_bytes=limit, on_bad_line="skip"))
    assert kept == [t.split("\n") for t in docs[:9]] + [["short", "short again"]] + [t.split("\n") for t in docs[9:]]


def test_streaming_memory_is_bounded(tmp_path):
    """A 9 MB Parquet row group is read in record batches of about --chunk-bytes holding a few MB of
    Arrow memory, and a zstd file decompressing to ~10 MB is streamed holding under 3 MB of Python
    objects."""
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    picks = words[np.random.default_rng(1).integers(0, len(words), size=(16000, 8, 12))]
    texts = ["\n".join(" ".join(s) for s in doc) for doc in picks]
    path = str(tmp_path / "big.parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=len(texts))     # one ~9 MB row group
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    sizes, arrow_peak = [], 0
    for raw in iter_raw_chunks(path, 64 << 10):
        sizes.append(raw.length)
        arrow_peak = max(arrow_peak, pool.bytes_allocated() - before)
    assert len(sizes) > 100 and max(sizes) < 80 << 10 and sum(sizes) == sum(len(t.encode()) for t in texts)
    assert arrow_peak < 4 << 20, f"{arrow_peak / 1e6:.1f} MB of Arrow memory for a {sum(sizes) / 1e6:.1f} MB row group"
    zpath = str(tmp_path / "big.jsonl.zst")
    data = jsonl(texts)
    with open(zpath, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(data))                        # one frame, ~10 MB out
    tracemalloc.start()
    n = sum(len(d) for d in iter_documents(zpath, chunk_bytes=64 << 10))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 8 * len(texts)
    assert peak < 3 << 20, f"peak {peak / 1e6:.1f} MB while streaming {len(data) / 1e6:.1f} MB"


def test_bench_measures_each_format_against_plain_text(base, tmp_path):
    """bench/preprocess.py --formats: the same documents as Parquet and zstd JSONL, measured in the run of
    the plain text (the tool must encode the same tokens from each), the comparison appended to --out."""
    import re
    import subprocess
    import sys
    from tests.support.prep import ROOT
    out = tmp_path / "results.txt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "preprocess.py"), "--mb", "0.2", "--repeats", "1",
                        "--workers", "1", "--tokenizer", base["model"], "--formats", "txt,parquet,zst", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert re.match(r"# bench/preprocess.py  \d{4}-\d\d-\d\d \d\d:\d\d UTC  commit \S+\n# command: python bench/"
                    r"preprocess.py --mb 0.2 .*--formats txt,parquet,zst", text)
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+1\s+(parquet|zst)\s+[\d.]+\s+[\d.]+\s+([\d.]+)",
                                                                 text, re.M)}
    assert set(rows) == {"parquet", "zst"} and all(v > 0 for v in rows.values()), text
