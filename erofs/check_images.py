"""``nydus-erofs check --source REF --target REF``: a converted Nydus image against the OCI image it was made
from, the way ``nydusify check`` compares them.

For each platform of the target (an index: each of its images, all of which the source must have; a
manifest: the one its config names) it compares, and stops at the first difference:

manifests
    two indexes list the same platforms (one image of an index is compared with that image); the target's
    manifest is a Nydus one (Nydus blob layers, then one bootstrap layer), at most one blob layer per source
    layer; the source manifest's annotations are the target's; the configs are equal but for ``rootfs`` and
    ``history`` (the target's ``rootfs.diff_ids`` count its own layers).
bootstrap
    ``image/image.boot`` of the bootstrap layer names exactly the manifest's blob layers and passes
    :func:`erofs.reader.check.check_image` with its blobs (every chunk read and verified).
file tree
    the source's layers are read by the builder's own tar readers and flattened with OCI whiteouts
    (:func:`erofs.build.overlay.merge_layers`), their data stored uncompressed in a scratch directory; the
    target is read through :mod:`erofs.reader`.  Every path on either side; per file its type, permission
    bits, uid, gid, size, symlink target, device numbers, xattrs, and the sha256 of its content.

``docker://`` references are copied into scratch OCI layouts by skopeo, as ``convert`` reads them.  A
difference is an :class:`ImagesDiffer` (an :class:`~erofs.errors.ImageError`, exit 3) whose message names the
platform, the path and what differs.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erofs.build.chunker import ChunkIndex, ChunkStore
from erofs.build.convert import index_platforms, is_index, local_layout, platform_text
from erofs.build.overlay import merge_layers
from erofs.build.sources.layers import layers_of
from erofs.build.sources.oci import OciLayout, parse_reference
from erofs.build.tree import Node, walk
from erofs.errors import ImageError
from erofs.imagespec import ANN_NYDUS_BOOTSTRAP, MT_NYDUS_BLOB, NYDUS_OS_FEATURE, extract_bootstrap, parse_platform
from erofs.paths import BOOTSTRAP_NAME, remove_stale_temps, temp_prefix
from erofs.progress import ProgressCallback
from erofs.reader.backend import LocalBlobDir
from erofs.reader.bootstrap import Bootstrap
from erofs.reader.check import check_image
from erofs.reader.data import ImageReader
from erofs.reader.records import Inode

CHECK_TEMP = "nydus-erofs-check-"  # + owner + random: the scratch directory in --work-dir
SOURCE_CHUNK = 4 << 20  # bytes per chunk of the scratch copy of the source's file data
_READ = 1 << 20
_TYPES = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}  # fmt: skip


class ImagesDiffer(ImageError):
    """The target is not a conversion of the source: the first difference found."""


@dataclass(slots=True)
class PlatformReport:
    platform: str
    source_manifest: str
    target_manifest: str
    files: int = 0
    directories: int = 0
    others: int = 0
    bytes_compared: int = 0
    blobs: int = 0

    def to_json(self) -> dict[str, object]:
        return {"platform": self.platform, "source_manifest": self.source_manifest,
                "target_manifest": self.target_manifest, "files": self.files, "directories": self.directories,
                "others": self.others, "bytes_compared": self.bytes_compared, "blobs": self.blobs}  # fmt: skip


@dataclass(slots=True)
class CompareReport:
    source: str
    target: str
    platforms: list[PlatformReport] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "target": self.target, "ok": True,
                "platforms": [p.to_json() for p in self.platforms]}  # fmt: skip


def _type(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), f"type {stat.S_IFMT(mode):#o}")


class _Side:
    """One image as a local OCI layout: its top document and, per platform, its manifest and config."""

    def __init__(self, what: str, ref: str, scratch: Path, platform: str | None, plain_http: bool) -> None:
        self.what = what
        self.ref = local_layout(ref, scratch, platform=platform, plain_http=plain_http)
        path, self.tag = parse_reference(self.ref)
        self.layout = OciLayout(path)
        self.top_desc, self.top = self.layout.top(self.tag)
        self.is_index = is_index(self.top)

    def platforms(self) -> list[dict[str, Any]]:
        """The platforms of its images: an index's entries, or what a manifest's config names."""
        if self.is_index:
            return index_platforms(self.top)
        config = self.config(self.top)
        return [{k: config[k] for k in ("os", "architecture", "variant") if isinstance(config.get(k), str)}]

    def manifest(self, platform: str) -> tuple[dict[str, Any], str]:
        """(the manifest of ``platform``, its digest)."""
        if not self.is_index:
            have = platform_text(self.platforms()[0])
            if not same_platform(have, platform):
                raise ImagesDiffer(f"manifest: the {self.what} is one {have} image, not {platform}")
            return self.top, str(self.top_desc.get("digest"))
        os_name, arch, variant = parse_platform(platform)
        for d in self.top.get("manifests") or []:
            p = d.get("platform") if isinstance(d, dict) else None
            if isinstance(p, dict) and same_platform(platform_text(p), platform):
                doc = self.layout.blob_json(d)
                if not isinstance(doc, dict):
                    raise ImageError(f"{self.what} {platform}: manifest {d.get('digest')} is not a JSON object")
                return doc, str(d.get("digest"))
        raise ImagesDiffer(f"manifest: the {self.what} has no {os_name}/{arch}" + (f"/{variant}" if variant else "")
                           + " image")  # fmt: skip

    def config(self, manifest: dict[str, Any]) -> dict[str, Any]:
        desc = manifest.get("config")
        config = self.layout.blob_json(desc) if isinstance(desc, dict) else None
        if not isinstance(config, dict):
            raise ImageError(f"{self.what}: the manifest has no image config")
        return config


def same_platform(a: str, b: str) -> bool:
    """Whether two ``os/arch[/variant]`` name the same platform (a missing variant matches any)."""
    pa, pb = a.split("/"), b.split("/")
    return pa[:2] == pb[:2] and (len(pa) < 3 or len(pb) < 3 or pa[2] == pb[2])


def compare_images(source: str, target: str, *, platform: str | None = None, plain_http: bool = False,
                   work_dir: str | None = None, progress: ProgressCallback | None = None) -> CompareReport:  # fmt: skip
    """Compare the Nydus image ``target`` with the OCI image ``source`` (``oci:PATH[:TAG]`` or ``docker://``);
    with ``platform`` only that platform's images.  Raises :class:`ImagesDiffer` at the first difference."""
    if platform is not None:
        parse_platform(platform)
    report = CompareReport(source, target)
    remove_stale_temps(work_dir or tempfile.gettempdir(), re.escape(CHECK_TEMP))  # what a killed check left
    with tempfile.TemporaryDirectory(prefix=temp_prefix(CHECK_TEMP), dir=work_dir) as tmpdir:
        tmp = Path(tmpdir)
        src = _Side("source", source, tmp / "source", platform, plain_http)
        dst = _Side("target", target, tmp / "target", platform, plain_http)
        wanted = [platform_text(p) for p in dst.platforms()]
        if platform is not None:
            wanted = [p for p in wanted if same_platform(p, platform)] or [platform]
        elif src.is_index and dst.is_index:
            extra = [p for p in map(platform_text, src.platforms()) if p not in wanted]
            if extra:
                raise ImagesDiffer(f"manifest: the source's {extra[0]} image is not in the target")
        for i, p in enumerate(wanted):
            try:
                report.platforms.append(_compare_platform(src, dst, p, tmp / f"platform-{i}", progress))
            except ImagesDiffer as e:
                raise ImagesDiffer(f"{p}: {e}" if dst.is_index else str(e)) from None
    return report


def _compare_platform(src: _Side, dst: _Side, platform: str, tmp: Path,
                      progress: ProgressCallback | None) -> PlatformReport:  # fmt: skip
    src_manifest, src_digest = src.manifest(platform)
    dst_manifest, dst_digest = dst.manifest(platform)
    report = PlatformReport(platform, src_digest, dst_digest)
    if dst.is_index:
        entry = next(d for d in dst.top["manifests"] if d.get("digest") == dst_digest)
        if NYDUS_OS_FEATURE not in (entry["platform"].get("os.features") or []):
            raise ImagesDiffer(f"manifest: the target's index entry lacks os.features {NYDUS_OS_FEATURE}")
    blob_ids, boot_desc = _nydus_layers(dst_manifest, len(src_manifest.get("layers") or []))
    for key, value in (src_manifest.get("annotations") or {}).items():
        if (dst_manifest.get("annotations") or {}).get(key) != value:
            raise ImagesDiffer(f"manifest: annotation {key} is {value!r} in the source, "
                               f"{(dst_manifest.get('annotations') or {}).get(key)!r} in the target")  # fmt: skip
    _compare_configs(src.config(src_manifest), dst.config(dst_manifest), len(dst_manifest["layers"]))

    tmp.mkdir()
    boot = tmp / BOOTSTRAP_NAME
    layer_path, _ = dst.layout.blob_path(boot_desc)
    try:
        with open(layer_path, "rb") as layer, open(boot, "wb") as out:
            extract_bootstrap(layer, out)
    except FileNotFoundError:
        raise ImagesDiffer(f"bootstrap: the layer {boot_desc.get('digest')} is missing from the target") from None
    with Bootstrap(boot, verify_checksum=False) as bs, LocalBlobDir(dst.layout.path / "blobs" / "sha256") as backend:
        table = [b.blob_id for b in bs.blobs]
        if sorted(table) != sorted(blob_ids):
            raise ImagesDiffer(f"bootstrap: its blob table ({len(table)} blobs) is not the manifest's "
                               f"{len(blob_ids)} blob layers")  # fmt: skip
        checked = check_image(bs, backend, progress=progress)
        if not checked.ok:
            raise ImagesDiffer(f"bootstrap: {checked.problems[0]}")
        report.blobs = checked.blobs_checked
        root, data = _source_tree(src.ref, platform if src.is_index else None, tmp / "data")
        _compare_trees(root, data, ImageReader(bs, backend), report)
    return report


def _nydus_layers(manifest: dict[str, Any], source_layers: int) -> tuple[list[str], dict[str, Any]]:
    """(blob ids, bootstrap layer descriptor) of a Nydus manifest; ImagesDiffer if it is none."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
        raise ImagesDiffer("manifest: the target has no layers")
    *blobs, boot = layers
    if (boot.get("annotations") or {}).get(ANN_NYDUS_BOOTSTRAP) != "true":
        raise ImagesDiffer(f"manifest: the target's last layer is no Nydus bootstrap layer ({ANN_NYDUS_BOOTSTRAP})")
    for i, desc in enumerate(blobs):
        if desc.get("mediaType") != MT_NYDUS_BLOB:
            raise ImagesDiffer(f"manifest: the target's layer {i} has media type {desc.get('mediaType')!r}, "
                               f"not {MT_NYDUS_BLOB}")  # fmt: skip
    if len(blobs) > source_layers:
        raise ImagesDiffer(f"manifest: the target has {len(blobs)} blob layers for {source_layers} source layers")
    return [str(d.get("digest", "")).removeprefix("sha256:") for d in blobs], boot


def _compare_configs(src: dict[str, Any], dst: dict[str, Any], layers: int) -> None:
    for key in sorted((set(src) | set(dst)) - {"rootfs", "history"}):
        if src.get(key) != dst.get(key):
            inner = src.get(key), dst.get(key)
            if isinstance(inner[0], dict) and isinstance(inner[1], dict):
                sub = sorted(k for k in set(inner[0]) | set(inner[1]) if inner[0].get(k) != inner[1].get(k))
                key = f"{key}.{sub[0]}"
            raise ImagesDiffer(f"config: {key} differs")
    diff_ids = (dst.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != layers:
        raise ImagesDiffer(f"config: rootfs.diff_ids lists {len(diff_ids or [])} layers, the manifest has {layers}")


class _SourceData:
    """The source's file data, stored uncompressed by the builder's chunk store in a scratch directory."""

    def __init__(self, blobs: dict[int, Path]) -> None:
        self.blobs = blobs

    def sha256(self, node: Node) -> str:
        h = hashlib.sha256()
        files: dict[int, Any] = {}
        try:
            left = node.size
            for ref in node.chunks:
                n = min(SOURCE_CHUNK, left)
                if ref is None:
                    h.update(bytes(n))
                else:
                    f = files.get(ref.blob_index)
                    if f is None:
                        f = files[ref.blob_index] = open(self.blobs[ref.blob_index], "rb")
                    h.update(os.pread(f.fileno(), ref.c_size, ref.c_off))
                left -= n
        finally:
            for f in files.values():
                f.close()
        return h.hexdigest()


def _source_tree(src_ref: str, platform: str | None, scratch: Path) -> tuple[Node, _SourceData]:
    """The source image's flattened tree (OCI whiteouts applied) and its file data."""
    scratch.mkdir()
    layers = layers_of([src_ref], platform)
    blobs: dict[int, Path] = {}
    known: ChunkIndex = {}
    for layer in layers:
        store = ChunkStore(scratch, len(blobs), SOURCE_CHUNK, "none", "sha256", known)
        try:
            layer(store)
            info = store.finish()
        except BaseException:
            store.abort()
            raise
        if info is not None:
            blobs[store.blob_index] = scratch / info.blob_id
    trees = [layer.result for layer in layers if layer.result is not None]  # type: ignore[union-attr]
    return merge_layers(trees, "oci"), _SourceData(blobs)


def _target_sha256(reader: ImageReader, ino: Inode) -> str:
    h = hashlib.sha256()
    for _, data, n in reader.iter_file(ino):
        h.update(bytes(n) if data is None else data)
    return h.hexdigest()


def _differ(path: str, what: str, src: object, dst: object) -> ImagesDiffer:
    return ImagesDiffer(f"{path}: {what} is {src} in the source, {dst} in the target")


def _compare_trees(root: Node, data: _SourceData, reader: ImageReader, report: PlatformReport) -> None:
    bs = reader.bootstrap
    target: dict[str, Inode] = {path: ino for path, _, ino in bs.walk()}
    hashed: dict[int, str] = {}  # nid -> sha256: hard links are read once
    for bpath, node in walk(root):
        path = os.fsdecode(bpath)
        ino = target.pop(path, None)
        if ino is None:
            raise ImagesDiffer(f"{path}: in the source, missing from the target")
        if stat.S_IFMT(node.mode) != stat.S_IFMT(ino.mode):
            raise _differ(path, "the file type", _type(node.mode), _type(ino.mode))
        if stat.S_IMODE(node.mode) != stat.S_IMODE(ino.mode):
            raise _differ(path, "the mode", f"{stat.S_IMODE(node.mode):04o}", f"{stat.S_IMODE(ino.mode):04o}")
        if (node.uid, node.gid) != (ino.uid, ino.gid):
            raise _differ(path, "the owner (uid:gid)", f"{node.uid}:{node.gid}", f"{ino.uid}:{ino.gid}")
        xs, xt = dict(node.xattrs), dict(bs.xattrs(ino))
        if xs != xt:
            name = min(k for k in set(xs) | set(xt) if xs.get(k) != xt.get(k))
            shown = [repr(os.fsdecode(v)) if v is not None else "absent" for v in (xs.get(name), xt.get(name))]
            raise _differ(path, f"xattr {os.fsdecode(name)}", *shown)
        if node.is_dir:
            report.directories += 1
        elif stat.S_ISLNK(node.mode):
            report.others += 1
            if node.target != bs.readlink(ino):
                raise _differ(path, "the symlink target", os.fsdecode(node.target or b""),
                              os.fsdecode(bs.readlink(ino)))  # fmt: skip
        elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            report.others += 1
            have = (os.major(node.rdev), os.minor(node.rdev))
            if have != ino.rdev:
                raise _differ(path, "the device number", "{}:{}".format(*have), "{}:{}".format(*ino.rdev))
        elif stat.S_ISREG(node.mode):
            report.files += 1
            if node.size != ino.size:
                raise _differ(path, "the size", node.size, ino.size)
            if ino.nid not in hashed:
                hashed[ino.nid] = _target_sha256(reader, ino)
                report.bytes_compared += ino.size
            want = data.sha256(node)
            if want != hashed[ino.nid]:
                raise ImagesDiffer(f"{path}: the content differs (sha256 {want[:12]}… in the source, "
                                   f"{hashed[ino.nid][:12]}… in the target)")  # fmt: skip
        else:
            report.others += 1
    if target:
        raise ImagesDiffer(f"{min(target)}: in the target, not in the source")
