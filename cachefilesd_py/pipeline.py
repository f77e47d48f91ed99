"""The one fetch → verify → decompress core both kernel front ends (fscache on-demand, fanotify pre-content) use.

A front end asks :meth:`Pipeline.fill` to make a byte range of a blob's *uncompressed* layout available and
gives it a ``write(d_off, data)`` callback (pwrite into the anonymous cache fd, or through a fanotify event
fd).  The pipeline maps the range to chunks (``BlobMeta.chunks_for_range``), widens it to whole chunks,
amplifies it with the chunks that follow in uncompressed order up to ``amplify`` bytes, drops the chunks the
caller already has (``present``), fetches the rest with one ranged backend read per contiguous compressed span
(:func:`erofs.reader.blob.plan_reads`), verifies and decompresses each chunk and writes it.  A chunk that fails
its fetch or its digest is never written.

No needless copies (:mod:`.fillbuf`): a span is read straight into a pooled page-aligned buffer (the backend's
``read_into`` when it has one: ``preadv``), an uncompressed chunk is hashed and written where it lies in it, a
compressed one is decompressed into another pooled buffer (liblz4/libzstd through ctypes, GIL released), hashed
and written from there.  The buffers are reused by the next fills: no fresh pages per fill.

Data handed to ``write`` is the chunk zero-padded to a multiple of 4 KiB (chunks start 4 KiB-aligned in the
uncompressed layout, so the padding covers no other chunk).  It is page-aligned in memory when it was
decompressed or padded (a pooled buffer), not necessarily when it is an uncompressed chunk within a span (a
caller writing with O_DIRECT checks: ``fscache.cachefiles.write_range`` does).  ``write`` may be called from
the thread that called ``fill`` only, and must not keep ``data`` once it returns: the buffer is reused.

A chunk wanted by two concurrent fills is fetched once: the first claims it in an in-flight table of futures
keyed by ``(blob_id, ci)``, the others wait for it.  When the owner's data is not yet in a waiter's
destination (``present`` false, or no ``present`` given: e.g. two cache objects of the same blob), the waiter
writes the owner's verified data itself, so every caller ends with its range filled.  When the owner's fetch
failed and it read another copy of the blob (another backend: the same layer in another image), the waiter
fetches from its own copy instead of taking the owner's error.

Each fill has a deadline (``fill_timeout``, :func:`~cachefilesd_py.backends.deadline.deadline`): backend requests,
their retries and waits for another fill's chunk end by then, and the fill fails (the reader gets EIO) instead
of hanging on a server that trickles bytes.

Failures are remembered (failure caching): a chunk that failed its digest (or could not be decoded) fails at once,
without a fetch, for :data:`BAD_CHUNK_TTL` seconds; one whose fetch failed (a backend error, a deadline) for
:data:`FAILED_FETCH_TTL`.  A reader re-reading a corrupt page then costs no refetch, and the line logged for it is
counted by the daemon's log filter (:mod:`cachefilesd_py.logfilter`) rather than repeated.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

from erofs.errors import BackendError, DigestMismatchError, ImageError, NydusErofsError
from erofs.reader.blob import BlobMeta, plan_reads

from .backends import BlobBackend
from .backends.deadline import PermanentFailure, deadline, time_left
from .defaults import FILL_TIMEOUT
from .fillbuf import BufferPool, decompress_into

__all__ = ["PAGE_SIZE", "BlobHandle", "Pipeline", "PipelineStats", "WriteFn", "PresentFn", "tune_malloc"]

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
BAD_CHUNK_TTL = 20.0  # seconds a chunk that failed its digest (or decoding) fails without a refetch
FAILED_FETCH_TTL = 3.0  # seconds a chunk whose fetch failed fails without a refetch
WriteFn = Callable[[int, memoryview], object]
PresentFn = Callable[[int, int], bool]


@dataclass(eq=False)
class BlobHandle:
    """One data blob being served: its id, its verified metadata and the backend it is fetched from."""

    blob_id: str
    meta: BlobMeta
    backend: BlobBackend

    @property
    def uncompressed_size(self) -> int:
        """Size of the blob's uncompressed layout (the size of its cache file), a multiple of 4 KiB."""
        size = self.meta.uncompressed_size
        if not size:
            size = max((d_off + d_size for _, _, d_off, d_size in map(self.meta.chunk, range(self.meta.chunk_count))),
                       default=0)  # fmt: skip
        return -(-size // PAGE_SIZE) * PAGE_SIZE

    @property
    def compressed_size(self) -> int:
        return self.meta.size

    def __repr__(self) -> str:
        return f"<BlobHandle {self.blob_id[:12]} {self.meta.chunk_count} chunks via {self.backend!r}>"


@dataclass
class PipelineStats:
    """Thread-safe counters of a :class:`Pipeline`.

    ``fills``: calls of ``fill``; ``chunks_fetched``/``bytes_fetched``: chunks and compressed bytes read from
    backends; ``backend_reads``: ranged backend reads; ``chunks_written``/``bytes_written``: what went to
    ``write`` (padded); ``chunks_present``: chunks skipped because ``present`` said so; ``chunks_amplified``:
    chunks added beyond the requested range; ``dedup_hits``: chunks another fill was already fetching;
    ``digest_failures``, ``fetch_failures`` (backend errors, per chunk), ``decode_failures`` (other image
    errors, per chunk), ``write_failures``; ``failures_cached``: chunks failed at once, a recent failure
    remembered (no fetch); ``timeouts``: chunks of another fill not waited for past the deadline.
    :meth:`per_blob`: the same counters of each blob (those counted with its ``blob`` id).
    """

    fills: int = 0
    backend_reads: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    chunks_written: int = 0
    bytes_written: int = 0
    chunks_present: int = 0
    chunks_amplified: int = 0
    dedup_hits: int = 0
    digest_failures: int = 0
    fetch_failures: int = 0
    decode_failures: int = 0
    write_failures: int = 0
    failures_cached: int = 0
    timeouts: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False, compare=False)
    _blobs: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    def add(self, blob: str | None = None, **counts: int) -> None:
        """Add ``counts``; with ``blob``, to that blob's counters too."""
        with self._cond:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)
            if blob is not None:
                mine = self._blobs.setdefault(blob, {})
                for k, v in counts.items():
                    mine[k] = mine.get(k, 0) + v
            self._cond.notify_all()

    def per_blob(self) -> dict[str, dict[str, int]]:
        """Each blob's counters (only those counted for it: absent means 0)."""
        with self._cond:
            return {b: dict(c) for b, c in self._blobs.items()}

    def wait_for(self, predicate: Callable[[PipelineStats], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(stats)`` holds (checked after every update) or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict (consistent at one instant)."""
        with self._cond:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def reset(self) -> None:
        with self._cond:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, 0)
            self._blobs.clear()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Keep chunk-sized buffers (fetched spans, decompressed chunks) in the malloc heap (glibc only).

    By default glibc serves every 1 MiB allocation with a fresh mmap (or trims the heap right after it is
    freed), so each chunk costs 256 page faults and the zeroing of 1 MiB: lz4 decompression then runs at
    ~0.8 GB/s instead of ~7-10.  Called once per process by :class:`Pipeline`; True if it applied.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _malloc_tuned = ok
    return ok


@dataclass(eq=False)
class _Claim:
    """A chunk being fetched by one fill: the future of its data, the copy of the blob it is read from, and how
    many other fills wait for it (only then is its data copied out of the owner's reused buffer)."""

    future: Future[memoryview | None]
    backend: BlobBackend
    waiters: int = 0


class Pipeline:
    """Fetch → verify → decompress → write, shared by every blob a daemon serves.  Thread-safe.

    ``amplify``: bytes of uncompressed data one fill brings in at least (whole chunks following the requested
    range, never beyond ``amplify`` in total; the requested range itself is always fetched whole).
    ``workers``: threads of :meth:`submit`, for front ends whose event loop must never wait on a fetch.
    ``fill_timeout``: seconds one :meth:`fill` may take (None: no deadline).
    """

    def __init__(self, *, amplify: int = 1 << 20, workers: int = 4, fill_timeout: float | None = FILL_TIMEOUT) -> None:
        if amplify < 0:
            raise ValueError(f"amplify must be >= 0, got {amplify}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.amplify = amplify
        self.workers = workers
        self.fill_timeout = fill_timeout
        self.stats = PipelineStats()
        tune_malloc()
        self._lock = threading.Lock()
        # (blob id, chunk) → its fetch: the future of its data, the backend (the copy of the blob), the waiters
        self._inflight: dict[tuple[str, int], _Claim] = {}
        # (blob id, chunk) → (until when, the failure, the backend it came from): failure caching
        self._failed: dict[tuple[str, int], tuple[float, BaseException, BlobBackend]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.buffers = BufferPool()

    def inflight(self) -> int:
        """Chunk fetches in flight now (reads waiting on a backend)."""
        with self._lock:
            return len(self._inflight)

    # -- planning -----------------------------------------------------------------------------------------------
    def chunks_to_fill(self, blob: BlobHandle, offset: int, length: int) -> tuple[list[int], list[int]]:
        """(requested, extra): chunk indexes meeting ``[offset, offset+length)`` and the amplification chunks
        that follow them, both in uncompressed order."""
        meta = blob.meta
        wanted = meta.chunks_for_range(offset, length) if length > 0 else []
        if not wanted:
            return [], []
        total = sum(meta.chunk(ci)[3] for ci in wanted)
        extra: list[int] = []
        if total < self.amplify:
            last_d_off = meta.chunk(wanted[-1])[2]
            seen = set(wanted)
            for ci in meta.chunks_for_range(last_d_off + 1, self.amplify):
                if ci in seen:
                    continue
                d_size = meta.chunk(ci)[3]
                if total + d_size > self.amplify:
                    break
                extra.append(ci)
                total += d_size
        return wanted, extra

    def pieces(self, blob: BlobHandle, offset: int, length: int, piece: int) -> list[tuple[int, int]]:
        """``[offset, offset+length)`` as ``(offset, length)`` ranges of whole chunks, each at least ``piece``
        bytes but the last (a chunk straddling a bound belongs to one piece only).  For filling a large range
        on several threads at once: pieces that shared a chunk would wait for each other."""
        meta = blob.meta
        out: list[tuple[int, int]] = []
        start = end = -1
        for ci in meta.chunks_for_range(offset, length) if length > 0 else ():
            _, _, d_off, d_size = meta.chunk(ci)
            if start < 0:
                start = d_off
            end = max(end, d_off + d_size)
            if end - start >= piece:
                out.append((start, end - start))
                start = -1
        if start >= 0:
            out.append((start, end - start))
        return out

    # -- the fill -----------------------------------------------------------------------------------------------
    def fill(self, blob: BlobHandle, offset: int, length: int, write: WriteFn,
             present: PresentFn | None = None, *, wait: bool = True) -> int:  # fmt: skip
        """Make ``[offset, offset+length)`` of ``blob``'s uncompressed layout available through ``write``.

        ``present(d_off, d_size)`` says whether a chunk is already in the caller's destination (it is then
        neither fetched nor written).  Returns the bytes passed to ``write``.  Raises the first error
        (BackendError, DigestMismatchError, ImageError, or what ``write`` raised) of a chunk of the requested
        range, after every other chunk has been written; errors of amplification chunks are only logged.
        ``wait=False`` (readahead): chunks another fill is fetching are left to it, not waited for.
        """
        if self._closed:
            raise RuntimeError("pipeline is closed")
        self.stats.add(blob=blob.blob_id, fills=1)
        with deadline(self.fill_timeout):
            return self._fill(blob, offset, length, write, present, wait)

    def _fill(self, blob: BlobHandle, offset: int, length: int, write: WriteFn, present: PresentFn | None,
              wait: bool) -> int:  # fmt: skip
        wanted, extra = self.chunks_to_fill(blob, offset, length)
        if not wanted:
            return 0
        if extra:
            self.stats.add(blob=blob.blob_id, chunks_amplified=len(extra))
        requested = set(wanted)
        meta = blob.meta
        bid = blob.blob_id

        # claim the chunks nobody is fetching; wait for the others; fail at once those that failed lately
        owned: list[int] = []
        waits: list[tuple[int, Future[memoryview | None], BlobBackend]] = []
        errors: dict[int, BaseException] = {}
        now = time.monotonic()
        with self._lock:
            for ci in (*wanted, *extra):
                failed = self._failed.get((bid, ci))
                if failed is not None:
                    if failed[0] > now and failed[2] is blob.backend:
                        errors[ci] = failed[1]
                        continue
                    if failed[0] <= now:
                        del self._failed[(bid, ci)]
                claim = self._inflight.get((bid, ci))
                if claim is None:
                    self._inflight[(bid, ci)] = _Claim(Future(), blob.backend)
                    owned.append(ci)
                elif wait:
                    claim.waiters += 1
                    waits.append((ci, claim.future, claim.backend))
        if waits:
            self.stats.add(blob=bid, dedup_hits=len(waits))
        if errors:
            self.stats.add(blob=bid, failures_cached=len(errors))
        written = 0
        try:
            written += self._fetch_owned(blob, owned, write, present, errors)
        finally:
            # never leave a claimed chunk unresolved, whatever happened
            with self._lock:
                for ci in owned:
                    claim = self._inflight.pop((bid, ci), None)
                    fut = claim.future if claim is not None else None
                    if fut is not None and not fut.done():
                        fut.set_exception(errors.get(ci) or RuntimeError(f"blob {bid}: chunk {ci} was not fetched"))

        refetch: list[int] = []
        for ci, fut, source in waits:
            try:
                left = time_left()
            except PermanentFailure:  # the deadline has passed: take the result only if it is there
                left = 0
            try:
                data = fut.result(timeout=left)
            except TimeoutError as e:
                if fut.done():  # the owner's own failure
                    errors[ci] = e
                    continue
                self.stats.add(blob=bid, timeouts=1)
                errors[ci] = BackendError(f"blob {bid}: chunk {ci} not filled within the {self.fill_timeout:g}s "
                                          "deadline")  # fmt: skip
                continue
            except BaseException as e:  # noqa: BLE001 - the owner's failure is this chunk's failure
                if source is not blob.backend:  # unless the owner read another copy: ours may be sound
                    refetch.append(ci)
                else:
                    errors[ci] = e
                continue
            _, _, d_off, d_size = meta.chunk(ci)
            if present is not None and present(d_off, d_size):
                continue
            if data is None:  # the owner had it already, in another destination than ours
                refetch.append(ci)
                continue
            try:
                write(d_off, data)
            except Exception as e:  # noqa: BLE001
                self.stats.add(blob=bid, write_failures=1)
                errors[ci] = e
                continue
            written += data.nbytes
            self.stats.add(blob=bid, chunks_written=1, bytes_written=data.nbytes)
        if refetch:
            written += self._fetch_owned(blob, refetch, write, present, errors, resolve=False)

        first: BaseException | None = None
        for ci in (*wanted, *extra):
            e = errors.get(ci)
            if e is None:
                continue
            if ci in requested:
                log.error("blob %s: chunk %d: %s", bid, ci, e)
                first = first or e
            else:
                log.warning("blob %s: amplification chunk %d not filled: %s", bid, ci, e)
        if first is not None:
            raise first
        return written

    def _resolve(self, bid: str, ci: int, data: memoryview | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            claim = self._inflight.pop((bid, ci), None)
        if claim is None:
            return
        fut = claim.future
        if error is not None:
            fut.set_exception(error)
        else:  # `data` lies in a buffer about to be reused: waiters get a copy (nobody waits: no copy)
            fut.set_result(memoryview(bytes(data)) if data is not None and claim.waiters else None)

    def _fetch_owned(self, blob: BlobHandle, cis: Iterable[int], write: WriteFn, present: PresentFn | None,
                     errors: dict[int, BaseException], resolve: bool = True) -> int:  # fmt: skip
        meta = blob.meta
        bid = blob.blob_id

        def fail(ci: int, e: BaseException, counter: str) -> None:
            errors[ci] = e
            self.stats.add(blob=bid, **{counter: 1})
            ttl = FAILED_FETCH_TTL if counter == "fetch_failures" else BAD_CHUNK_TTL
            with self._lock:
                self._failed[(bid, ci)] = (time.monotonic() + ttl, e, blob.backend)
            if resolve:
                self._resolve(bid, ci, error=e)

        todo: list[tuple[int, int]] = []  # (c_off, ci)
        skipped = 0
        for ci in cis:
            try:
                c_off, _, d_off, d_size = meta.check_chunk_bounds(ci)
            except ImageError as e:
                fail(ci, e, "decode_failures")
                continue
            if present is not None and present(d_off, d_size):
                skipped += 1
                if resolve:
                    self._resolve(bid, ci, None)
                continue
            todo.append((c_off, ci))
        if skipped:
            self.stats.add(blob=bid, chunks_present=skipped)
        todo.sort()
        written = 0
        for start, length, group in plan_reads(meta, (ci for _, ci in todo)):
            with self._span(blob, start, length) as view:
                if isinstance(view, BaseException):
                    for ci in group:
                        fail(ci, view, "fetch_failures")
                    continue
                self.stats.add(blob=bid, backend_reads=1, chunks_fetched=len(group), bytes_fetched=length)
                for ci in group:
                    c_off, c_size, d_off, d_size = meta.chunk(ci)
                    raw = view[c_off - start : c_off - start + c_size]
                    padded = -(-d_size // PAGE_SIZE) * PAGE_SIZE
                    with self._decoded(meta, ci, raw, padded) as data:
                        if isinstance(data, DigestMismatchError):
                            fail(ci, data, "digest_failures")
                            continue
                        if isinstance(data, ImageError):
                            fail(ci, data, "decode_failures")
                            continue
                        try:
                            write(d_off, data)
                        except Exception as e:  # noqa: BLE001 - reported as this chunk's failure
                            errors[ci] = e
                            self.stats.add(blob=bid, write_failures=1)
                        else:
                            written += data.nbytes
                            self.stats.add(blob=bid, chunks_written=1, bytes_written=data.nbytes)
                        if resolve:  # verified data: waiters may write it themselves if our write failed
                            self._resolve(bid, ci, data)
        return written

    @contextmanager
    def _span(self, blob: BlobHandle, start: int, length: int) -> Iterator[memoryview | NydusErofsError]:
        """The blob's stored bytes ``[start, start + length)``: read into a pooled buffer when the backend can
        (``read_into``), else as the bytes its ``read`` returns; or the error that stopped the read."""
        bid = blob.blob_id
        read_into = getattr(blob.backend, "read_into", None)
        if read_into is None:
            got: memoryview | NydusErofsError
            try:
                buf = blob.backend.read(bid, start, length)
                got = memoryview(buf)
                if len(buf) != length:
                    got = BackendError(f"blob {bid}: short read at {start}: {len(buf)} of {length} bytes")
            except NydusErofsError as e:
                got = e
            except OSError as e:
                got = BackendError(f"blob {bid}: read of {start}+{length} failed: {e}")
            yield got
            return
        with self.buffers.lease(length) as view:
            try:
                read_into(bid, start, view)
                got = view
            except NydusErofsError as e:
                got = e
            except OSError as e:
                got = BackendError(f"blob {bid}: read of {start}+{length} failed: {e}")
            yield got

    @contextmanager
    def _decoded(self, meta: BlobMeta, ci: int, raw: memoryview, padded: int) -> Iterator[memoryview | ImageError]:
        """Chunk ``ci`` verified and zero-padded to ``padded`` bytes, from its stored bytes ``raw``: ``raw``
        itself when it is stored uncompressed and whole pages, else decompressed (or copied) into a pooled
        buffer; or the ImageError (DigestMismatchError) that rejected it."""
        c_off, c_size, _, d_size = meta.chunk(ci)
        got: memoryview | ImageError
        if c_size == d_size == padded:
            try:
                got = meta.decode_chunk(ci, raw)  # verified where it lies: no copy
            except ImageError as e:
                got = e
            yield got
            return
        with self.buffers.lease(padded) as out:
            data = out[:d_size]
            try:
                if c_size != d_size:
                    try:
                        decompress_into(meta.compressor, raw, data)
                    except ImageError as e:
                        raise ImageError(f"blob {meta.blob_id}: chunk {ci} (at {c_off}): {e}") from None
                else:
                    data[:] = raw
                meta.verify_chunk(ci, data)
                out[d_size:] = bytes(padded - d_size)
                got = out
            except ImageError as e:
                got = e
            yield got

    # -- asynchronous use ---------------------------------------------------------------------------------------
    def submit(self, blob: BlobHandle, offset: int, length: int, write: WriteFn,
               present: PresentFn | None = None) -> Future[int]:  # fmt: skip
        """:meth:`fill` on one of the ``workers`` threads; the future holds its result or error."""
        with self._lock:
            if self._closed:
                raise RuntimeError("pipeline is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pipeline")
            pool = self._pool
        return pool.submit(self.fill, blob, offset, length, write, present)

    def close(self) -> None:
        """Stop accepting work and wait for submitted fills to finish."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
