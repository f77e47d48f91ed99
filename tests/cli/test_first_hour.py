"""What a newcomer trips over in the first hour (issue 20): errors that name the real cause and the fix, and no
silent surprises.  Each test asserts what the user sees: the one error line (or warning) and the exit code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import one_line, run
from tests.support.oci import MT_LAYER, Layout, tar_layer
from tests.support.registry import RegistryServer

AMD64 = {"os": "linux", "architecture": "amd64"}


@pytest.fixture
def amd64_layout(tmp_path: Path) -> Path:
    """A single-platform (linux/amd64) image, as umoci and skopeo write one: a manifest, no index."""
    lay = Layout(tmp_path / "L")
    lay.tag(lay.manifest([(tar_layer({"etc/os": b"amd64\n"}), MT_LAYER)], config=AMD64), "v1")
    return lay.root


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "option"),
    [(["build", "SRC", "-o", "OUT", "--chunk-size", "1q"], "--chunk-size"),
     (["convert", "oci:L:v1", "oci:T:v1", "--chunk-size", "1q"], "--chunk-size"),
     (["mount", "BOOT", "MNT", "--cache-dir", "C", "--amplify", "1q"], "--amplify"),
     (["mount", "BOOT", "MNT", "--cache-dir", "C", "--readahead", "1q"], "--readahead"),
     (["snapshotter", "--address", "MNT/sock", "--root", "C", "--amplify", "1q"], "--amplify")],
)  # fmt: skip
def test_a_bad_size_names_its_option(args: list[str], option: str, image: Path, source: Path, tmp_path: Path) -> None:
    subst = {"SRC": str(source), "OUT": str(tmp_path / "out"), "BOOT": str(image / "image.boot"),
             "MNT": str(tmp_path), "C": str(tmp_path / "c")}  # fmt: skip
    one_line(run(*[subst.get(a, a) for a in args]), 2, f"{option}: not a size: '1q'")


def test_convert_chunk_dict_blob_dir_is_an_option_of_convert(image: Path, amd64_layout: Path, tmp_path: Path) -> None:
    boot = tmp_path / "dict" / "image.boot"  # a dict without its blobs beside it
    boot.parent.mkdir()
    shutil.copyfile(image / "image.boot", boot)
    target = f"oci:{tmp_path / 'T'}:n"
    base = ["convert", f"oci:{amd64_layout}:v1", target, "--compressor", "none", "--chunk-size", "4KiB"]
    one_line(run(*base, "--chunk-dict", boot), 2, "(see --chunk-dict-blob-dir)")
    r = run(*base, "--chunk-dict", boot, "--chunk-dict-blob-dir", image / "blobs")
    assert r.returncode == 0, r.stderr


def test_converting_a_nydus_image_says_so(amd64_layout: Path, tmp_path: Path) -> None:
    nydus = tmp_path / "N"
    assert run("convert", f"oci:{amd64_layout}:v1", f"oci:{nydus}:v1-nydus").returncode == 0
    r = run("convert", f"oci:{nydus}:v1-nydus", f"oci:{tmp_path / 'again'}:x")
    one_line(r, 2, f"oci:{nydus}:v1-nydus is already a Nydus image")
    assert "media type" not in r.stderr
    one_line(run("build", f"oci:{nydus}:v1-nydus", "-o", tmp_path / "out"), 2, "already a Nydus image")


@pytest.mark.network
@pytest.mark.tools("docker-registry", "skopeo")
def test_skopeo_failures_are_our_own_line(amd64_layout: Path, registry_server: RegistryServer,
                                          tmp_path: Path) -> None:  # fmt: skip
    # a registry that speaks plain HTTP, reached without --plain-http
    r = run("convert", f"oci:{amd64_layout}:v1", f"docker://{registry_server.host}/first/hour:n")
    one_line(r, 2, f"cannot push docker://{registry_server.host}/first/hour:n: ")
    assert "level=fatal" not in r.stderr and 'msg="' not in r.stderr
    assert "server gave HTTP response to HTTPS client (the registry speaks plain HTTP: add --plain-http)" in r.stderr
    # an image that is not there
    r = run("convert", f"docker://{registry_server.host}/no/such:tag", f"oci:{tmp_path / 'T'}:n", "--plain-http")
    one_line(r, 2, f"cannot pull docker://{registry_server.host}/no/such:tag: ")
    assert "level=fatal" not in r.stderr and 'msg="' not in r.stderr
    assert "/tmp/" not in r.stderr.replace(str(tmp_path), "")  # no work-dir path


@pytest.mark.network
@pytest.mark.tools("docker-registry", "skopeo")
def test_converting_a_nydus_image_from_a_registry_names_the_reference(amd64_layout: Path,
                                                                      registry_server: RegistryServer,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    ref = f"docker://{registry_server.host}/first/nydus:n"
    assert run("convert", f"oci:{amd64_layout}:v1", ref, "--plain-http").returncode == 0
    r = run("convert", ref, f"oci:{tmp_path / 'T'}:x", "--plain-http")
    one_line(r, 2, f"{ref} is already a Nydus image")
    assert "nydus-erofs-convert-" not in r.stderr  # the temporary copy is not what the user named


def test_unpack_without_blobs_is_a_usage_error(image: Path, tmp_path: Path) -> None:
    boot = tmp_path / "elsewhere" / "image.boot"
    boot.parent.mkdir()
    shutil.copyfile(image / "image.boot", boot)
    one_line(run("unpack", boot, "-o", tmp_path / "out"), 2, "give --blob-dir")
    assert not (tmp_path / "out").exists()


# -- silent surprises ----------------------------------------------------------------------------------------------
def test_platform_not_in_a_single_platform_layout(amd64_layout: Path, tmp_path: Path) -> None:
    r = run("build", f"oci:{amd64_layout}:v1", "-o", tmp_path / "out", "--platform", "linux/arm64")
    one_line(r, 2, "no manifest for platform linux/arm64 (has: linux/amd64)")
    assert not (tmp_path / "out").exists()
    assert run("build", f"oci:{amd64_layout}:v1", "-o", tmp_path / "out", "--platform", "linux/amd64").returncode == 0


def test_a_layout_given_without_oci_prefix_is_warned_about(amd64_layout: Path, tmp_path: Path) -> None:
    r = run("build", amd64_layout, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.splitlines()
    assert line == (f"nydus-erofs: warning: {amd64_layout} is an OCI image layout, built here as plain files: "
                    f"for the image it holds, give oci:{amd64_layout}[:TAG]")  # fmt: skip
    r = run("build", f"oci:{amd64_layout}", "-o", tmp_path / "out2")
    assert r.returncode == 0 and r.stderr == ""


def test_rebuilding_into_out_removes_the_old_blobs(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = json.loads(run("build", source, "-o", out, "--json").stdout)
    (out / "blobs" / "README").write_text("not a blob: stays")
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(os.urandom(10_000))
    second = json.loads(run("build", other, "-o", out, "--json").stdout)
    ids = {b["id"] for b in second["blobs"]}
    assert ids.isdisjoint(b["id"] for b in first["blobs"])
    assert {p.name for p in (out / "blobs").iterdir()} == ids | {"README"}
    assert run("check", out / "image.boot").returncode == 0


def test_check_and_unpack_find_the_blobs_beside_the_bootstrap(image: Path, tmp_path: Path) -> None:
    r = run("check", image / "image.boot", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks_verified"] > 0
    r = run("unpack", image / "image.boot", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "d" / "f").read_bytes() == b"hello\n"


def test_check_says_loudly_when_blobs_are_not_checked(image: Path, tmp_path: Path) -> None:
    boot = tmp_path / "image.boot"
    shutil.copyfile(image / "image.boot", boot)
    r = run("check", boot)
    assert r.returncode == 0
    assert r.stderr == ("nydus-erofs: warning: blobs not checked (metadata only): give --blob-dir DIR, or keep "
                        "blobs/ beside image.boot\n")  # fmt: skip
    assert r.stdout.startswith("OK: ") and "blobs not checked" in r.stdout


@pytest.mark.tools("mkfs.erofs")
@pytest.mark.parametrize("command", ["inspect", "check"])
def test_compressed_plain_erofs_is_not_a_nydus_image(command: str, source: Path, tmp_path: Path) -> None:
    img = tmp_path / "z.img"
    mk = subprocess.run(["mkfs.erofs", "--quiet", "-zlz4hc", str(img), str(source)], capture_output=True)
    if mk.returncode != 0:
        pytest.skip("mkfs.erofs has no lz4hc")
    one_line(run(command, img), 2, f"{img}: not a Nydus image: compressed EROFS is not supported")


def test_debug_after_the_subcommand(tmp_path: Path) -> None:
    r = run("build", tmp_path / "nonexistent", "-o", tmp_path / "out", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "UsageError" in r.stderr
    r = run("build", tmp_path / "nonexistent", "-o", tmp_path / "out")
    one_line(r, 2, "no such file, directory or oci:PATH")


def test_counts_are_singular_and_plural(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one chunk")
    r = run("build", src, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    head, blob = r.stdout.splitlines()
    assert head.endswith(": 2 inodes, 1 blob")
    assert re.fullmatch(r"  blobs/[0-9a-f]{64}  1 chunk, \d+ bytes", blob), blob
    c = run("check", tmp_path / "out" / "image.boot")
    assert "1 file, 1 directory), 1 blob, 1 chunk verified" in c.stdout


# -- startup ---------------------------------------------------------------------------------------------------------
def test_a_command_loads_only_its_own_module() -> None:
    """``nydus-erofs inspect --help`` must not pay for the builder's or the mount daemon's imports."""
    code = ("import sys; from erofs.cli import main\n"
            "try:\n    main(['inspect', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('erofs.build', 'cachefilesd_py'))))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    r = run("--help", timeout=60)
    assert all(f"  {name} " in r.stdout for name in ("build", "convert", "mount", "mounts", "umount", "unpack"))
