"""setup.sh installs the Debian package of every external command the code, tests and benchmarks run.

A new command the suite calls gets a row in COMMANDS and its package in setup.sh's PACKAGES, or this fails.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: external command → the Debian 12 package that installs it (``dpkg -S``), and who runs it
COMMANDS = {
    "mkfs.erofs": "erofs-utils",  # reference images in tests, bench_build, bench_convert
    "fsck.erofs": "erofs-utils",  # tests/test_build.py checks our images with it
    "setfattr": "attr",  # tests/test_reader_fuzz.py
    "mkfs.ext4": "e2fsprogs",  # kernel-test/run_vm.py: the VM's scratch disk
    "qemu-system-x86_64": "qemu-system-x86",  # kernel-test/run_vm.py
    "qemu-img": "qemu-utils",  # the Vagrant box
    "vagrant": "vagrant",  # tests/test_run_vm.py
    "skopeo": "skopeo",  # nydus-erofs convert docker://, tests/test_convert.py
    "umoci": "umoci",  # OCI layouts in tests/test_convert.py, tests/test_layers.py
    "docker-registry": "docker-registry",  # tests/registry.py, tests/vm_remote.py
    "tar": "tar",  # test layers, bench_convert
    "gzip": "gzip",  # bench_convert's gzip -1
    "zstd": "zstd",  # tests/test_tar.py's .tar.zst
    "xz": "xz-utils",  # the kernel source tarball
    "bsdtar": "libarchive-tools",  # tests/test_tar.py: a second tar writer
    "ip": "iproute2",  # kernel-test/vm-init: the guest's network; benchmarks/coldstart: ip netns exec
    "make": "build-essential",  # (its dependency) kernel-test/vmkernel.py, erofs-utils 1.9.3 for the benchmarks
    "gcc": "build-essential",
    "bc": "bc",  # the kernel build
    "bison": "bison",
    "flex": "flex",
    "cpio": "cpio",
    "autoreconf": "autoconf",  # ../shared/anchors/build-erofs-utils (benchmarks/mkfs_erofs.py)
    "automake": "automake",
    "libtoolize": "libtool",
    "pkg-config": "pkg-config",  # (through pkgconf)
    "containerd": "containerd",  # the next features' tests
    "runc": "runc",
    "tinyproxy": "tinyproxy",
    "debootstrap": "debootstrap",
    "curl": "curl",  # tests/daemon/test_serve.py
    "openssl": "openssl",  # tests/daemon/test_backend_proxy.py: a test CA
    "setpriv": "util-linux",  # tests/mount/test_hardening.py: an image's setuid binary run by nobody
    "losetup": "util-linux",
    "ctr": "containerd",
    "busybox": "busybox-static",  # tests/snapshotter: the busybox image's /bin/busybox
}


def setup_packages() -> set[str]:
    """The package names in setup.sh's ``PACKAGES=( ... )`` array (comments dropped)."""
    text = (REPO / "setup.sh").read_text()
    m = re.search(r"^PACKAGES=\(\n(.*?)^\)", text, re.S | re.M)
    assert m, "setup.sh has no PACKAGES=( ... ) array"
    return {word for line in m.group(1).splitlines() for word in line.split("#", 1)[0].split()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_setup_installs_the_package_of_each_command(command: str) -> None:
    package = COMMANDS[command]
    assert package in setup_packages(), f"{command} needs the package {package}: add it to setup.sh's PACKAGES"


def test_setup_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(REPO / "setup.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
