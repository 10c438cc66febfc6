"""Tokenize per-language raw text into Megatron MMIDIDX datasets: OUT/<lang>/{train,valid,test}.{bin,idx}.

    xlmr-preprocess --input DIR --tokenizer P.model --output-dir OUT --workers N
    mpirun -np K xlmr-preprocess --input DIR --tokenizer P.model --output-dir OUT

Input: DIR/<lang>.txt (one sentence per line, a blank line between documents) or DIR/<lang>.jsonl
(one document per line, sentences = lines of its text field --text-key), either optionally .gz / .xz /
.zst (DIR/<lang>.zst: JSONL); DIR/<lang>.parquet (one row per document, column --text-key); a folder
DIR/<lang>/ of such files (shards); or with --lang-key COL, Parquet files under DIR whose column COL
gives each row's language. See xlmr_mp.data.corpus_io.
Output: one sequence per sentence, each ending in </s> (id 2), ids of tokenizer P.model with the
XLM-R dictionary (xlmr_mp.tokenizer), one document-index entry per document; uint16 tokens when
the vocabulary has < 65500 ids, else int32.

Split: a document goes to train/valid/test by a keyed hash (--seed) of its first sentence against
the --split fractions. That depends on neither position nor worker/rank count (and keeps
documents with the same opening line in the same split), so the output is byte-identical for
any --workers and any MPI rank count.

Parallel: --workers N = N encoding processes, this one included (it encodes a chunk itself
whenever its N - 1 helpers have two queued each), so N matches N cores without oversubscription.
Helpers re-read plain files by offset and decode Parquet row groups of up to 8 chunks themselves
(larger row groups are decoded here in batches); only compressed input is piped to them.

Streaming: the reader holds about (2 * workers + 2) chunks of --chunk-bytes (Parquet: of up to
8 x --chunk-bytes, a row group decoded whole); token lengths and document ends are spooled to
disk, so memory does not grow with the file size.

MPI: plain files are cut into ranges of about --range-bytes at document boundaries (compressed
files are one range each); ranges go round-robin to ranks, each rank writes shard datasets under
OUT/.shards/, then languages are merged (xlmr-merge logic) in range order, language j
by rank j % K. Across nodes, --input and --output-dir must be on a filesystem every node sees.
Each rank may also use --workers encoder processes.

Datasets only appear complete: written under temporary names, .bin renamed before .idx.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time

import numpy as np

from xlmr_mp.atomic import atomic_write
from xlmr_mp.data.corpus_io import (BAD_LINE_POLICIES, PARQUET_EXT, CorpusError, RawChunk, corpus_ranges,
                                    count_lines_before, find_language_files, is_seekable,
                                    iter_raw_chunks, load_chunk, parse_chunk, source_files,
                                    source_format)
from xlmr_mp.data.indexed import IndexedWriter, token_dtype
from xlmr_mp.cli.merge_datasets import merge_datasets

from xlmr_mp.data.split import SPLITS, document_split, parse_split  # noqa: F401 (re-exported for tests)

_TOKENIZER = None  # per-process XLMRTokenizer, set by _init_worker
DEFER_CHUNKS = 8   # Parquet row groups of up to this many --chunk-bytes are decoded by the encoding process


def _init_worker(model_path: str, parquet: bool = False) -> None:
    global _TOKENIZER
    from xlmr_mp.tokenizer import XLMRTokenizer
    _TOKENIZER = XLMRTokenizer(model_path)
    if parquet:                 # helpers decode Parquet row groups: import pyarrow now, not in timed work
        import pyarrow.parquet  # noqa: F401


def encode_chunk(raw: RawChunk, path: str, fmt: str, max_line_bytes: int, on_bad_line: str,
                 json_key: str, seed: int, cumulative: list, dtype=np.int32):
    """Parse and encode one raw chunk; everything the writer needs, as compact arrays.

    ids come back already in the dataset's dtype and with </s> after each sentence, so the
    writing process only routes slices and writes bytes.
    """
    cpu0 = time.process_time()
    raw = load_chunk(raw, path)
    parsed = parse_chunk(raw, path, fmt, max_line_bytes, on_bad_line, json_key)
    ids, lengths, n_unk = _TOKENIZER.encode_flat(parsed.sentences, add_eos=True, num_threads=1, dtype=dtype,
                                                 count_unk=True)
    doc_start = np.asarray(parsed.doc_start, dtype=bool)
    split = np.full(len(parsed.sentences), -1, dtype=np.int8)
    for k in np.flatnonzero(doc_start).tolist() + ([0] if parsed.sentences else []):
        split[k] = document_split(parsed.sentences[k], seed, cumulative)
    return dict(ids=ids, lengths=lengths.astype(np.int32), doc_start=doc_start, split=split,
                trailing_break=parsed.trailing_break, skipped=parsed.skipped, n_bytes=raw.length,
                n_unk=n_unk, cpu=time.process_time() - cpu0)


class _Sink:
    """Routes encoded chunks, in file order, to the train/valid/test writers by document."""

    def __init__(self, prefixes, dtype):
        self.writers = [IndexedWriter(p, dtype) for p in prefixes]
        self.pending_break = True
        self.current = None
        self.stats = dict(documents=[0, 0, 0], sentences=0, tokens=0, unk=0, bytes=0, skipped=0,
                          skipped_examples=[], encode_cpu_s=0.0)

    def consume(self, r) -> int:
        """Write one encoded chunk; returns the number of documents it started."""
        st = self.stats
        st["bytes"] += r["n_bytes"]
        st["encode_cpu_s"] += r["cpu"]
        st["skipped"] += len(r["skipped"])
        for item in r["skipped"]:
            if len(st["skipped_examples"]) < 5:
                st["skipped_examples"].append(item)
        lengths = r["lengths"]
        n = lengths.size
        if n == 0:
            self.pending_break = self.pending_break or r["trailing_break"]
            return 0
        starts = r["doc_start"].copy()
        starts[0] |= self.pending_break
        # split of every sentence: its document's, carried forward from the document's start
        doc_of = np.cumsum(starts) - 1                      # -1: continues the open document
        start_split = r["split"][starts].astype(np.int64)
        if start_split.size:
            split = np.where(doc_of >= 0, start_split[np.maximum(doc_of, 0)], -1 if self.current is None else self.current)
            self.current = int(start_split[-1])
        else:
            split = np.full(n, self.current, dtype=np.int64)
        ids = r["ids"]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # runs of consecutive sentences bound for the same split (few per chunk): write slices
        runs = np.flatnonzero(np.diff(split)) + 1
        bounds = [0] + runs.tolist() + [n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            s = int(split[a])
            self.stats["documents"][s] += int(np.count_nonzero(starts[a:b]))
            self.writers[s].add_sequences(ids[offsets[a]:offsets[b]], lengths[a:b], starts[a:b])
        st["sentences"] += n
        st["tokens"] += int(ids.size)
        st["unk"] += r["n_unk"]
        self.pending_break = r["trailing_break"]
        return int(np.count_nonzero(starts))

    def finalize(self):
        for w in self.writers:
            w.finalize()

    def abort(self):
        """Drop this unit's temporary files, and its language folder when that leaves it empty."""
        for w in self.writers:
            w.abort()
        for d in {os.path.dirname(w.prefix) for w in self.writers}:
            try:
                os.rmdir(d)             # only when empty: a finished dataset of another unit stays
            except OSError:
                pass


class _Progress:
    """tqdm over text bytes with documents/s in the postfix (stderr)."""

    def __init__(self, total, desc, disable):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                        mininterval=1.0, disable=disable, dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.docs = 0
        self.last = 0.0

    def update(self, n_bytes, n_docs):
        self.docs += n_docs
        self.bar.update(n_bytes)
        now = time.perf_counter()
        if now - self.last > 1.0:
            self.last = now
            self.bar.set_postfix_str(f"{self.docs / max(now - self.t0, 1e-9):,.0f} docs/s", refresh=False)

    def close(self):
        self.bar.close()


class _Done:
    """An already-computed result in the in-flight queue (a chunk this process encoded itself)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def get(self, timeout=None):
        return self.value


def process_units(args, pool, units, dtype, progress, on_done):
    """Encode units [(lang, path, start, end, first_line, prefixes)] in order, pipelined across units.

    --workers N means N encoding processes: this one plus a pool of N - 1. Chunks go to the pool
    while it has fewer than 2 queued per helper; otherwise this process encodes the chunk itself
    instead of waiting, so the coordinating work (reading, routing, writing) is absorbed by one of
    the N processes rather than competing with them for N cores. Results are consumed strictly
    in file order (one queue of at most 2 * N + 2 chunks), so the output does not depend on who
    encoded what. on_done(i, sink) is called (in order) when unit i is fully written to its sink,
    and must finalize or abort it.
    """
    cumulative = parse_split(args.split).tolist()
    helpers = 0 if pool is None else args.workers - 1
    pool_limit = 2 * helpers                # chunks queued or running in the pool
    limit = 1 if pool is None else 2 * args.workers + 2
    inflight = collections.deque()       # ("chunk", unit, result) | ("end", unit, None)
    sinks = {}
    n_chunks = 0
    stats = dict(local_cpu_s=0.0, local_chunks=0, pool_chunks=0)
    reading = draining = -1                # the unit being read / last unit whose result was taken

    def drain_one():
        nonlocal n_chunks, draining
        kind, u, obj = inflight.popleft()
        draining = u
        if kind == "end":
            on_done(u, sinks.pop(u))
            return
        n_chunks -= 1
        try:
            r = obj.get(timeout=args.task_timeout)
        except mp.TimeoutError:
            lang, path = units[u][0], units[u][1]
            raise CorpusError(f"an encoding helper gave no answer for {args.task_timeout:g} s on a chunk of {path} "
                              f"({lang}): a helper process died (e.g. out of memory) or hangs; rerun with "
                              f"--workers 1 to see its error, or raise --task-timeout") from None
        progress.update(r["n_bytes"], sinks[u].consume(r))

    def drain_ready():
        while inflight and (inflight[0][0] == "end" or inflight[0][2].ready()):
            drain_one()

    try:
        for u, (lang, path, start, end, first_line, prefixes) in enumerate(units):
            reading = u
            fmt = source_format(path)
            extra = (path, fmt, args.max_line_bytes, args.on_bad_line, args.json_key, args.seed, cumulative, dtype)
            sinks[u] = _Sink(prefixes, dtype)
            for raw in iter_raw_chunks(path, args.chunk_bytes, args.max_line_bytes, args.on_bad_line,
                                       start=start, end=end, first_line=first_line, text_key=args.json_key,
                                       lang_key=args.lang_key, lang=lang, defer_bytes=DEFER_CHUNKS * args.chunk_bytes):
                busy = sum(1 for k, _, o in inflight if k == "chunk" and not o.ready())   # _Done is always ready
                if pool is not None and busy < pool_limit:
                    work = pool.apply_async(encode_chunk, (raw.by_reference(),) + extra)
                    stats["pool_chunks"] += 1
                else:
                    work = _Done(encode_chunk(raw, *extra))
                    stats["local_cpu_s"] += work.value["cpu"]
                    stats["local_chunks"] += 1
                inflight.append(("chunk", u, work))
                n_chunks += 1
                drain_ready()
                while n_chunks >= limit:
                    drain_one()
            inflight.append(("end", u, None))
            drain_ready()                   # finished units are written out at once
        while inflight:
            drain_one()
    except BaseException as e:
        # A bad line while reading unit `reading`: the units read completely before it may still be
        # in flight; write them out (they are complete), then drop the rest. An error from a result
        # (draining) comes in unit order, so every earlier unit is written already.
        if isinstance(e, CorpusError) and draining < reading:
            try:
                while inflight and inflight[0][1] < reading:
                    drain_one()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        for sink in sinks.values():
            sink.abort()
        raise
    return stats


def _check_nonempty(lang, path, stats):
    if sum(stats["documents"]) == 0:
        raise CorpusError(f"{path}: no documents for language {lang!r} (every line blank or skipped); "
                          f"remove the file or pass --languages without {lang}")


def _merge_stats(parts):
    out = dict(documents=[0, 0, 0], sentences=0, tokens=0, unk=0, bytes=0, skipped=0, skipped_examples=[],
               encode_cpu_s=0.0)
    for p in parts:
        out["documents"] = [a + b for a, b in zip(out["documents"], p["documents"])]
        for k in ("sentences", "tokens", "unk", "bytes", "skipped", "encode_cpu_s"):
            out[k] += p[k]
        out["skipped_examples"] = (out["skipped_examples"] + [list(x) for x in p["skipped_examples"]])[:5]
    return out


def print_summary(stats_by_lang, seconds, workers, ranks):
    """Per-language table: documents (train/valid/test), sentences, tokens, unknown-token rate."""
    print(f"{'lang':<8} {'docs':>9} {'train/valid/test':>20} {'sentences':>11} {'tokens':>12} "
          f"{'unk%':>7} {'MB':>8} {'skipped':>8}")
    tot = _merge_stats(stats_by_lang.values())
    for lang, st in list(stats_by_lang.items()) + [("TOTAL", tot)]:
        pieces = st["tokens"] - st["sentences"]
        unk = 100.0 * st["unk"] / max(pieces, 1)
        d = st["documents"]
        print(f"{lang:<8} {sum(d):>9,} {'/'.join(map(str, d)):>20} {st['sentences']:>11,} {st['tokens']:>12,} "
              f"{unk:>7.3f} {st['bytes'] / 1e6:>8.2f} {st['skipped']:>8,}")
        for line, reason in st["skipped_examples"] if lang != "TOTAL" else []:
            print(f"         skipped line {line}: {reason}")
    mb = tot["bytes"] / 1e6
    print(f"done in {seconds:.2f} s: {mb / max(seconds, 1e-9):.2f} MB/s, "
          f"{tot['tokens'] / max(seconds, 1e-9):,.0f} tokens/s, "
          f"{sum(tot['documents']) / max(seconds, 1e-9):,.0f} docs/s "
          f"({workers} worker(s) x {ranks} rank(s)); encoding CPU {tot['encode_cpu_s']:.2f} s")
    return tot


def _write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def close_pool(pool, wait_s: float = 30.0) -> None:
    """Stop the helper encoders without ever hanging the tool: `Pool.terminate()` runs in a daemon
    thread and, when it has not returned after `wait_s` seconds (CPython's terminate can block on the
    task queue's lock that an idle helper holds while it waits for work), the helpers are killed and
    the tool goes on to report its result or error."""
    t = threading.Thread(target=pool.terminate, name="pool-terminate", daemon=True)
    t.start()
    t.join(wait_s)
    if t.is_alive():
        for w in list(getattr(pool, "_pool", [])):
            if w.is_alive():
                w.kill()


def _make_pool(args, announce=True, parquet=False):
    """The tokenizer for this process, and a pool of --workers - 1 helper encoders (None for 1);
    parquet: the input has Parquet files, which the helpers decode."""
    _init_worker(args.tokenizer)
    if announce and not args.quiet and _TOKENIZER._encode_buffers is None:
        import sentencepiece
        print(f"note: sentencepiece {sentencepiece.__version__} gives no buffer output (or XLMR_MP_SPM_BUFFERS=0): "
              f"encoding goes through Python lists, ~25% slower; pip install 'sentencepiece>=0.2.3'",
              file=sys.stderr)
    if args.workers <= 1:
        return None
    n = args.workers - 1
    pool = mp.get_context("spawn").Pool(n, initializer=_init_worker, initargs=(args.tokenizer, parquet))
    pool.map(_ready, range(n), chunksize=1)    # start-up is not part of the timed work
    return pool


def _has_parquet(paths) -> bool:
    return any(f.endswith(PARQUET_EXT) for p in paths for f in source_files(p))


def _ready(_):
    return _TOKENIZER is not None


def _dtype_for(model_path):
    from xlmr_mp.tokenizer import XLMRTokenizer
    return token_dtype(XLMRTokenizer(model_path).vocab_size)


def run_single(args, files):
    """One process (plus --workers encoders) for every language, straight into the final datasets."""
    dtype = _dtype_for(args.tokenizer)
    total = sum(os.path.getsize(p) for p in files.values()) if all(map(is_seekable, files.values())) else None
    progress = _Progress(total, "preprocess", args.quiet)
    pool = _make_pool(args, parquet=_has_parquet(files.values()))
    stats = {}
    langs = list(files)
    units = [(lang, path, 0, None, 1, [os.path.join(args.output_dir, lang, s) for s in SPLITS])
             for lang, path in files.items()]

    def done(u, sink):
        try:
            _check_nonempty(langs[u], files[langs[u]], sink.stats)
        except CorpusError:
            sink.abort()
            raise
        sink.finalize()
        stats[langs[u]] = sink.stats

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        sched = process_units(args, pool, units, dtype, progress, done)
    except CorpusError as e:
        left = [lang for lang in langs if lang not in stats]
        kept = (f"kept the finished languages {', '.join(stats)} (complete) in {args.output_dir}; " if stats
                else "nothing was written; ")
        raise CorpusError(f"{e}\n{kept}not written: {', '.join(left)} (fix the input and rerun with "
                          f"--languages {','.join(left)})") from None
    finally:
        progress.close()
        if pool is not None:
            close_pool(pool)
    args.main_cpu_s = time.process_time() - c0
    args.sched = sched
    return stats, time.perf_counter() - t0


def plan_units(files, range_bytes, text_key="text", lang_key=None):
    """[(lang, path, start, end)] in canonical order: plain files cut at document starts, other sources
    into runs of whole pieces (row groups, files): corpus_io.corpus_ranges."""
    return [(lang, path, a, b) for lang, path in files.items()
            for a, b in corpus_ranges(path, range_bytes, text_key, lang_key)]


def run_mpi(args, files, comm):
    """Ranks encode disjoint ranges into shards, then merge languages in canonical range order."""
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = _dtype_for(args.tokenizer)
    units = plan_units(files, args.range_bytes, args.json_key, args.lang_key)
    shard_root = os.path.join(args.output_dir, ".shards")
    mine = [u for i, u in enumerate(units) if i % size == rank]
    total = sum(u[3] - u[2] for u in mine) if all(is_seekable(u[1]) for u in mine) else None
    progress = _Progress(total, f"rank {rank}", args.quiet or rank != 0)
    t0 = time.perf_counter()
    error = None
    pool = None
    try:
        pool = _make_pool(args, announce=rank == 0, parquet=_has_parquet(files.values()))
        work = []
        for i, (lang, path, start, end) in enumerate(units):
            if i % size == rank:
                first_line = 1 + (count_lines_before(path, start) if start and is_seekable(path) else 0)
                work.append((lang, path, start, end, first_line,
                             [os.path.join(shard_root, lang, f"u{i:06d}.{s}") for s in SPLITS]))
        ids = [i for i in range(len(units)) if i % size == rank]

        def done(k, sink):
            sink.finalize()
            _write_json(os.path.join(shard_root, work[k][0], f"u{ids[k]:06d}.stats.json"), sink.stats)

        process_units(args, pool, work, dtype, progress, done)
    except Exception as e:  # noqa: BLE001 - every rank must learn about a failure
        error = f"rank {rank}: {e}"
    finally:
        progress.close()
        if pool is not None:
            close_pool(pool)
    errors = [e for e in comm.allgather(error) if e]
    if errors:                          # no language is complete yet: remove the partial output
        if rank == 0:
            shutil.rmtree(shard_root, ignore_errors=True)
        return None, errors
    # merge: language j on rank j % size
    langs = list(files)
    stats, error = {}, None
    try:
        for j, lang in enumerate(langs):
            if j % size != rank:
                continue
            idxs = [i for i, u in enumerate(units) if u[0] == lang]
            parts = []
            for i in idxs:
                with open(os.path.join(shard_root, lang, f"u{i:06d}.stats.json")) as f:
                    parts.append(json.load(f))
            st = _merge_stats(parts)
            _check_nonempty(lang, files[lang], st)
            for s in SPLITS:
                merge_datasets([os.path.join(shard_root, lang, f"u{i:06d}.{s}") for i in idxs],
                             os.path.join(args.output_dir, lang, s), dtype)
            stats[lang] = st
            shutil.rmtree(os.path.join(shard_root, lang), ignore_errors=True)
    except Exception as e:  # noqa: BLE001
        error = f"rank {rank}: {e}"
    gathered = comm.allgather((stats, error))
    errors = [e for _, e in gathered if e]
    if errors:                          # merged languages are complete and stay; the shards go
        if rank == 0:
            shutil.rmtree(shard_root, ignore_errors=True)
        return None, errors
    merged = {}
    for st, _ in gathered:
        merged.update(st)
    if rank == 0:
        shutil.rmtree(shard_root, ignore_errors=True)
    return ({l: merged[l] for l in langs}, time.perf_counter() - t0), []


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="directory of <lang>.txt / <lang>.jsonl [.gz|.xz|.zst] / "
                   "<lang>.zst / <lang>.parquet / <lang>/ folders of those")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model P.model (P.dict.txt beside it is used)")
    p.add_argument("--output-dir", required=True, help="writes OUT/<lang>/{train,valid,test}.{bin,idx}")
    p.add_argument("--languages", default=None, help="comma list (default: every language file in --input)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes on this machine, this one included (default 1)")
    p.add_argument("--split", default="98,1,1", help="train,valid,test proportions of documents (default 98,1,1)")
    p.add_argument("--seed", type=int, default=1234, help="key of the document split hash")
    p.add_argument("--on-bad-line", choices=BAD_LINE_POLICIES, default="error",
                   help="invalid UTF-8 / over-long / bad JSON lines: stop with file:line, or skip and count")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20, help="longer lines are bad (default 1 MiB)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes per work item (default 1 MiB)")
    p.add_argument("--text-key", "--json-key", dest="json_key", default="text", metavar="KEY",
                   help="text field of JSONL input / text column of Parquet input (default text)")
    p.add_argument("--lang-key", default=None, metavar="COLUMN",
                   help="Parquet column holding each row's language: read every .parquet under --input and "
                        "route rows by it (default: language from the file or folder name)")
    p.add_argument("--mpi", choices=("auto", "on", "off"), default="auto",
                   help="auto: MPI mode when launched by mpirun with more than one rank")
    p.add_argument("--range-bytes", type=int, default=256 << 20,
                   help="MPI mode: plain files are cut into ranges of about this size (default 256 MiB)")
    p.add_argument("--task-timeout", type=float, default=600.0,
                   help="seconds to wait for a helper's chunk before failing (default 600; a chunk takes ~1 s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(args):
    if args.workers < 1:
        raise CorpusError(f"--workers {args.workers}: must be >= 1")
    if args.chunk_bytes < 1024:
        raise CorpusError(f"--chunk-bytes {args.chunk_bytes}: must be >= 1024")
    if args.task_timeout <= 0:
        raise CorpusError(f"--task-timeout {args.task_timeout}: must be > 0")
    if args.max_line_bytes < 16:
        raise CorpusError(f"--max-line-bytes {args.max_line_bytes}: must be >= 16")
    if not os.path.isfile(args.tokenizer):
        raise CorpusError(f"--tokenizer {args.tokenizer}: no such file (train one with xlmr-train-spm)")
    parse_split(args.split)


def _mpi_comm(mode):
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))
    if mode == "off" or (mode == "auto" and not launched):
        return None
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 or mode == "on" else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    comm = _mpi_comm(args.mpi)
    rank = comm.Get_rank() if comm is not None else 0
    try:
        _check_args(args)
        langs = [l for l in args.languages.split(",") if l] if args.languages else None
        files = find_language_files(args.input, langs, args.json_key, args.lang_key)
    except CorpusError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if comm is None:
        try:
            stats, seconds = run_single(args, files)
        except CorpusError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ranks = 1
    else:
        result, errors = run_mpi(args, files, comm)
        if errors:
            if rank == 0:
                for e in errors:
                    print(f"error: {e}", file=sys.stderr)
            return 2
        stats, seconds = result
        ranks = comm.Get_size()
        if rank != 0:
            return 0
    tot = print_summary(stats, seconds, args.workers, ranks)
    # main_cpu_s: this process in total (its own encoding included); encode_cpu_s: every chunk's encoding,
    # in whichever process; sched: how many chunks this process encoded itself vs the helper pool
    timing = dict(seconds=seconds, encode_cpu_s=tot["encode_cpu_s"], workers=args.workers, ranks=ranks,
                  main_cpu_s=getattr(args, "main_cpu_s", None), sched=getattr(args, "sched", None))
    for st in stats.values():
        st.pop("encode_cpu_s", None)
    _write_json(os.path.join(args.output_dir, "preprocess_summary.json"),
                dict(languages=stats, split=args.split, seed=args.seed, tokenizer=os.path.abspath(args.tokenizer),
                     timing=timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
