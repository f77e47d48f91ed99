"""The benchmark's images: a real base layer plus layers of random files nobody reads, up to each size; pushed as
OCI (gzip), as Nydus (``nydus-erofs convert``, zstd) and as Nydus with a prefetch table recorded from the workload
(``nydus-erofs trace``, then ``convert --prefetch-list``).

The base is a root filesystem directory given by the caller (a ``debootstrap --variant=minbase`` tree, say) or,
by default, a subset of this machine's own Debian 12: the files of the packages of about a minbase, plus python3
(:func:`host_base`; about 70 MB).
Layers are written straight into one OCI layout under the work directory and kept there, so a second run
reuses them (the padding layers are shared by all sizes: an image of size S is the base plus the first N).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import isal.isal_zlib as zlib

from tests.support.busybox_image import push_layout, run
from tests.support.containerd import CLI
from tests.support.oci import Layout

#: what the container runs; its first output line is the first line of /etc/os-release
WORKLOAD = 'ls /usr/bin >/dev/null; cat /etc/os-release; python3 -c "import json"'
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
PAD_FILE = 4 << 20
PAD_LAYER = 128 << 20
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the host's packages the base is made of: about Debian's minbase, with python3
BASE_PACKAGES = ("base-files", "base-passwd", "bash", "coreutils", "dash", "debianutils", "diffutils", "findutils",
                 "grep", "gzip", "hostname", "mawk", "sed", "tar", "util-linux", "libc6", "libc-bin", "ncurses-base",
                 "ncurses-bin", "media-types", "python3-minimal", "python3.11-minimal", "libpython3.11-minimal",
                 "libpython3.11-stdlib", "python3", "python3.11")  # fmt: skip
_UNWANTED = ("/usr/share/doc", "/usr/share/man", "/usr/share/info", "/usr/share/locale", "/usr/share/lintian")
REPOS = {"oci": "coldstart/oci", "nydus": "coldstart/nydus", "nydus-prefetch": "coldstart/nydus-prefetch"}


@dataclass
class Image:
    """One size's image: its tag and its OCI layers' total (compressed) size."""

    tag: str
    size_bytes: int

    def ref(self, host: str, mode: str) -> str:
        return f"{host}/{REPOS[mode]}:{self.tag}"


# --- the base root filesystem -------------------------------------------------------------------------------


def host_base(rootfs: Path) -> Path:
    """A small Debian root filesystem in ``rootfs`` (merged /usr) from this machine's own files: those of the
    packages :data:`BASE_PACKAGES` (``dpkg -L``, no documentation), the libraries their programs load, and
    Debian's initial /etc/passwd and /etc/group."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "dev", "proc", "sys", "run", "tmp", "root",
              "var/tmp", "home"):  # fmt: skip
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    for name in ("bin", "sbin", "lib", "lib64"):
        os.symlink(f"usr/{name}", rootfs / name)
    listed = subprocess.run(["dpkg", "-L", *BASE_PACKAGES], capture_output=True, text=True, check=True).stdout
    elves = []
    for line in sorted(set(listed.splitlines())):
        src = Path(line)
        if not line.startswith("/") or line.startswith(_UNWANTED) or src.is_dir() or not os.path.lexists(src):
            continue
        dest = rootfs / line.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dest):
            continue
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        else:
            shutil.copy2(src, dest)
            if "/bin/" in line or "/sbin/" in line or line.endswith(".so") or ".so." in line:
                elves.append(src)
    for lib in _libraries(elves):
        dest = rootfs / lib.relative_to("/")
        if not os.path.lexists(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dest)  # the file a link names, under the link's name
    for name in ("passwd", "group"):
        shutil.copy2(f"/usr/share/base-passwd/{name}.master", rootfs / "etc" / name)
    return rootfs


def _libraries(files: list[Path]) -> set[Path]:
    """The shared libraries (and the dynamic loader) these ELF files load, by ``ldd``, as /usr/... paths."""
    found: set[Path] = set()
    for i in range(0, len(files), 200):
        out = subprocess.run(["ldd", *map(str, files[i : i + 200])], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts else ""
            if path.startswith("/") and os.path.exists(path):
                real = Path(path)
                found.add(Path("/usr") / real.relative_to("/") if not path.startswith("/usr/") else real)
    return {p for p in found if p.exists()}


# --- layers ---------------------------------------------------------------------------------------------------


class _LayerSink:
    """A file object for tarfile: hashes what it is given (the diff id), gzips it into ``path`` and hashes that."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by finish()
        self.diff, self.digest = hashlib.sha256(), hashlib.sha256()
        self.gz = zlib.compressobj(1, zlib.DEFLATED, 31)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        self._out(self.gz.compress(data))
        return len(data)

    def _out(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        self._out(self.gz.flush())
        self.file.close()


def _layer(layout: Path, name: str, fill: object) -> dict:
    """The layer ``name`` of the layout (made by ``fill(tarfile)`` the first time): descriptor + diff id."""
    meta = layout / f"{name}.json"
    if meta.exists():
        return json.loads(meta.read_text())
    tmp = layout / f"{name}.tmp"
    sink = _LayerSink(tmp)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
        fill(tf)  # type: ignore[operator]
    sink.finish()
    digest = sink.digest.hexdigest()
    tmp.rename(layout / "blobs" / "sha256" / digest)
    desc = {"mediaType": MT_LAYER_GZIP, "digest": f"sha256:{digest}", "size": sink.size,
            "diff_id": f"sha256:{sink.diff.hexdigest()}"}  # fmt: skip
    meta.write_text(json.dumps(desc))
    return desc


def _fill_base(rootfs: Path):  # type: ignore[no-untyped-def]
    def fill(tf: tarfile.TarFile) -> None:
        for name in sorted(os.listdir(rootfs)):
            tf.add(rootfs / name, arcname=name)

    return fill


def _fill_pad(name: str, size: int):  # type: ignore[no-untyped-def]
    def fill(tf: tarfile.TarFile) -> None:
        for i in range(0, size, PAD_FILE):
            ti = tarfile.TarInfo(f"opt/pad/{name}/f{i // PAD_FILE:03d}")
            ti.size, ti.mtime, ti.mode = min(PAD_FILE, size - i), 1_700_000_000, 0o644
            tf.addfile(ti, io.BytesIO(os.urandom(ti.size)))

    return fill


def oci_images(work: Path, sizes: list[int], base: Path | None) -> tuple[Path, list[Image]]:
    """The OCI layout under ``work`` with one tag per size (``s<bytes>``): the base plus padding layers."""
    layout = work / "layout"
    lay = Layout(layout)  # kept from an earlier run: its layers are reused, its tags written anew
    if base is None:
        base = work / "base-rootfs"
        if not (base / "usr").exists():
            shutil.rmtree(base, ignore_errors=True)
            host_base(base)
    name = "base" if base == work / "base-rootfs" else f"base-{hashlib.sha256(bytes(base)).hexdigest()[:12]}"
    base_layer = _layer(layout, name, _fill_base(base))
    images = []
    for size in sizes:
        # shared padding layers of PAD_LAYER, then one of this size's own for the rest
        full, rest = divmod(max(size - base_layer["size"], 0), PAD_LAYER)
        chosen = [base_layer] + [_layer(layout, f"pad-{n:03d}", _fill_pad(f"{n:03d}", PAD_LAYER)) for n in range(full)]
        if rest >= 1 << 20:
            chosen.append(_layer(layout, f"rest-{size}", _fill_pad(f"rest-{size}", rest)))
        config = {"architecture": "amd64", "os": "linux", "config": {"Env": [f"PATH={PATH}"], "Cmd": ["/bin/bash"]},
                  "rootfs": {"type": "layers", "diff_ids": [d["diff_id"] for d in chosen]}}  # fmt: skip
        descs = [{k: v for k, v in d.items() if k != "diff_id"} for d in chosen]
        manifest = lay.manifest_of(descs, config)
        tag = f"s{size}-{manifest['digest'][7:19]}"  # by content: conversions kept in the work directory match
        lay.tag(manifest, tag)
        images.append(Image(tag, sum(d["size"] for d in chosen)))
    return layout, images


# --- Nydus conversions and the registry ---------------------------------------------------------------------


def _has_tag(layout: Path, tag: str) -> bool:
    index = layout / "index.json"
    if not index.exists():
        return False
    names = [(m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
             for m in json.loads(index.read_text())["manifests"]]  # fmt: skip
    return tag in names


def _convert(work: Path, layout: Path, tag: str, mode: str, *options: str | Path) -> Path:
    """``layout:tag`` converted into the layout of ``mode`` (kept: converted once per work directory)."""
    target = work / f"{mode}-layout"
    if not _has_tag(target, tag):
        tmp = work / "convert-tmp"
        tmp.mkdir(exist_ok=True)
        run(CLI, "convert", "--work-dir", tmp, *options, f"oci:{layout}:{tag}", f"oci:{target}:{tag}")
    return target


def record_trace(ref: str, work: Path) -> Path:
    """The workload's prefetch list: run in a chroot on a fanotify mount of the Nydus image ``ref``, then
    ``nydus-erofs trace`` (kept: recorded once per work directory)."""
    out = work / f"prefetch-list-{ref.rsplit(':', 1)[1]}.txt"
    if out.exists():
        return out
    mnt, cache = work / "trace-mnt", work / "trace-cache"
    shutil.rmtree(cache, ignore_errors=True)
    for d in (mnt, cache):
        d.mkdir(exist_ok=True)
    run(CLI, "mount", f"docker://{ref}", mnt, "--plain-http", "--cache-dir", cache, "--no-prefetch")
    try:
        run("mount", "--bind", "/dev", mnt / "dev")
        try:
            proc = subprocess.run(["chroot", str(mnt), "/bin/bash", "-c", WORKLOAD], env={"PATH": PATH},
                                  capture_output=True, text=True)  # fmt: skip
        finally:
            run("umount", mnt / "dev")
        if proc.returncode != 0:
            raise RuntimeError(f"the workload failed on the traced mount: {proc.stderr.strip()[-500:]}")
        run(CLI, "trace", mnt, "-o", out.with_suffix(".tmp"))
    finally:
        run(CLI, "umount", mnt)
    out.with_suffix(".tmp").rename(out)
    return out


def publish(work: Path, layout: Path, images: list[Image], host: str, prefetch: bool = True) -> Path | None:
    """Every image to the registry at ``host`` in the three forms (without the prefetch one unless
    ``prefetch``); returns the prefetch list used."""
    for im in images:
        push_layout(layout, im.tag, host, REPOS["oci"])
        push_layout(_convert(work, layout, im.tag, "nydus"), im.tag, host, REPOS["nydus"])
    if not prefetch:
        return None
    trace = record_trace(images[0].ref(host, "nydus"), work)
    for im in images:
        target = _convert(work, layout, im.tag, "nydus-prefetch", "--prefetch-list", trace)
        push_layout(target, im.tag, host, REPOS["nydus-prefetch"])
    return trace
