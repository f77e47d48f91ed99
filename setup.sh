#!/usr/bin/env bash
# One command installs everything nydus-erofs needs on Debian 12, as root:
# system packages (the kernel-facing peers and the VM tooling) and a virtualenv in .venv with the project.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    erofs-utils e2fsprogs qemu-system-x86 qemu-utils skopeo umoci docker-registry vagrant \
    tar gzip zstd python3-venv ca-certificates iproute2
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "setup done: run the tests with .venv/bin/pytest"
