"""Fetch CC-100 per-language text and stream-decompress it into DIR/<lang>.txt.

    xlmr-download-cc100 --languages en,fr,sw --output-dir data/raw
    xlmr-download-cc100 --languages sw --output-dir DIR --base-url file:///mirror/cc100

Each language is read from BASE_URL/<lang>.txt.xz (default https://data.statmt.org/cc-100, the
layout CC-100 is published in: one paragraph per line, a blank line between documents, which
is the txt format tools/preprocess_data.py reads) and decompressed on the fly, so neither the
archive nor the text is held in memory. Output goes to DIR/<lang>.txt.part and is renamed when the
download is complete and the xz stream has ended cleanly; an existing DIR/<lang>.txt is skipped
(--force re-downloads). Bytes are written in xz-decompressed form as they arrive; an interrupted
download is retried from the beginning (--retries) since an xz stream cannot be resumed midway.
"""
from __future__ import annotations

import argparse
import lzma
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_BASE_URL = "https://data.statmt.org/cc-100"


class DownloadError(RuntimeError):
    """A download that failed; the message names the URL and the reason."""


def language_url(base_url: str, lang: str) -> str:
    """URL of a language's archive: BASE_URL/<lang>.txt.xz."""
    return f"{base_url.rstrip('/')}/{lang}.txt.xz"


def download_language(lang: str, output_dir: str, base_url: str = DEFAULT_BASE_URL, force: bool = False,
                      block: int = 1 << 20, timeout: float = 60.0, progress: bool = True) -> dict:
    """Download and decompress one language into output_dir/<lang>.txt; return its statistics."""
    from tqdm import tqdm
    out = os.path.join(output_dir, f"{lang}.txt")
    if os.path.exists(out) and not force:
        return dict(lang=lang, skipped=True, path=out, compressed=0, text=os.path.getsize(out), seconds=0.0)
    url = language_url(base_url, lang)
    part = out + ".part"
    t0 = time.perf_counter()
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"{url}: cannot open ({e}); check --base-url and the language code {lang!r}") from None
    total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_AUTO)
    n_in = n_out = 0
    bar = tqdm(total=int(total) if total else None, desc=lang, unit="B", unit_scale=True,
               disable=not progress, mininterval=1.0)
    try:
        with resp, open(part, "wb") as f:
            while True:
                try:
                    data = resp.read(block)
                except OSError as e:
                    raise DownloadError(f"{url}: connection failed after {n_in} bytes ({e})") from None
                if not data:
                    break
                n_in += len(data)
                bar.update(len(data))
                try:
                    text = dec.decompress(data)
                except lzma.LZMAError as e:
                    raise DownloadError(f"{url}: not a valid .xz stream at compressed byte ~{n_in} ({e})") from None
                f.write(text)
                n_out += len(text)
                while dec.eof and dec.unused_data:  # concatenated xz streams
                    rest = dec.unused_data
                    dec = lzma.LZMADecompressor(format=lzma.FORMAT_AUTO)
                    text = dec.decompress(rest)
                    f.write(text)
                    n_out += len(text)
        if not dec.eof:
            raise DownloadError(f"{url}: truncated download ({n_in} bytes, xz stream did not end)")
        if total and n_in != int(total):
            raise DownloadError(f"{url}: got {n_in} of {total} bytes")
        os.replace(part, out)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    return dict(lang=lang, skipped=False, path=out, compressed=n_in, text=n_out, seconds=dt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", required=True, help="comma list of CC-100 codes, e.g. en,fr,sw")
    p.add_argument("--output-dir", required=True, help="writes DIR/<lang>.txt")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"where <lang>.txt.xz live (default {DEFAULT_BASE_URL}); "
                   "http(s):// or file://")
    p.add_argument("--force", action="store_true", help="download even when DIR/<lang>.txt exists")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per language on a failed transfer")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    langs = [l.strip() for l in args.languages.split(",") if l.strip()]
    if not langs:
        print("error: --languages is empty; pass e.g. --languages en,fr", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    results, failed = [], []
    for lang in langs:
        for attempt in range(args.retries + 1):
            try:
                results.append(download_language(lang, args.output_dir, args.base_url, args.force,
                                                 timeout=args.timeout, progress=not args.quiet))
                break
            except DownloadError as e:
                print(f"warning: {lang} attempt {attempt + 1}: {e}", file=sys.stderr)
                if attempt == args.retries or "cannot open" in str(e):
                    failed.append((lang, str(e)))
                    break
    print(f"{'lang':<8} {'status':<10} {'xz MB':>9} {'text MB':>9} {'MB/s':>8}")
    for r in results:
        st = "exists" if r["skipped"] else "ok"
        rate = r["compressed"] / 1e6 / r["seconds"] if r["seconds"] else 0.0
        print(f"{r['lang']:<8} {st:<10} {r['compressed'] / 1e6:>9.2f} {r['text'] / 1e6:>9.2f} {rate:>8.2f}")
    for lang, e in failed:
        print(f"{lang:<8} {'FAILED':<10} {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
