"""Debian 12's stock kernel (``linux-image-6.1.0-NN-amd64``) for the test VM: its bzImage and an initramfs.

The package is downloaded with ``apt-get download`` (never installed on the host) and unpacked with
``dpkg-deb -x``; from its module tree we keep only the modules the guest needs (:data:`MODULES` and what they
depend on, read from each module's ``.modinfo`` ``depends=``), and build a gzip'd newc initramfs holding them, a
static busybox (``busybox-static``) and a small ``/init``: it loads the modules in dependency order, mounts the
host root over 9p (the ``rootflags=`` of the kernel command line) and ``switch_root``\\ s to the ``init=`` of the
command line (kernel-test/vm-init), passing its arguments on. Everything lands in
``kernel-test/.cache/debian-6.1/<package>/``: ``bzImage``, ``config``, ``modules/`` and
``initramfs-<sha256 of its content>.cpio.gz`` (rebuilt when the init script, busybox or a module changes).

Stdlib only, like run_vm.py.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "debian-6.1"
NAME = "debian-6.1"
PACKAGE_RE = re.compile(r"^(linux-image-6\.1\.0-(\d+)-amd64) ")
BUSYBOX = Path("/bin/busybox")
# What the guest needs: virtio (PCI, block, net, console), the host root over 9p, the scratch disk's ext4 (and
# the crc32c its metadata checksums use), and what the tests mount: EROFS, overlayfs, loop and NBD devices.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "9pnet_virtio", "9p", "crc32c_generic",
           "ext4", "erofs", "overlay", "loop", "nbd")

INIT = r"""#!/bin/sh
# /init of the initramfs for a stock (modular) kernel, written by kernel-test/debkernel.py: load the modules,
# mount the host root over 9p, hand over to the init= of the command line (kernel-test/vm-init) with our args.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "run-vm initramfs: $*" >/dev/console
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}
while read -r module; do
    insmod "/modules/$module" || fail "cannot load $module"
done </modules/order
init= rootflags=
for word in $(cat /proc/cmdline); do
    case $word in
        init=*) init=${word#init=} ;;
        rootflags=*) rootflags=${word#rootflags=} ;;
    esac
done
[ -n "$init" ] || fail "no init= on the kernel command line"
mount -t 9p -o "ro,$rootflags" root /newroot || fail "cannot mount the host root over 9p"
# vm-init takes this /dev as it is (the kernel mounts devtmpfs on /dev itself only without an initramfs).
mount --move /dev /newroot/dev || fail "cannot move /dev to the new root"
umount /proc
exec switch_root /newroot "$init" "$@"
"""


class DebianKernelError(Exception):
    """The Debian kernel cannot be fetched or prepared; the message says why."""


@dataclass(frozen=True)
class DebianKernel:
    bzimage: Path
    initramfs: Path
    config: Path


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DebianKernelError(f"{cmd[0]} not found (Debian's apt and dpkg are needed)") from exc
    if done.returncode != 0:
        raise DebianKernelError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def newest_package() -> str:
    """The newest ``linux-image-6.1.0-NN-amd64`` apt knows (Debian 12's kernel)."""
    found = [(int(m.group(2)), m.group(1)) for line in _run(["apt-cache", "search", "linux-image-6.1.0"]).splitlines()
             if (m := PACKAGE_RE.match(line))]
    if not found:
        raise DebianKernelError("apt knows no linux-image-6.1.0-*-amd64 (a Debian 12 apt source is needed)")
    return max(found)[1]


def module_depends(ko: bytes) -> list[str]:
    """A module's hard dependencies: the ``depends=`` entry of its ``.modinfo`` section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [name for name in m.group(1).decode().split(",") if name] if m else []


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_closure(tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The ``.ko`` files of ``wanted`` and their dependencies, each after what it depends on."""
    index = {_norm(p.name.removesuffix(".ko")): p for p in tree.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in seen:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            raise DebianKernelError(f"module {name} not found under {tree}")
        for dep in module_depends(path.read_bytes()):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio ``newc`` archive of (path, mode, data) entries (a symlink's data is its target)."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data, ino)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def initramfs_content(modules: list[Path], busybox: bytes) -> bytes:
    dirs = ("bin", "modules", "proc", "sys", "dev", "newroot")
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    entries += [("bin/busybox", 0o100755, busybox), ("bin/sh", 0o120777, b"busybox"),
                ("init", 0o100755, INIT.encode())]
    entries += [(f"modules/{p.name}", 0o100644, p.read_bytes()) for p in modules]
    entries.append(("modules/order", 0o100644, "".join(f"{p.name}\n" for p in modules).encode()))
    return newc_archive(entries)


def _unpack(package: str, dest: Path) -> None:
    """Download ``package``, keep its vmlinuz, config and the modules the guest needs in ``dest``."""
    with tempfile.TemporaryDirectory(prefix="debkernel-", dir=dest.parent) as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        (deb,) = work.glob("*.deb")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        (vmlinuz,) = (tree / "boot").glob("vmlinuz-*")
        (config,) = (tree / "boot").glob("config-*")
        (modtree,) = (tree / "lib" / "modules").iterdir()
        staging = work / "staging"
        (staging / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz, staging / "bzImage")
        shutil.copyfile(config, staging / "config")
        order = module_closure(modtree, MODULES)
        for ko in order:
            shutil.copyfile(ko, staging / "modules" / ko.name)
        (staging / "modules" / "order").write_text("".join(f"{ko.name}\n" for ko in order))
        staging.chmod(0o755)
        staging.rename(dest)


def _cached_dirs(cache: Path) -> list[Path]:
    found = [d for d in cache.glob("linux-image-6.1.0-*-amd64") if (d / "bzImage").is_file()]
    return sorted(found, key=lambda d: int(re.findall(r"\d+", d.name)[3]))


def prepare(cache: Path = CACHE) -> DebianKernel:
    """The Debian kernel and its initramfs, downloading and building what the cache lacks."""
    if not BUSYBOX.is_file():
        raise DebianKernelError(f"{BUSYBOX} not found: install busybox-static (setup.sh does)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once (parametrized tests) build it once
        have = _cached_dirs(cache)
        if have:
            dest = have[-1]
        else:
            package = newest_package()
            dest = cache / package
            _unpack(package, dest)
        names = (dest / "modules" / "order").read_text().split()
        modules = [dest / "modules" / name for name in names]
        content = initramfs_content(modules, BUSYBOX.read_bytes())
        digest = hashlib.sha256(content).hexdigest()[:16]
        initramfs = dest / f"initramfs-{digest}.cpio.gz"
        if not initramfs.is_file():
            for old in dest.glob("initramfs-*.cpio.gz"):
                old.unlink()
            part = initramfs.with_suffix(".part")
            part.write_bytes(gzip.compress(content, compresslevel=6, mtime=0))
            os.replace(part, initramfs)
        return DebianKernel(dest / "bzImage", initramfs, dest / "config")
