"""tools/download_cc100.py against locally served .xz files (http.server in a thread, and file://)."""
import functools
import http.server
import lzma
import os
import threading

import pytest

from tests.support.prep import run_tool

TEXT = {"sw": "Habari ya asubuhi.\nWatoto wanasoma.\n\nMji mkubwa.\n" * 500,
        "ur": "لوگ شہر دریا بازار۔\nآج کل۔\n\n" * 300}


@pytest.fixture
def mirror(tmp_path):
    d = tmp_path / "mirror"
    d.mkdir()
    for lang, text in TEXT.items():
        with lzma.open(d / f"{lang}.txt.xz", "wb") as f:
            f.write(text.encode("utf-8"))
    good = (d / "sw.txt.xz").read_bytes()
    (d / "tr.txt.xz").write_bytes(good[: len(good) // 2])        # truncated archive
    (d / "ko.txt.xz").write_bytes(b"this is not xz data" * 10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(d))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield d, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_decompresses_and_skips_existing(mirror, tmp_path):
    d, url = mirror
    out = tmp_path / "raw"
    r = run_tool("download_cc100", "--languages", "sw,ur", "--output-dir", out, "--base-url", url, "--quiet")
    for lang, text in TEXT.items():
        assert (out / f"{lang}.txt").read_text(encoding="utf-8") == text
    assert sorted(os.listdir(out)) == ["sw.txt", "ur.txt"]
    assert "ok" in r.stdout and "MB/s" in r.stdout
    (out / "sw.txt").write_text("kept\n")
    r = run_tool("download_cc100", "--languages", "sw", "--output-dir", out, "--base-url", url, "--quiet")
    assert (out / "sw.txt").read_text() == "kept\n" and "exists" in r.stdout
    run_tool("download_cc100", "--languages", "sw", "--output-dir", out, "--base-url", url, "--quiet", "--force")
    assert (out / "sw.txt").read_text(encoding="utf-8") == TEXT["sw"]


def test_file_url(mirror, tmp_path):
    d, _ = mirror
    out = tmp_path / "raw"
    run_tool("download_cc100", "--languages", "ur", "--output-dir", out, "--base-url", d.as_uri(), "--quiet")
    assert (out / "ur.txt").read_text(encoding="utf-8") == TEXT["ur"]


def test_failures_leave_no_output(mirror, tmp_path):
    _, url = mirror
    out = tmp_path / "raw"
    r = run_tool("download_cc100", "--languages", "tr,ko,xx,sw", "--output-dir", out, "--base-url", url,
                 "--quiet", "--retries", "1", check=False)
    assert r.returncode == 1
    assert "truncated" in r.stderr and "tr.txt.xz" in r.stderr
    assert "not a valid .xz" in r.stderr and "ko.txt.xz" in r.stderr
    assert "xx.txt.xz: cannot open" in r.stderr
    assert sorted(os.listdir(out)) == ["sw.txt"]                  # the good one still arrives, no .part files
    assert r.stdout.count("FAILED") == 3
