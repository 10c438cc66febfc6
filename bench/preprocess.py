#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py against raw SentencePiece encoding of the same text.

    python bench/preprocess.py [--mb 24] [--workers 1,2] [--tokenizer P.model] [--repeats 2] [--list-path]
                               [--plot bench/results/preprocess_cpu.png]

Corpus: a slice of ../shared/corpus (several scripts) when present, else the built-in tiny corpus
scaled up. Tokenizer: --tokenizer, or an 8000-piece model trained here on the corpus.
For each process count N it measures, in the same run:
  raw  N processes, each encoding its contiguous 1/N of the non-blank lines with
       SentencePieceProcessor.encode(batch of lines, num_threads=1), text already in memory,
       timed between a barrier and the last process finishing: the limit. Two output types:
       `raw` = lists of ints (the default everyone calls), `raw np` = out_type="numpy"
       (SentencePiece >= 0.2.3: an int32 array per sentence, no Python int per token), which is
       the stricter peer since the tool uses SentencePiece's buffer output too;
  tool `preprocess_data.py --workers N`: reading, UTF-8 checks, document grouping, encoding,
       id remapping, splitting and writing .bin/.idx; its own processing time (after interpreter
       start-up) and the wall time of the whole command.
It prints MB/s (input bytes), tokens/s, tool/raw ratios and the N-vs-1 scaling of each, and CPU
seconds: raw = encoding loops; tool = its main process (which encodes too) + its helper processes'
chunk work (start-up excluded from both). On a shared, oversubscribed machine the CPU ratio is the steadier
measure of the tool's overhead; wall-clock ratios there mostly measure other people's load.

--formats txt,parquet,zst also measures the tool on the same documents written as Parquet (a `text`
column, snappy, row groups of about --row-group-mb MB of text, default 1) and as zstd JSONL (one
frame per MB), interleaved with the plain-text runs: throughput on each format / on plain text (wall
and CPU), both in MB/s of the plain text. --out FILE appends that comparison (command, commit, date, load) to FILE.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "corpus")
BENCH_LANGS = ["en", "ru", "zh", "hi", "ar", "ja", "sw", "el", "th", "fr", "de", "ko"]


def build_corpus(out_dir, mb):
    """Write a benchmark corpus of about `mb` MB; returns (languages, description)."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(SHARED):
        langs = [l for l in BENCH_LANGS if os.path.exists(os.path.join(SHARED, f"{l}.txt"))]
        per = int(mb * 1e6 / len(langs))
        for l in langs:
            with open(os.path.join(SHARED, f"{l}.txt"), "rb") as f:
                data = f.read(per)
            cut = data.rfind(b"\n\n")
            data = data[:cut + 1] if cut > 0 else data[:data.rfind(b"\n") + 1]
            reps = max(1, per // max(len(data), 1))      # small languages are repeated to their share
            with open(os.path.join(out_dir, f"{l}.txt"), "wb") as f:
                for r in range(reps):
                    f.write(data if r == 0 else b"\n" + data)
        return langs, f"../shared/corpus slice ({len(langs)} languages)"
    from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus
    scale = mb * 1e6 / 180e3
    paths = make_tiny_corpus(out_dir, scale=scale)
    return list(paths), f"built-in tiny corpus x{scale:.0f}"


def _raw_worker(model, lines, batch, barrier, q, out_type):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(lines), batch):
        for ids in sp.encode(lines[i:i + batch], num_threads=1, out_type=out_type):
            n += len(ids)
    q.put((t0, time.perf_counter(), n, time.process_time() - c0))


def raw_encode(model, lines, nproc, out_type=int):
    """Wall seconds and pieces for nproc processes encoding contiguous slices of lines."""
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(nproc), ctx.Queue()
    k = (len(lines) + nproc - 1) // nproc
    procs = [ctx.Process(target=_raw_worker, args=(model, lines[i * k:(i + 1) * k], 4096, barrier, q, out_type))
             for i in range(nproc)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return max(r[1] for r in res) - min(r[0] for r in res), sum(r[2] for r in res), sum(r[3] for r in res)


def run_tool(corpus, model, out, workers, tool=None, env=None):
    cmd = [sys.executable, tool or os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus, "--tokenizer",
           model, "--output-dir", out, "--workers", str(workers), "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"preprocess_data failed:\n{r.stderr}")
    summary = json.load(open(os.path.join(out, "preprocess_summary.json")))
    timing = summary["timing"]
    tokens = sum(s["tokens"] - s["sentences"] for s in summary["languages"].values())   # pieces, without </s>
    # this process in total + the helper processes' chunk work (chunks it encoded itself are in main_cpu_s)
    cpu = timing["main_cpu_s"] + timing["encode_cpu_s"] - ((timing.get("sched") or {}).get("local_cpu_s") or 0.0)
    return timing["seconds"], wall, tokens, cpu


def write_formats(corpus, langs, work, formats, row_group_mb=1.0):
    """The corpus's documents as Parquet (row groups of about row_group_mb of text) and/or zstd JSONL
    beside it; {format: input directory}."""
    from xlmr_mp.data.corpus_io import iter_documents
    dirs = {"txt": corpus}
    for fmt in formats:
        if fmt not in ("txt", "parquet", "zst"):
            raise SystemExit(f"--formats {fmt}: choose from txt, parquet, zst")
        if fmt != "txt":
            dirs[fmt] = os.path.join(work, f"corpus_{fmt}")
            os.makedirs(dirs[fmt], exist_ok=True)
    for lang in langs:
        texts = ["\n".join(doc) for doc in iter_documents(os.path.join(corpus, f"{lang}.txt"))]
        if "parquet" in dirs:
            import pyarrow as pa
            import pyarrow.parquet as pq
            per_row = max(1, sum(map(len, texts)) // max(len(texts), 1))
            pq.write_table(pa.table({"text": texts}), os.path.join(dirs["parquet"], f"{lang}.parquet"),
                           row_group_size=max(1, int(row_group_mb * (1 << 20)) // per_row))
        if "zst" in dirs:
            import zstandard
            data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
            c = zstandard.ZstdCompressor(level=3)
            with open(os.path.join(dirs["zst"], f"{lang}.jsonl.zst"), "wb") as f:
                for i in range(0, len(data), 1 << 20):
                    f.write(c.compress(data[i:i + (1 << 20)]))
    return dirs


def format_report(rows, nbytes, formats, args):
    """Lines comparing the tool on each format with the tool on plain text, in the same run."""
    lines = [f"# command: python bench/preprocess.py {' '.join(sys.argv[1:])}",
             f"# cpus {os.cpu_count()}, load average at start {args.load_at_start:.2f}, at end "
             f"{os.getloadavg()[0]:.2f}; {nbytes / 1e6:.1f} MB of plain text, best of {args.repeats}",
             f"{'procs':>5} {'format':>8} {'MB/s':>8} {'txt MB/s':>9} {'fmt/txt':>8} {'CPU s':>7} {'txt CPU s':>10} "
             f"{'CPU txt/fmt':>12}"]
    for n, r in rows.items():
        for fmt in formats:
            if fmt == "txt":
                continue
            f_s, f_cpu, f_tokens = r["formats"][fmt]
            assert f_tokens == r["tool_tokens"], f"{fmt} and plain text must encode the same text"
            lines.append(f"{n:>5} {fmt:>8} {nbytes / 1e6 / f_s:>8.2f} {nbytes / 1e6 / r['tool_s']:>9.2f} "
                         f"{r['tool_s'] / f_s:>8.3f} {f_cpu:>7.2f} {r['tool_cpu']:>10.2f} {r['tool_cpu'] / f_cpu:>12.3f}")
    cpu = getattr(args, "inproc", {})
    if cpu:
        lines.append("one process, reading + parsing + encoding, CPU best of 3: " + ", ".join(
            f"{fmt} {s:.3f} s" + ("" if fmt == "txt" else f" (txt/{fmt} {cpu['txt'] / s:.3f})") for fmt, s in cpu.items()))
    return lines


def plot(rows, nbytes, desc, args):
    """Grouped bars: MB/s of raw, raw np, the tool (and the list-path / --compare tool) per process count."""
    from xlmr_mp.plotting import pyplot, save_figure
    plt = pyplot()
    if plt is None:
        return
    series = [("raw SentencePiece (list output)", "raw_s"), ("raw SentencePiece (numpy output)", "raw_np_s"),
              ("preprocess_data.py", "tool_s")]
    if args.list_path or args.compare:
        series.append(("preprocess_data.py, list path" if args.list_path else f"--compare {args.compare}", "other_s"))
    counts = list(rows)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, key) in enumerate(series):
        vals = [nbytes / 1e6 / rows[n][key] for n in counts]
        bars = ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(counts))], vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(counts)), [f"{n} process(es)" for n in counts])
    ax.set_ylabel("MB/s of input text")
    ax.set_title(f"tools/preprocess_data.py vs raw SentencePiece\n{desc}, {nbytes / 1e6:.0f} MB, "
                 f"best of {args.repeats}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, args.plot, dpi=120)
    print(f"plot: {args.plot}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=24.0, help="corpus size in MB (default 24)")
    ap.add_argument("--workers", default="1,2", help="process counts to measure (default 1,2)")
    ap.add_argument("--tokenizer", default=None, help="P.model (default: train an 8000-piece model here)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    ap.add_argument("--keep", default=None, help="keep the work directory here")
    ap.add_argument("--compare", default=None,
                    help="another preprocess_data.py (e.g. an older commit's copy) measured in the same run")
    ap.add_argument("--list-path", action="store_true",
                    help="also measure the tool with XLMR_MP_SPM_BUFFERS=0 (SentencePiece's list output)")
    ap.add_argument("--plot", default=None, help="write a PNG of MB/s per process count (needs matplotlib)")
    ap.add_argument("--formats", default="txt",
                    help="input formats the tool is measured on, e.g. txt,parquet,zst (default txt)")
    ap.add_argument("--row-group-mb", type=float, default=1.0,
                    help="Parquet row groups of about this many MB of text (default 1)")
    ap.add_argument("--out", default=None, help="append the --formats comparison to this file")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="bench_prep_")
    corpus = os.path.join(work, "corpus")
    langs, desc = build_corpus(corpus, args.mb)
    nbytes = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
    model = args.tokenizer
    if model is None:
        model = os.path.join(work, "spm.model")
        if not os.path.exists(model):
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_spm.py"), "--input", corpus,
                            "--output-prefix", model[:-6], "--vocab-size", "8000", "--sample-size", "40000",
                            "--quiet"], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    from xlmr_mp.data.corpus_io import iter_sentences
    lines = [s for l in langs for s in iter_sentences(os.path.join(corpus, f"{l}.txt"))]
    print(f"corpus: {desc}, {nbytes / 1e6:.1f} MB, {len(lines):,} sentences; tokenizer {model}; "
          f"cpus={os.cpu_count()}")
    counts = [int(x) for x in args.workers.split(",")]
    import sentencepiece as spm
    try:
        spm.SentencePieceProcessor(model_file=model).encode(["probe"], out_type="numpy")
        has_numpy_out = True
    except (ValueError, TypeError):
        has_numpy_out = False
        print(f"sentencepiece {spm.__version__} has no out_type='numpy': the 'raw np' column is empty")
    formats = [f for f in args.formats.split(",") if f]
    args.load_at_start = os.getloadavg()[0]
    dirs = write_formats(corpus, langs, work, formats, args.row_group_mb)
    rows = {}
    for n in counts:
        raws, raws_np, tools, others = [], [], [], []
        by_format = {f: [] for f in dirs if f != "txt"}
        for _ in range(args.repeats):          # interleaved, so all see the same machine load
            raws.append(raw_encode(model, lines, n))
            if has_numpy_out:
                raws_np.append(raw_encode(model, lines, n, "numpy"))
            out = os.path.join(work, f"out_w{n}")
            tools.append(run_tool(corpus, model, out, n))
            shutil.rmtree(out)
            for fmt, runs in by_format.items():
                runs.append(run_tool(dirs[fmt], model, out, n))
                shutil.rmtree(out)
            if args.compare or args.list_path:
                others.append(run_tool(corpus, model, out, n, args.compare,
                                       {"XLMR_MP_SPM_BUFFERS": "0"} if args.list_path else None))
                shutil.rmtree(out)
        raw, tool = min(raws), min(tools)
        raw_np = min(raws_np) if raws_np else None
        if others:
            o = min(others)
            what = f"--compare {args.compare}" if args.compare else ""
            what += " with XLMR_MP_SPM_BUFFERS=0 (list path)" if args.list_path else ""
            print(f"{what.strip()}, {n} worker(s): {nbytes / 1e6 / o[0]:.2f} MB/s, "
                  f"tool/raw {raw[0] / o[0]:.3f} (this tree: {nbytes / 1e6 / tool[0]:.2f} MB/s, "
                  f"tool/raw {raw[0] / tool[0]:.3f})")
        rows[n] = dict(formats={f: (min(r[0] for r in v), min(r[3] for r in v), v[0][2]) for f, v in by_format.items()},
                       raw_s=raw[0], raw_tokens=raw[1], raw_cpu=min(r[2] for r in raws), tool_s=tool[0],
                       other_s=min(others)[0] if others else float("nan"),
                       raw_np_s=raw_np[0] if raw_np else float("nan"),
                       tool_wall=tool[1], tool_tokens=tool[2], tool_cpu=min(t[3] for t in tools))
    print(f"{'procs':>5} {'raw MB/s':>9} {'raw tok/s':>11} {'raw np MB/s':>12} {'tool MB/s':>10} {'tool tok/s':>11} "
          f"{'tool/raw':>9} {'tool/raw np':>12} {'wall MB/s':>10} {'wall/raw':>9} {'raw CPU s':>10} {'tool CPU s':>11} {'CPU raw/tool':>13}")
    for n, r in rows.items():
        assert r["raw_tokens"] == r["tool_tokens"], "raw and tool must encode the same text"
        raw_mbs, tool_mbs, wall_mbs = nbytes / 1e6 / r["raw_s"], nbytes / 1e6 / r["tool_s"], nbytes / 1e6 / r["tool_wall"]
        np_mbs = nbytes / 1e6 / r["raw_np_s"]
        print(f"{n:>5} {raw_mbs:>9.2f} {r['raw_tokens'] / r['raw_s']:>11,.0f} {np_mbs:>12.2f} {tool_mbs:>10.2f} "
              f"{r['tool_tokens'] / r['tool_s']:>11,.0f} {tool_mbs / raw_mbs:>9.3f} {tool_mbs / np_mbs:>12.3f} "
              f"{wall_mbs:>10.2f} "
              f"{wall_mbs / raw_mbs:>9.3f} {r['raw_cpu']:>10.2f} {r['tool_cpu']:>11.2f} "
              f"{r['raw_cpu'] / r['tool_cpu']:>13.3f}")
    # steadier on a busy machine: CPU of the tool's per-chunk worker path vs raw encoding, best of 3, in-process
    import numpy as np
    from xlmr_mp.cli import preprocess_data
    import sentencepiece as spm
    from xlmr_mp.data.corpus_io import iter_raw_chunks
    preprocess_data._init_worker(model)
    sp = spm.SentencePieceProcessor(model_file=model)
    raws = [r for l in langs for r in iter_raw_chunks(os.path.join(corpus, f"{l}.txt"))]

    def best_cpu(fn):
        b = float("inf")
        for _ in range(3):
            c = time.process_time()
            fn()
            b = min(b, time.process_time() - c)
        return b
    raw_cpu = best_cpu(lambda: [sp.encode(lines[i:i + 4096], num_threads=1) for i in range(0, len(lines), 4096)])
    np_cpu = best_cpu(lambda: [sp.encode(lines[i:i + 4096], num_threads=1, out_type="numpy")
                               for i in range(0, len(lines), 4096)]) if has_numpy_out else float("nan")
    tool_cpu = best_cpu(lambda: [preprocess_data.encode_chunk(r, "x.txt", "txt", 1 << 20, "error", "text", 1234,
                                                              [0.98, 0.99, 1.0], np.uint16) for r in raws])
    print(f"worker path, one process, CPU best of 3: raw encode {raw_cpu:.2f} s, raw np encode {np_cpu:.2f} s, "
          f"tool parse+encode+remap {tool_cpu:.2f} s, raw/tool {raw_cpu / tool_cpu:.3f}, raw np/tool "
          f"{np_cpu / tool_cpu:.3f}")
    if len(formats) > 1:    # each format read, parsed and encoded in this process, best of 3 (steadier)
        from xlmr_mp.data.corpus_io import find_language_files, source_format
        args.inproc = {}
        for fmt, d in dirs.items():
            files = find_language_files(d)
            args.inproc[fmt] = best_cpu(lambda: [
                preprocess_data.encode_chunk(r, p, source_format(p), 1 << 20, "error", "text", 1234, [0.98, 0.99, 1.0],
                                             np.uint16) for p in files.values() for r in iter_raw_chunks(p)])
    if len(rows) > 1:
        base = counts[0]
        for n in counts[1:]:
            print(f"scaling {base}->{n} processes: raw x{rows[base]['raw_s'] / rows[n]['raw_s']:.2f}, "
                  f"raw np x{rows[base]['raw_np_s'] / rows[n]['raw_np_s']:.2f}, "
                  f"tool x{rows[base]['tool_s'] / rows[n]['tool_s']:.2f} (ideal x{n / base:.0f})")
    if len(formats) > 1:
        import bench_log  # bench/, beside this script
        bench_log.emit("\n".join([bench_log.header("preprocess.py")] + format_report(rows, nbytes, formats, args)),
                       args.out)
    if args.plot:
        plot(rows, nbytes, desc, args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
