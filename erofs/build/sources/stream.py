"""A layer file (or stdin) as a stream of uncompressed tar bytes: plain, gzip or zstd, told apart by content.

Decompression runs in a reader thread (zlib and zstd release the GIL), overlapping hashing and writing; output
is bounded per step, so a decompression bomb cannot exhaust memory.
"""

from __future__ import annotations

import io
import queue
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import zstandard

try:  # ISA-L inflates gzip about twice as fast as zlib; optional (pip install isal)
    from isal import isal_zlib as _gzip_zlib

    _GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _gzip_zlib.error)
except ImportError:  # pragma: no cover - depends on the environment
    _gzip_zlib = zlib  # type: ignore[assignment]
    _GZIP_ERRORS = (zlib.error,)

from erofs.errors import SourceError
from erofs.format.erofs_fs import EROFS_SUPER_MAGIC_V1, EROFS_SUPER_OFFSET

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_EROFS_MAGIC = EROFS_SUPER_MAGIC_V1.to_bytes(4, "little")
_HEAD_SIZE = EROFS_SUPER_OFFSET + 4  # enough to tell an EROFS image from a tar
_OTHER_MAGIC = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x5d\x00\x00": "lzma",
    b"\x04\x22\x4d\x18": "lz4 frame",
    b"PK\x03\x04": "zip",
}
READ_SIZE = 1 << 20
_QUEUE_DEPTH = 8
_ZSTD_FEED = 4 << 10  # zstd input per call: its output is not bounded per call, but 4 KiB of input
# expand to at most ~128 MiB (one 128 KiB RLE block per 4 input bytes), which bounds memory


class _Decoder:
    """Incremental decompression of one format; ``feed`` returns output, ``finish`` checks the end."""

    def __init__(self, kind: str, label: str) -> None:
        self.kind = kind
        self.label = label
        self._z: Any = None
        self._zs: zstandard.ZstdDecompressionObj | None = None
        self._done = False  # the last member/frame ended exactly here
        self._dctx = zstandard.ZstdDecompressor()
        self._new()

    def _new(self) -> None:
        if self.kind == "gzip":
            self._z = _gzip_zlib.decompressobj(wbits=31)
        elif self.kind == "zstd":
            self._zs = self._dctx.decompressobj()
        self._done = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded output of ``data`` in pieces of at most ~1 MiB (gzip) so a bomb cannot exhaust memory."""
        while data:
            if self._done:
                if not data.strip(b"\0"):
                    return  # zero padding after the last member/frame, as gzip and zstd tolerate
                if not data.startswith(_GZIP_MAGIC if self.kind == "gzip" else _ZSTD_MAGIC[:1]):
                    raise SourceError(f"{self.label}: trailing garbage after the {self.kind} stream")
                self._new()
            try:
                if self._z is not None:
                    z = self._z
                    out = z.decompress(data, READ_SIZE)
                    while True:
                        if out:
                            yield out
                        if not z.unconsumed_tail or z.eof:
                            break
                        out = z.decompress(z.unconsumed_tail, READ_SIZE)
                    if z.eof:
                        data = z.unused_data
                        self._done = True
                    else:
                        data = b""
                else:
                    zs = self._zs
                    assert zs is not None
                    rest = memoryview(data)
                    data = b""
                    while rest:
                        piece, rest = rest[:_ZSTD_FEED], rest[_ZSTD_FEED:]
                        out = zs.decompress(piece)
                        if out:
                            yield out
                        if zs.eof:
                            data = zs.unused_data + bytes(rest)
                            self._done = True
                            break
            except _GZIP_ERRORS as e:
                raise SourceError(f"{self.label}: corrupt gzip data ({e})") from None
            except zstandard.ZstdError as e:
                raise SourceError(f"{self.label}: corrupt zstd data ({e})") from None

    def finish(self) -> None:
        if not self._done:
            raise SourceError(f"{self.label}: truncated {self.kind} stream (ends before its end marker)")


class LayerStream(io.RawIOBase):
    """The uncompressed bytes of a layer file (or stdin), decoded by a reader thread.

    ``raw`` is read to its end; ``on_raw`` sees every raw byte (for digest checks).  Errors of the reader
    thread surface in :meth:`readinto`.
    """

    def __init__(self, raw: BinaryIO, label: str, on_raw: Callable[[bytes], None] | None = None,
                 threaded: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.label = label
        self._raw = raw
        self._on_raw = on_raw
        head = b""
        while len(head) < _HEAD_SIZE:  # a pipe may deliver less than asked
            more = self._read_raw(_HEAD_SIZE - len(head))
            if not more:
                break
            head += more
        self.kind = detect(head, label)
        self._decoder = _Decoder(self.kind, label) if self.kind != "tar" else None
        self._pending: list[bytes] = [head]
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = False
        self._q: queue.Queue[bytes | BaseException | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._q = queue.Queue(_QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._produce, name=f"decode {label}", daemon=True)
            self._thread.start()

    def _read_raw(self, n: int) -> bytes:
        try:
            data = self._raw.read(n)
        except OSError as e:
            raise SourceError(f"{self.label}: read error: {e.strerror or e}") from None
        if data and self._on_raw is not None:
            self._on_raw(data)
        return data

    def _blocks(self) -> Iterator[bytes]:
        """Decoded output, block by block, until the raw stream is exhausted."""
        while True:
            raw = self._pending.pop() if self._pending else self._read_raw(READ_SIZE)
            if not raw:
                if self._decoder is not None:
                    self._decoder.finish()
                return
            if self._decoder is None:
                yield raw
            else:
                yield from self._decoder.feed(raw)

    def _produce(self) -> None:
        assert self._q is not None
        try:
            for block in self._blocks():
                self._q.put(block)
                if self._stop:
                    break
            self._q.put(None)
        except BaseException as e:  # handed to the consumer
            self._q.put(e)

    def _next_block(self) -> bytes | None:
        if self._q is None:
            if not hasattr(self, "_gen"):
                self._gen = self._blocks()
            return next(self._gen, None)
        item = self._q.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        return item

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            if self._eof:
                return 0
            block = self._next_block()
            if block is None:
                self._eof = True
                return 0
            self._buf = memoryview(block)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self._buf and not self._eof:
            block = self._next_block()
            if block is None:
                self._eof = True
            else:
                self._buf = memoryview(block)
        if len(self._buf) and size >= len(self._buf):
            out = bytes(self._buf)
            self._buf = memoryview(b"")
            return out
        out = bytes(self._buf[:size])
        self._buf = self._buf[size:]
        return out

    def drain(self) -> None:
        """Read (and check) everything left, e.g. padding after the tar's end marker."""
        while self.read(READ_SIZE):
            pass

    def close(self) -> None:
        if self._thread is not None:
            if not self._eof:  # the producer's last item (end or error) is still to come: unblock it
                assert self._q is not None
                self._stop = True  # it stops after its current block
                while True:
                    item = self._q.get()
                    if item is None or isinstance(item, BaseException):
                        break
                self._eof = True
            # Once the last item is taken the producer has nothing left to put, though it may still be
            # running (is_alive() is no test of that: waiting on the queue then would wait for ever).
            self._thread.join()
            self._thread = None
        super().close()


def detect(head: bytes, label: str) -> str:
    """'gzip', 'zstd' or 'tar' from the first bytes; SourceError for anything else recognisable."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise SourceError(f"{label}: {name} archives are not supported (tar, tar.gz or tar.zst)")
    if head[EROFS_SUPER_OFFSET : EROFS_SUPER_OFFSET + 4] == _EROFS_MAGIC:  # its zero first KiB reads as an empty tar
        raise SourceError(f"{label}: an EROFS image (a bootstrap), not a tar archive")
    if not head:
        raise SourceError(f"{label}: empty file, not a tar archive")
    if len(head) < 512:
        raise SourceError(f"{label}: not a tar archive (only {len(head)} bytes)")
    return "tar"


def open_source(source: str) -> BinaryIO:
    """The raw bytes of a tar SOURCE: a file path, or '-' for stdin."""
    if source == "-":
        if sys.stdin.isatty():  # as gzip does: a layer is never typed in, the shell's pipe was forgotten
            raise SourceError("SOURCE '-': stdin is a terminal, not a tar archive (pipe one in)")
        return sys.stdin.buffer
    try:
        return open(source, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise SourceError(f"cannot read {source}: {e.strerror}") from None
