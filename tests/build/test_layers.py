"""Multi-layer images made by umoci, flattened by ``nydus-erofs build``, mounted by the kernel and compared
entry by entry with ``umoci unpack`` of the same image (issue 3).

The image (tag after each step):
  t1  a base layer: files, a multi-chunk file, xattrs, owners, a setuid file, devices, a fifo, symlinks,
      hard links, an empty file, nanosecond mtimes;
  t2  deletions (whiteouts), a directory removed and recreated, files overwritten, a new hard link;
  t3  ``umoci insert --opaque`` (an opaque directory) and a file deleted in t2 added again;
  t4  a hand-made tar layer (``umoci raw add-layer``): a hard link to a file of a lower layer only, a file
      replacing a directory, a directory replacing a file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from erofs.build.overlay import merge_layers
from erofs.build.tree import LINK_PLACEHOLDER_MODE, LayerTree, Node, walk
from erofs.errors import SourceError
from tests.support import cli
from tests.support.fstree import assert_same_tree, image_devices, snapshot
from tests.support.kmount import mount, mount_erofs, umount

NS = 123_456_789

needs_umoci = pytest.mark.tools("umoci")


def run(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def build(*args: str | Path) -> dict:
    proc = cli.run("build", *args, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _touch(path: Path, sec: int) -> None:
    os.utime(path, ns=(sec * 10**9 + NS, sec * 10**9 + NS), follow_symlinks=False)


def _base(rootfs: Path) -> None:
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (rootfs / "big").write_bytes(os.urandom(3 << 20 | 77))
    (rootfs / "empty").write_bytes(b"")
    (rootfs / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(rootfs / "suid", 0o4755)
    (rootfs / "owned").write_bytes(b"mine")
    os.chown(rootfs / "owned", 1000, 2000)
    os.setxattr(rootfs / "etc" / "hosts", "user.comment", b"xattr value")
    os.setxattr(rootfs / "etc" / "hosts", "security.test", b"\x00\x01binary")
    os.setxattr(rootfs / "etc" / "hosts", "trusted.thing", b"t")
    d = rootfs / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_text("a\n")
    (d / "sub" / "deep").write_text("deep\n")
    (rootfs / "keep").mkdir()
    (rootfs / "keep" / "lk").write_text("linked\n")
    os.link(rootfs / "keep" / "lk", rootfs / "keep" / "lk2")
    (rootfs / "keep" / "gone").write_text("to be deleted\n")
    (rootfs / "keep" / "back").write_text("deleted, then added again\n")
    (rootfs / "opq").mkdir()
    (rootfs / "opq" / "old1").write_text("hidden by the opaque dir\n")
    (rootfs / "opq" / "olddir").mkdir()
    (rootfs / "opq" / "olddir" / "x").write_text("x\n")
    (rootfs / "was-dir").mkdir()
    (rootfs / "was-dir" / "child").write_text("c\n")
    (rootfs / "was-file").write_text("file\n")
    os.mknod(rootfs / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(rootfs / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mkfifo(rootfs / "fifo")
    os.symlink("etc/hosts", rootfs / "sl")
    os.symlink("/does/not/exist", rootfs / "dangling")
    (rootfs / "名前").write_text("CJK name\n")
    (rootfs / ("n" * 255)).write_text("255-byte name\n")
    for p in [*rootfs.rglob("*"), rootfs]:
        _touch(p, 1_600_000_000)


def _layer2(rootfs: Path) -> None:
    shutil.rmtree(rootfs / "d")
    (rootfs / "d").mkdir()
    (rootfs / "d" / "new").write_text("recreated dir\n")
    (rootfs / "keep" / "gone").unlink()
    (rootfs / "keep" / "back").unlink()
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    os.link(rootfs / "keep" / "lk", rootfs / "keep" / "lk3")
    (rootfs / "big2").write_bytes((rootfs / "big").read_bytes())  # same data as a lower file: dedup
    _touch(rootfs / "d" / "new", 1_650_000_000)


def _tar_layer(path: Path) -> None:
    """A hand-made layer: hard link to a lower layer's file, file over dir, dir over file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, kind: bytes, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mtime = 1_700_000_000
            ti.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
            ti.size = len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("keep/lk4", tarfile.LNKTYPE, linkname="keep/lk")  # keep/lk exists only in lower layers
        add(".wh.was-dir", tarfile.REGTYPE)
        add("was-dir", tarfile.REGTYPE, b"now a file\n")
        add(".wh.was-file", tarfile.REGTYPE)
        add("was-file", tarfile.DIRTYPE)
        add("was-file/inside", tarfile.REGTYPE, b"in the new dir\n")
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("umoci")
    layout = work / "L"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    steps = [_base, _layer2]
    for i, step in enumerate(steps, 1):
        bundle = work / f"b{i}"
        run("umoci", "unpack", "--image", f"{layout}:t", bundle)
        step(bundle / "rootfs")
        run("umoci", "repack", "--image", f"{layout}:t", bundle)
        run("umoci", "tag", "--image", f"{layout}:t", f"t{i}")
    # t3: an opaque directory, and a file deleted in t2 added back
    src = work / "opq-src"
    src.mkdir()
    (src / "fresh").write_text("only this is visible\n")
    run("umoci", "insert", "--image", f"{layout}:t", "--opaque", src, "/opq")
    back = work / "back"
    back.write_text("added back\n")
    run("umoci", "insert", "--image", f"{layout}:t", back, "/keep/back")
    run("umoci", "insert", "--image", f"{layout}:t", "--whiteout", "/etc/hosts")
    run("umoci", "tag", "--image", f"{layout}:t", "t3")
    _tar_layer(work / "l4.tar")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:t", work / "l4.tar")
    run("umoci", "tag", "--image", f"{layout}:t", "t4")
    return layout


def _unpacked(layout: Path, tag: str, dest: Path) -> Path:
    if not dest.exists():
        run("umoci", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"


def _layer_blobs(layout: Path, tag: str) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(d for d in index["manifests"] if d["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_text())
    return [layout / "blobs" / "sha256" / ld["digest"].split(":")[1] for ld in manifest["layers"]]


@needs_umoci
@pytest.mark.kernel
@pytest.mark.parametrize("tag", ["t1", "t2", "t3", "t4"])
def test_flattened_image_equals_umoci_unpack(image: Path, tmp_path: Path, tag: str) -> None:
    ref = _unpacked(image, tag, tmp_path / "ref")
    out = tmp_path / "out"
    info = build(f"oci:{image}:{tag}", "-o", out, "--compressor", "none")
    assert len(info["layers"]) == {"t1": 1, "t2": 2, "t3": 5, "t4": 6}[tag]  # each umoci insert adds a layer
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert_same_tree(ref, mnt)
        if tag == "t4":
            st = os.stat(mnt / "keep" / "lk4")  # hard link across layers: one inode with lk, lk2, lk3
            assert st.st_ino == os.stat(mnt / "keep" / "lk").st_ino and st.st_nlink == 4


@needs_umoci
@pytest.mark.kernel
def test_layer_files_as_sources_equal_the_oci_source(image: Path, tmp_path: Path) -> None:
    """The layer blobs given as tar.gz SOURCEs (the last one from stdin) give the same bootstrap."""
    blobs = _layer_blobs(image, "t4")
    a = build(f"oci:{image}:t4", "-o", tmp_path / "a")
    plain = tmp_path / "last.tar"
    plain.write_bytes(gzip.decompress(blobs[-1].read_bytes()) if blobs[-1].read_bytes()[:2] == b"\x1f\x8b"
                      else blobs[-1].read_bytes())  # fmt: skip
    with open(plain, "rb") as stdin:
        proc = cli.run("build", *blobs[:-1], "-", "-o", tmp_path / "b", "--json", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    b = json.loads(proc.stdout)
    assert a["layers"] == b["layers"]
    assert (tmp_path / "a" / "image.boot").read_bytes() == (tmp_path / "b" / "image.boot").read_bytes()


@needs_umoci
@pytest.mark.kernel
def test_dedup_across_layers_in_umoci_image(image: Path, tmp_path: Path) -> None:
    """Layer 2 repeats the 3 MiB 'big' of layer 1 as 'big2': its blob holds no chunk of it."""
    info = build(f"oci:{image}:t2", "-o", tmp_path / "out", "--chunk-size", "1MiB")
    blob2 = info["blobs"][1]
    assert info["bytes_deduped"] >= 3 << 20 | 77
    assert blob2["uncompressed_size"] < 1 << 20  # only the small files of layer 2


def _ovl_view(snap: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """Directory records without mtimes (implicit parents of a lone diff layer carry defaults)."""
    out = {}
    for k, v in snap.items():
        if k != b"<hardlinks>" and stat.S_ISDIR(v[0]):
            v = (v[0], v[1], v[2], None, v[-1])
        out[k] = v
    return out


@needs_umoci
@pytest.mark.kernel
def test_overlayfs_spec_image_works_as_an_overlay_lower(image: Path, tmp_path: Path) -> None:
    """Layers 2-3 built alone with ``--whiteout-spec overlayfs`` are a diff: overlaid on umoci's t1 they
    give umoci's t3 (whiteouts as char 0:0, opaque dirs by trusted.overlay.opaque=y)."""
    blobs = _layer_blobs(image, "t3")
    out = tmp_path / "out"
    build(*blobs[1:], "-o", out, "--whiteout-spec", "overlayfs")
    lower = _unpacked(image, "t1", tmp_path / "ref1")
    want = _unpacked(image, "t3", tmp_path / "ref3")
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        st = os.lstat(mnt / "keep" / "gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(mnt / "opq", "trusted.overlay.opaque") == b"y"
        assert not any(n.startswith(".wh.") for n in os.listdir(mnt / "keep"))
        merged = tmp_path / "merged"
        merged.mkdir()
        mount("overlay", merged, "overlay", 1, f"lowerdir={mnt}:{lower}")
        try:
            got, exp = _ovl_view(snapshot(merged)), _ovl_view(snapshot(want))
            # overlayfs reports the erofs xattrs it uses itself nowhere; compare the rest
            assert {k: v for k, v in got.items() if k != b"."} == {k: v for k, v in exp.items() if k != b"."}
        finally:
            umount(merged)


@needs_umoci
@pytest.mark.kernel
def test_none_spec_keeps_whiteouts_as_files(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(f"oci:{image}:t2", "-o", out, "--whiteout-spec", "none")
    with mount_erofs(out / "image.boot", tmp_path / "mnt", image_devices(out)) as mnt:
        assert (mnt / "keep" / ".wh.gone").is_file()
        assert (mnt / "keep" / "gone").is_file()  # nothing was removed
        assert (mnt / "d" / "sub" / "deep").is_file()


# ---- the merge on its own (no tools, no mount) --------------------------------------------------------------


def _layer(spec: dict[str, object]) -> LayerTree:
    """A layer tree from {path: 'file' | 'dir' | 'chr00' | bytes}; parents are implicit directories."""
    tree = LayerTree(Node.directory(0o755))
    tree.implicit.add(id(tree.root))
    for path, kind in spec.items():
        node = tree.root
        parts = path.encode().split(b"/")
        for comp in parts[:-1]:
            assert node.children is not None
            if comp not in node.children:
                node.children[comp] = Node.directory(0o755)
                tree.implicit.add(id(node.children[comp]))
            node = node.children[comp]
        assert node.children is not None
        if kind == "dir":
            node.children[parts[-1]] = Node.directory(0o700, mtime=5)
        elif kind == "chr00":
            node.children[parts[-1]] = Node(mode=stat.S_IFCHR | 0o600)
        else:
            node.children[parts[-1]] = Node(mode=stat.S_IFREG | 0o644, mtime=len(str(kind)))
    return tree


def _paths(root: Node) -> dict[str, tuple[int, dict[bytes, bytes]]]:
    return {p.decode(): (n.mode, n.xattrs) for p, n in walk(root) if p != b"/"}


def test_merge_oci_spec() -> None:
    lower = _layer({"a/x": "f", "a/y": "f", "b/z": "f", "c/w": "f"})
    upper = _layer({"a/.wh.x": "", "a/x2": "f", "b/.wh..wh..opq": "", "b/new": "f", "c/.wh.w": "", "c/w": "again"})
    got = _paths(merge_layers([lower, upper], "oci"))
    assert set(got) == {"/a", "/a/y", "/a/x2", "/b", "/b/new", "/c", "/c/w"}  # a same-layer entry survives
    assert got["/a"][0] == stat.S_IFDIR | 0o755  # implicit in the upper: the lower's metadata stays


def test_merge_overlayfs_spec() -> None:
    lower = _layer({"a/x": "f", "b/z": "f", "d": "dir"})
    upper = _layer({"a/.wh.x": "", "b/.wh..wh..opq": "", "b/new": "f", "e/old": "chr00", ".wh.d": ""})
    top = _layer({"d/in": "f"})
    got = _paths(merge_layers([lower, upper, top], "overlayfs"))
    assert got["/a/x"][0] == stat.S_IFCHR | 0o644 and got["/a"][1] == {b"trusted.overlay.origin": b""}
    assert got["/b"][1] == {b"trusted.overlay.opaque": b"y"} and "/b/z" not in got and "/b/new" in got
    assert got["/e/old"][0] == stat.S_IFCHR | 0o600  # a source's own 0:0 whiteout is kept
    assert got["/d"][1] == {b"trusted.overlay.opaque": b"y"}  # a dir re-created over a whiteout hides below


def test_merge_none_spec_and_missing_lower_link() -> None:
    lower = _layer({"a/x": "f"})
    upper = _layer({"a/.wh.x": ""})
    assert set(_paths(merge_layers([lower, upper], "none"))) == {"/a", "/a/x", "/a/.wh.x"}
    link = Node(mode=LINK_PLACEHOLDER_MODE)
    upper.links[id(link)] = ([b"nowhere"], "l")
    upper.link_sites[id(link)] = [(upper.root, b"l")]
    assert upper.root.children is not None
    upper.root.children[b"l"] = link
    with pytest.raises(SourceError, match="neither this nor a lower layer"):
        merge_layers([lower, upper], "oci")
