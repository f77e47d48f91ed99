"""Prefetch on a fanotify mount behind a slow registry (issue 14).

The blobs are served by ``nydus-erofs serve`` (a local peer, a separate process) through a
:class:`~tests.support.shaping.ShapedFront`: +:data:`LATENCY` per request, every byte paced through one link of
:data:`BANDWIDTH` bytes/s shared by all connections, bytes counted.  The mounts use the registry backend
(``/v2/<repo>/blobs/sha256:<id>``); each mount is fresh, over an empty cache dir (cold).

*On-demand latency during a big prefetch*: an image whose prefetch table lists one big incompressible file,
and a small unlisted file between two unlisted fillers (what reading it fetches is nothing the prefetch
fetches).  Each round reads the small file cold through a fresh ``--no-prefetch`` mount (uncontended), then
through a fresh mount whose prefetch of the big file is under way (the proxy has sent it data), which the
umount then stops; on both, a tiny file is read first, so neither measured read is the daemon's first.  The
issue: an on-demand read never waits behind prefetch (it still shares the link with the piece the prefetch is
fetching).

*Startup*: a Debian python3 starts with its standard library (``/usr/lib/python3.X`` without tests and
site-packages, with its ``__pycache__``) on the mount (``PYTHONHOME``), imports a handful of modules and
prints once.  A first mount records the access trace (``nydus-erofs trace``); the image is rebuilt with it as
``--prefetch-list``.  Each round starts the workload right after the mount, in three modes: no prefetch, the
traced table, ``--prefetch-all`` (the image without a table: the whole blob).  Time to the workload's output,
and the bytes the proxy sent and the blob requests it served from mount to umount (the umount waits for the
prefetch to finish).

Numbers are reported (``extra_info`` and the run's comparison lines), not asserted: the machine is shared.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.mount.prefetch import read_prefetch_progress
from cachefilesd_py.mount.record import RUN_DIR_ENV
from cachefilesd_py.mount.service import mount_image
from cachefilesd_py.mount.spec import MountSpec
from tests.mount.test_fanotify_mount import Mounts
from tests.support.poll import wait_for
from tests.support.shaping import ShapedFront

CLI = str(Path(sys.executable).with_name("nydus-erofs"))
LATENCY = 0.02  # seconds added to each request
BANDWIDTH = 16 << 20  # bytes/s, all connections together
REPO = "bench/prefetch"
BIG = 64 << 20
FILLER = 4 << 20
WARM = "etc/warm"  # each mount's first on-demand read (first-read costs are not what is compared)
ROUNDS = 7
STARTUP_ROUNDS = 3
TIMEOUT = 90.0
MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.kernel("erofs", "fanotify"), pytest.mark.network]


def _build(src: Path, out: Path, prefetch_list: Path | None = None) -> Path:
    extra = ["--prefetch-list", str(prefetch_list)] if prefetch_list is not None else []
    r = subprocess.run([CLI, "build", str(src), "-o", str(out), "--compressor", "zstd", *extra],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@contextmanager
def _slow_peer(blob_dirs: list[Path], tmp: Path) -> Iterator[ShapedFront]:
    """``nydus-erofs serve`` over the blobs of ``blob_dirs``, behind a shaping proxy (yielded)."""
    served = tmp / "served"
    served.mkdir()
    for d in blob_dirs:
        for blob in d.iterdir():
            if not (served / blob.name).exists():
                os.link(blob, served / blob.name)
    log = tmp / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([CLI, "serve", str(served), "--listen", "127.0.0.1:0"], stdout=f, stderr=f,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        line = wait_for(lambda: proc.poll() is None and re.search(r" on (http://\S+)", log.read_text()),
                        "nydus-erofs serve listening", 30)  # fmt: skip
        with ShapedFront(upstream=line.group(1), latency=LATENCY, bandwidth=BANDWIDTH) as front:
            yield front
    finally:
        proc.kill()  # a read-only server: nothing to finish
        proc.wait()


def _mount(mounts: Mounts, front: ShapedFront, out: Path, name: str, **kw: Any) -> Path:
    """A fresh mount of ``out`` over an empty cache dir, blobs through ``front``; the proxy's counts start now."""
    mp = mounts.tmp / f"mnt-{name}"
    cache = mounts.tmp / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    mp.mkdir(exist_ok=True)
    front.reset()
    config = {"host": front.host, "repo": REPO, "plain_http": True}
    mount_image(MountSpec(str(out / "image.boot"), str(mp), str(cache), mode="fanotify", backend="registry",
                          backend_config=config, **kw))  # fmt: skip
    mounts.active.append(mp)
    return mp


def _timed_read(path: Path) -> float:
    t0 = time.perf_counter()
    path.read_bytes()
    return time.perf_counter() - t0


# --- on-demand latency during a big prefetch --------------------------------------------------------------


def test_ondemand_read_during_big_prefetch(benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           comparison: Callable[[str], None]) -> None:  # fmt: skip
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    src = tmp_path / "src"
    (src / "app").mkdir(parents=True)
    (src / "data").mkdir()
    with open(src / "app" / "big.bin", "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    # the small file between two unlisted fillers: what its read fetches is never what the prefetch fetches
    (src / "data" / "fill-a").write_bytes(os.urandom(FILLER))
    (src / "data" / "m-small.json").write_text('{"key": "value"}\n' * 256)
    (src / "data" / "z-fill").write_bytes(os.urandom(FILLER))
    (src / "etc").mkdir()
    (src / WARM).write_text("warm up\n")
    listing = tmp_path / "list.txt"
    listing.write_text("/app/big.bin\n")
    out = _build(src, tmp_path / "out", listing)
    shutil.rmtree(src)
    small = Path("data/m-small.json")
    mounts = Mounts(tmp_path)
    quiet: list[float] = []
    busy: list[float] = []
    prefetch_stats: list[dict[str, Any]] = []
    busy_mp: list[Path] = []

    def end_busy() -> None:
        if busy_mp:
            prefetch_stats.append(mounts.umount(busy_mp.pop())["stats"]["prefetch"])

    def setup() -> None:
        end_busy()
        mp = _mount(mounts, front, out, "quiet", prefetch=False)
        (mp / WARM).read_bytes()
        quiet.append(_timed_read(mp / small))
        mounts.umount(mp)
        busy_mp.append(mp := _mount(mounts, front, out, "busy"))
        wait_for(lambda: front.bytes_sent > MiB, "the prefetch is fetching", TIMEOUT)
        (mp / WARM).read_bytes()

    try:
        with _slow_peer([out / "blobs"], tmp_path) as front:
            benchmark.pedantic(lambda: busy.append(_timed_read(busy_mp[0] / small)), setup=setup, rounds=ROUNDS,
                               iterations=1)  # fmt: skip
            end_busy()
    finally:
        mounts.cleanup()
    q, b = statistics.median(quiet), statistics.median(busy)
    benchmark.extra_info.update(uncontended_median_s=round(q, 4), during_prefetch_median_s=round(b, 4),
                                ratio=round(b / q, 2), latency_s=LATENCY, bandwidth=BANDWIDTH,
                                prefetch_states=[s["state"] for s in prefetch_stats])  # fmt: skip
    comparison(f"prefetch: cold read of a small unlisted file during a {BIG // MiB} MiB prefetch: median "
               f"{b * 1000:.0f} ms vs {q * 1000:.0f} ms uncontended (--no-prefetch) -> {b / q:.2f}x ({ROUNDS} "
               f"rounds, link {BANDWIDTH // MiB} MiB/s + {LATENCY * 1000:.0f} ms/request)")  # fmt: skip
    # the read overlapped the prefetch: the umount stopped each one before it was done
    assert [s["state"] for s in prefetch_stats] == ["stopped"] * ROUNDS


# --- startup: no prefetch vs the traced table vs everything -----------------------------------------------

IMPORTS = "import json, email.parser, http.client, asyncio, logging, argparse"
SENTINEL = "/etc/trace-end"  # read after the workload: once the trace lists it, the workload's reads are in


def _debian_python() -> tuple[Path, Path]:
    """Debian's ``/usr/bin/python3`` and its standard library, or a skip."""
    exe = Path("/usr/bin/python3").resolve()
    m = re.fullmatch(r"python(\d+\.\d+)", exe.name)
    lib = Path(f"/usr/lib/python{m.group(1)}") if m else None
    if lib is None or not (lib / "os.py").is_file():
        pytest.skip("no Debian python3 with its standard library in /usr/lib/python3.X")
    return exe, lib


def _python_tree(lib: Path, src: Path) -> None:
    skip = shutil.ignore_patterns("test", "tests", "idle_test", "site-packages", "dist-packages", "config-*",
                                  "*.opt-1.pyc", "*.opt-2.pyc")  # fmt: skip
    shutil.copytree(lib, src / lib.relative_to("/"), ignore=skip, symlinks=True)
    (src / SENTINEL[1:]).parent.mkdir(parents=True, exist_ok=True)
    (src / SENTINEL[1:]).write_text("end of the traced run\n")


class Startup:
    """One mode of the startup benchmark: each run mounts fresh, starts the workload, times its output, waits
    for the prefetch, unmounts; ``seconds`` and ``bytes`` (sent by the proxy) per run."""

    def __init__(self, mounts: Mounts, front: ShapedFront, exe: Path, out: Path, name: str, label: str,
                 **kw: Any) -> None:  # fmt: skip
        self.mounts, self.front, self.exe, self.out, self.kw = mounts, front, exe, out, kw
        self.name, self.label = name, label
        self.seconds: list[float] = []
        self.bytes: list[int] = []
        self.fetched: list[int] = []
        self.prefetch: list[dict[str, Any]] = []
        self.requests: list[int] = []

    def mount(self) -> Path:
        return _mount(self.mounts, self.front, self.out, self.name, **self.kw)

    def workload(self, mp: Path) -> float:
        """Seconds from the start of the workload to its output."""
        env = {"PATH": "/usr/bin:/bin", "PYTHONHOME": str(mp / "usr")}
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(self.exe), "-B", "-s", "-c", f"{IMPORTS}; print('ready', flush=True)"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            dt = time.perf_counter() - t0
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert line == b"ready\n" and proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return dt

    def finish(self, mp: Path) -> None:
        if self.kw.get("prefetch", True):
            wait_for(lambda: (p := read_prefetch_progress(mp)) and p["state"] == "done", "prefetch done", TIMEOUT)
        stats = self.mounts.umount(mp)["stats"]
        self.bytes.append(self.front.bytes_sent)
        self.requests.append(self.front.blob_requests())
        self.fetched.append(stats["pipeline"]["bytes_fetched"])
        if "prefetch" in stats:
            self.prefetch.append(stats["prefetch"])

    def run(self) -> None:
        mp = self.mount()
        self.seconds.append(self.workload(mp))
        self.finish(mp)

    def line(self) -> str:
        done = f" (prefetch done in {statistics.median(p['seconds'] for p in self.prefetch):.1f} s)" \
            if self.prefetch else ""  # fmt: skip
        return (f"{self.label} {statistics.median(self.seconds):.2f} s to output, "
                f"{statistics.median(self.bytes) / MiB:.1f} MiB in {statistics.median(self.requests):.0f} blob requests"
                f"{done}")  # fmt: skip


def _record_trace(run: Startup, path: Path) -> int:
    """Mount, run the workload, write its trace as a prefetch list to ``path``; the number of files."""
    mp = run.mount()
    run.workload(mp)
    (mp / SENTINEL[1:]).read_bytes()
    listed = wait_for(lambda: (t := _trace(mp)) and t[-1] == SENTINEL and t, "the trace shows the sentinel", TIMEOUT)
    run.mounts.umount(mp)
    path.write_text("".join(f"{p}\n" for p in listed[:-1]))
    return len(listed) - 1


def _trace(mp: Path) -> list[str]:
    r = subprocess.run([CLI, "trace", str(mp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_startup(benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 comparison: Callable[[str], None]) -> None:  # fmt: skip
    """Rounds interleave the modes (same moment, same load); the benchmarked one is the traced table."""
    exe, lib = _debian_python()
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    src = tmp_path / "src"
    _python_tree(lib, src)
    plain = _build(src, tmp_path / "plain")
    mounts = Mounts(tmp_path)
    try:
        with _slow_peer([plain / "blobs"], tmp_path) as front:
            trace_list = tmp_path / "trace.txt"
            files = _record_trace(Startup(mounts, front, exe, plain, "record", "record", prefetch=False), trace_list)
            traced = _build(src, tmp_path / "traced", trace_list)
            assert {b.name for b in (traced / "blobs").iterdir()} == {b.name for b in (plain / "blobs").iterdir()}
            none = Startup(mounts, front, exe, plain, "none", "no prefetch", prefetch=False)
            table = Startup(mounts, front, exe, traced, "table", "traced table")
            everything = Startup(mounts, front, exe, plain, "all", "--prefetch-all", prefetch_all=True)
            pending: list[Path] = []

            def setup() -> None:
                if pending:
                    table.finish(pending.pop())
                none.run()
                everything.run()
                pending.append(table.mount())

            benchmark.pedantic(lambda: table.seconds.append(table.workload(pending[0])), setup=setup,
                               rounds=STARTUP_ROUNDS, iterations=1)  # fmt: skip
            table.finish(pending.pop())
    finally:
        mounts.cleanup()
    blob = sum(b.stat().st_size for b in (plain / "blobs").iterdir())
    for run in (none, table, everything):
        benchmark.extra_info.update({f"{run.name}_s": [round(s, 3) for s in run.seconds],
                                     f"{run.name}_bytes": run.bytes, f"{run.name}_requests": run.requests,
                                     f"{run.name}_fetched": run.fetched,
                                     f"{run.name}_prefetch": run.prefetch})
    benchmark.extra_info.update(traced_files=files, blob_bytes=blob, latency_s=LATENCY, bandwidth=BANDWIDTH)
    comparison(f"prefetch startup (python3 {IMPORTS[7:]}; {files} files traced; blob {blob / MiB:.1f} MiB; link "
               f"{BANDWIDTH // MiB} MiB/s + {LATENCY * 1000:.0f} ms/request; median of {STARTUP_ROUNDS}): "
               f"{none.line()}; {table.line()}; {everything.line()}")  # fmt: skip
