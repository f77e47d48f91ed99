"""Dedup across layers and through a chunk dict (issue 3, item 3): a chunk already stored is referenced, not
stored again; the images still mount with the right content."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.fstree import image_devices
from tests.support.kmount import mount_erofs

CHUNK = 64 << 10
BIG = os.urandom(40 * CHUNK + 1000)  # 41 chunks
OTHER = os.urandom(10 * CHUNK)

needs_mount = pytest.mark.kernel


def layer(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return path


def build(*args: str | Path, ok: bool = True) -> dict:
    proc = run("build", *args, "--chunk-size", str(CHUNK), "--json")
    assert "Traceback" not in proc.stderr
    if not ok:
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
        return {"error": proc.stderr.strip()}
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _read_all(out: Path, tmp: Path, names: list[str]) -> dict[str, bytes]:
    with mount_erofs(out / "image.boot", tmp / "mnt", image_devices(out)) as mnt:
        return {n: (mnt / n).read_bytes() for n in names}


@needs_mount
def test_upper_layer_repeating_a_lower_file_stores_nothing_for_it(tmp_path: Path) -> None:
    l1 = layer(tmp_path / "l1.tgz", {"big": BIG})
    l2 = layer(tmp_path / "l2.tgz", {"copy-of-big": BIG, "new": OTHER})
    l3 = layer(tmp_path / "l3.tgz", {"again": BIG})  # nothing new at all: no blob
    out = tmp_path / "out"
    info = build(l1, l2, l3, "-o", out)
    b1, b2 = info["blobs"]
    assert b1["chunk_count"] == 41
    assert b2["chunk_count"] == 10 and b2["uncompressed_size"] == 4096 + len(OTHER)  # prefix + 'new'
    assert info["layers"][2] is None and info["bytes_deduped"] == 2 * len(BIG)
    alone = build(l2, "-o", tmp_path / "alone")  # the same layer on its own stores both files
    assert alone["blobs"][0]["chunk_count"] == 51
    got = _read_all(out, tmp_path, ["big", "copy-of-big", "new", "again"])
    assert got == {"big": BIG, "copy-of-big": BIG, "new": OTHER, "again": BIG}


@needs_mount
def test_chunk_dict_shrinks_the_next_image_and_out_is_self_contained(tmp_path: Path) -> None:
    dict_img = tmp_path / "dict"
    dict_info = build(layer(tmp_path / "v1.tgz", {"lib": BIG, "old": os.urandom(5000)}), "-o", dict_img)
    v2 = layer(tmp_path / "v2.tgz", {"lib": BIG, "app": OTHER})
    plain = build(v2, "-o", tmp_path / "plain")
    out = tmp_path / "out"
    info = build(v2, "-o", out, "--chunk-dict", dict_img / "image.boot")
    assert plain["blobs"][0]["chunk_count"] == 51
    # slot 0 is the dict's blob (referenced for 'lib'), slot 1 this image's own, holding only 'app'
    assert [b["id"] for b in info["blobs"]][0] == dict_info["blobs"][0]["id"]
    mine = info["blobs"][1]
    assert mine["chunk_count"] == 10 and mine["compressed_size"] < plain["blobs"][0]["compressed_size"] // 3
    assert info["bytes_deduped"] == len(BIG)
    for dev in image_devices(out):  # OUT holds every blob it needs
        assert dev.parent == out / "blobs" and dev.is_file()
    assert (out / "blobs" / info["blobs"][0]["id"]).read_bytes() == (
        dict_img / "blobs" / info["blobs"][0]["id"]
    ).read_bytes()
    got = _read_all(out, tmp_path, ["lib", "app"])
    assert got == {"lib": BIG, "app": OTHER}


def test_chunk_dict_without_common_chunks_is_dropped(tmp_path: Path) -> None:
    dict_img = tmp_path / "dict"
    build(layer(tmp_path / "d.tgz", {"x": os.urandom(3 * CHUNK)}), "-o", dict_img)
    info = build(layer(tmp_path / "n.tgz", {"y": OTHER}), "-o", tmp_path / "out", "--chunk-dict",
                 dict_img / "image.boot")  # fmt: skip
    assert len(info["blobs"]) == 1 and info["blobs"][0]["chunk_count"] == 10
    assert [p.name for p in (tmp_path / "out" / "blobs").iterdir()] == [info["blobs"][0]["id"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--chunk-size", "4KiB"], "chunk size"), (["--compressor", "zstd"], "--compressor none"),
     (["--chunk-dict-blob-dir", "/nonexistent"], "not in /nonexistent")],
)  # fmt: skip
def test_chunk_dict_mismatch_is_a_one_line_error(tmp_path: Path, extra: list[str], message: str) -> None:
    dict_img = tmp_path / "dict"
    build(layer(tmp_path / "d.tgz", {"x": BIG}), "-o", dict_img)
    src = layer(tmp_path / "n.tgz", {"y": OTHER})
    proc = run("build", src, "-o", tmp_path / "out", "--chunk-size", str(CHUNK),
               "--chunk-dict", dict_img / "image.boot", *extra)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "out").exists()
