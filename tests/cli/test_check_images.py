"""``convert --platform all`` and ``check --source/--target``: a two-platform OCI image becomes a Nydus index (in a
layout and in a real registry) that ``check`` finds equal to its source; a conversion of a changed source, a
changed mode or config, or a missing platform fails ``check`` with exit 3 and one line naming what differs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.oci import MT_LAYER, Layout

NYDUS_FEATURE = "nydus.remoteimage.v1"
ANN_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
pytestmark = pytest.mark.tools("skopeo")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = run(*args, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(*args: str | Path) -> str:
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _image(lay: Layout, arch: str, layers: list[bytes], annotations: dict[str, str], env: str) -> dict:
    """A manifest (annotated) of gzip layers, with a config naming the platform; its descriptor."""
    config = {"architecture": arch, "os": "linux", "config": {"Env": [f"{env}={arch}"], "Cmd": ["/bin/tool"]},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]},
              "history": [{"created_by": "test"}] * len(layers)}  # fmt: skip
    body = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
            "config": lay.blob(json.dumps(config).encode(), MT_CONFIG),
            "layers": [lay.blob(gzip.compress(x, mtime=0), MT_LAYER + "+gzip") for x in layers],
            "annotations": annotations}  # fmt: skip
    return lay.blob(json.dumps(body).encode(), MT_MANIFEST, platform={"os": "linux", "architecture": arch})


def _tar(files: dict[str, bytes], modes: dict[str, int] | None = None, xattrs: dict[str, str] | None = None,
         specials: bool = False) -> bytes:  # fmt: skip
    """A tar layer of regular files (name → content; mode 0644 unless ``modes`` says otherwise; ``xattrs``: a
    user.test xattr per file), and with ``specials`` a symlink and a character device."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, (modes or {}).get(name, 0o644)
            if name in (xattrs or {}):
                ti.pax_headers = {"SCHILY.xattr.user.test": (xattrs or {})[name]}
            tf.addfile(ti, io.BytesIO(data))
        if specials:
            link = tarfile.TarInfo("bin/sh")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "tool", 0o777
            dev = tarfile.TarInfo("dev/null")
            dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
            tf.addfile(link)
            tf.addfile(dev)
    return buf.getvalue()


ARM_TOOL = b"arm64 tool " * 40_000


def two_platforms(root: Path, *, arm_tool: bytes = ARM_TOOL, arm_mode: int = 0o755, env: str = "ARCH",
                  arm: bool = True, arm_xattr: str = "arm") -> Path:  # fmt: skip
    """An OCI layout tagged ``multi``: an annotated index of a linux/amd64 and (``arm``) a linux/arm64 image, two
    layers each (the upper one deletes a file of the lower one by a whiteout and replaces another)."""
    lay = Layout(root)
    base = _tar({"etc/os-release": b"ID=test\n", "bin/tool": b"x" * (300 << 10), "gone": b"whited out\n",
                 "etc/motd": b"base\n"}, specials=True)  # fmt: skip
    amd_top = _tar({"etc/arch": b"amd64\n", ".wh.gone": b"", "etc/motd": b"upper\n",
                    "bin/tool": b"amd64 tool " * 50_000}, {"bin/tool": 0o755})  # fmt: skip
    arm_top = _tar({"etc/arch": b"arm64\n", ".wh.gone": b"", "etc/motd": b"upper\n", "bin/tool": arm_tool},
                   {"bin/tool": arm_mode}, {"etc/arch": arm_xattr})  # fmt: skip
    amd = _image(lay, "amd64", [base, amd_top], {"org.opencontainers.image.title": "amd"}, env)
    images = [amd] + ([_image(lay, "arm64", [base, arm_top], {"org.opencontainers.image.title": "arm"}, env)]
                      if arm else [])  # fmt: skip
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": images,
             "annotations": {"org.opencontainers.image.source": "https://example.test/app"}}  # fmt: skip
    lay.tag(lay.blob(json.dumps(index).encode(), index["mediaType"]), "multi")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_platforms(tmp_path_factory.mktemp("src") / "layout")


def blob(layout: Path, desc: dict) -> dict:
    return json.loads((layout / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")).read_bytes())


def convert_all(src: Path, target: str, *extra: str) -> dict:
    return json.loads(ok("convert", f"oci:{src}:multi", target, "--platform", "all", "--json", *extra))


def fails(source: str, target: str, *extra: str) -> str:
    """``check`` of a target that differs: exit 3, one line on stderr (returned)."""
    proc = cli("check", "--source", source, "--target", target, *extra)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_convert_all_platforms_into_a_nydus_index_that_checks_equal(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "nydus"
    result = convert_all(source, f"oci:{out}:n")
    assert [p["platform"] for p in result["platforms"]] == ["linux/amd64", "linux/arm64"]
    (top,) = json.loads((out / "index.json").read_text())["manifests"]
    index = blob(out, top)
    assert top["digest"] == result["manifest_digest"]
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["annotations"] == {"org.opencontainers.image.source": "https://example.test/app"}
    for entry, arch in zip(index["manifests"], ("amd64", "arm64"), strict=True):
        assert entry["platform"] == {"os": "linux", "architecture": arch, "os.features": [NYDUS_FEATURE]}
        manifest = blob(out, entry)
        *blobs, boot = manifest["layers"]
        assert len(blobs) == 2 and boot["annotations"][ANN_BOOTSTRAP] == "true"
        assert manifest["annotations"] == {"org.opencontainers.image.title": arch[:3]}
        config = blob(out, manifest["config"])
        assert config["config"]["Env"] == [f"ARCH={arch}"] and config["architecture"] == arch
        assert len(config["rootfs"]["diff_ids"]) == 3
    stdout = ok("check", "--source", f"oci:{source}:multi", "--target", f"oci:{out}:n")
    assert "linux/amd64: 4 files, 4 directories, 2 others" in stdout and "linux/arm64: 4 files" in stdout, stdout
    assert stdout.strip().splitlines()[-1] == f"OK: oci:{out}:n matches oci:{source}:multi"
    report = json.loads(ok("check", "--source", f"oci:{source}:multi", "--target", f"oci:{out}:n", "--json"))
    assert report["ok"] and [p["platform"] for p in report["platforms"]] == ["linux/amd64", "linux/arm64"]
    # one platform of the pair, converted alone: compared with that platform of the source
    single = tmp_path / "single"
    ok("convert", f"oci:{source}:multi", f"oci:{single}:arm", "--platform", "linux/arm64")
    assert "OK:" in ok("check", "--source", f"oci:{source}:multi", "--target", f"oci:{single}:arm",
                       "--platform", "linux/arm64")  # fmt: skip


def test_check_names_the_first_difference(source: Path, tmp_path: Path) -> None:
    src = f"oci:{source}:multi"
    content = tmp_path / "content"
    convert_all(two_platforms(tmp_path / "s1", arm_tool=b"arm64 tool!" * 40_000), f"oci:{content}:n")
    line = fails(src, f"oci:{content}:n")
    assert line.startswith("nydus-erofs: error: linux/arm64: /bin/tool: the content differs"), line
    mode = tmp_path / "mode"
    convert_all(two_platforms(tmp_path / "s2", arm_mode=0o700), f"oci:{mode}:n")
    assert "linux/arm64: /bin/tool: the mode is 0755 in the source, 0700 in the target" in fails(src, f"oci:{mode}:n")
    xattr = tmp_path / "xattr"
    convert_all(two_platforms(tmp_path / "s5", arm_xattr="ARM"), f"oci:{xattr}:n")
    line = fails(src, f"oci:{xattr}:n")
    assert line.endswith("linux/arm64: /etc/arch: xattr user.test is 'arm' in the source, 'ARM' in the target"), line
    config = tmp_path / "config"
    convert_all(two_platforms(tmp_path / "s3", env="OTHER"), f"oci:{config}:n")
    assert "linux/amd64: config: config.Env differs" in fails(src, f"oci:{config}:n")
    amd_only = tmp_path / "amd-only"
    convert_all(two_platforms(tmp_path / "s4", arm=False), f"oci:{amd_only}:n")
    assert fails(src, f"oci:{amd_only}:n").endswith("manifest: the source's linux/arm64 image is not in the target")
    one = tmp_path / "one"
    ok("convert", src, f"oci:{one}:n", "--platform", "linux/amd64")
    assert "OK:" in ok("check", "--source", src, "--target", f"oci:{one}:n")  # the amd64 image of the index
    line = fails(src, f"oci:{one}:n", "--platform", "linux/arm64")
    assert line.endswith("manifest: the target is one linux/amd64 image, not linux/arm64"), line


def test_check_usage_errors_are_one_line(source: Path, tmp_path: Path) -> None:
    src = f"oci:{source}:multi"
    for args, says in ((["--source", src], "comparing images needs both --source REF and --target REF"),
                       (["--target", src], "comparing images needs both --source REF and --target REF"),
                       ([], "give BOOTSTRAP, or --source REF --target REF"),
                       (["--source", src, "--target", src, "--platform", "linux"], "--platform must be os/arch"),
                       (["--source", f"oci:{tmp_path}/no", "--target", src], "no such OCI image layout")):  # fmt: skip
        proc = cli("check", *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert says in proc.stderr, proc.stderr


@pytest.mark.network
@pytest.mark.tools("docker-registry")
def test_convert_all_platforms_to_a_registry_then_check(source: Path, tmp_path: Path, registry_server) -> None:
    ref = f"docker://{registry_server.host}/app:nydus"
    convert_all(source, ref, "--plain-http")
    index = json.loads(ok_tool("skopeo", "inspect", "--raw", "--tls-verify=false", ref))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [(m["platform"]["architecture"], m["platform"]["os.features"]) for m in index["manifests"]] == [
        ("amd64", [NYDUS_FEATURE]), ("arm64", [NYDUS_FEATURE])]  # fmt: skip
    for m in index["manifests"]:
        manifest = json.loads(ok_tool("skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"{ref.rsplit(':', 1)[0]}@{m['digest']}"))  # fmt: skip
        assert manifest["layers"][-1]["annotations"][ANN_BOOTSTRAP] == "true"
    assert "OK:" in ok("check", "--source", f"oci:{source}:multi", "--target", ref, "--plain-http")
    # the source in the registry too, and converted from there
    src_ref = f"docker://{registry_server.host}/src:multi"
    ok_tool("skopeo", "copy", "--all", "--dest-tls-verify=false", f"oci:{source}:multi", src_ref)
    assert "OK:" in ok("check", "--source", src_ref, "--target", ref, "--plain-http")
    again = f"docker://{registry_server.host}/app:from-registry"
    ok("convert", src_ref, again, "--platform", "all", "--plain-http")
    assert "OK:" in ok("check", "--source", src_ref, "--target", again, "--plain-http")
    # a tampered image pushed under another tag: one file of one platform differs
    bad = f"docker://{registry_server.host}/app:tampered"
    convert_all(two_platforms(tmp_path / "s", arm_tool=b"arm64 tool?" * 40_000), bad, "--plain-http")
    line = fails(f"oci:{source}:multi", bad, "--plain-http")
    assert "linux/arm64: /bin/tool: the content differs" in line, line


def ok_tool(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_check_cleans_its_work_dir_and_what_a_killed_check_left(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "nydus"
    convert_all(source, f"oci:{out}:n")
    code = "from erofs.paths import temp_prefix; print(temp_prefix('nydus-erofs-check-'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stale = tmp_path / "work" / (r.stdout.strip() + "abcd1234")  # named by a process that has exited
    (stale / "source").mkdir(parents=True)
    ok("check", "--source", f"oci:{source}:multi", "--target", f"oci:{out}:n", "--work-dir", tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []
