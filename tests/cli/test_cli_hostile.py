"""The CLIs against a hostile or careless user: every bad path, option or stream gives one clear error line and
a non-zero exit — never a traceback, never a write outside the output, never a half-written or destroyed
result (inputs included), never a hang — and what the user asked for is left alone when it is not ours.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pty
import re
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.build.test_hostile import _oci, member, tar_bytes
from tests.support.cli import CACHEFILESD, CLI, TIMEOUT, one_line, run
from tests.support.kmount import MNT_DETACH, is_mounted, mount, mount_erofs, umount
from tests.support.machine import missing_erofs, missing_fanotify
from tests.support.poll import wait_for


def listing(root: Path) -> dict[str, str]:
    """Every path under ``root`` (the root included) and what it is: file hashes, link targets, kinds."""
    out: dict[str, str] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            out[str(p)] = "-> " + os.readlink(p)
        else:
            out[str(p)] = stat.filemode(st.st_mode)[0]
    return out


def blob_of(image: Path) -> Path:
    (blob,) = (image / "blobs").iterdir()
    return blob


# -- sizes -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["1" * 5000, "١٠٢٤"], ids=["5000-digits", "arabic-digits"])
def test_a_size_that_is_not_one(size: str, source: Path, tmp_path: Path) -> None:
    r = run("build", source, "-o", tmp_path / "out", "--chunk-size", size)
    one_line(r, 2, "not a size")
    assert len(r.stderr) < 200 and not (tmp_path / "out").exists()


def test_a_size_with_a_leading_zero_is_decimal(source: Path, tmp_path: Path) -> None:
    r = run("build", source, "-o", tmp_path / "out", "--chunk-size", "04096", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert '"chunk_size": 4096' in r.stdout


def test_daemon_size_of_5000_digits(tmp_path: Path) -> None:
    r = run("--cache-dir", tmp_path / "c", "--images-dir", tmp_path, "--amplify", "9" * 5000, prog=CACHEFILESD)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not a size" in r.stderr, r.stderr
    assert "set_int_max_str_digits" not in r.stderr and len(r.stderr) < 200


def test_no_command_shows_the_help_not_an_error() -> None:
    r = run()
    assert r.returncode == 2 and r.stderr.startswith("Usage: nydus-erofs ") and "error:" not in r.stderr, r.stderr


# -- a FIFO where a bootstrap or blob is read --------------------------------------------------------------------------
def test_a_fifo_where_a_file_is_read_does_not_hang(image: Path, source: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line(run("inspect", fifo), 2, "not a regular file")
    one_line(run("check", fifo, "--json"), 2, "not a regular file")
    one_line(run("build", source, "-o", tmp_path / "o", "--chunk-dict", fifo), 2, "not a regular file")
    assert not (tmp_path / "o").exists()
    r = run("check", image / "image.boot", "--device", fifo)
    assert r.returncode == 3 and "not a regular file" in r.stdout, (r.stdout, r.stderr)
    fifo_blobs = tmp_path / "blobs"
    fifo_blobs.mkdir()
    os.mkfifo(fifo_blobs / blob_of(image).name)
    r = run("unpack", image / "image.boot", "--blob-dir", fifo_blobs, "-o", tmp_path / "u")
    one_line(r, 4, "not a regular file")
    assert not (tmp_path / "u").exists()


# -- build: sources and output -----------------------------------------------------------------------------------------
def test_an_erofs_image_is_not_an_empty_tar_layer(image: Path, tmp_path: Path) -> None:
    # its first KiB is zeros, which tar reads as an end-of-archive marker: an empty layer, silently
    one_line(run("build", image / "image.boot", "-o", tmp_path / "o"), 2, "an EROFS image (a bootstrap), not a tar")
    with open(image / "image.boot", "rb") as f:
        one_line(run("build", "-", "-o", tmp_path / "o", stdin=f), 2, "an EROFS image")
    assert not (tmp_path / "o").exists()


def test_output_inside_the_source_directory(source: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(source, src, symlinks=True)
    before = listing(src)
    for out in (src, src / "sub" / "out", tmp_path / "src" / ".." / "src" / "o"):
        one_line(run("build", src, "-o", out), 2, "is inside SOURCE")
    assert listing(src) == before


def test_a_failed_build_takes_back_the_parents_it_made(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    one_line(run("build", tmp_path / "bad.tar", "-o", tmp_path / "a" / "b" / "out"), 2, "not a tar archive")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: ENOSPC in the middle of writing."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount("tmpfs", mnt, "tmpfs", 0, "size=1M")  # the test is marked ``root``
    try:
        yield mnt
    finally:
        umount(mnt, MNT_DETACH)


@pytest.mark.root
def test_build_out_of_space_takes_back_the_parents_it_made(small_fs: Path) -> None:
    big = small_fs.parent / "bigsrc"
    big.mkdir()
    (big / "f").write_bytes(os.urandom(3 << 20))
    one_line(run("build", big, "-o", small_fs / "a" / "o"), 1, "No space left on device")
    assert list(small_fs.iterdir()) == []


# -- streams and signals -----------------------------------------------------------------------------------------------
def test_a_source_file_shorter_than_its_size(tmp_path: Path) -> None:
    # sysfs attributes say 4096 bytes and hold a few: EOFError used to come out as "aborted", like Ctrl-C
    sysdir = Path("/sys/kernel/mm/transparent_hugepage")
    if not sysdir.is_dir():
        pytest.skip(f"no {sysdir}")
    r = run("build", sysdir, "-o", tmp_path / "o")
    assert r.returncode not in (0, 130) and "aborted" not in r.stderr
    one_line(r, r.returncode, "")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("sig", "said"), [(signal.SIGINT, "aborted"), (signal.SIGTERM, "terminated"),
                                           (signal.SIGHUP, "terminated")], ids=["INT", "TERM", "HUP"])  # fmt: skip
def test_a_signal_while_blocked_leaves_nothing(sig: int, said: str, tmp_path: Path) -> None:
    fifo = tmp_path / "layer.tar"
    os.mkfifo(fifo)  # the build makes OUT, then waits for a writer here
    out = tmp_path / "new" / "out"
    proc = subprocess.Popen([CLI, "build", str(fifo), "-o", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _wchan(proc.pid) == "wait_for_partner", "the build never blocked opening the FIFO", 30)
        assert out.exists()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (128 + sig, f"nydus-erofs: {said}\n")  # SIGTERM used to leave OUT behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar"]


def _sh(redirect: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", f'exec "$0" "$@" {redirect}', CLI, *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip


def test_stdout_closed(source: Path, tmp_path: Path) -> None:
    r = _sh(">&-", "build", source, "-o", tmp_path / "o", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "o" / "image.boot").is_file()
    r = _sh(">&-", "inspect", tmp_path / "o" / "image.boot", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_stdin_closed(tmp_path: Path) -> None:
    one_line(_sh("<&-", "build", "-", "-o", tmp_path / "o"), 2, "<stdin>: empty file")
    assert not (tmp_path / "o").exists()


def test_stdin_a_terminal(tmp_path: Path) -> None:
    main, tty = pty.openpty()  # `nydus-erofs build - -o OUT` typed without a pipe: it waited for a tar forever
    try:
        one_line(run("build", "-", "-o", tmp_path / "o", stdin=tty), 2, "stdin is a terminal")
    finally:
        os.close(main)
        os.close(tty)
    assert not (tmp_path / "o").exists()


def test_stderr_closed_is_not_a_file_we_write(source: Path, tmp_path: Path) -> None:
    # with fd 2 closed the blob would get fd 2, and anything written to stderr would land in it
    r = _sh("2>&-", "build", source, "-o", tmp_path / "o")
    assert r.returncode == 0
    assert run("check", tmp_path / "o" / "image.boot", "--blob-dir", tmp_path / "o" / "blobs").returncode == 0


# -- unpack ------------------------------------------------------------------------------------------------------------
def test_unpack_never_replaces_the_image_it_reads(image: Path, tmp_path: Path) -> None:
    before = listing(image)
    boot, blob = image / "image.boot", blob_of(image)
    for args in (("--blob-dir", image / "blobs", "-o", blob), ("--blob-dir", image / "blobs", "-o", boot),
                 ("--device", blob, "-o", blob)):  # fmt: skip
        one_line(run("unpack", boot, *args, "--format", "tar"), 2, "the output would replace")
    assert listing(image) == before
    assert run("check", boot, "--blob-dir", image / "blobs").returncode == 0


def test_unpack_tar_onto_something_not_a_file(image: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    (tmp_path / "dangling.tar").symlink_to("nowhere")
    for out in (fifo, tmp_path / "dangling.tar"):
        r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", out)
        one_line(r, 2, "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and (tmp_path / "dangling.tar").is_symlink()
    (tmp_path / "dangling").symlink_to("nowhere")
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", tmp_path / "dangling")
    one_line(r, 2, "output exists")


def test_unpack_tar_mode_follows_the_umask(image: Path, tmp_path: Path) -> None:
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", tmp_path / "x.tar", umask=0o022)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "x.tar").stat().st_mode) == 0o644
    with tarfile.open(tmp_path / "x.tar") as t:
        assert "./big" in t.getnames()


@pytest.mark.parametrize("name", ["n" * 255, "é" * 125 + ".tar"], ids=["dir", "tar"])
def test_unpack_to_a_long_name(name: str, image: Path, tmp_path: Path) -> None:
    # the temporary name beside it was '.NAME.unpack-XXXXXXXX': too long for a name that itself is fine
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", tmp_path / name)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "image"] == [name]


@pytest.mark.parametrize("out", ["a/b/dir", "a/b/x.tar"])
def test_a_failed_unpack_takes_back_the_parents_it_made(out: str, image: Path, tmp_path: Path) -> None:
    blob = blob_of(image)
    blob.write_bytes(blob.read_bytes()[:5000])  # the data of /big is gone
    work = tmp_path / "work"
    work.mkdir()
    r = run("unpack", image / "image.boot", "--blob-dir", image / "blobs", "-o", work / out)
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert list(work.iterdir()) == []


# -- inspect -----------------------------------------------------------------------------------------------------------
def test_inspect_a_path_not_in_the_image_is_bad_usage(image: Path) -> None:
    one_line(run("inspect", image / "image.boot", "--ls", "/nope"), 2, "no such file or directory in the image")
    one_line(run("inspect", image / "image.boot", "--stat", "/nope", "--json"), 2, "no such file")


# -- convert -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def layout(tmp_path: Path) -> str:
    return _oci(tmp_path / "L", tar_bytes(member("big", data=os.urandom(3 << 20))))


def test_convert_into_a_garbled_layout(layout: str, tmp_path: Path) -> None:
    target = tmp_path / "T"
    target.mkdir()
    (target / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (target / "index.json").write_text("garbage")
    before = listing(target)
    one_line(run("convert", layout, f"oci:{target}:n"), 2, "index.json")
    (target / "index.json").write_text("[]")
    one_line(run("convert", layout, f"oci:{target}:n"), 2, "not an OCI image index")
    (target / "index.json").write_text("garbage")
    assert listing(target) == before


def test_convert_into_a_directory_that_is_not_a_layout(layout: str, source: Path, tmp_path: Path) -> None:
    target = tmp_path / "home"
    shutil.copytree(source, target, symlinks=True)
    before = listing(target)
    one_line(run("convert", layout, f"oci:{target}:n"), 2, "not an OCI image layout")
    assert listing(target) == before
    (tmp_path / "file").write_text("x")
    one_line(run("convert", layout, f"oci:{tmp_path / 'file'}:n"), 2, "is not a directory")


def test_convert_onto_its_own_source_tag(layout: str, tmp_path: Path) -> None:
    before = listing(tmp_path / "L")
    for target in (layout, f"oci:{tmp_path}/./L/:t"):
        one_line(run("convert", layout, target), 2, "is the source image")  # the tag t would lose the source
    assert listing(tmp_path / "L") == before
    assert run("convert", layout, layout + "-nydus").returncode == 0


@pytest.mark.root
def test_convert_out_of_space_leaves_no_half_layout(layout: str, small_fs: Path) -> None:
    r = run("convert", layout, f"oci:{small_fs / 'a' / 'T'}:n", "--compressor", "none")
    one_line(r, 1, "No space left on device")
    assert str(small_fs) in r.stderr  # where it could not write, not the work dir
    assert list(small_fs.iterdir()) == []


# -- mount / umount ----------------------------------------------------------------------------------------------------
def test_mount_with_the_blob_dir_as_cache_dir(image: Path, mountpoint: Path, run_env: dict[str, str]) -> None:
    before = listing(image)
    for extra in ((), ("--blob-dir", image / "blobs"), ("--mode", "full")):
        r = run("mount", image / "image.boot", mountpoint, "--cache-dir", image / "blobs", *extra, env=run_env)
        one_line(r, 2, "is the blob directory")
        assert not is_mounted(mountpoint)
    assert listing(image) == before


@pytest.mark.skipif(os.path.exists("/dev/cachefiles"), reason="this host has /dev/cachefiles (tests/vm covers it)")
def test_mount_mode_fscache_needs_cachefiles(image: Path, mountpoint: Path, run_env: dict[str, str],
                                             tmp_path: Path) -> None:  # fmt: skip
    # fscache mode binds the image in cachefilesd-py (its API) and mounts -o fsid=: without the device, one line
    r = run("mount", image / "image.boot", mountpoint, "--mode", "fscache", env=run_env)
    one_line(r, 2, "--mode fscache needs /dev/cachefiles")
    r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c", "--mode", "fscache",
            env=run_env)  # fmt: skip
    one_line(r, 2, "--cache-dir is cachefilesd-py's in fscache mode")
    assert not is_mounted(mountpoint) and not (tmp_path / "c").exists()


def test_mount_a_damaged_bootstrap(image: Path, mountpoint: Path, run_env: dict[str, str], tmp_path: Path) -> None:
    boot = tmp_path / "trunc.boot"
    boot.write_bytes((image / "image.boot").read_bytes()[:2000])
    r = run("mount", boot, mountpoint, "--cache-dir", tmp_path / "c", "--blob-dir", image / "blobs", env=run_env)
    one_line(r, 3, "superblock")
    assert "[Errno" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "http", "--backend-config", '{"url": 5}'], "option url: expected str, got 5"),
        (["--backend-config", '{"dir": null}'], "option dir"),
        (["--backend", "http"], "--backend http needs url="),
        (["--backend", "http", "--backend-config", "url=notaurl"], "url 'notaurl': expected http://HOST"),
        (["--backend", "http", "--backend-config", "url=ftp://example.com"], "expected http://HOST"),
        (["--backend", "http", "--backend-config", "url=http:///blobs"], "url 'http:///blobs': expected"),
        (["--backend", "registry", "--backend-config", "host=r.example"], "needs repo="),
        (["--backend-config", "@/nonexistent/cfg"], "No such file or directory"),
        (["--backend-config", "@BAD"], "codec can't decode"),
    ],
)  # fmt: skip
def test_mount_bad_backend_config(args: list[str], message: str, image: Path, mountpoint: Path,
                                  run_env: dict[str, str], tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "bad.cfg").write_bytes(b"\xff\xfe{")  # not UTF-8
    args = [f"@{tmp_path / 'bad.cfg'}" if a == "@BAD" else a for a in args]
    r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c", *args, env=run_env)
    one_line(r, 2, message)
    assert "[Errno" not in r.stderr and "__init__()" not in r.stderr
    assert not is_mounted(mountpoint)


@pytest.mark.tools("mkfs.erofs")
@pytest.mark.parametrize("mode", ["auto", "full"])
def test_mount_a_plain_erofs_image(mode: str, source: Path, mountpoint: Path, run_env: dict[str, str],
                                   tmp_path: Path) -> None:  # fmt: skip
    subprocess.run(["mkfs.erofs", str(tmp_path / "plain.img"), str(source)], check=True, capture_output=True)
    r = run("mount", tmp_path / "plain.img", mountpoint, "--cache-dir", tmp_path / "c", "--blob-dir", tmp_path,
            "--mode", mode, env=run_env)  # fmt: skip
    one_line(r, 3, "not a Nydus RAFS v6 bootstrap")  # the same exit status, whichever process finds it
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize("mode", ["auto", "full"])
def test_mount_cache_dir_with_a_comma(mode: str, image: Path, mountpoint: Path, run_env: dict[str, str],
                                      tmp_path: Path) -> None:  # fmt: skip
    r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / "a,b", "--mode", mode, env=run_env)
    one_line(r, 2, "must not contain commas")  # the same exit status, whichever process finds it
    assert not (tmp_path / "a,b").exists() and not is_mounted(mountpoint)


def test_mount_full_of_a_damaged_blob_is_one_line(image: Path, mountpoint: Path, run_env: dict[str, str],
                                                  tmp_path: Path) -> None:  # fmt: skip
    blob = blob_of(image)
    data = bytearray(blob.read_bytes())
    data[5000] ^= 1  # in chunk 1 of /big
    blob.write_bytes(data)
    r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c", "--mode", "full", env=run_env)
    one_line(r, 3, "does not match its digest")  # the pipeline's log line of the same failure came out too
    assert not is_mounted(mountpoint)


def _modes(tmp_path: Path) -> list[str]:
    """full, and fanotify when this host has it: a failure must give the same exit status in both."""
    return ["full"] if missing_erofs() or missing_fanotify() else ["full", "fanotify"]


def _fill(fs: Path) -> None:
    """Write ``fs`` full (ENOSPC)."""
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


@pytest.mark.parametrize(("damage", "code", "message"), [("toc", 3, "ToC"), ("missing", 4, "not found in")])
def test_mount_of_a_damaged_blob_exits_alike_in_every_mode(damage: str, code: int, message: str, image: Path,
                                                           mountpoint: Path, run_env: dict[str, str],
                                                           tmp_path: Path) -> None:  # fmt: skip
    # fanotify mode said 5 (a mount failure) for whatever the daemon found: the worker's error line had no category
    blob = blob_of(image)
    if damage == "missing":
        blob.unlink()
    else:
        data = bytearray(blob.read_bytes())
        data[-100] ^= 0xFF  # in the ToC at the blob's end: its metadata cannot be read
        blob.write_bytes(data)
    for mode in _modes(tmp_path):
        r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / f"c-{mode}", "--mode", mode,
                env=run_env)  # fmt: skip
        one_line(r, code, message)
        assert blob.name in r.stderr and "[Errno" not in r.stderr, (mode, r.stderr)
        assert not is_mounted(mountpoint) and not _mount_daemons(run_env)
        assert not any((tmp_path / "run").iterdir()), mode


@pytest.mark.root
def test_mount_with_a_full_run_dir(image: Path, mountpoint: Path, small_fs: Path, tmp_path: Path) -> None:
    # the record's write failed with "[Errno 28] No space left on device" (exit 5 in fanotify mode), naming no file,
    # and left RECORD.json.tmp in the run dir
    rdir = small_fs / "run"
    rdir.mkdir()
    _fill(small_fs)
    env = dict(os.environ, NYDUS_EROFS_RUN_DIR=str(rdir))
    for mode in _modes(tmp_path):
        r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / f"c-{mode}", "--mode", mode,
                env=env)  # fmt: skip
        one_line(r, 1, f"No space left on device: {rdir}/")
        assert "[Errno" not in r.stderr, (mode, r.stderr)
        assert list(rdir.iterdir()) == [], mode
        assert not is_mounted(mountpoint) and not _mount_daemons(env)


@pytest.mark.kernel
def test_umount_leaves_a_mount_that_is_not_ours(image: Path, mountpoint: Path, run_env: dict[str, str]) -> None:
    with mount_erofs(image / "image.boot", mountpoint, [blob_of(image)]):
        one_line(run("umount", mountpoint, env=run_env), 2, "not mounted by nydus-erofs")
        assert is_mounted(mountpoint) and (mountpoint / "d" / "f").read_bytes() == b"hello\n"


@pytest.mark.kernel
def test_umount_leaves_what_was_mounted_over_a_stale_record(image: Path, mountpoint: Path, run_env: dict[str, str],
                                                             tmp_path: Path) -> None:  # fmt: skip
    r = run("mount", image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c", "--mode", "full", env=run_env)
    assert r.returncode == 0, r.stderr
    umount(mountpoint, detach_if_busy=False)  # umount(8): the record stays
    mount("tmpfs", mountpoint, "tmpfs", 0, "size=64k")  # someone else's
    try:
        (mountpoint / "precious").write_text("theirs")
        one_line(run("umount", mountpoint, env=run_env), 2, "left alone")  # it unmounted the tmpfs, data and all
        assert (mountpoint / "precious").read_text() == "theirs"
    finally:
        umount(mountpoint, detach_if_busy=False)
    r = run("umount", mountpoint, env=run_env)  # the stale record goes
    assert r.returncode == 0 and not any((tmp_path / "run").iterdir()), r.stderr


def test_umount_never_signals_init_or_a_stranger() -> None:
    # a worker orphaned by its supervisor recorded its new parent, init, as the daemon: umount sent it SIGTERM,
    # SIGUSR1 and SIGKILL, then waited for it to exit, for ever
    from cachefilesd_py.mount.record import is_daemon
    from erofs.paths import process_start_time

    assert not is_daemon({"pid": 1, "start_time": process_start_time(1)})
    with subprocess.Popen(["sleep", "60"]) as stranger:
        try:
            assert not is_daemon({"pid": stranger.pid, "start_time": process_start_time(stranger.pid)})
        finally:
            stranger.kill()


def _wchan(pid: int) -> str:
    """Where a process sleeps in the kernel ('' if it is running or gone)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` is pending for the process (or it is gone: dead of it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    if re.search(r"^State:\s+[ZX]", status, re.M):
        return True
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (sig - 1)))


def _mount_daemons(env: dict[str, str], module: str = "cachefilesd_py.mount.") -> list[int]:
    """The mount daemons (supervisors and workers, or those whose module is ``module``) started with ``env``'s run
    dir (their mountpoint is not on their command line: that says only fds)."""
    run_dir = f"NYDUS_EROFS_RUN_DIR={env['NYDUS_EROFS_RUN_DIR']}".encode()
    out = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if d.name.isdigit() and any(a.startswith(module.encode()) for a in argv) and run_dir in environ:
            out.append(int(d.name))
    return out


WORKER = "cachefilesd_py.mount.worker"


@pytest.mark.kernel("erofs", "fanotify")
def test_mount_interrupted_before_ready_leaves_no_mount(image: Path, mountpoint: Path, run_env: dict[str, str],
                                                        tmp_path: Path) -> None:  # fmt: skip
    proc = subprocess.Popen([CLI, "mount", str(image / "image.boot"), str(mountpoint), "--cache-dir",
                             str(tmp_path / "cache"), "--mode", "fanotify"], env=run_env, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    worker = None
    try:
        worker = wait_for(lambda: _mount_daemons(run_env, WORKER), "no worker started", 30)[0]
        os.kill(worker, signal.SIGSTOP)  # held before it mounts; Ctrl-C now
        proc.send_signal(signal.SIGINT)
        # the CLI stops the supervisor, which passes the SIGTERM on to its worker (a stopped worker without a
        # handler yet dies of it at once); then let the worker run on
        wait_for(lambda: _signal_pending(worker, signal.SIGTERM), "the worker was never told to stop", 30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if worker is not None and worker in _mount_daemons(run_env, WORKER):
            os.kill(worker, signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (130, "nydus-erofs: aborted\n")
    # an orphaned worker used to mount the image after the CLI had said "aborted": none may be left to do so
    wait_for(lambda: not _mount_daemons(run_env), "a mount daemon outlived the aborted mount", 30)
    assert not is_mounted(mountpoint)
    assert not any((tmp_path / "run").iterdir())


# -- cachefilesd-py ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.path.exists("/dev/cachefiles"), reason="this host has /dev/cachefiles")
def test_daemon_without_dev_cachefiles_makes_no_cache_dir(tmp_path: Path) -> None:
    r = run("--cache-dir", tmp_path / "a" / "cache", "--images-dir", tmp_path, prog=CACHEFILESD)
    one_line(r, 1, "no /dev/cachefiles", prog="cachefilesd-py")
    assert not (tmp_path / "a").exists()


def test_daemon_threads_out_of_range(tmp_path: Path) -> None:
    r = run("--cache-dir", tmp_path / "c", "--images-dir", tmp_path, "--threads", "99999999999", prog=CACHEFILESD)
    one_line(r, 2, "--threads", prog="cachefilesd-py")
    assert not (tmp_path / "c").exists()


def test_daemon_device_that_is_a_file_is_not_written(tmp_path: Path) -> None:
    fake = tmp_path / "cachefiles"
    fake.write_bytes(b"")
    r = run("--cache-dir", tmp_path / "c", "--images-dir", tmp_path, "--device", fake, prog=CACHEFILESD)
    one_line(r, 1, "not a character device", prog="cachefilesd-py")  # it used to write its commands into it
    assert fake.read_bytes() == b"" and not (tmp_path / "c").exists()


def test_daemon_api_sock_of_a_running_daemon_is_left_alone(tmp_path: Path) -> None:
    sock_path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock_path))
        live.listen(1)
        ino = sock_path.stat().st_ino
        # /dev/null stands in for /dev/cachefiles: the API socket is set up once the device is bound
        r = subprocess.run([CACHEFILESD, "--cache-dir", str(tmp_path / "c"), "--images-dir", str(tmp_path),
                            "--device", "/dev/null", "--api-sock", str(sock_path), "--no-supervisor"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
        one_line(r, 2, "in use by a running daemon", prog="cachefilesd-py")  # it unlinked it and took it over
        assert sock_path.stat().st_ino == ino


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blob-dir", "FILE"], "--blob-dir FILE: not a directory"),
        (["--blob-dir", "/nonexistent/blobs"], "not a directory"),
        (["--backend", "http", "--url", "example.com/blobs"], "expected http://HOST"),
        (["--backend", "http", "--url", "ftp://example.com"], "expected http://HOST"),
        (["--backend", "http", "--url", "http://:8080/blobs"], "--url 'http://:8080/blobs': expected http://HOST"),
    ],
)  # fmt: skip
def test_daemon_bad_backend_options_before_serving(args: list[str], message: str, tmp_path: Path) -> None:
    # these were accepted: the daemon served (here on a /dev/null stand-in device), failing every read
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    r = run("--cache-dir", tmp_path / "c", "--images-dir", tmp_path, "--device", "/dev/null", "--no-supervisor",
            *args, prog=CACHEFILESD)  # fmt: skip
    one_line(r, 2, message.replace("FILE", str(tmp_path / "FILE")), prog="cachefilesd-py")
