"""Hostile input, table-driven (issue 3, item 6): every bad SOURCE gives one clear error line and a non-zero
exit, never a traceback, never a write outside OUT, never a half-written OUT; inputs that are odd but valid
(duplicates, absolute names, members below a symlink, very deep trees) build, and stay inside the image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.support.cli import run
from tests.support.fstree import image_devices
from tests.support.kmount import mount_erofs


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", pax: dict[str, str] | None = None,
           **kw: object) -> tuple[tarfile.TarInfo, bytes]:  # fmt: skip
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = 1_700_000_000
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.size = len(data)
    if pax:
        ti.pax_headers = dict(pax)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


ZSTD = zstandard.ZstdCompressor(write_checksum=True)  # as the zstd tool writes frames
GOOD = tar_bytes(member("dir", tarfile.DIRTYPE), member("dir/file", data=os.urandom(40_000)),
                 member("dir/other", data=b"x" * 3000))  # fmt: skip


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    for i in range(at, min(at + 64, len(b))):
        b[i] ^= 0x5A
    return bytes(b)


def _deep(levels: int) -> bytes:
    path = "/".join(["d"] * levels)
    return tar_bytes(member(path + "/leaf", data=b"deep"))


def _oci(root: Path, layer: bytes, media: str = "application/vnd.oci.image.layer.v1.tar", digest: str | None = None,
         drop_blob: bool = False, index: bytes | None = None) -> str:  # fmt: skip
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return d

    ld = digest or put(layer)
    if digest is not None:
        (blobs / digest).write_bytes(layer)
    if drop_blob:
        (blobs / ld).unlink()
    config = put(b"{}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config}", "size": 2},
        "layers": [{"mediaType": media, "digest": f"sha256:{ld}", "size": len(layer)}],
    }).encode()  # fmt: skip
    md = put(manifest)
    (root / "index.json").write_bytes(index if index is not None else json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{md}",
                       "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "t"}}],
    }).encode())  # fmt: skip
    return f"oci:{root}:t"


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], str]  # writes the input under the given dir, returns the SOURCE argument
    error: str | None  # a substring of the one-line error; None: the build must succeed
    check: Callable[[Path], None] | None = None  # for successful builds: runs on the mounted image


def _file(data: bytes, name: str = "layer") -> Callable[[Path], str]:
    def make(d: Path) -> str:
        (d / name).write_bytes(data)
        return str(d / name)

    return make


def _check_below_symlink(mnt: Path) -> None:
    assert stat.S_ISDIR(os.lstat(mnt / "a").st_mode)  # by name: the later member needs 'a' to be a directory
    assert (mnt / "a" / "passwd").read_bytes() == b"inside the image"


def _check_duplicates(mnt: Path) -> None:
    assert (mnt / "f").read_bytes() == b"second"  # later wins, as extraction does
    assert (mnt / "x").is_dir() and (mnt / "x" / "in").read_bytes() == b"dir replaced the file"
    assert (mnt / "y").read_bytes() == b"file replaced the dir"


def _check_absolute(mnt: Path) -> None:
    assert (mnt / "etc" / "abs").read_bytes() == b"abs" and (mnt / "up" / "ok").read_bytes() == b"ok"


def _check_deep(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY)
    try:
        for _ in range(1500):
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.stat("leaf", dir_fd=fd).st_size == 4
    finally:
        os.close(fd)


def _check_libarchive_xattr(mnt: Path) -> None:
    assert os.getxattr(mnt / "f", "user.k=x") == "vé".encode()  # name URL-encoded, value base64


def _check_big_time(mnt: Path) -> None:
    assert os.stat(mnt / "future").st_mtime_ns == (2**33 + 5) * 10**9 + 120_000_000


def _check_negative_time(mnt: Path) -> None:
    assert os.stat(mnt / "f").st_mtime_ns == -5_500_000_000  # before 1970, as the archive says


CASES = [
    Case("truncated-in-data", _file(GOOD[:1024 + 20_000]), "truncated archive"),
    Case("truncated-in-header", _file(GOOD[:512 * 3 + 200]), "truncated archive"),
    Case("truncated-gzip", _file(gzip.compress(GOOD)[:-300]), "truncated gzip"),
    Case("corrupt-gzip", _file(_flip(gzip.compress(GOOD), 200)), "gzip"),
    Case("gzip-bad-crc", _file(_flip(gzip.compress(GOOD), len(gzip.compress(GOOD)) - 8)), "corrupt gzip"),
    Case("corrupt-zstd", _file(_flip(ZSTD.compress(GOOD), 100)), "corrupt zstd"),  # caught by the frame checksum
    Case("corrupt-zstd-header", _file(b"\x28\xb5\x2f\xfd\xff\xff" + ZSTD.compress(GOOD)[6:]), "corrupt zstd"),
    Case("truncated-zstd", _file(zstandard.ZstdCompressor().compress(GOOD)[:-50]), "truncated zstd"),
    Case("random-bytes", _file(os.urandom(4096)), "not a tar archive"),
    Case("text-file", _file(b"hello, I am not an archive\n" * 100), "not a tar archive"),
    Case("empty-file", _file(b""), "empty file"),
    Case("tiny-file", _file(b"abc"), "not a tar archive"),
    Case("bzip2", _file(b"BZh91AY&SY" + os.urandom(600)), "bzip2 archives are not supported"),
    Case("hardlink-to-missing", _file(tar_bytes(member("l", tarfile.LNKTYPE, linkname="nowhere"))),
         "is in neither this nor a lower layer"),
    Case("hardlink-to-itself", _file(tar_bytes(member("l", tarfile.LNKTYPE, linkname="l"))), "neither this"),
    Case("hardlink-to-dir", _file(tar_bytes(member("d", tarfile.DIRTYPE), member("l", tarfile.LNKTYPE, linkname="d"))),
         "hard link to a directory"),
    Case("name-over-255", _file(tar_bytes(member("ok/" + "n" * 256, data=b"x"))), "longer than 255 bytes"),
    Case("xattr-system-ns", _file(tar_bytes(member("f", pax={"SCHILY.xattr.system.evil": "v"}))),
         "EROFS stores only"),
    Case("xattr-no-ns", _file(tar_bytes(member("f", pax={"SCHILY.xattr.bogus": "v"}))), "EROFS stores only"),
    Case("mtime-negative", _file(tar_bytes(member("f", pax={"mtime": "-5.5"}))), None, _check_negative_time),
    Case("mtime-under-s64", _file(tar_bytes(member("f", pax={"mtime": str(-(2**63) - 1)}))), "out of range"),
    Case("mtime-over-2^64", _file(tar_bytes(member("f", pax={"mtime": str(2**64 + 1)}))), "out of range"),
    Case("mtime-garbage", _file(tar_bytes(member("f", pax={"mtime": "12x"}))), "invalid PAX time"),
    Case("mtime-over-2^32", _file(tar_bytes(member("future", pax={"mtime": f"{2**33 + 5}.12"}))), None,
         _check_big_time),
    Case("uid-over-32-bits", _file(tar_bytes(member("f", pax={"uid": str(2**32)}))), "out of range"),
    Case("major-over-12-bits", _file(tar_bytes(member("c", tarfile.CHRTYPE, devmajor=4096, devminor=0))),
         "does not fit EROFS"),
    Case("minor-over-20-bits", _file(tar_bytes(member("b", tarfile.BLKTYPE, devmajor=1, devminor=1 << 20))),
         "does not fit EROFS"),
    Case("dotdot-escape", _file(tar_bytes(member("../evil", data=b"x"))), "escapes the image root"),
    Case("dotdot-deep-escape", _file(tar_bytes(member("a/b/../../../evil", data=b"x"))), "escapes the image root"),
    Case("nul-in-name", _file(tar_bytes(member("f", pax={"path": "a\0b"}))), "NUL"),
    Case("empty-symlink", _file(tar_bytes(member("s", tarfile.SYMTYPE, linkname=""))), "invalid symlink target"),
    Case("multivolume-member", _file(tar_bytes(member("m", b"M", data=b"x"), fmt=tarfile.GNU_FORMAT)),
         "unsupported tar entry type"),
    Case("sparse-claiming-2^50-bytes", _file(tar_bytes(member("s", data=b"12345", pax={
        "GNU.sparse.map": "0,5", "GNU.sparse.size": str(2**50), "GNU.sparse.name": "s"}))), "too large"),
    Case("libarchive-xattr-bad-namespace", _file(tar_bytes(member("f", pax={"LIBARCHIVE.xattr.system.x": "dg=="}))),
         "EROFS stores only"),
    Case("missing-source", lambda d: str(d / "does-not-exist"), "no such file"),
    Case("oci-digest-mismatch", lambda d: _oci(d / "L", GOOD, digest="0" * 64), "does not match its digest"),
    Case("oci-unknown-media-type", lambda d: _oci(d / "L", GOOD, media="application/vnd.example.weird"),
         "unsupported media type"),
    Case("oci-missing-layer", lambda d: _oci(d / "L", GOOD, drop_blob=True), "missing"),
    Case("oci-bad-index", lambda d: _oci(d / "L", GOOD, index=b"{not json"), "not valid JSON"),
    Case("oci-no-such-tag", lambda d: _oci(d / "L", GOOD).removesuffix(":t") + ":nope", "no image tagged"),
    # odd but valid: built, and everything stays inside the image
    Case("below-a-symlink", _file(tar_bytes(member("a", tarfile.SYMTYPE, linkname="/etc"),
                                            member("a/passwd", data=b"inside the image"))), None, _check_below_symlink),
    Case("duplicates", _file(tar_bytes(member("f", data=b"first"), member("f", data=b"second"),
                                       member("x", data=b"file"), member("x", tarfile.DIRTYPE),
                                       member("x/in", data=b"dir replaced the file"),
                                       member("y", tarfile.DIRTYPE), member("y/z", data=b"gone"),
                                       member("y", data=b"file replaced the dir"))), None, _check_duplicates),
    Case("absolute-and-dotdot-inside", _file(tar_bytes(member("/etc/abs", data=b"abs"),
                                                       member("up/x/../ok", data=b"ok"))), None, _check_absolute),
    Case("very-deep-tree", _file(_deep(1500)), None, _check_deep),
    Case("libarchive-xattr-only", _file(tar_bytes(member("f", pax={"LIBARCHIVE.xattr.user.k%3Dx": "dsOp"}))), None,
         _check_libarchive_xattr),
]  # fmt: skip


def _listing(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@pytest.mark.parametrize("preexisting", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.kernel] if c.check else [])
                                  for c in CASES])  # fmt: skip
def test_hostile_input(case: Case, preexisting: bool, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = case.make(inputs)
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out"
    if preexisting:
        (out / "blobs").mkdir(parents=True)
        (out / "image.boot").write_bytes(b"previous image")
        (out / "blobs" / "keep").write_bytes(b"previous blob")
    before_out = _listing(out) if out.exists() else None
    before = _listing(tmp_path)
    proc = run("build", source, "-o", out, "--chunk-size", "4KiB", cwd=work, timeout=120)
    assert "Traceback" not in proc.stderr
    after = _listing(tmp_path)
    outside = {k: v for k, v in after.items() if not k.startswith("out")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("out")}  # nothing written outside OUT
    if case.error is not None:
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nydus-erofs: error: "), proc.stderr
        assert case.error in lines[0], lines[0]
        assert (_listing(out) if out.exists() else None) == before_out  # OUT untouched (or still absent)
        return
    assert proc.returncode == 0, proc.stderr
    assert (out / "image.boot").is_file() and not [p for p in out.iterdir() if p.name.startswith(".")]
    if case.check is not None and not preexisting:
        with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
            case.check(mnt)
