"""``nydus-erofs convert``: an OCI image → a Nydus image, as an OCI image layout or pushed to a registry.

The Nydus image follows upstream nydusify's conventions (``contrib/nydusify/pkg/utils/constant.go``): one
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
from erofs.build.sources.oci import (
    ANN_NYDUS_BOOTSTRAP,
    DEFAULT_PLATFORM,
    MT_MANIFEST,
    MT_NYDUS_BLOB,
    REF_NAME,
    OciLayout,
    is_nydus_manifest,
    parse_platform,
    parse_reference,
)
from erofs.errors import SourceError, UsageError
from erofs.paths import BLOBS_DIR, BOOTSTRAP_NAME, make_dirs, remove_stale_temps, temp_prefix
from erofs.progress import ProgressCallback

MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANN_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
NYDUS_OS_FEATURE = "nydus.remoteimage.v1"
BOOTSTRAP_MEMBER = "image/image.boot"
CONVERT_TEMP = "nydus-erofs-convert-"  # + owner + random: the work directory in --work-dir


@dataclass(slots=True)
class ConvertResult:
    target: str
    manifest_digest: str
    manifest: dict[str, Any]
    build: BuildResult

    def to_json(self) -> dict[str, object]:
        return {"target": self.target, "manifest_digest": self.manifest_digest, "manifest": self.manifest,
                "image": self.build.to_json()}  # fmt: skip


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


def convert(source: str, target: str, opts: ImageOptions, *, platform: str | None = None,
            chunk_dict: str | None = None, chunk_dict_blob_dir: str | None = None, plain_http: bool = False,
            work_dir: str | None = None, progress: ProgressCallback | None = None,
            prefetch: PrefetchSelector | None = None) -> ConvertResult:  # fmt: skip
    """Convert the OCI image ``source`` into a Nydus image at ``target`` (``oci:`` or ``docker://``)."""
    src_kind, src_rest = _split(source)
    dst_kind, dst_rest = _split(target)
    want = platform or DEFAULT_PLATFORM
    parse_platform(want)
    if dst_kind == "oci":
        out_path, out_tag = parse_reference(target)
        read_target_index(out_path)  # an unusable target fails now, not after the build
        if src_kind == "oci":
            src_path, src_tag = parse_reference(source)
            if out_tag == src_tag and out_path.is_dir() and src_path.is_dir() and out_path.samefile(src_path):
                raise UsageError(f"{target} is the source image: give the Nydus image another tag")
    remove_stale_temps(work_dir or tempfile.gettempdir(), re.escape(CONVERT_TEMP))  # what a killed convert left
    with tempfile.TemporaryDirectory(prefix=temp_prefix(CONVERT_TEMP), dir=work_dir) as tmpdir:
        tmp = Path(tmpdir)
        if src_kind == "docker":
            os_name, arch = want.split("/")[:2]
            src_ref = f"oci:{tmp / 'src'}:src"
            _skopeo(f"cannot pull {source}", "copy", "--quiet", *_tls(plain_http, "src"), f"--override-os={os_name}",
                    f"--override-arch={arch}", f"docker:{src_rest}", src_ref)  # fmt: skip
        else:
            src_ref = source
        layout_path, tag = parse_reference(src_ref)
        if not layout_path.is_dir():
            raise SourceError(f"{layout_path}: no such OCI image layout directory")
        layout = OciLayout(layout_path)
        src_manifest = layout.manifest(tag, platform)
        if is_nydus_manifest(src_manifest):
            raise SourceError(f"{source} is already a Nydus image: nothing to convert (mount its bootstrap, or "
                              "convert the OCI image it was made from)")  # fmt: skip
        config = layout._blob_json(src_manifest["config"])
        sources = [src_ref]
        result = build_image(sources, tmp / "image", opts, platform=platform, chunk_dict=chunk_dict,
                             chunk_dict_blob_dir=chunk_dict_blob_dir, progress=progress,
                             prefetch=prefetch)  # fmt: skip

        made: list[Path] = []
        if dst_kind == "oci":
            out_path, out_tag = parse_reference(target)
            made = make_dirs(out_path)
        else:
            out_path, out_tag = tmp / "out", "nydus"
        try:
            writer = _LayoutWriter(out_path)
            layers = []
            diff_ids = []
            for b in result.blobs:
                layers.append(writer.add_file(tmp / "image" / BLOBS_DIR / b.blob_id, b.blob_id, MT_NYDUS_BLOB,
                                              annotations={ANN_NYDUS_BLOB: "true"}))  # fmt: skip
                diff_ids.append(f"sha256:{b.blob_id}")
            boot_gz, boot_diff_id = _bootstrap_layer(tmp / "image" / BOOTSTRAP_NAME)
            boot_annotations = {ANN_NYDUS_BOOTSTRAP: "true", ANN_NYDUS_FS_VERSION: "6"}
            layers.append(writer.add_bytes(boot_gz, MT_LAYER_GZIP, annotations=boot_annotations))
            diff_ids.append(boot_diff_id)
            new_config = {k: v for k, v in config.items() if k != "history"}
            new_config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
            config_desc = writer.add_bytes(json.dumps(new_config, sort_keys=True).encode(), MT_CONFIG)
            manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layers}
            manifest_desc = writer.add_bytes(json.dumps(manifest, indent=2).encode(), MT_MANIFEST)
            os_name, arch, *variant = want.split("/")
            manifest_desc["platform"] = {"os": os_name, "architecture": arch, "os.features": [NYDUS_OS_FEATURE],
                                         **({"variant": variant[0]} if variant else {})}  # fmt: skip
            writer.tag(manifest_desc, out_tag)
            if dst_kind == "docker":
                _skopeo(f"cannot push {target}", "copy", "--quiet", *_tls(plain_http, "dest"),
                        f"oci:{out_path}:{out_tag}", f"docker:{dst_rest}")  # fmt: skip
            return ConvertResult(target, manifest_desc["digest"], manifest, result)
        except BaseException:
            if made:  # a layout this conversion created: gone again, not left half-written
                shutil.rmtree(made[0], ignore_errors=True)
            raise
