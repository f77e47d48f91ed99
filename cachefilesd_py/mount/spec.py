"""What a mount is: :class:`MountSpec`, and how it travels whole from ``nydus-erofs mount`` to its daemon.

The spec goes to the supervisor and to each worker as JSON in an inherited memfd (:func:`spec_fd`, mode 0600,
in no filesystem), never on a command line: ``backend_config`` can carry a password or a token, and
``/proc/PID/cmdline`` is readable by every user.

Adding a mount option is two edits: a field here and the click option of the same name
(:mod:`cachefilesd_py.commands.mount`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Self

from erofs.errors import UsageError

from ..defaults import FILL_TIMEOUT

__all__ = ["FSCACHE_MODE", "MODES", "MountSpec", "read_spec_fd", "spec_fd"]

MODES = ("auto", "fanotify", "full", "nbd")
#: the mode of an image bound in cachefilesd-py (:mod:`cachefilesd_py.fscache_mount`): no MountSpec, no daemon of ours
FSCACHE_MODE = "fscache"


@dataclass(frozen=True)
class MountSpec:
    """A mount of a Nydus image: ``boot`` (its bootstrap) on ``mountpoint``, blob cache files in ``cache_dir``.

    - ``mode``: one of :data:`MODES` (``auto``: fanotify when the kernel has pre-content events, else nbd when it
      has NBD devices, else full);
    - ``backend``, ``backend_config``: where blobs come from (:func:`cachefilesd_py.backends.make_backend`'s
      kind and options, ``--blob-dir`` being localfs's ``dir``; never shown in ``repr``: it may hold credentials);
    - ``amplify``: least bytes one fetch brings in; ``readahead``: bytes filled ahead of a sequential reader
      (0: off, None: 8 x amplify); ``workers``: fill threads; ``log_level``: the daemon's;
    - ``fill_timeout``: seconds one fill (fetch, verify, write of what a read wants) may take, retries included;
      past it the read gets EIO and the fetch is abandoned;
    - ``allow_suid``, ``allow_dev``: mount without ``nosuid`` / ``nodev`` (by default an image's setuid bits and
      device nodes mean nothing on this host).
    - ``file_backed``: mount the local files file-backed (True), over loop devices (False), or file-backed where
      the kernel has it, else loop devices (None; :mod:`.localmount`).
    - ``prefetch``: fetch the files of the image's prefetch table in the background once mounted;
      ``prefetch_all``: then the rest of the blobs too; ``prefetch_bandwidth``: its cap in bytes/s fetched (0:
      none); ``prefetch_merge``: the largest piece it fills at once (:mod:`cachefilesd_py.prefetch`).
    - ``cache_size_limit``: bytes the cache files may take on disk (0: no limit); in fanotify mode the least
      recently used chunks are punched out to stay under it (:mod:`.evict`), full and nbd modes refuse an image
      that does not fit.
    """

    boot: str
    mountpoint: str
    cache_dir: str
    mode: str = "auto"
    backend: str = "localfs"
    backend_config: dict[str, Any] = field(default_factory=dict, repr=False)
    amplify: int = 1 << 20
    readahead: int | None = None
    workers: int = 4
    log_level: str = "INFO"
    fill_timeout: float = FILL_TIMEOUT
    allow_suid: bool = False
    allow_dev: bool = False
    file_backed: bool | None = None
    prefetch: bool = True
    prefetch_all: bool = False
    prefetch_bandwidth: int = 0
    prefetch_merge: int = 1 << 20
    cache_size_limit: int = 0

    def resolved(self) -> Self:
        """The spec with absolute, symlink-free paths (what the daemon, run from ``/``, is given)."""
        return dataclasses.replace(self, boot=os.path.realpath(self.boot), mountpoint=os.path.realpath(self.mountpoint),
                                   cache_dir=os.path.realpath(self.cache_dir))  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """The spec :meth:`to_json` wrote; UsageError when ``text`` is not one."""
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UsageError(f"mount spec: not valid JSON: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(value, dict) or not set(value) <= names or not isinstance(value.get("backend_config"), dict):
            raise UsageError("mount spec: expected an object of the MountSpec fields")
        try:
            return cls(**value)
        except TypeError as e:
            raise UsageError(f"mount spec: {e}") from None


def spec_fd(spec: MountSpec) -> int:
    """A memfd holding ``spec`` (JSON, mode 0600), positioned at its start, not inheritable: pass it to the child
    with ``pass_fds``; the reader closes it."""
    fd = os.memfd_create("nydus-erofs-mount-spec", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        data = spec.to_json().encode()
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_spec_fd(fd: int) -> MountSpec:
    """The spec in ``fd`` (from :func:`spec_fd`, inherited); closes ``fd``."""
    try:
        chunks, pos = [], 0
        while chunk := os.pread(fd, 1 << 16, pos):
            chunks.append(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return MountSpec.from_json(b"".join(chunks))
