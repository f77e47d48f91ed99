"""Nydus images in a real registry for tests: a small OCI image made by umoci, converted and pushed with
``nydus-erofs convert``, and hand-made manifests (pushed with the registry backend's push helpers) for the
images that are not what they should be."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from cachefilesd_py.backends.registry import push_blob, push_manifest
from tests.support import cli


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def make_source_layout(tmp: Path, seed: int = 0) -> Path:
    """An OCI layout (tag ``v1``) of two layers: small files, and one 4 MiB file (so a small read is a small
    part of the blob bytes); ``seed`` makes the contents differ between images."""
    layout = tmp / "layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    for i, fill in enumerate((_base, _big)):
        bundle = tmp / f"bundle{i}"
        run("umoci", "unpack", "--image", f"{layout}:v1", bundle)
        fill(bundle / "rootfs", seed)
        run("umoci", "repack", "--image", f"{layout}:v1", bundle)
    return layout


def _base(rootfs: Path, seed: int) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hostname").write_text(f"nydus-{seed}\n")
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "usr" / "bin" / "tool").write_bytes(os.urandom(1 << 20))
    os.chmod(rootfs / "usr" / "bin" / "tool", 0o755)
    os.symlink("../usr/bin/tool", rootfs / "etc" / "tool-link")


def _big(rootfs: Path, seed: int) -> None:
    (rootfs / "data").mkdir()
    (rootfs / "data" / "big").write_bytes(os.urandom(4 << 20))
    (rootfs / "data" / "small.txt").write_text(f"a small file of image {seed}\n")


def unpack_layout(layout: Path, dest: Path) -> Path:
    """``umoci unpack`` of the layout's ``v1``: the expected tree (returned: its rootfs)."""
    run("umoci", "unpack", "--image", f"{layout}:v1", dest)
    return dest / "rootfs"


def convert_to(layout: Path, ref: str, env: dict[str, str] | None = None) -> str:
    """``nydus-erofs convert`` the layout's ``v1`` to the registry reference ``ref`` (plain HTTP)."""
    proc = cli.run("convert", f"oci:{layout}:v1", ref, "--plain-http", "--chunk-size", "64KiB", env=env)
    assert proc.returncode == 0, f"convert {layout} {ref}: {proc.stderr}"
    return proc.stdout


def raw_manifest(ref: str) -> dict[str, Any]:
    return json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", ref))


def tar_gz(members: dict[str, bytes | str]) -> bytes:
    """A tar.gz of regular files (bytes) and symlinks (str: the target)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return gzip.compress(raw.getvalue(), mtime=0)


def push_bytes(host: str, repo: str, data: bytes, tmp: Path) -> dict[str, Any]:
    """Push ``data`` as a blob; its descriptor (without media type)."""
    path = tmp / f"push-{hashlib.sha256(data).hexdigest()}"
    path.write_bytes(data)
    digest = push_blob(host, repo, path, plain_http=True, docker_config=False)
    path.unlink()
    return {"digest": digest, "size": len(data)}


def push_json(host: str, repo: str, tag: str, manifest: dict[str, Any], media_type: str) -> str:
    return push_manifest(host, repo, tag, manifest, media_type=media_type, plain_http=True, docker_config=False)
