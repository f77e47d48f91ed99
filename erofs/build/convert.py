"""``nydus-erofs convert``: an OCI image → a Nydus image, as an OCI image layout or pushed to a registry.

The Nydus image follows upstream nydusify's conventions (:mod:`erofs.imagespec` names them): one
layer per data blob (media type ``application/vnd.oci.image.layer.nydus.blob.v1``, digest = ``sha256:<blob
id>``, annotation ``containerd.io/snapshot/nydus-blob``), then, last, a gzip tar layer holding
``image/image.boot`` (annotation ``containerd.io/snapshot/nydus-bootstrap``).  The config is the source's, its
``rootfs.diff_ids`` rewritten for the new layers.  Registries are reached through skopeo (a real peer): a
``docker://`` source is copied into a temporary layout first, a ``docker://`` target is pushed from one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erofs.build.bootstrap import ImageOptions
from erofs.build.builder import BuildResult, PrefetchSelector, build_image
from erofs.build.sources.oci import REF_NAME, OciLayout, parse_reference
from erofs.errors import SourceError, UsageError
from erofs.imagespec import (
    ANN_NYDUS_BLOB,
    ANN_NYDUS_BOOTSTRAP,
    ANN_NYDUS_FS_VERSION,
    BOOTSTRAP_MEMBER,
    DEFAULT_PLATFORM,
    MT_DOCKER_LIST,
    MT_INDEX,
    MT_MANIFEST,
    MT_NYDUS_BLOB,
    NYDUS_OS_FEATURE,
    is_nydus_manifest,
    parse_platform,
)
from erofs.paths import BLOBS_DIR, BOOTSTRAP_NAME, make_dirs, remove_stale_temps, temp_prefix
from erofs.progress import ProgressCallback

MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONVERT_TEMP = "nydus-erofs-convert-"  # + owner + random: the work directory in --work-dir


ALL_PLATFORMS = "all"  # --platform all: every platform of an index, converted into a Nydus index


@dataclass(slots=True)
class PlatformImage:
    """One converted image: its platform (``os/arch[/variant]``), its Nydus manifest's digest, the build."""

    platform: str
    manifest_digest: str
    build: BuildResult

    def to_json(self) -> dict[str, object]:
        return {"platform": self.platform, "manifest_digest": self.manifest_digest, "image": self.build.to_json()}


@dataclass(slots=True)
class ConvertResult:
    """What ``convert`` wrote: ``manifest`` is the Nydus manifest, or with ``is_index`` the Nydus index whose
    entries are ``images``'s manifests."""

    target: str
    manifest_digest: str
    manifest: dict[str, Any]
    images: list[PlatformImage]
    is_index: bool = False

    @property
    def build(self) -> BuildResult:
        return self.images[0].build

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"target": self.target, "manifest_digest": self.manifest_digest,
                                  "manifest": self.manifest}  # fmt: skip
        if self.is_index:
            out["platforms"] = [image.to_json() for image in self.images]
        else:
            out["image"] = self.build.to_json()
        return out


_SKOPEO_FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')  # logrus: time=... level=fatal msg="..."


def _skopeo(what: str, *args: str) -> None:
    """Run skopeo; a failure is one line of ours: ``WHAT: skopeo's reason`` (not its log line)."""
    if shutil.which("skopeo") is None:
        raise UsageError("docker:// references need skopeo (apt-get install skopeo)")
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = skopeo_reason(lines[-1]) if lines else f"skopeo exited with status {proc.returncode}"
        if "server gave HTTP response to HTTPS client" in reason:
            reason += " (the registry speaks plain HTTP: add --plain-http)"
        raise SourceError(f"{what}: {reason}")


def skopeo_reason(line: str) -> str:
    """The message of skopeo's ``level=fatal msg="..."`` log line (unquoted), or the line as it is."""
    m = _SKOPEO_FATAL.search(line)
    if m is None:
        return line.strip()
    return re.sub(r"\\(.)", r"\1", m.group(1))


def _split(ref: str) -> tuple[str, str]:
    kind, sep, rest = ref.partition(":")
    if not sep or kind not in ("oci", "docker") or not rest:
        raise UsageError(f"{ref!r}: expected oci:PATH[:TAG] or docker://REGISTRY/REPO[:TAG]")
    return kind, rest


def _tls(plain_http: bool, flag: str) -> list[str]:
    return [f"--{flag}-tls-verify=false"] if plain_http else []


def _bootstrap_layer(boot: Path) -> tuple[bytes, str]:
    """The bootstrap as a reproducible tar.gz (bytes) and the sha256 of the uncompressed tar (its diff id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("image",):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        info = tarfile.TarInfo(BOOTSTRAP_MEMBER)
        info.size, info.mode, info.mtime = boot.stat().st_size, 0o644, 0
        with open(boot, "rb") as f:
            tar.addfile(info, f)
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


class _LayoutWriter:
    """Adds content-addressed blobs and one tagged manifest to an OCI image layout directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (path / "oci-layout").exists():
            self._atomic(path / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')

    @staticmethod
    def _atomic(dest: Path, data: bytes) -> None:
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def add_bytes(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        dest = self.path / "blobs" / "sha256" / digest
        if not dest.exists():
            self._atomic(dest, data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}

    def add_file(self, src: Path, digest: str, media_type: str, **extra: Any) -> dict[str, Any]:
        dest = self.path / "blobs" / "sha256" / digest
        if not dest.exists():
            tmp = dest.with_name(f".{digest}.tmp")
            try:
                try:
                    os.link(src, tmp)
                except OSError:
                    try:
                        shutil.copyfile(src, tmp)
                    except OSError as e:  # say where it could not be written (not the source, in the work dir)
                        raise OSError(e.errno, e.strerror, str(dest)) from None
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": src.stat().st_size, **extra}

    def tag(self, manifest_desc: dict[str, Any], tag: str | None) -> None:
        index_path = self.path / "index.json"
        index = read_target_index(self.path)
        if tag:
            manifest_desc = {**manifest_desc, "annotations": {REF_NAME: tag}}
            index["manifests"] = [m for m in index.get("manifests", [])
                                  if m.get("annotations", {}).get(REF_NAME) != tag]  # fmt: skip
        index.setdefault("manifests", []).append(manifest_desc)
        index.setdefault("mediaType", "application/vnd.oci.image.index.v1+json")
        self._atomic(index_path, json.dumps(index, indent=2).encode())


def read_target_index(path: Path) -> dict[str, Any]:
    """The index.json of a target layout directory (a new one if it has none); UsageError when ``path``
    cannot be a target: not a directory, a directory with other things than a layout, a garbled index."""
    if os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"target {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "oci-layout").is_file():
        raise UsageError(f"target {path} is a directory but not an OCI image layout (it has no oci-layout file)")
    index_path = path / "index.json"
    if not os.path.lexists(index_path):
        return {"schemaVersion": 2, "manifests": []}
    try:
        index = json.loads(index_path.read_bytes())
    except (OSError, ValueError) as e:
        raise UsageError(f"target {index_path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise UsageError(f"target {index_path}: not an OCI image index")
    return index


def local_layout(ref: str, dest: Path, *, platform: str | None, plain_http: bool) -> str:
    """``ref`` as an ``oci:PATH[:TAG]`` reference to read: itself, or a ``docker://`` image copied by skopeo into
    the new layout ``dest`` — the image of ``platform`` (``os/arch[/variant]``), or with None the index and
    every image it lists."""
    kind, rest = _split(ref)
    if kind == "oci":
        path, _ = parse_reference(ref)
        if not path.is_dir():
            raise SourceError(f"{path}: no such OCI image layout directory")
        return ref
    if platform is None:
        select = ["--all"]
    else:
        os_name, arch = platform.split("/")[:2]
        select = [f"--override-os={os_name}", f"--override-arch={arch}"]
    _skopeo(f"cannot pull {ref}", "copy", "--quiet", *_tls(plain_http, "src"), *select, f"docker:{rest}",
            f"oci:{dest}:src")  # fmt: skip
    return f"oci:{dest}:src"


def platform_text(p: dict[str, Any]) -> str:
    """``os/arch[/variant]`` of an OCI platform object."""
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def is_index(doc: dict[str, Any]) -> bool:
    return doc.get("mediaType") in (MT_INDEX, MT_DOCKER_LIST) or ("manifests" in doc and "layers" not in doc)


def index_platforms(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The platform objects of an index's image entries, in its order; attestations (``unknown/unknown``) and
    entries without a platform are no images to convert."""
    out = []
    for d in doc.get("manifests") or []:
        p = d.get("platform") if isinstance(d, dict) else None
        if isinstance(p, dict) and p.get("os") not in (None, "unknown") and p.get("architecture") not in (None, ""):
            out.append(dict(p))
    return out


def _nydus_platform(p: dict[str, Any]) -> dict[str, Any]:
    features = [f for f in p.get("os.features") or [] if f != NYDUS_OS_FEATURE]
    return {**p, "os.features": [*features, NYDUS_OS_FEATURE]}


def convert(source: str, target: str, opts: ImageOptions, *, platform: str | None = None,
            chunk_dict: str | None = None, chunk_dict_blob_dir: str | None = None, plain_http: bool = False,
            work_dir: str | None = None, progress: ProgressCallback | None = None,
            prefetch: PrefetchSelector | None = None) -> ConvertResult:  # fmt: skip
    """Convert the OCI image ``source`` into a Nydus image at ``target`` (``oci:`` or ``docker://``); with
    ``platform`` ``all``, every platform of the source's index into a Nydus index of Nydus manifests."""
    _split(source)
    dst_kind, dst_rest = _split(target)
    every = platform == ALL_PLATFORMS
    want = platform or DEFAULT_PLATFORM
    if not every:
        parse_platform(want)
    if dst_kind == "oci":
        out_path, out_tag = parse_reference(target)
        read_target_index(out_path)  # an unusable target fails now, not after the build
        if source.startswith("oci:"):
            src_path, src_tag = parse_reference(source)
            if out_tag == src_tag and out_path.is_dir() and src_path.is_dir() and out_path.samefile(src_path):
                raise UsageError(f"{target} is the source image: give the Nydus image another tag")
    remove_stale_temps(work_dir or tempfile.gettempdir(), re.escape(CONVERT_TEMP))  # what a killed convert left
    with tempfile.TemporaryDirectory(prefix=temp_prefix(CONVERT_TEMP), dir=work_dir) as tmpdir:
        tmp = Path(tmpdir)
        src_ref = local_layout(source, tmp / "src", platform=None if every else want, plain_http=plain_http)
        layout_path, tag = parse_reference(src_ref)
        layout = OciLayout(layout_path)
        _, top = layout.top(tag)
        make_index = every and is_index(top)
        if make_index:
            platforms = index_platforms(top)
            if not platforms:
                raise SourceError(f"{source}: the index lists no image of a platform")
        elif every:  # one image: its config says its platform
            config = layout.blob_json(top["config"]) if isinstance(top.get("config"), dict) else {}
            platforms = [{k: config[k] for k in ("os", "architecture", "variant") if isinstance(config.get(k), str)}]
            if len(platforms[0]) < 2:
                raise SourceError(f"{source}: its config names no os/architecture: give --platform OS/ARCH")
        else:
            os_name, arch, variant = parse_platform(want)
            platforms = [{"os": os_name, "architecture": arch, **({"variant": variant} if variant else {})}]
        images: list[tuple[str, BuildResult, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        for i, p in enumerate(platforms):
            text = platform_text(p)
            src_manifest = layout.manifest(tag, text if (platform or make_index) else None)
            if is_nydus_manifest(src_manifest):
                raise SourceError(f"{source} is already a Nydus image: nothing to convert (mount its bootstrap, or "
                                  "convert the OCI image it was made from)")  # fmt: skip
            config = layout.blob_json(src_manifest["config"])
            result = build_image([src_ref], tmp / f"image-{i}", opts, platform=text if (platform or make_index)
                                 else None, chunk_dict=chunk_dict, chunk_dict_blob_dir=chunk_dict_blob_dir,
                                 progress=progress, prefetch=prefetch)  # fmt: skip
            images.append((text, result, src_manifest, config, _nydus_platform(p)))

        made: list[Path] = []
        if dst_kind == "oci":
            out_path, out_tag = parse_reference(target)
            made = make_dirs(out_path)
        else:
            out_path, out_tag = tmp / "out", "nydus"
        try:
            writer = _LayoutWriter(out_path)
            written = []
            descs = []
            for i, (text, result, src_manifest, config, nydus_platform) in enumerate(images):
                manifest = _write_image(writer, tmp / f"image-{i}", result, src_manifest, config)
                desc = writer.add_bytes(json.dumps(manifest, indent=2).encode(), MT_MANIFEST)
                desc["platform"] = nydus_platform
                descs.append(desc)
                written.append(PlatformImage(text, desc["digest"], result))
            if make_index:
                index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descs}
                if top.get("annotations"):
                    index["annotations"] = top["annotations"]
                top_desc = writer.add_bytes(json.dumps(index, indent=2).encode(), MT_INDEX)
                top_doc = index
            else:
                top_desc, top_doc = descs[0], manifest
            writer.tag(top_desc, out_tag)
            if dst_kind == "docker":
                _skopeo(f"cannot push {target}", "copy", "--quiet", *_tls(plain_http, "dest"),
                        *(["--all"] if make_index else []), f"oci:{out_path}:{out_tag}",
                        f"docker:{dst_rest}")  # fmt: skip
            return ConvertResult(target, top_desc["digest"], top_doc, written, make_index)
        except BaseException:
            if made:  # a layout this conversion created: gone again, not left half-written
                shutil.rmtree(made[0], ignore_errors=True)
            raise


def _write_image(writer: _LayoutWriter, image_dir: Path, result: BuildResult, src_manifest: dict[str, Any],
                 config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Add one built image's blobs, bootstrap layer and config to the layout; its Nydus manifest.  The source's
    config (without its history, which counts the old layers) and manifest annotations carry over."""
    layers = []
    diff_ids = []
    for b in result.blobs:
        layers.append(writer.add_file(image_dir / BLOBS_DIR / b.blob_id, b.blob_id, MT_NYDUS_BLOB,
                                      annotations={ANN_NYDUS_BLOB: "true"}))  # fmt: skip
        diff_ids.append(f"sha256:{b.blob_id}")
    boot_gz, boot_diff_id = _bootstrap_layer(image_dir / BOOTSTRAP_NAME)
    boot_annotations = {ANN_NYDUS_BOOTSTRAP: "true", ANN_NYDUS_FS_VERSION: "6"}
    layers.append(writer.add_bytes(boot_gz, MT_LAYER_GZIP, annotations=boot_annotations))
    diff_ids.append(boot_diff_id)
    new_config = {k: v for k, v in config.items() if k != "history"}
    new_config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_desc = writer.add_bytes(json.dumps(new_config, sort_keys=True).encode(), MT_CONFIG)
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layers}
    if src_manifest.get("annotations"):
        manifest["annotations"] = src_manifest["annotations"]
    return manifest
