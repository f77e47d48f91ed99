"""``nydus-erofs mount --mode full`` over loop devices (what kernels without file-backed EROFS mounts get),
forced on this host with ``--no-file-backed`` or ``$NYDUS_EROFS_FORCE_LOOP=1``: the same tree as a file-backed
mount; the mount's source is a loop device; umount leaves no loop device bound to the image's files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fscache.loop import backing_files
from fscache.nbd import why_no_nbd
from tests.support.cli import run
from tests.support.fstree import assert_same_tree

pytestmark = [pytest.mark.root, pytest.mark.kernel("erofs", "loop")]


def nydus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(*args, stdin=subprocess.DEVNULL, timeout=300, env=env)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-layer image (two blobs, lz4 chunks): its merged source tree and its output dir."""
    tmp = tmp_path_factory.mktemp("loop-image")
    lower, upper = tmp / "lower", tmp / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "big.bin").write_bytes(os.urandom(3 << 20) + b"tail")
    (lower / "small.txt").write_text("from the lower layer\n")
    (upper / "e").mkdir(parents=True)
    (upper / "e" / "text").write_bytes(b"compressible " * 50000)
    out = tmp / "out"
    built = nydus("build", str(lower), str(upper), "--output-dir", str(out), "--compressor", "lz4_block")
    assert built.returncode == 0, built.stderr
    merged = tmp / "merged"
    subprocess.run(["cp", "-a", str(lower), str(merged)], check=True)
    subprocess.run(["cp", "-a", f"{upper}/.", str(merged)], check=True)
    return merged, out


def _mount(out: Path, mp: Path, cache: Path, *flags: str, env: dict[str, str] | None = None) -> dict[str, object]:
    mp.mkdir()
    done = nydus("mount", str(out / "image.boot"), str(mp), "--cache-dir", str(cache), "--mode", "full", "--json",
                 *flags, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _ours(cache: Path, out: Path) -> dict[str, str]:
    """Bound loop devices reading the image's bootstrap or a cache file."""
    return {dev: f for dev, f in backing_files().items() if f.startswith((str(cache), str(out)))}


def test_loop_mount_equals_the_file_backed_mount(image: tuple[Path, Path], tmp_path: Path) -> None:
    source, out = image
    loop = _mount(out, tmp_path / "loop", tmp_path / "cache-loop", "--no-file-backed")
    try:
        assert str(loop["source"]).startswith("/dev/loop")
        bound = _ours(tmp_path / "cache-loop", out)
        cache_files = [p for p in (tmp_path / "cache-loop").iterdir() if p.suffix != ".map"]  # not the chunk maps
        files = [str(out / "image.boot"), *map(str, cache_files)]
        assert sorted(bound.values()) == sorted(files)
        filed = _mount(out, tmp_path / "file", tmp_path / "cache-file", "--file-backed")
        try:
            assert filed["source"] == str(out / "image.boot")
            assert_same_tree(source, tmp_path / "loop")
            assert_same_tree(tmp_path / "file", tmp_path / "loop")
        finally:
            assert nydus("umount", str(tmp_path / "file")).returncode == 0
    finally:
        done = nydus("umount", str(tmp_path / "loop"))
    assert done.returncode == 0, done.stderr
    assert _ours(tmp_path / "cache-loop", out) == {}  # autoclear: the devices went with the mount


def test_force_loop_env_makes_auto_use_loop_devices(image: tuple[Path, Path], tmp_path: Path) -> None:
    source, out = image
    rec = _mount(out, tmp_path / "mnt", tmp_path / "cache", env={**os.environ, "NYDUS_EROFS_FORCE_LOOP": "1"})
    try:
        assert str(rec["source"]).startswith("/dev/loop")
        assert_same_tree(source, tmp_path / "mnt")
    finally:
        done = nydus("umount", str(tmp_path / "mnt"))
    assert done.returncode == 0, done.stderr
    assert _ours(tmp_path / "cache", out) == {}


def test_nbd_mode_without_nbd_is_a_one_line_usage_error(image: tuple[Path, Path], tmp_path: Path) -> None:
    if why_no_nbd() is None:
        pytest.skip("this kernel has NBD: tests/vm/test_block_modes.py mounts in nbd mode")
    _, out = image
    (tmp_path / "mnt").mkdir()
    done = nydus("mount", str(out / "image.boot"), str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"),
                 "--mode", "nbd")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"nydus-erofs: error: --mode nbd: {why_no_nbd()} (use --mode full)"]
