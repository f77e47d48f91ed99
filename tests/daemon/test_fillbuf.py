"""cachefilesd_py.fillbuf: the fill path's reused page-aligned buffers and decompression into them."""

from __future__ import annotations

import ctypes
import mmap
import random

import pytest

from cachefilesd_py.fillbuf import BufferPool, decompress_into, native_decompressors
from erofs.codec import compress_chunk
from erofs.errors import ImageError

DATA = random.Random(3).randbytes(40_000) + b"compressible text " * 5000


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_pool_reuses_page_aligned_buffers() -> None:
    pool = BufferPool()
    addresses = set()
    for size in (1, 5000, 1 << 16, 100_000, 1 << 20):
        for _ in range(3):
            with pool.lease(size) as view:
                assert view.nbytes == size and not view.readonly
                assert _address(view) % mmap.PAGESIZE == 0
                addresses.add(_address(view))
                view[-1:] = b"x"
    # one buffer per size class (64 KiB, 128 KiB, 1 MiB), reused by every later lease of its class
    assert pool.created == 3 and len(addresses) == 3
    pool.close()


def test_pool_keeps_at_most_keep_bytes() -> None:
    pool = BufferPool(keep=1 << 20)
    with pool.lease(1 << 20), pool.lease(1 << 20):  # two at once: the second cannot be kept
        pass
    with pool.lease(1 << 20), pool.lease(1 << 20):
        pass
    assert pool.created == 3


@pytest.mark.parametrize("compressor", ["lz4_block", "zstd"])
def test_decompress_into(compressor: str) -> None:
    assert compressor in native_decompressors()  # both libraries are on the machines we support
    stored = compress_chunk(compressor, DATA)
    assert len(stored) < len(DATA)
    out = memoryview(bytearray(len(DATA)))
    decompress_into(compressor, memoryview(stored), out)  # read-only input
    assert out == DATA
    with pytest.raises(ImageError, match="expected"):  # decompresses to fewer bytes than the chunk's size
        decompress_into(compressor, memoryview(stored), memoryview(bytearray(len(DATA) + 1)))
    with pytest.raises(ImageError, match=f"corrupt {compressor}"):  # more than the chunk's size
        decompress_into(compressor, memoryview(stored), memoryview(bytearray(len(DATA) - 1)))
    damaged = bytearray(stored)
    damaged[len(damaged) // 2 :] = bytes(len(damaged) - len(damaged) // 2)
    with pytest.raises(ImageError):
        decompress_into(compressor, memoryview(damaged), memoryview(bytearray(len(DATA))))
