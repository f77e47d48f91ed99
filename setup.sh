#!/usr/bin/env bash
# One command installs everything nydus-erofs needs on Debian 12, as root:
# system packages (every external command the code, tests and benchmarks run; tests/test_setup.py checks that
# each one's package is listed here) and a virtualenv in .venv with the project. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(
    # the kernel-facing peers: mkfs.erofs/fsck.erofs, mkfs.ext4 (VM scratch disk), setfattr
    erofs-utils e2fsprogs attr
    # the VM: qemu-system-x86_64, qemu-img; vagrant for the Vagrant box test
    qemu-system-x86 qemu-utils vagrant
    # images and registries: skopeo, umoci, docker-registry (the test registry)
    skopeo umoci docker-registry
    # archives: tar, gzip, zstd, xz, bsdtar (a second tar writer in the tests)
    tar gzip zstd xz-utils libarchive-tools
    # the VM guest's network (ip); benchmarks/coldstart's registry in a network namespace (ip netns exec); the virtualenv
    iproute2 python3-venv ca-certificates
    # setpriv (tests run image binaries as user nobody), mount/umount
    util-linux
    # building the test kernel (kernel-test/build-kernel: make, gcc, bc, bison, flex, cpio)
    build-essential bc bison flex cpio libelf-dev libssl-dev
    # building erofs-utils 1.9.3 for the benchmarks (../shared/anchors/build-erofs-utils)
    autoconf automake libtool pkg-config uuid-dev liblz4-dev libzstd-dev zlib1g-dev liblzma-dev
    # the next features: containerd snapshotter (containerd, runc), proxy tests (tinyproxy), root file systems
    containerd runc tinyproxy debootstrap
    # the snapshotter tests' busybox image (a static busybox, no image needed)
    busybox-static
    # HTTP clients and a test CA (curl, openssl)
    curl openssl
)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "setup done: run the tests with .venv/bin/pytest"
