"""The fill path's memory: page-aligned buffers reused across fills (:class:`BufferPool`), and decompression
straight into them (:func:`decompress_into`).

Fresh anonymous memory costs a page fault and the zeroing of each page on first touch: reading 1 MiB into a
fresh mapping ran at ~1 GB/s here against ~26 GB/s into one already touched.  So the pipeline reads each span
of a blob into a pooled buffer (``preadv``), hashes the chunks where they lie, decompresses compressed ones into
another pooled buffer and writes from there; the buffers go back to the pool for the next fill.  They are
``mmap`` pages: page-aligned, as a cachefiles cache file's direct-I/O writes want them.

:func:`decompress_into` calls liblz4's ``LZ4_decompress_safe`` and libzstd's ``ZSTD_decompress`` through ctypes
(which releases the GIL) into the caller's buffer; where a library is missing it falls back to
:func:`erofs.codec.decompress` and a copy.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from erofs.codec import decompress
from erofs.errors import ImageError

__all__ = ["MIN_BUFFER", "BufferPool", "decompress_into", "native_decompressors"]

PAGE_SIZE = mmap.PAGESIZE
MIN_BUFFER = 64 << 10  # the smallest buffer handed out (sizes are powers of two from here)
KEEP_BYTES = 96 << 20  # bytes of idle buffers a pool keeps, by default


class BufferPool:
    """Page-aligned ``mmap`` buffers, reused: :meth:`lease` one of at least ``size`` bytes for a ``with`` block.

    Sizes are rounded up to a power of two (at least :data:`MIN_BUFFER`); up to ``keep`` bytes of idle buffers
    are kept for later leases, larger surpluses are unmapped.  A buffer comes back as it was left (not zeroed).
    Thread-safe.  Whoever leases a buffer must not keep views of it past the ``with`` block.
    """

    def __init__(self, keep: int = KEEP_BYTES) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        self.created = 0  # buffers mapped so far (a pool that works maps few)

    @staticmethod
    def size_class(size: int) -> int:
        return max(MIN_BUFFER, 1 << max(size - 1, 0).bit_length())

    def _take(self, size: int) -> mmap.mmap:
        cls = self.size_class(size)
        with self._lock:
            free = self._free.get(cls)
            if free:
                self._idle -= cls
                return free.pop()
            self.created += 1
        return mmap.mmap(-1, cls)

    def _give(self, buf: mmap.mmap) -> None:
        cls = len(buf)
        with self._lock:
            if self._idle + cls <= self.keep:
                self._free.setdefault(cls, []).append(buf)
                self._idle += cls
                return
        try:
            buf.close()
        except BufferError:  # a view is still alive: unmapped when the last one goes
            pass

    @contextmanager
    def lease(self, size: int) -> Iterator[memoryview]:
        """A writable view of exactly ``size`` bytes at the start of a page-aligned buffer."""
        buf = self._take(size)
        view = memoryview(buf)
        try:
            yield view[:size]
        finally:
            view.release()
            self._give(buf)

    def close(self) -> None:
        """Unmap the idle buffers."""
        with self._lock:
            free, self._free, self._idle = self._free, {}, 0
        for bufs in free.values():
            for b in bufs:
                try:
                    b.close()
                except BufferError:
                    pass


def _load(names: tuple[str, ...]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


_Decoder = Callable[[int, int, int, int], int]  # (src address, src size, dst address, dst capacity) -> size


def _function(lib: ctypes.CDLL, name: str, argtypes: list[type], restype: type) -> Callable[..., int]:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn  # type: ignore[no-any-return]


def _lz4_decoder() -> _Decoder | None:
    lib = _load(("liblz4.so.1", "liblz4.so"))
    if lib is None:
        return None
    fn = _function(lib, "LZ4_decompress_safe", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
                   ctypes.c_int)  # fmt: skip

    def decode(src: int, n: int, dst: int, cap: int) -> int:
        return int(fn(src, dst, n, cap))  # negative on corrupt input

    return decode


def _zstd_decoder() -> _Decoder | None:
    lib = _load(("libzstd.so.1", "libzstd.so"))
    if lib is None:
        return None
    size_t = ctypes.c_size_t
    fn = _function(lib, "ZSTD_decompress", [ctypes.c_void_p, size_t, ctypes.c_void_p, size_t], size_t)
    is_error = _function(lib, "ZSTD_isError", [size_t], ctypes.c_uint)

    def decode(src: int, n: int, dst: int, cap: int) -> int:
        got = fn(dst, cap, src, n)
        return -1 if is_error(got) else int(got)

    return decode


_DECODERS: dict[str, _Decoder] = {
    name: dec for name, dec in (("lz4_block", _lz4_decoder()), ("zstd", _zstd_decoder())) if dec is not None
}


def native_decompressors() -> list[str]:
    """The compressors :func:`decompress_into` decodes in place (the others go through a copy)."""
    return sorted(_DECODERS)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def decompress_into(compressor: str, src: memoryview, dst: memoryview) -> None:
    """Decompress ``src`` (stored with ``compressor``) into ``dst``, which must be exactly its uncompressed size.

    ImageError on corrupt input, a size mismatch or an unknown compressor, as :func:`erofs.codec.decompress`.
    ``src`` may be read-only (then it is copied first); ``dst`` must be writable.
    """
    decode = _DECODERS.get(compressor)
    size = dst.nbytes
    if decode is None or size == 0:
        dst[:] = decompress(compressor, src, size)
        return
    if src.readonly:
        src = memoryview(bytearray(src))
    if src.nbytes == 0:
        raise ImageError(f"corrupt {compressor} data: no input")
    got = decode(_address(src), src.nbytes, _address(dst), size)
    if got < 0:
        raise ImageError(f"corrupt {compressor} data")
    if got != size:
        raise ImageError(f"{compressor} data decompressed to {got} bytes, expected {size}")
