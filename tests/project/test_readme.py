"""The README is true as written: every shell example in its ```sh blocks runs and exits 0 (issue 20).

The blocks run in README order, in one scratch directory, as a reader would follow them top to bottom (a later
block uses what an earlier one built; running one block alone runs the earlier ones first).  Placeholders are
replaced by fixtures (:data:`PLACEHOLDERS`: adding one is one entry there, and one in :data:`NEEDS` when it needs a
tool or a peer); ``/mnt`` is a scratch mountpoint; ``nydus-erofs`` is this checkout's.  Lines that cannot run in a
test are in :data:`SKIPPED`, each with the reason and the test that covers it instead; every other line must run.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from tests.support.cli import BIN, CLI
from tests.support.kmount import MNT_DETACH, umount
from tests.support.machine import missing_erofs, missing_network, missing_root, missing_tool
from tests.support.paths import REPO
from tests.support.registry import RegistryServer

README = REPO / "README.md"

# A line matching one of these (searched in it, continuation lines joined) is not run here, for the reason given.
SKIPPED = {
    r"^\./setup\.sh": "installs system packages: tests/project/test_setup.py checks what it installs",
    r"^\.venv/bin/pytest": "the test suite itself",
    r"^python3 -m venv": "a fresh virtualenv downloads the dependencies from the package index",
    r"^cachefilesd-py ": "needs /dev/cachefiles (cachefiles on-demand): tests/vm runs the daemon in the test VM",
    r"^mount -t erofs none -o fsid=": "needs /dev/cachefiles and cachefilesd-py: tests/vm/test_cachefiles.py",
    r"^S=/run/cachefilesd-py/|--unix-socket \$S|^umount /mnt/app":
        "cachefilesd-py's bind API: tests/vm/test_bind_api.py",
    r"--mode fscache": "needs /dev/cachefiles and cachefilesd-py: tests/vm/test_bind_api.py",
    r"--backend s3\b": "needs an S3 store holding the blobs: tests/daemon/test_backend_s3.py (moto's server)",
    r"proxy=http://127\.0\.0\.1:65001": "needs a P2P proxy (dfdaemon): tests/daemon/test_backend_proxy.py",
    r"^nydus-erofs serve ": "serves until stopped: tests/daemon/test_serve.py runs it with curl and a mount",
    r"http://127\.0\.0\.1:8000/|host=127\.0\.0\.1:8000": "reads from `nydus-erofs serve` above (skipped)",
    # Run containers: the host's containerd, its config and systemd; tests/snapshotter/test_containerd.py runs the
    # same steps against a containerd of its own (private root, the snapshotter as its proxy plugin)
    r"^nydus-erofs snapshotter ": "starts the snapshotter for the host's containerd: tests/snapshotter",
    r"^systemctl restart containerd": "restarts the host's containerd: tests/snapshotter starts a private one",
    r"registry\.example\.com": "an example registry and the host's containerd: tests/snapshotter/test_containerd.py",
    r"^#": "a comment (the containerd config it shows is systemd/containerd-nydus-erofs.toml)",
}


@dataclass
class Scratch:
    """The reader's world: a scratch directory (the working directory of every block) and the fixtures."""

    root: Path
    request: pytest.FixtureRequest
    made: dict[str, str] = field(default_factory=dict)
    ran: set[int] = field(default_factory=set)

    def path(self, name: str) -> str:
        return str(self.root / name)


def _rootfs(s: Scratch) -> str:
    root = s.root / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("readme\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(os.urandom(300_000))
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    return str(root)


def _umoci(*args: str | Path) -> None:
    r = subprocess.run(["umoci", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"umoci {args}: {r.stderr}"


def _layout(s: Scratch) -> str:
    """An OCI image layout made by umoci: ``v1`` (one layer: /etc/hostname, a tool) and ``v2`` (v1 and a layer)."""
    layout = s.root / "layout"
    _umoci("init", "--layout", layout)
    _umoci("new", "--image", f"{layout}:v1")
    bundle = s.root / "bundle"
    _umoci("unpack", "--image", f"{layout}:v1", bundle)
    shutil.copytree(_rootfs_once(s), bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    _umoci("repack", "--image", f"{layout}:v1", bundle)
    _umoci("tag", "--image", f"{layout}:v1", "v2")
    (bundle / "rootfs" / "etc" / "motd").write_text("v2\n")
    _umoci("repack", "--image", f"{layout}:v2", bundle)
    shutil.rmtree(bundle)
    return str(layout)


def _rootfs_once(s: Scratch) -> str:
    return s.made.get("ROOTFS_DIR") or s.made.setdefault("ROOTFS_DIR", _rootfs(s))


def _tar_layers(s: Scratch) -> str:
    """``base.tar.gz`` and ``app.tar.zst`` in the working directory (the README names them as they are)."""

    def tar(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in members.items():
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    (s.root / "base.tar.gz").write_bytes(gzip.compress(tar({"etc/hostname": b"base\n", "lib/a": b"a" * 9000})))
    (s.root / "app.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar({"app/run": b"#!/bin/sh\n"})))
    return "base.tar.gz"


def _registry(s: Scratch) -> str:
    server: RegistryServer = s.request.getfixturevalue("registry_server")
    return server.host


def _fresh(name: str) -> Callable[[Scratch], str]:
    return lambda s: s.path(name)


def _mountpoint(s: Scratch) -> str:
    (s.root / "mnt").mkdir(exist_ok=True)
    return s.path("mnt")


# Placeholder → how to make what it stands for (once, on first use).
PLACEHOLDERS: dict[str, Callable[[Scratch], str]] = {
    "ROOTFS_DIR": _rootfs_once,
    "LAYOUT_DIR": _layout,
    "NYDUS_LAYOUT": _fresh("nydus-layout"),
    "REGISTRY": _registry,
    "REPO": lambda s: "readme/image",
    "CACHE_DIR": _fresh("cache"),
    "CACHE_DIR2": _fresh("cache2"),
    "CACHE_DIR3": _fresh("cache3"),
    "UNPACKED_DIR": _fresh("unpacked"),
    "UNPACKED.tar": _fresh("unpacked.tar"),
    "OUT": _fresh("out"),
    "OUT2": _fresh("out2"),
    "OUT3": _fresh("out3"),
    "OUT_Z": _fresh("out-z"),
    "OUT_P": _fresh("out-p"),
    "base.tar.gz": _tar_layers,
    "/mnt": _mountpoint,
}
# What a block needs when it uses a placeholder or runs a command (the checks of tests/support/machine.py).
NEEDS: dict[str, list[Callable[[], str | None]]] = {
    "LAYOUT_DIR": [lambda: missing_tool("umoci")],
    "REGISTRY": [missing_network, lambda: missing_tool("docker-registry"), lambda: missing_tool("skopeo")],
    "/mnt": [missing_root, missing_erofs],
}


def _token(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w.-])" + re.escape(name) + r"(?![\w])")


@dataclass
class Block:
    line: int  # in README.md
    text: str  # the commands to run (skipped lines left out), continuation lines joined

    @property
    def placeholders(self) -> list[str]:
        return [name for name in PLACEHOLDERS if _token(name).search(self.text)]

    def missing(self) -> list[str]:
        why = [check() for name in self.placeholders for check in NEEDS.get(name, [])]
        return list(dict.fromkeys(w for w in why if w))


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```sh":
            i += 1
            continue
        start = i + 1
        body: list[str] = []
        i += 1
        while lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        commands = " \n".join(body).replace("\\ \n", " ").splitlines()  # join continuation lines
        kept = [c for c in commands if c.strip() and not any(re.search(p, c.strip()) for p in SKIPPED)]
        if kept:
            blocks.append(Block(start, "\n".join(kept)))
        i += 1
    return blocks


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def scratch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    s = Scratch(tmp_path_factory.mktemp("readme"), request)
    try:
        yield s
    finally:
        mnt = s.root / "mnt"
        env = _env(s)
        if mnt.is_dir() and os.path.ismount(mnt):
            subprocess.run([CLI, "umount", mnt], capture_output=True, env=env, timeout=60)
        if mnt.is_dir() and os.path.ismount(mnt):
            umount(mnt, MNT_DETACH)


def _env(s: Scratch) -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                NYDUS_EROFS_RUN_DIR=str(s.root / "run"))  # fmt: skip


def _script(s: Scratch, block: Block) -> str:
    text = block.text.replace(".venv/bin/nydus-erofs", "nydus-erofs")
    for name in block.placeholders:
        if name not in s.made:
            s.made[name] = PLACEHOLDERS[name](s)
        value = s.made[name] if name != "base.tar.gz" else name  # made in the working directory, named as it is
        text = _token(name).sub(lambda _m, v=value: v, text)
    return text


def _run(s: Scratch, index: int) -> subprocess.CompletedProcess[str]:
    block = BLOCKS[index]
    script = _script(s, block)
    s.ran.add(index)
    return subprocess.run(["bash", "-e", "-x", "-c", script], cwd=s.root, env=_env(s), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_every_sh_block_is_found() -> None:
    """The extraction sees the README's examples (a renamed fence would silently test nothing)."""
    assert len(BLOCKS) >= 7
    assert any("nydus-erofs build ROOTFS_DIR" in b.text for b in BLOCKS)
    assert not any(re.search(p, line) for b in BLOCKS for line in b.text.splitlines() for p in SKIPPED)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_example_runs(index: int, scratch: Scratch) -> None:
    block = BLOCKS[index]
    missing = block.missing()
    if missing:
        why = "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this example, but: {why}")
        pytest.skip(why)
    for earlier in range(index):  # what the reader did before (when this block runs alone)
        if earlier not in scratch.ran and not BLOCKS[earlier].missing():
            r = _run(scratch, earlier)
            assert r.returncode == 0, f"README.md:{BLOCKS[earlier].line} (run before this one) failed:\n{r.stderr}"
    r = _run(scratch, index)
    assert r.returncode == 0, f"README.md:{block.line}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
