"""Where a snapshot's files are, the mounts containerd is told to perform, and the lazy EROFS mounts of Nydus
bootstraps.

Layout under the root: ``snapshots/<id>/fs`` (a layer's files, or a container's upper dir), ``snapshots/<id>/work``
(overlayfs' work dir); a Nydus bootstrap snapshot has ``image.boot``, ``backend.json`` and ``mnt`` (where the image
is mounted, once a container needs it) instead, its blob cache files in ``<cache dir>/<id>`` (none in fscache
mode: the image is bound in cachefilesd-py, which keeps the cache, and mounted by fsid).

Mounts are containerd's overlayfs snapshotter's: a snapshot without lower layers is a bind mount of its ``fs``;
otherwise overlayfs, ``lowerdir`` the ancestors' ``fs`` nearest first.  A Nydus blob layer contributes nothing (its
data is in the image the bootstrap describes) and a bootstrap contributes its lazy mount and ends the chain.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fscache.mount import is_mounted

from ..defaults import DEFAULT_DAEMON_SOCK
from ..fscache_mount import mount_fscache
from ..mount.record import read_record
from ..mount.service import mount_image, umount_image
from ..mount.spec import FSCACHE_MODE, MODES, MountSpec
from .nydus import BOOT_FILE, load_backend
from .store import ACTIVE, NYDUS_BLOB, NYDUS_BOOTSTRAP, Snapshot

__all__ = ["SNAPSHOTTER_MODES", "Layout", "LazyMounts", "MountEntry", "mounts_for"]

#: how the snapshotter mounts Nydus images: ``nydus-erofs mount``'s modes, and fscache (bound in cachefilesd-py)
SNAPSHOTTER_MODES = (*MODES, FSCACHE_MODE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountEntry:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    root: Path
    cache_dir: Path

    def dir(self, snap: Snapshot | int) -> Path:
        return self.root / "snapshots" / str(snap if isinstance(snap, int) else snap.id)

    def fs(self, snap: Snapshot) -> Path:
        return self.dir(snap) / "fs"

    def work(self, snap: Snapshot) -> Path:
        return self.dir(snap) / "work"

    def boot(self, snap: Snapshot) -> Path:
        return self.dir(snap) / BOOT_FILE

    def mnt(self, snap: Snapshot) -> Path:
        return self.dir(snap) / "mnt"

    def cache(self, snap: Snapshot) -> Path:
        return self.cache_dir / str(snap.id)


class LazyMounts:
    """The EROFS mounts of bootstrap snapshots (through :func:`~cachefilesd_py.mount.service.mount_image`: its
    daemon runs in a session of its own, so it outlives a killed snapshotter and running containers keep reading;
    in fscache mode through :func:`~cachefilesd_py.fscache_mount.mount_fscache`: the cachefilesd-py at
    ``daemon_sock`` serves the image, and the kernel keeps the mount whatever happens to the snapshotter)."""

    def __init__(self, layout: Layout, mode: str, *, amplify: int = 1 << 20, readahead: int | None = 0,
                 daemon_sock: str = DEFAULT_DAEMON_SOCK, cache_size_limit: int = 0) -> None:  # fmt: skip
        self.layout, self.mode, self.amplify, self.readahead = layout, mode, amplify, readahead
        self.daemon_sock = daemon_sock
        self.cache_size_limit = cache_size_limit
        self._lock = threading.Lock()

    def is_mounted(self, snap: Snapshot) -> bool:
        mnt = self.layout.mnt(snap)
        return is_mounted(mnt) and read_record(mnt) is not None

    def ensure(self, snap: Snapshot) -> Path:
        """The mountpoint of ``snap``'s image, mounting it first when it is not (or no longer) mounted."""
        mnt = self.layout.mnt(snap)
        with self._lock:
            if self.is_mounted(snap):
                return mnt
            mnt.mkdir(exist_ok=True)
            backend = load_backend(self.layout.dir(snap))
            if self.mode == FSCACHE_MODE:
                if read_record(mnt) is not None:  # a mount gone by other means: unbound before binding again
                    umount_image(mnt)
                rec = mount_fscache(str(self.layout.boot(snap)), mnt, daemon_sock=self.daemon_sock,
                                    backend=backend.type, backend_config=backend.config)  # fmt: skip
                log.info("mounted %s (fscache mode, fsid %s) on %s", snap.name, rec["fsid"], mnt)
                return mnt
            cache = self.layout.cache(snap)
            cache.mkdir(parents=True, exist_ok=True)
            spec = MountSpec(boot=str(self.layout.boot(snap)), mountpoint=str(mnt), cache_dir=str(cache),
                             mode=self.mode, backend=backend.type, backend_config=backend.config,
                             amplify=self.amplify, readahead=self.readahead,
                             cache_size_limit=self.cache_size_limit)  # fmt: skip
            rec = mount_image(spec)
            log.info("mounted %s (%s mode) on %s", snap.name, rec.get("mode"), mnt)
            return mnt

    def release(self, snap: Snapshot) -> None:
        """Unmount ``snap``'s image if it is mounted (EBUSY while a container still has files open there)."""
        mnt = self.layout.mnt(snap)
        with self._lock:
            if read_record(mnt) is not None:
                umount_image(mnt)
                log.info("unmounted %s from %s", snap.name, mnt)


def lower_dirs(layout: Layout, lazy: LazyMounts, chain: list[Snapshot]) -> list[str]:
    """The lowerdirs for a snapshot whose ancestors are ``chain`` (parent first)."""
    lowers: list[str] = []
    for p in chain:
        if p.nydus == NYDUS_BLOB:
            continue
        if p.nydus == NYDUS_BOOTSTRAP:
            lowers.append(str(lazy.ensure(p)))
            break
        lowers.append(str(layout.fs(p)))
    return lowers


def mounts_for(layout: Layout, lazy: LazyMounts, snap: Snapshot, chain: list[Snapshot]) -> list[MountEntry]:
    """What containerd mounts for active or view snapshot ``snap``."""
    lowers = lower_dirs(layout, lazy, chain)
    if snap.kind == ACTIVE:
        if not lowers:
            return [MountEntry("bind", str(layout.fs(snap)), ("rw", "rbind"))]
        options = ("index=off", f"workdir={layout.work(snap)}", f"upperdir={layout.fs(snap)}",
                   f"lowerdir={':'.join(lowers)}")  # fmt: skip
        return [MountEntry("overlay", "overlay", options)]
    if not lowers:
        return [MountEntry("bind", str(layout.fs(snap)), ("ro", "rbind"))]
    if len(lowers) == 1:
        return [MountEntry("bind", lowers[0], ("ro", "rbind"))]
    return [MountEntry("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]
