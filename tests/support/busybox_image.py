"""Test helper: a small busybox image (Debian's busybox-static) as an OCI layout made by umoci, with a big file
nobody reads (to show a Nydus run fetches little) and a few small ones, pushed to a registry with skopeo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "ls", "echo", "stat", "find", "sha256sum", "rm", "mkdir", "head", "wc", "sleep", "sync",
           "true", "tail", "dd", "mv", "cp", "test", "[")  # fmt: skip
BIG_SIZE = 96 << 20  # the benchmarks' default; the tests take a smaller one


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: exit {proc.returncode}: {proc.stderr}")
    return proc.stdout


def fill_rootfs(rootfs: Path, big_size: int = BIG_SIZE) -> None:
    """busybox and its applets in /bin, /etc/hello.txt, /data/big (random, ``big_size``), /data/log."""
    (rootfs / "bin").mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for name in APPLETS:
        os.symlink("busybox", rootfs / "bin" / name)
    for d in ("etc", "data", "tmp", "proc", "sys", "dev", "run"):
        (rootfs / d).mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    (rootfs / "etc" / "hello.txt").write_text("hello from the image\n")
    (rootfs / "etc" / "owned").write_text("owned by 1000:100\n")
    os.chown(rootfs / "etc" / "owned", 1000, 100)
    os.chmod(rootfs / "etc" / "owned", 0o640)
    with open(rootfs / "data" / "big", "wb") as f:
        for _ in range(big_size >> 20):
            f.write(os.urandom(1 << 20))
    (rootfs / "data" / "log").write_text("line 1\n")
    os.symlink("hello.txt", rootfs / "etc" / "hello-link")


def busybox_layout(tmp: Path, tag: str = "v1", big_size: int = BIG_SIZE) -> Path:
    """An OCI layout at ``tmp/layout`` holding ``tag``: one layer, the busybox root filesystem (:func:`fill_rootfs`)."""
    layout = tmp / "layout"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    bundle = tmp / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    fill_rootfs(bundle / "rootfs", big_size)
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    run("umoci", "config", "--image", f"{layout}:{tag}", "--config.cmd", "/bin/sh", "--config.env",
        "PATH=/bin")  # fmt: skip
    shutil.rmtree(bundle)
    return layout


def push_layout(layout: Path, tag: str, registry_host: str, repo: str) -> str:
    """Copy ``layout:tag`` to ``registry_host/repo:tag`` (plain HTTP); returns the reference."""
    ref = f"{registry_host}/{repo}:{tag}"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}")
    return ref
