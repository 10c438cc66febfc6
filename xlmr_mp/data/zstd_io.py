"""Streaming reader of zstd-compressed corpus files (HPLT's `*.jsonl.zst`), frame by frame.

`open_zstd(path)` is a binary file object (read / readline) over the decompressed bytes of every
frame of the file in order, as `zstd -dc` gives them, holding one input block (64 KiB) and its
output at a time. Frames are decoded one at a time (a fresh decompression object per frame) so that
a damaged file is reported by the frame it is in: the error names the file, the frame's number and
the byte offset where it starts, and the byte range of the compressed input that failed. A file
cut inside a frame (an interrupted download) is reported the same way.
"""
from __future__ import annotations

import io

_IN_BLOCK = 1 << 16         # compressed bytes fed per step


def _error_type():
    from xlmr_mp.data.chunks import CorpusError
    return CorpusError


class ZstdFrames(io.RawIOBase):
    """Raw reader of the concatenated frames of one .zst file (wrap in io.BufferedReader)."""

    def __init__(self, path: str):
        import zstandard
        self.path = path
        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._f = open(path, "rb")
        self._pos = 0               # compressed bytes consumed from the file
        self._frame = 0             # number of the frame being decoded (0-based)
        self._frame_start = 0       # its byte offset in the file
        self._obj = None            # its decompression object; None between frames
        self._out = memoryview(b"")
        self._out_pos = 0

    def readable(self):
        return True

    def close(self):
        if not self.closed:
            self._f.close()
        super().close()

    def _fail(self, what: str, block_start: int, block_end: int):
        raise _error_type()(
            f"{self.path}: {what} in zstd frame {self._frame} (it starts at byte offset {self._frame_start}; the "
            f"failing input is within bytes {block_start}-{block_end}); the file is damaged or cut short: "
            f"download it again (`zstd -t {self.path}` checks a file), or remove it") from None

    def _feed(self, data: bytes, block_start: int) -> bytes:
        """Decompress data (which may cross frame ends); returns the output."""
        out = []
        while data:
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            try:
                piece = self._obj.decompress(data)
            except self._zstd.ZstdError as e:
                self._fail(f"corrupt data ({e})", block_start, block_start + len(data))
            out.append(piece)
            if not self._obj.eof:
                break
            rest = self._obj.unused_data
            used = len(data) - len(rest)
            block_start += used
            self._frame += 1
            self._frame_start = block_start
            self._obj = None
            data = rest
        return b"".join(out)

    def _refill(self) -> bool:
        while True:
            data = self._f.read(_IN_BLOCK)
            start = self._pos
            if not data:
                if self._obj is not None:
                    self._fail("unexpected end of file (the frame is incomplete)", self._frame_start, start)
                return False
            self._pos += len(data)
            out = self._feed(data, start)
            if out:
                self._out, self._out_pos = memoryview(out), 0
                return True

    def readinto(self, b) -> int:
        if self._out_pos >= len(self._out) and not self._refill():
            return 0
        n = min(len(b), len(self._out) - self._out_pos)
        b[:n] = self._out[self._out_pos:self._out_pos + n]
        self._out_pos += n
        return n


def open_zstd(path: str) -> io.BufferedReader:
    """Binary file object over the decompressed content of a .zst file (all frames)."""
    return io.BufferedReader(ZstdFrames(path), buffer_size=1 << 20)
