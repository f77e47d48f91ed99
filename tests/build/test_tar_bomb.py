"""A zstd decompression bomb as a tar layer: the build's memory stays bounded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import zstandard

from tests.support.cli import CLI


def test_zstd_bomb_layer_memory_is_bounded(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar.zst"
    zeros = bytes(1 << 20)
    with open(bomb, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        for _ in range(1024):  # 1 GiB of zeros (an empty tar archive) in ~32 KiB
            w.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    proc = subprocess.Popen([CLI, "build", str(bomb), "-o", str(tmp_path / "out")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    assert usage.ru_maxrss < 600 * 1024, f"peak RSS {usage.ru_maxrss} KiB"  # all of it at once would be > 1 GiB
