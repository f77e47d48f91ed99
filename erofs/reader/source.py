"""Where blob bytes come from: a :class:`BlobSource` reads ranges of a blob named by its id.

:class:`LocalBlobDir` reads blob files named by id from a directory (``nydus-image -D`` layout);
:class:`BlobFiles` maps ids (or device keys of plain EROFS images) to explicit paths.  The daemon's HTTP and
registry backends implement the same two-method protocol.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from erofs.errors import BackendError

_SAFE_ID = re.compile(r"[A-Za-z0-9._:+=-]{1,128}")


@runtime_checkable
class BlobSource(Protocol):
    """Ranged reads of blobs by id.  ``read`` returns exactly ``length`` bytes or raises BackendError."""

    def read(self, blob_id: str, offset: int, length: int) -> bytes: ...

    def size(self, blob_id: str) -> int: ...


class _FileSource:
    """Shared pread machinery: one cached O_RDONLY fd per blob."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, blob_id: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is not None:
            return fd
        with self._lock:  # safe to share between threads: one fd per blob
            fd = self._fds.get(blob_id)
            if fd is not None:
                return fd
            path = self._path(blob_id)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise BackendError(f"blob {blob_id}: not found ({path})") from None
            except OSError as e:
                raise BackendError(f"blob {blob_id}: cannot open {path}: {e.strerror}") from None
            self._fds[blob_id] = fd
        return fd

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackendError(f"blob {blob_id}: invalid range {offset}+{length}")
        fd = self._fd(blob_id)
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                raise BackendError(
                    f"blob {blob_id}: short read at offset {offset}: {got} of {length} bytes (blob is truncated?)"
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def size(self, blob_id: str) -> int:
        return os.fstat(self._fd(blob_id)).st_size

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> _FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LocalBlobDir(_FileSource):
    """Blob files named by their id in one directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)

    def _path(self, blob_id: str) -> Path:
        if not _SAFE_ID.fullmatch(blob_id) or blob_id in (".", ".."):
            raise BackendError(f"blob id {blob_id!r} is not a valid file name")
        return self.path / blob_id

    def __repr__(self) -> str:
        return f"LocalBlobDir({str(self.path)!r})"


class BlobFiles(_FileSource):
    """Explicit id → file mapping (e.g. the ``--device`` files of a plain EROFS image, by device key)."""

    def __init__(self, files: Mapping[str, str | os.PathLike[str]]) -> None:
        super().__init__()
        self.files = {k: Path(v) for k, v in files.items()}

    def _path(self, blob_id: str) -> Path:
        try:
            return self.files[blob_id]
        except KeyError:
            raise BackendError(f"blob {blob_id}: no file given for it") from None


class ChainSource:
    """Try each source in turn (first that has the blob wins)."""

    def __init__(self, *sources: BlobSource) -> None:
        self.sources = sources
        self._picked: dict[str, BlobSource] = {}

    def _pick(self, blob_id: str) -> BlobSource:
        picked = self._picked.get(blob_id)
        if picked is not None:
            return picked
        last: BackendError | None = None
        for s in self.sources:
            try:
                s.size(blob_id)
            except BackendError as e:
                last = e
                continue
            self._picked[blob_id] = s
            return s
        raise last or BackendError(f"blob {blob_id}: no source")

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        return self._pick(blob_id).read(blob_id, offset, length)

    def size(self, blob_id: str) -> int:
        return self._pick(blob_id).size(blob_id)
