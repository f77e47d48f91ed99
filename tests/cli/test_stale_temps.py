"""Temporaries that a killed command left (SIGKILL, a crash) are removed by the next command of the kind that
makes them there, and one whose owner is still running never is: build (inside OUT), unpack (beside OUTPUT),
convert (in --work-dir)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erofs.paths import remove_stale_temps, temp_prefix
from tests.build.test_hostile import _oci, member, tar_bytes
from tests.support.cli import CLI, TIMEOUT, run
from tests.support.poll import wait_for

BIG = 4 << 20  # the size of the file the blocked builds read from stdin

# `nydus-erofs` that stops before it writes the first entry of an unpack (its temporary made) until a line is read
BLOCKED_UNPACK = """
import sys
from erofs.reader import bootstrap
listdir = bootstrap.Bootstrap.listdir
def first_waits(self, ino, _waited=[]):
    if not _waited:
        _waited.append(sys.stdin.readline())
    return listdir(self, ino)
bootstrap.Bootstrap.listdir = first_waits
from erofs.cli import main
main(sys.argv[1:], prog_name="nydus-erofs")
"""


def _wait_for(cond: Callable[[], list[Path]], what: str) -> list[Path]:
    """Poll ``cond`` until it gives something (the process under test is running, we cannot be told)."""
    return wait_for(cond, f"no {what} after {TIMEOUT}s", TIMEOUT)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def removed(path: Path, pid: int) -> str:
    return f"nydus-erofs: removed stale temporary {path} (its process {pid} is gone)"


def check(out: Path) -> None:
    r = run("check", out / "image.boot", "--blob-dir", out / "blobs")
    assert r.returncode == 0, r.stdout + r.stderr


# -- build ---------------------------------------------------------------------------------------------------------
def _big_header() -> bytes:
    info = tarfile.TarInfo("big")
    info.size = BIG
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _stdin_build(out: Path, procs: list[subprocess.Popen[bytes]], data: bytes) -> subprocess.Popen[bytes]:
    """``build - -o OUT`` reading a tar with one file of BIG bytes from our pipe, given ``data`` of it so far."""
    p = subprocess.Popen([CLI, "build", "-", "-o", str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)  # fmt: skip
    procs.append(p)
    assert p.stdin is not None
    p.stdin.write(_big_header() + data)
    p.stdin.flush()
    return p


def _build_temps(out: Path) -> list[Path]:
    return sorted(out.glob(".nydus-erofs-build-*"))


def test_a_killed_build_leaves_a_temp_the_next_build_removes_not_a_live_ones(
    source: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    data = os.urandom(BIG)

    live = _stdin_build(out, procs, b"")  # a build to OUT that waits for its tar
    (live_tmp,) = _wait_for(lambda: _build_temps(out), "temporary of the live build")

    killed = _stdin_build(out, procs, data[: BIG // 2])  # surely running: half of the file is still to come
    (blob,) = _wait_for(lambda: list(out.glob(".nydus-erofs-build-*/blobs/.blob-0.tmp")), "blob being written")
    (stale,) = [p for p in _build_temps(out) if p != live_tmp]
    assert blob.is_relative_to(stale)
    killed.kill()
    killed.wait()
    assert stale.is_dir()  # SIGKILL: no cleanup

    r = run("build", source, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [removed(stale, killed.pid)]
    assert _build_temps(out) == [live_tmp]
    check(out)

    assert live.stdin is not None and live.stderr is not None
    live.stdin.write(data + b"\0" * (-BIG % 512 + 1024))
    live.stdin.close()
    assert live.wait(TIMEOUT) == 0, live.stderr.read()
    assert sorted(os.listdir(out)) == ["blobs", "image.boot"]
    check(out)
    r = run("inspect", out / "image.boot", "--stat", "/big", "--json")
    assert r.returncode == 0 and f'"size": {BIG}' in r.stdout, r.stdout + r.stderr


# -- unpack --------------------------------------------------------------------------------------------------------
def _blocked_unpack(image: Path, out: Path, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    args = ["unpack", str(image / "image.boot"), "--blob-dir", str(image / "blobs"), "-o", str(out)]
    p = subprocess.Popen([sys.executable, "-c", BLOCKED_UNPACK, *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    return p


def _unpack_temps(d: Path) -> list[Path]:
    return sorted(d.glob(".*.unpack-*"))


def _tree(root: Path) -> dict[str, str]:
    """A tar's hash, or a directory's paths with their contents' hashes or link targets."""
    if root.is_file():
        return {"": _sha(root)}
    return {str(p.relative_to(root)): "-> " + os.readlink(p) if p.is_symlink() else _sha(p) if p.is_file() else "/"
            for p in sorted(root.rglob("*"))}  # fmt: skip


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", ["", ".tar"], ids=["dir", "tar"])
def test_a_killed_unpack_leaves_a_temp_the_next_unpack_removes_not_a_live_ones(
    suffix: str, image: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    d = tmp_path / "d"  # image is in tmp_path
    d.mkdir()
    out = d / f"out{suffix}"
    live = _blocked_unpack(image, d / f"live{suffix}", procs)  # another unpack into the same directory, running
    (live_tmp,) = _wait_for(lambda: _unpack_temps(d), "temporary of the live unpack")

    killed = _blocked_unpack(image, out, procs)
    stale = _wait_for(lambda: [p for p in _unpack_temps(d) if p != live_tmp], "temporary of the unpack")[0]
    killed.kill()
    killed.wait()
    assert stale.exists() and not out.exists()

    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[:-1] == [removed(stale, killed.pid)], r.stderr
    assert _unpack_temps(d) == [live_tmp]

    assert live.stdin is not None and live.stderr is not None
    live.stdin.close()
    assert live.wait(TIMEOUT) == 0, live.stderr.read()
    assert sorted(os.listdir(d)) == [f"live{suffix}", f"out{suffix}"]
    assert _tree(d / f"live{suffix}") == _tree(out)
    if not suffix:
        assert _tree(out)["d/f"] == hashlib.sha256(b"hello\n").hexdigest()


# -- convert -------------------------------------------------------------------------------------------------------
def test_a_killed_convert_leaves_a_work_dir_the_next_convert_removes_not_a_live_ones(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    layer = tar_bytes(member("big", data=os.urandom(1 << 20)))
    blocked = _oci(tmp_path / "L1", layer)
    fifo = tmp_path / "L1" / "blobs" / "sha256" / hashlib.sha256(layer).hexdigest()
    fifo.unlink()
    os.mkfifo(fifo)  # a convert of L1 waits for the layer to be written here
    work = tmp_path / "work"
    work.mkdir()

    def convert(target: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([CLI, "convert", blocked, target, "--work-dir", str(work)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)  # fmt: skip
        procs.append(p)
        return p

    live = convert(f"oci:{tmp_path / 'T2'}:n")
    (live_tmp,) = _wait_for(lambda: list(work.iterdir()), "work directory of the live convert")
    killed = convert(f"oci:{tmp_path / 'T1'}:n")
    stale = _wait_for(lambda: [p for p in work.iterdir() if p != live_tmp], "work directory of the convert")[0]
    killed.kill()
    killed.wait()

    r = run("convert", _oci(tmp_path / "L2", layer), f"oci:{tmp_path / 'T3'}:n", "--work-dir", work)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [removed(stale, killed.pid)]
    assert list(work.iterdir()) == [live_tmp]

    fifo.write_bytes(layer)
    assert live.stderr is not None
    assert live.wait(TIMEOUT) == 0, live.stderr.read()
    assert list(work.iterdir()) == []


# -- what is never removed -----------------------------------------------------------------------------------------
HEAD = ".nydus-erofs-build-"


def _dead_prefix() -> str:
    """``temp_prefix(HEAD)`` of a process that has exited."""
    r = subprocess.run([sys.executable, "-c", f"from erofs.paths import temp_prefix; print(temp_prefix({HEAD!r}))"],
                       capture_output=True, text=True, check=True, timeout=TIMEOUT)  # fmt: skip
    prefix = r.stdout.strip()
    assert re.fullmatch(re.escape(HEAD) + r"\d+-\d+-[0-9a-f]{8}-[0-9a-f]{8}-", prefix), prefix
    return prefix


def _with_field(prefix: str, i: int, value: str) -> str:
    fields = prefix[len(HEAD) :].split("-")
    fields[i] = value
    return HEAD + "-".join(fields)


def test_only_our_temps_of_a_gone_owner_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead, alive = _dead_prefix(), temp_prefix(HEAD)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "f").write_text("keep")
    d = tmp_path / "out"
    d.mkdir()
    gone = [dead + "aaaa_111", _with_field(alive, 3, "0badb007") + "bbbbbbbb"]  # exited; ran before a reboot
    for name in gone:
        (d / name / "blobs").mkdir(parents=True)
        (d / name / "blobs" / "x").write_bytes(b"x")
    kept = {
        alive + "cccccccc": "dir",  # ours: running
        _with_field(dead, 2, "0badb007") + "dddddddd": "dir",  # another process table (a container, a host)
        dead + "symlink_": "link",  # never followed
        dead + "afile___": "file",  # a directory kind: a plain file is not ours
        dead + "adir____.tmp": "dir",  # a *.tmp is a file
        dead + "toolong__": "dir",
        HEAD + "eeeeeeee": "dir",  # named without an owner (older versions)
        "x" + dead + "ffffffff": "dir",
    }
    if os.geteuid() == 0:
        kept[dead + "chowned_"] = "chowned"
    for name, kind in kept.items():
        p = d / name
        if kind == "link":
            p.symlink_to(precious)
        elif kind == "file":
            p.write_text("x")
        else:
            p.mkdir()
            if kind == "chowned":
                os.chown(p, 4242, 4242)
    remove_stale_temps(d, re.escape(HEAD))
    assert sorted(os.listdir(d)) == sorted(kept)
    assert (precious / "f").read_text() == "keep"
    assert sorted(capsys.readouterr().err.splitlines()) == sorted(
        removed(d / n, int(n[len(HEAD) :].split("-")[0])) for n in gone
    )
