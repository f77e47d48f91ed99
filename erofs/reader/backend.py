"""Where blob bytes come from: a :class:`BlobBackend` reads ranges of a blob named by its id.

The one blob-reading interface of the project: the reader (``check``, ``unpack``, ``inspect``) and the daemon
(:mod:`cachefilesd_py.backends`: HTTP and registry backends) both read blobs through it.  Here are the local
ones: :class:`LocalBlobDir` reads blob files named by id from a directory (``nydus-image -D`` layout, the
daemon's ``localfs``); :class:`BlobFiles` maps ids (or device keys of plain EROFS images) to explicit paths;
:class:`ChainBackend` tries several in turn.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

from erofs.errors import BackendError

_SAFE_ID = re.compile(r"[A-Za-z0-9._:+=-]{1,128}")
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def check_blob_id(blob_id: str) -> str:
    """A blob id is the sha256 of the blob: 64 lowercase hex digits (so it is always a safe file name)."""
    if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
        raise BackendError(f"blob id {blob_id!r} is not 64 lowercase hex digits")
    return blob_id


#: Upper bounds (milliseconds) of the latency histogram buckets of :class:`BackendStats` (cumulative, as in
#: Prometheus: ``latency_le_10ms`` counts the operations that took at most 10 ms).
LATENCY_BUCKETS_MS = (1, 10, 100, 1000, 10000)


def latency_bucket_name(ms: int) -> str:
    return f"latency_le_{ms}ms" if ms < 1000 else f"latency_le_{ms // 1000}s"


@dataclass
class BackendStats:
    """Thread-safe counters.

    ``requests``: requests sent (HTTP requests, or ``pread`` calls for localfs), auth included;
    ``bytes``: blob bytes received from the backend (bytes skipped over when a server ignores Range count
    too); ``errors``: failed ``read``/``size`` calls; ``retries``: extra attempts after a temporary failure;
    ``proxied``: requests sent through an HTTP proxy (the ``proxy`` network option); ``fallbacks``: proxy
    failures after which the request went to the origin instead.

    Latency, of each ``read``/``size`` call as its caller sees it (retries included): ``latency_count``,
    ``latency_sum_ms``, ``latency_max_ms`` and a cumulative histogram, ``latency_le_1ms`` ... ``latency_le_10s``
    (:data:`LATENCY_BUCKETS_MS`; the rest took longer).  :meth:`snapshot` gives all of them as one flat dict;
    :meth:`combined` sums several backends' (and takes the largest ``latency_max_ms``).
    """

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    retries: int = 0
    proxied: int = 0
    fallbacks: int = 0
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    _buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS), repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to counters by name (``requests=1, bytes=n``...)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def observe(self, seconds: float) -> None:
        """One operation that took ``seconds``."""
        ms = seconds * 1000.0
        with self._lock:
            self.latency_count += 1
            self.latency_sum_ms += ms
            self.latency_max_ms = max(self.latency_max_ms, ms)
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                if ms <= bound:
                    self._buckets[i] += 1

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Observe how long the ``with`` body takes (whether it returns or raises)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.observe(time.monotonic() - start)

    def snapshot(self) -> dict[str, int | float]:
        """Every counter as one flat dict (consistent at one instant)."""
        with self._lock:
            out: dict[str, int | float] = {
                f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
            }
            out.update(zip(map(latency_bucket_name, LATENCY_BUCKETS_MS), self._buckets, strict=True))
        out["latency_sum_ms"] = round(out["latency_sum_ms"], 3)
        out["latency_max_ms"] = round(out["latency_max_ms"], 3)
        return out

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, type(getattr(self, f.name))())
            self._buckets = [0] * len(LATENCY_BUCKETS_MS)

    @classmethod
    def combined(cls, stats: Iterable[BackendStats]) -> BackendStats:
        """The counters of several backends together: sums, and the largest ``latency_max_ms``."""
        total = cls()
        for s in stats:
            with s._lock:
                for f in fields(s):
                    if f.name.startswith("_"):
                        continue
                    mine, theirs = getattr(total, f.name), getattr(s, f.name)
                    setattr(total, f.name, max(mine, theirs) if f.name == "latency_max_ms" else mine + theirs)
                total._buckets = [a + b for a, b in zip(total._buckets, s._buckets, strict=True)]
        return total


@runtime_checkable
class BlobBackend(Protocol):
    """Ranged reads of blobs by id.

    ``read`` returns exactly ``length`` bytes or raises :class:`~erofs.errors.BackendError` (a range reaching
    past the end of the blob is an error too); ``size`` is the blob's size in bytes; ``stats`` counts what was
    fetched; ``close`` releases what the backend holds.  Every backend is safe to call from many threads.
    """

    stats: BackendStats

    def read(self, blob_id: str, offset: int, length: int) -> bytes: ...

    def size(self, blob_id: str) -> int: ...

    def close(self) -> None: ...


class _Fd:
    __slots__ = ("fd", "refs", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.evicted = False


class BlobFileBackend:
    """Blobs as local files, read with ``os.pread`` through a bounded cache of open fds (least recently used
    closed first; an fd in use by a concurrent read is closed when that read ends).  Thread-safe.
    Subclasses say where a blob's file is (:meth:`_candidates`)."""

    def __init__(self, *, max_open: int = 64) -> None:
        self.max_open = max(1, max_open)
        self.stats = BackendStats()
        self._fds: OrderedDict[str, _Fd] = OrderedDict()
        self._lock = threading.Lock()

    def _candidates(self, blob_id: str) -> list[Path]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _missing(self, blob_id: str) -> BackendError:
        return BackendError(f"blob {blob_id}: not found")

    def _open(self, blob_id: str) -> int:
        for path in self._candidates(blob_id):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the open
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BackendError(f"blob {blob_id}: cannot open {path}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise BackendError(f"blob {blob_id}: {path} is not a regular file")
            return fd
        raise self._missing(blob_id)

    def _acquire(self, blob_id: str) -> _Fd:
        with self._lock:
            entry = self._fds.get(blob_id)
            if entry is not None:
                self._fds.move_to_end(blob_id)
                entry.refs += 1
                return entry
        fd = self._open(blob_id)  # outside the lock: opening may be slow (NFS)
        to_close: list[int] = []
        with self._lock:
            entry = self._fds.get(blob_id)
            if entry is not None:  # another thread won the race
                to_close.append(fd)
                self._fds.move_to_end(blob_id)
            else:
                entry = self._fds[blob_id] = _Fd(fd)
                while len(self._fds) > self.max_open:
                    _, old = self._fds.popitem(last=False)
                    old.evicted = True
                    if old.refs == 0:
                        to_close.append(old.fd)
            entry.refs += 1
        for f in to_close:
            os.close(f)
        return entry

    def _acquire_counted(self, blob_id: str) -> _Fd:
        try:
            return self._acquire(blob_id)
        except BackendError:
            self.stats.add(errors=1)
            raise

    def _release(self, entry: _Fd) -> None:
        with self._lock:
            entry.refs -= 1
            close = entry.evicted and entry.refs == 0
        if close:
            os.close(entry.fd)

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or BackendError (a range past the end included)."""
        if offset < 0 or length < 0:
            self.stats.add(errors=1)
            raise BackendError(f"blob {blob_id}: invalid range {offset}+{length}")
        if length == 0:
            return b""
        with self.stats.timed():
            return self._pread(blob_id, offset, length)

    def _pread(self, blob_id: str, offset: int, length: int) -> bytes:
        entry = self._acquire_counted(blob_id)
        try:
            parts: list[bytes] = []
            got = 0
            while got < length:
                try:
                    data = os.pread(entry.fd, length - got, offset + got)
                except OSError as e:
                    self.stats.add(requests=1, errors=1)
                    raise BackendError(f"blob {blob_id}: read at {offset + got} failed: {e.strerror}") from None
                self.stats.add(requests=1, bytes=len(data))
                if not data:
                    self.stats.add(errors=1)
                    size = os.fstat(entry.fd).st_size
                    raise BackendError(
                        f"blob {blob_id}: range {offset}+{length} is past the end of the blob (size {size})"
                    )
                parts.append(data)
                got += len(data)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self._release(entry)

    def read_into(self, blob_id: str, offset: int, buf: memoryview) -> None:
        """:meth:`read` of ``buf.nbytes`` bytes at ``offset`` straight into ``buf`` (``preadv``: no bytes object
        in between), or BackendError."""
        length = buf.nbytes
        if offset < 0:
            self.stats.add(errors=1)
            raise BackendError(f"blob {blob_id}: invalid range {offset}+{length}")
        if length == 0:
            return
        with self.stats.timed():
            entry = self._acquire_counted(blob_id)
            try:
                got = 0
                while got < length:
                    try:
                        n = os.preadv(entry.fd, [buf[got:]], offset + got)
                    except OSError as e:
                        self.stats.add(requests=1, errors=1)
                        raise BackendError(f"blob {blob_id}: read at {offset + got} failed: {e.strerror}") from None
                    self.stats.add(requests=1, bytes=n)
                    if not n:
                        self.stats.add(errors=1)
                        size = os.fstat(entry.fd).st_size
                        raise BackendError(
                            f"blob {blob_id}: range {offset}+{length} is past the end of the blob (size {size})"
                        )
                    got += n
            finally:
                self._release(entry)

    def size(self, blob_id: str) -> int:
        with self.stats.timed():
            entry = self._acquire_counted(blob_id)
            try:
                return os.fstat(entry.fd).st_size
            finally:
                self._release(entry)

    def close(self) -> None:
        with self._lock:
            entries, self._fds = list(self._fds.values()), OrderedDict()
            to_close = []
            for e in entries:
                e.evicted = True
                if e.refs == 0:
                    to_close.append(e.fd)
        for fd in to_close:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LocalBlobDir(BlobFileBackend):
    """Blob files named by their id in ``dir`` (then each of ``alt_dirs``): the ``nydus-image -D`` layout and
    the daemon's ``localfs`` backend.  With ``strict_ids`` an id must be a sha256 (64 lowercase hex digits);
    otherwise any plain file name is accepted.  Either way a path never leaves the directories."""

    def __init__(self, dir: str | os.PathLike[str], *, alt_dirs: Sequence[str | os.PathLike[str]] = (),
                 max_open: int = 64, strict_ids: bool = False) -> None:  # fmt: skip
        super().__init__(max_open=max_open)
        self.dirs = [Path(dir), *(Path(d) for d in alt_dirs)]
        self.path = self.dirs[0]
        self.strict_ids = strict_ids

    def _candidates(self, blob_id: str) -> list[Path]:
        if self.strict_ids:
            check_blob_id(blob_id)
        elif not isinstance(blob_id, str) or not _SAFE_ID.fullmatch(blob_id) or blob_id in (".", ".."):
            raise BackendError(f"blob id {blob_id!r} is not a valid file name")
        return [d / blob_id for d in self.dirs]

    def _missing(self, blob_id: str) -> BackendError:
        return BackendError(f"blob {blob_id}: not found in {' or '.join(str(d) for d in self.dirs)}")

    def __repr__(self) -> str:
        return f"LocalBlobDir({', '.join(repr(str(d)) for d in self.dirs)})"


class BlobFiles(BlobFileBackend):
    """Explicit id → file mapping (e.g. the ``--device`` files of a plain EROFS image, by device key)."""

    def __init__(self, files: Mapping[str, str | os.PathLike[str]]) -> None:
        super().__init__()
        self.files = {k: Path(v) for k, v in files.items()}

    def _candidates(self, blob_id: str) -> list[Path]:
        try:
            return [self.files[blob_id]]
        except KeyError:
            raise BackendError(f"blob {blob_id}: no file given for it") from None


class ChainBackend:
    """Try each backend in turn (the first that has the blob serves it)."""

    def __init__(self, *backends: BlobBackend) -> None:
        self.backends = backends
        self._picked: dict[str, BlobBackend] = {}

    def _pick(self, blob_id: str) -> BlobBackend:
        picked = self._picked.get(blob_id)
        if picked is not None:
            return picked
        last: BackendError | None = None
        for b in self.backends:
            try:
                b.size(blob_id)
            except BackendError as e:
                last = e
                continue
            self._picked[blob_id] = b
            return b
        raise last or BackendError(f"blob {blob_id}: no backend")

    @property
    def stats(self) -> BackendStats:
        """The backends' counters together."""
        return BackendStats.combined(b.stats for b in self.backends)

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        return self._pick(blob_id).read(blob_id, offset, length)

    def size(self, blob_id: str) -> int:
        return self._pick(blob_id).size(blob_id)

    def close(self) -> None:
        for b in self.backends:
            b.close()
