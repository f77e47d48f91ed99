"""``check`` verifies each local blob's sha256 against its id: a blob named by another blob's id (an impostor
with its own, self-consistent chunk table and digests) fails with one line naming the blob, exit 3."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tests.support.cli import CLI, run


def _build(src: Path, out: Path, data: bytes) -> str:
    src.mkdir()
    (src / "f.bin").write_bytes(data)
    subprocess.run([CLI, "build", str(src), "--output-dir", str(out), "--chunk-size", "64KiB"], check=True,
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

    ok = run("check", tmp_path / "victim" / "image.boot", "--blob-dir", tmp_path / "victim" / "blobs")
    assert ok.returncode == 0 and ok.stdout.startswith("OK:"), ok.stdout + ok.stderr

    bad = run("check", boot, "--blob-dir", blobs)
    assert bad.returncode == 3, bad.stdout + bad.stderr
    real = hashlib.sha256((blobs / victim).read_bytes()).hexdigest()
    assert bad.stdout.splitlines() == [f"blob {victim}: the blob's sha256 is {real}, not its id: not this blob"]
    assert "Traceback" not in bad.stderr
