"""The snapshotter's operations, without gRPC: containerd's overlayfs snapshotter, plus Nydus layers that are
answered without being downloaded (:mod:`.nydus`) and mounted lazily (:mod:`.mounts`).

A layer Prepare carrying the target label (:data:`~.nydus.LABEL_TARGET`, the layer's chain ID) and a Nydus role:

- a data-blob layer is committed at once, empty, under the target's name;
- the bootstrap layer, when the labels say where the image lives, has its bootstrap fetched (small) and is
  committed the same way; its image is mounted then (no data is read), and stays mounted, for every container
  of the image, until the snapshot is removed (the image's removal);

and both answer ``ALREADY_EXISTS``: containerd then finds the committed target (List) and skips the layer.  A
bootstrap layer labelled without the image's location is unpacked by containerd's differ like any layer; its Commit
takes the unpacked bootstrap and reads the blobs from containerd's content store.  containerd 1.6's ``ctr image
pull`` labels no layer at all: our data blobs start with a tar end-of-archive marker, so its differ applies each
as an empty layer (given the README's stream processor for their media type), and the bootstrap layer is known
by what it unpacks to (:func:`~.nydus.unlabelled_bootstrap`) and taken the same way.  A first layer that is no
tar (a blob written without that prefix) is refused with what to use instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from pathlib import Path

from erofs.errors import UsageError

from ..backends.config import BackendSpec
from ..defaults import DEFAULT_DAEMON_SOCK
from .mounts import SNAPSHOTTER_MODES, Layout, LazyMounts, MountEntry, mounts_for
from .nydus import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_TARGET,
    fetch_bootstrap,
    layer_role,
    missing_blob,
    registry_backend,
    save_backend,
    take_unpacked_bootstrap,
    unlabelled_bootstrap,
    unpack_chain_id,
    untarrable_layer,
)
from .store import ACTIVE, COMMITTED, NYDUS_BLOB, NYDUS_BOOTSTRAP, VIEW, Snapshot, SnapshotError, Store

__all__ = ["Snapshotter", "disk_usage"]

log = logging.getLogger(__name__)

CONTENT_BLOBS = "io.containerd.content.v1.content/blobs/sha256"


def disk_usage(path: Path) -> tuple[int, int]:
    """Bytes allocated and inodes under ``path`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
            inodes += 1
    return size, inodes


class Snapshotter:
    """Snapshots under ``root`` (metadata in ``root/metadata.db``).

    ``mode``: how Nydus images are mounted (:data:`~.mounts.SNAPSHOTTER_MODES`; ``daemon_sock``: the API socket of
    the cachefilesd-py that serves them in fscache mode); ``plain_http``: reach
    registries over HTTP; ``containerd_root``: where a plain pull's blobs are (containerd's content store);
    ``amplify``, ``readahead``, ``cache_size_limit``: the mounts' (:class:`~cachefilesd_py.mount.spec.MountSpec`;
    the limit holds for each image's cache); no readahead by default: a container starts by reading scattered
    files, and a window of megabytes after each would fetch much of the image.
    """

    def __init__(self, root: Path, *, cache_dir: Path | None = None, mode: str = "auto", plain_http: bool = False,
                 containerd_root: Path = Path("/var/lib/containerd"), amplify: int = 1 << 20,
                 readahead: int | None = 0, daemon_sock: str = DEFAULT_DAEMON_SOCK,
                 cache_size_limit: int = 0) -> None:  # fmt: skip
        if mode not in SNAPSHOTTER_MODES:
            raise SnapshotError("INVALID_ARGUMENT", f"unknown mode {mode!r}")
        root.mkdir(parents=True, exist_ok=True)
        if any(c in str(root.resolve()) for c in ",:"):  # the paths go into overlayfs' mount options
            raise UsageError(f"--root {root}: a path with ',' or ':' cannot be in overlayfs mount options")
        self._lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise UsageError(f"another snapshotter is using {root}") from None
        (root / "snapshots").mkdir(exist_ok=True)
        self.layout = Layout(root.resolve(), (cache_dir or root / "cache").resolve())
        self.store = Store(root / "metadata.db")
        self.lazy = LazyMounts(self.layout, mode, amplify=amplify, readahead=readahead, daemon_sock=daemon_sock,
                               cache_size_limit=cache_size_limit)  # fmt: skip
        self.plain_http = plain_http
        self.containerd_root = containerd_root
        # held while a snapshot's row and directory are created, and by cleanup: it never sees a directory whose
        # row it read too early to know
        self._create_lock = threading.Lock()

    def close(self) -> None:
        self.store.close()
        os.close(self._lock_fd)

    def reattach(self) -> None:
        """After a restart: mount again the images whose mounts are gone (mounts whose daemons survived are left as
        they are, running containers reading on)."""
        for snap in self.store.all():
            if snap.nydus == NYDUS_BOOTSTRAP and snap.kind == COMMITTED:
                self._mount_early(snap)

    def _mount_early(self, snap: Snapshot) -> None:
        """Mount ``snap``'s image now, so that starting a container does not wait for it; a failure is only
        logged (the container's Prepare tries again, and fails with the reason)."""
        try:
            self.lazy.ensure(snap)
        except Exception as e:
            log.error("cannot mount %s: %s", snap.name, e)

    # -- create ---------------------------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str], kind: int = ACTIVE) -> list[MountEntry]:
        log.debug("%s %r parent %r labels %s", "prepare" if kind == ACTIVE else "view", key, parent, labels)
        target = labels.get(LABEL_TARGET, "")
        role = layer_role(labels)
        if not target and not parent and kind == ACTIVE:
            self._refuse_untarrable(key)
        if target and role and kind == ACTIVE:
            existing = self.store.get(target)
            if existing is not None and existing.kind == COMMITTED and existing.parent == parent:
                raise SnapshotError("ALREADY_EXISTS", f"target snapshot {target!r} already exists")
            if role == NYDUS_BLOB:
                self._commit_remote(key, parent, labels, target, NYDUS_BLOB)
            if labels.get(LABEL_IMAGE_REF) and labels.get(LABEL_LAYER_DIGEST):
                self._commit_remote(key, parent, labels, target, NYDUS_BOOTSTRAP)
        with self._create_lock:
            snap = self.store.create(key, parent, kind, labels)
            try:
                self.layout.fs(snap).mkdir(parents=True)
                if kind == ACTIVE:
                    self.layout.work(snap).mkdir()
            except BaseException:
                self._drop(snap)
                raise
        try:
            return mounts_for(self.layout, self.lazy, snap, self.store.chain(snap))
        except BaseException:
            self._drop(snap)
            raise

    def _refuse_untarrable(self, key: str) -> None:
        """containerd 1.6's own unpack (``ctr image pull``) prepares each layer without its labels and has its
        differ apply the layer's blob; a first layer that is a Nydus data blob without our zero prefix (upstream's,
        or ours from before it: its diff ID its digest, and no tar) it can never apply: say so, and what pulls the
        image instead, rather than let it fail in the differ."""
        chain_id = unpack_chain_id(key)
        if chain_id and untarrable_layer(self.containerd_root / CONTENT_BLOBS / chain_id.removeprefix("sha256:")):
            raise SnapshotError("FAILED_PRECONDITION", "the layer is not a tar (a Nydus data blob?): "
                                "`ctr image pull` cannot unpack it; pull the image with `nydus-erofs pull`")

    def _commit_remote(self, key: str, parent: str, labels: dict[str, str], target: str, role: str) -> None:
        """Create ``key`` as a Nydus layer, commit it as ``target``, and say ALREADY_EXISTS (containerd skips it)."""
        with self._create_lock:
            snap = self.store.create(key, parent, ACTIVE, labels, nydus=role)
            d = self.layout.dir(snap)
            try:
                d.mkdir(parents=True)
            except BaseException:
                self._drop(snap)
                raise
        try:
            size = 0
            if role == NYDUS_BOOTSTRAP:
                backend = registry_backend(labels[LABEL_IMAGE_REF], self.plain_http)
                fetch_bootstrap(backend, labels[LABEL_LAYER_DIGEST], self.layout.boot(snap))
                save_backend(backend, d)
                size = self.layout.boot(snap).stat().st_size
            committed = self.store.commit(key, target, {}, size, 1)
        except BaseException:
            self._drop(snap)
            raise
        log.info("%s layer %s committed without downloading it", role, target)
        if role == NYDUS_BOOTSTRAP:
            self._mount_early(committed)
        raise SnapshotError("ALREADY_EXISTS", f"target snapshot {target!r} already exists")

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[MountEntry]:
        return self.prepare(key, parent, labels, VIEW)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        snap = self.store.need(key)
        if snap.kind != ACTIVE:
            raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key!r} is not active")
        nydus = None
        fs = self.layout.fs(snap)
        role = layer_role(snap.labels) or (NYDUS_BOOTSTRAP if unlabelled_bootstrap(fs) else "")
        if role == NYDUS_BOOTSTRAP and take_unpacked_bootstrap(fs, self.layout.boot(snap)):
            image_ref = snap.labels.get(LABEL_IMAGE_REF)
            if image_ref:
                backend = registry_backend(image_ref, self.plain_http)
            else:
                blobs = self.containerd_root / CONTENT_BLOBS
                missing = missing_blob(self.layout.boot(snap), blobs)
                if missing:
                    raise SnapshotError("FAILED_PRECONDITION", f"blob {missing} of the Nydus image is not in "
                                        f"{blobs}, and the layer labels do not say where the image is: with "
                                        "containerd's CRI plugin set disable_snapshot_annotations = false, or "
                                        "pull with `nydus-erofs pull`")  # fmt: skip
                backend = BackendSpec("localfs", {"dir": str(blobs)})
            save_backend(backend, self.layout.dir(snap))
            nydus = NYDUS_BOOTSTRAP
        size, inodes = disk_usage(fs)
        committed = self.store.commit(key, name, labels, size, inodes, nydus)
        if nydus == NYDUS_BOOTSTRAP:
            self._mount_early(committed)
        return committed

    # -- read -----------------------------------------------------------------------------------------------------
    def mounts(self, key: str) -> list[MountEntry]:
        snap = self.store.need(key)
        chain = self.store.chain(snap)
        if snap.kind == COMMITTED:  # shown read-only, as a view of itself
            return mounts_for(self.layout, self.lazy, Snapshot(snap.id, key, "", VIEW, 0, 0), [snap, *chain])
        return mounts_for(self.layout, self.lazy, snap, chain)

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.store.need(key)
        if snap.kind == ACTIVE:
            return disk_usage(self.layout.fs(snap))
        return snap.size, snap.inodes

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        snap = self.store.need(name)
        if not paths:
            new = dict(labels)
        else:
            new = dict(snap.labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels.") :]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise SnapshotError("INVALID_ARGUMENT", f"cannot update {path!r} of snapshot {name!r}")
        return self.store.set_labels(name, new)

    # -- remove ---------------------------------------------------------------------------------------------------
    def remove(self, key: str) -> None:
        snap = self.store.need(key)
        if self.store.children(key):
            raise SnapshotError("FAILED_PRECONDITION", f"snapshot {key!r} has children")
        if snap.nydus == NYDUS_BOOTSTRAP:  # the image's mount lives as long as its bootstrap snapshot
            self.lazy.release(snap)
        self._drop(snap)

    def _drop(self, snap: Snapshot) -> None:
        if self.store.get(snap.name) is not None:
            self.store.remove(snap.name)
        shutil.rmtree(self.layout.dir(snap), ignore_errors=True)
        shutil.rmtree(self.layout.cache(snap), ignore_errors=True)

    def cleanup(self) -> None:
        """Remove the files of snapshots the metadata no longer has (left by a crash between the two)."""
        with self._create_lock:
            ids = {str(s.id) for s in self.store.all()}
            for base in (self.layout.root / "snapshots", self.layout.cache_dir):
                if not base.is_dir():
                    continue
                for d in base.iterdir():
                    if d.name not in ids and not (d / "mnt").is_mount():
                        shutil.rmtree(d, ignore_errors=True)
