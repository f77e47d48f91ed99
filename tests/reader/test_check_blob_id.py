"""``check`` verifies each local blob's sha256 against its id: a blob named by another blob's id (an impostor
with its own, self-consistent chunk table and digests) fails with one line naming the blob, exit 3."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("nydus-erofs"))]


def _build(src: Path, out: Path, data: bytes) -> str:
    src.mkdir()
    (src / "f.bin").write_bytes(data)
    subprocess.run([*CLI, "build", str(src), "--output-dir", str(out), "--chunk-size", "64KiB"], check=True,
                   capture_output=True)  # fmt: skip
    (blob,) = (out / "blobs").iterdir()
    return blob.name


def test_check_fails_a_blob_whose_sha256_is_not_its_id(tmp_path: Path) -> None:
    victim = _build(tmp_path / "v", tmp_path / "victim", b"victim data\n" * 30000)
    own = _build(tmp_path / "i", tmp_path / "impostor", b"impostor data\n" * 30000)
    boot = tmp_path / "impostor" / "image.boot"
    boot.write_bytes(boot.read_bytes().replace(own.encode(), victim.encode()))
    blobs = tmp_path / "impostor" / "blobs"
    (blobs / own).rename(blobs / victim)

    ok = subprocess.run([*CLI, "check", str(tmp_path / "victim" / "image.boot"), "--blob-dir",
                         str(tmp_path / "victim" / "blobs")], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.startswith("OK:"), ok.stdout + ok.stderr

    bad = subprocess.run([*CLI, "check", str(boot), "--blob-dir", str(blobs)], capture_output=True, text=True)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    real = hashlib.sha256((blobs / victim).read_bytes()).hexdigest()
    assert bad.stdout.splitlines() == [f"blob {victim}: the blob's sha256 is {real}, not its id: not this blob"]
    assert "Traceback" not in bad.stderr
