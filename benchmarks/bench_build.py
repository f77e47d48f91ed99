"""Building an image of a real directory tree: ``nydus-erofs build`` next to ``mkfs.erofs`` (the C anchor).

Both write an uncompressed image of the same tree (/usr/share: ~1 GB, ~66k entries; another with
``NYDUS_EROFS_BENCH_SOURCE``) in the same run; mkfs.erofs is given chunked files in a separate blob device, the
closest it comes to what we write. We also hash every chunk (blake3) and the whole blob (sha256) and write the
Nydus chunk tables; mkfs.erofs does not.  Which mkfs.erofs: benchmarks/mkfs_erofs.py (1.9.3 when it can).
The comparison is printed in the run's summary ("benchmark comparisons").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.mkfs_erofs import Mkfs
from erofs.build.builder import build_directory, check_options

SOURCE = Path(os.environ.get("NYDUS_EROFS_BENCH_SOURCE", "/usr/share"))


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_build_usr_share_vs_mkfs_erofs(
    benchmark, mkfs: Mkfs, comparison: Callable[[str], None], tmp_path: Path
) -> None:
    mkfs_img = tmp_path / "mkfs.img"
    mkfs_blob = tmp_path / "mkfs.blob"
    _drop_caches()
    subprocess.run([mkfs.path, "--quiet", str(mkfs_img), str(SOURCE)], check=True)  # warm the page cache once
    mkfs_img.unlink()
    t0 = time.perf_counter()
    subprocess.run([mkfs.path, "--quiet", "--chunksize=1048576", f"--blobdev={mkfs_blob}", str(mkfs_img),
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
        mkfs_erofs=mkfs.path,
        mkfs_erofs_version=mkfs.version,
        mkfs_erofs_seconds=round(mkfs_seconds, 3),
        nydus_erofs_seconds=round(ours_seconds, 3),
        speed_vs_mkfs_erofs=round(mkfs_seconds / ours_seconds, 3),
        blob_bytes=size,
        mib_per_second=round(size / ours_seconds / (1 << 20), 1),
    )
    comparison(
        f"build {SOURCE} ({size / 1e6:.0f} MB of blob): nydus-erofs build {ours_seconds:.2f} s, "
        f"{mkfs} {mkfs_seconds:.2f} s -> ours {mkfs_seconds / ours_seconds:.2f}x as fast"
    )
