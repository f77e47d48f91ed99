"""Building an image of a real directory tree: ``nydus-erofs build`` next to ``mkfs.erofs`` (the C anchor).

Both write an uncompressed image of the same tree (/usr/share: ~1 GB, ~66k entries) in the same run; mkfs.erofs
is given chunked files in a separate blob device, the closest it comes to what we write. We also hash every
chunk (blake3) and the whole blob (sha256) and write the Nydus chunk tables; mkfs.erofs does not.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from erofs.build.builder import build_directory, check_options

SOURCE = Path("/usr/share")


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils is not installed")
def test_build_usr_share_vs_mkfs_erofs(benchmark, tmp_path: Path) -> None:
    mkfs_img = tmp_path / "mkfs.img"
    mkfs_blob = tmp_path / "mkfs.blob"
    _drop_caches()
    subprocess.run(["mkfs.erofs", "--quiet", str(mkfs_img), str(SOURCE)], check=True)  # warm the page cache once
    mkfs_img.unlink()
    t0 = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=1048576", f"--blobdev={mkfs_blob}", str(mkfs_img),
                    str(SOURCE)], check=True)  # fmt: skip
    mkfs_seconds = time.perf_counter() - t0
    opts = check_options(1 << 20, "none", "blake3")
    out = tmp_path / "out"

    def ours() -> None:
        shutil.rmtree(out, ignore_errors=True)
        build_directory(SOURCE, out, opts)

    benchmark.pedantic(ours, rounds=1, iterations=1)
    ours_seconds = benchmark.stats.stats.mean
    size = sum(f.stat().st_size for f in (out / "blobs").iterdir())
    benchmark.extra_info.update(
        mkfs_erofs_seconds=round(mkfs_seconds, 3),
        nydus_erofs_seconds=round(ours_seconds, 3),
        speed_vs_mkfs_erofs=round(mkfs_seconds / ours_seconds, 3),
        blob_bytes=size,
        mib_per_second=round(size / ours_seconds / (1 << 20), 1),
    )
