"""``nydus-erofs build``: sources → one bootstrap + one blob per layer, written atomically into OUT.

Several SOURCEs are layers, bottom to top (see :mod:`erofs.build.sources.layers`), flattened into one
bootstrap with one blob per layer that has new data.

Everything is built in a private temporary directory inside OUT and moved into place only when complete:
a failed build leaves OUT as it was (and removes OUT if the build created it); a build into an OUT that holds
an image replaces it, removing the old blobs the new bootstrap does not use.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from erofs.build.bootstrap import ImageOptions, write_bootstrap
from erofs.build.chunker import ChunkIndex, ChunkStore
from erofs.build.overlay import merge_layers
from erofs.build.sources.dir import DirLayer, read_directory
from erofs.build.sources.layers import layers_of
from erofs.build.tree import Node
from erofs.errors import SourceError, UsageError
from erofs.format import rafs_v6 as r
from erofs.format.rafs_v6 import BlobInfo
from erofs.paths import BLOBS_DIR, BOOTSTRAP_NAME, make_dirs, remove_dirs, remove_stale_temps, temp_prefix
from erofs.progress import ProgressCallback

if TYPE_CHECKING:
    from erofs.build.chunk_dict import ChunkDict

BUILD_TEMP = ".nydus-erofs-build-"  # + owner + random: the temporary directory inside OUT
_BLOB_ID = re.compile(r"[0-9a-f]{64}")
# Read through erofs.reader, whose import is a third of the build command's: imported only when a build has a
# chunk dict (as the CLI imports a command's module only when it runs).
_CHUNK_DICT_MODULE = "erofs.build.chunk_dict"


@dataclass(slots=True)
class BuildResult:
    bootstrap: Path
    blobs: list[BlobInfo]
    inodes: int
    options: ImageOptions
    bytes_in: int = 0
    bytes_deduped: int = 0
    layers: list[str | None] = field(default_factory=list)  # blob id per source layer (None: no new data)

    def to_json(self) -> dict[str, object]:
        return {
            "bootstrap": str(self.bootstrap),
            "blobs": [
                {"id": b.blob_id, "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
                 "chunk_count": b.chunk_count}
                for b in self.blobs
            ],
            "layers": self.layers,
            "chunk_size": self.options.chunk_size,
            "compressor": self.options.compressor,
            "digester": self.options.digester,
            "inodes": self.inodes,
            "bytes_in": self.bytes_in,
            "bytes_deduped": self.bytes_deduped,
        }  # fmt: skip


def check_options(chunk_size: int, compressor: str, digester: str) -> ImageOptions:
    if chunk_size & (chunk_size - 1) or not r.RAFS_MIN_CHUNK_SIZE <= chunk_size <= r.RAFS_MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size must be a power of two between 4 KiB and 16 MiB, not {chunk_size}")
    if compressor not in ("none", "lz4_block", "zstd"):
        raise UsageError(f"unknown compressor {compressor!r} (none, lz4_block, zstd)")
    if digester not in r.DIGESTERS:
        raise UsageError(f"unknown digester {digester!r} (blake3, sha256)")
    return ImageOptions(chunk_size, compressor, digester)


# A layer reader fills a tree from one source, storing data through the given store.
LayerReader = Callable[[ChunkStore], Node]
# Merging turns the layer trees (bottom to top) into the image tree.
Merger = Callable[[list[Node]], Node]
# Picks the nodes the prefetch table lists from the image tree.
PrefetchSelector = Callable[[Node], Sequence[Node]]


def _single(trees: list[Node]) -> Node:
    if len(trees) != 1:
        raise UsageError("several directory sources cannot be stacked: give tar layers or an OCI image")
    return trees[0]


def build_layers(readers: Sequence[LayerReader], output_dir: str | os.PathLike[str], opts: ImageOptions,
                 merge: Merger = _single, known: ChunkIndex | None = None,
                 extra_blobs: Sequence[BlobInfo] = (),
                 extra_blob_files: Mapping[str, Path] | None = None,
                 progress: ProgressCallback | None = None,
                 prefetch: PrefetchSelector | None = None) -> BuildResult:  # fmt: skip
    """Build an image from layer readers into ``output_dir`` atomically.

    ``known`` pre-seeds dedup (a chunk dict's chunks, referring to ``extra_blobs``, which become the first
    blob slots of the image).  ``extra_blob_files`` (blob id -> file) are copied into OUT/blobs when the
    image references them, so OUT is self-contained.  ``progress`` is called with the bytes of file data read.
    ``prefetch`` picks the prefetch table's inodes from the merged tree (:func:`erofs.build.prefetch.resolve`).
    """
    collecting = gc.isenabled()
    gc.disable()  # the tree is tens of thousands of long-lived objects and no cycles: collections only cost
    try:
        return _build_layers(readers, out=Path(output_dir), opts=opts, merge=merge, known=known,
                             extra_blobs=extra_blobs, extra_blob_files=extra_blob_files, progress=progress,
                             prefetch=prefetch)  # fmt: skip
    finally:
        if collecting:
            gc.enable()


def _build_layers(readers: Sequence[LayerReader], *, out: Path, opts: ImageOptions, merge: Merger,
                  known: ChunkIndex | None, extra_blobs: Sequence[BlobInfo],
                  extra_blob_files: Mapping[str, Path] | None, progress: ProgressCallback | None,
                  prefetch: PrefetchSelector | None) -> BuildResult:  # fmt: skip
    try:
        made = make_dirs(out)  # what a failure removes again (OUT and any parents this build created)
    except OSError as e:
        raise UsageError(f"cannot create output directory {out}: {e.strerror}") from None
    try:
        if not out.is_dir():
            raise UsageError(f"output {out} is not a directory")
        remove_stale_temps(out, re.escape(BUILD_TEMP))  # what a killed build left
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(BUILD_TEMP), dir=out))
    except BaseException:
        remove_dirs(made)
        raise
    try:
        (tmp / BLOBS_DIR).mkdir()
        index: ChunkIndex = dict(known or {})
        blobs: list[BlobInfo] = list(extra_blobs)
        trees: list[Node] = []
        layers: list[str | None] = []
        bytes_in = bytes_deduped = 0
        for reader in readers:
            store = ChunkStore(tmp / BLOBS_DIR, len(blobs), opts.chunk_size, opts.compressor, opts.digester, index,
                               progress)  # fmt: skip
            try:
                trees.append(reader(store))
                info = store.finish()
            except BaseException:
                store.abort()
                raise
            bytes_in += store.bytes_in
            bytes_deduped += store.bytes_deduped
            layers.append(info.blob_id if info else None)
            if info is not None:
                if len(blobs) >= r.RAFS_MAX_BLOBS:
                    raise SourceError(f"an image holds at most {r.RAFS_MAX_BLOBS} blobs")
                blobs.append(info)
        tree = merge(trees)
        used = _used_blobs(tree, len(blobs))
        if used != set(range(len(blobs))):
            blobs, tree = _drop_unused(blobs, tree, used)
        inodes = write_bootstrap(tmp / BOOTSTRAP_NAME, tree, blobs, opts, prefetch(tree) if prefetch else ())
        for b in blobs:
            src = (extra_blob_files or {}).get(b.blob_id)
            if src is not None and not (tmp / BLOBS_DIR / b.blob_id).exists():
                _link_or_copy(src, tmp / BLOBS_DIR / b.blob_id)
        # publish: blobs first (content addressed, harmless if left alone), the bootstrap last
        (out / BLOBS_DIR).mkdir(exist_ok=True)
        for b in blobs:
            src = tmp / BLOBS_DIR / b.blob_id
            if src.exists():
                os.replace(src, out / BLOBS_DIR / b.blob_id)
        os.replace(tmp / BOOTSTRAP_NAME, out / BOOTSTRAP_NAME)
        _remove_stale_blobs(out / BLOBS_DIR, {b.blob_id for b in blobs})
        _fsync_dir(out / BLOBS_DIR)
        _fsync_dir(out)
        return BuildResult(out / BOOTSTRAP_NAME, blobs, inodes, opts, bytes_in, bytes_deduped, layers)
    except BaseException:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_blobs(blobs_dir: Path, keep: set[str]) -> None:
    """A rebuild replaces the image in OUT: the blobs of the previous one that the new bootstrap does not use go
    (only files named like a blob id; anything else in OUT/blobs is left alone)."""
    for entry in os.scandir(blobs_dir):
        if _BLOB_ID.fullmatch(entry.name) and entry.name not in keep and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _used_blobs(tree: Node, blobs: int) -> set[int]:
    """The blob indexes the chunks of ``tree`` use (of ``blobs`` in all)."""
    used: set[int] = set()
    stack = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.chunks:
            used.update(c.blob_index for c in node.chunks if c is not None)
            if len(used) == blobs:  # all of them: the usual case, found at the first files
                break
        if node.children:
            stack.extend(node.children.values())
    return used


def _drop_unused(blobs: list[BlobInfo], tree: Node, used: set[int]) -> tuple[list[BlobInfo], Node]:
    """Renumber blobs when some (a lower layer whose files were all deleted, an unused dict) are unreferenced."""
    keep = [b for b in blobs if b.blob_index in used]
    renumber = {b.blob_index: i for i, b in enumerate(keep)}
    stack, seen = [tree], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        node.chunks = [None if c is None else c._replace(blob_index=renumber[c.blob_index])
                       for c in node.chunks]  # fmt: skip
        if node.children:
            stack.extend(node.children.values())
    return [dataclasses.replace(b, blob_index=i) for i, b in enumerate(keep)], tree


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_directory(source: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                    opts: ImageOptions) -> BuildResult:  # fmt: skip
    """Build an image of one directory tree."""
    return build_layers([lambda store: read_directory(source, store)], output_dir, opts)


def build_image(sources: Sequence[str], output_dir: str | os.PathLike[str], opts: ImageOptions, *,
                whiteout_spec: str = "oci", platform: str | None = None, chunk_dict: str | None = None,
                chunk_dict_blob_dir: str | None = None,
                progress: ProgressCallback | None = None,
                prefetch: PrefetchSelector | None = None) -> BuildResult:  # fmt: skip
    """Build one image from SOURCE layers into ``output_dir`` (atomically; see :func:`build_layers`)."""
    if chunk_dict_blob_dir and not chunk_dict:
        raise UsageError("--chunk-dict-blob-dir needs --chunk-dict")
    layers = layers_of(sources, platform)
    out = os.path.realpath(output_dir)
    for layer in layers:
        src = os.path.realpath(layer.path) if isinstance(layer, DirLayer) else None
        if src is not None and (out == src or out.startswith(src.rstrip("/") + "/")):
            raise UsageError(f"--output-dir {output_dir} is inside SOURCE {layer.path}: the image would hold itself")
    cd: ChunkDict | None = None
    if chunk_dict:
        cd = importlib.import_module(_CHUNK_DICT_MODULE).load_chunk_dict(chunk_dict, chunk_dict_blob_dir, opts)

    def merge(_trees: list[Node]) -> Node:
        return merge_layers([layer.result for layer in layers if layer.result is not None], whiteout_spec)

    readers: list[LayerReader] = list(layers)
    return build_layers(
        readers, output_dir, opts, merge=merge,
        known=cd.known if cd else None, extra_blobs=cd.blobs if cd else (),
        extra_blob_files=cd.blob_files if cd else None, progress=progress, prefetch=prefetch,
    )  # fmt: skip
