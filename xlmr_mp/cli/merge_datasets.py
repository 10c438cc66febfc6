"""Concatenate MMIDIDX datasets (PREFIX.bin/.idx) into one, in the order given.

    xlmr-merge --inputs shard0 shard1 ... --output OUT/en/train
    xlmr-merge --input-dir SHARDS --output OUT/en/train   # every prefix, sorted by name

Documents and sequences are copied as they are (streamed; memory does not grow with the data);
all inputs must have the same token dtype. The output appears only when complete (.bin renamed
first, .idx last). Used by xlmr-preprocess to merge MPI shards.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from xlmr_mp.data.indexed import IndexedWriter, read_index


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the file."""


def merge_datasets(prefixes, out_prefix, dtype=None, progress=False):
    """Write the concatenation of the complete datasets `prefixes` to out_prefix; return (docs, seqs, tokens)."""
    if not prefixes:
        raise MergeError("no input datasets to merge")
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise MergeError(f"{p}{ext}: missing; every input needs both .bin and .idx (an incomplete shard?)")
        if os.path.abspath(p) == os.path.abspath(out_prefix):
            raise MergeError(f"--output {out_prefix} is also an input")
    if dtype is None:
        dtype = read_index(prefixes[0])[0]
    from tqdm import tqdm
    w = IndexedWriter(out_prefix, dtype)
    try:
        for p in tqdm(prefixes, desc="merging", unit="dataset", disable=not progress, mininterval=1.0):
            try:
                w.append_dataset(p)
            except ValueError as e:
                raise MergeError(str(e)) from None
        w.finalize()
    except BaseException:
        w.abort()
        raise
    return w.n_documents, w.n_sequences, w.n_tokens


def prefixes_in(directory):
    """Dataset prefixes (with a .idx and a .bin) in a directory, sorted by name."""
    names = sorted(n[:-4] for n in os.listdir(directory) if n.endswith(".idx"))
    return [os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n + ".bin"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--inputs", nargs="+", help="dataset prefixes, merged in this order")
    g.add_argument("--input-dir", help="merge every dataset in this directory, sorted by name")
    p.add_argument("--output", required=True, help="output prefix (writes OUTPUT.bin and OUTPUT.idx)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        prefixes = args.inputs if args.inputs else prefixes_in(args.input_dir)
        docs, seqs, toks = merge_datasets(prefixes, args.output, progress=not args.quiet)
    except (MergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    size = os.path.getsize(args.output + ".bin")
    print(f"merged {len(prefixes)} datasets -> {args.output}: {docs:,} documents, {seqs:,} sequences, "
          f"{toks:,} tokens in {dt:.1f} s ({size / 1e6 / max(dt, 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
