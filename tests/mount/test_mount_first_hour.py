"""``nydus-erofs mount`` as a newcomer meets it (issue 20): a missing bootstrap named as such, a plain-HTTP registry
named as such, the daemon's log named where a user looks (``mount``'s line, ``nydus-erofs mounts``), Ctrl-C on
``--foreground`` exiting 130, and a progress line while ``--mode full`` fetches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import CLI, one_line, run
from tests.support.kmount import is_mounted
from tests.support.registry import RegistryServer
from tests.support.terminal import run_in_terminal

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with 64 MiB of data: fetching it whole takes a moment."""
    tmp = tmp_path_factory.mktemp("mount-first-hour")
    src = tmp / "src"
    src.mkdir()
    for i in range(64):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
    out = tmp / "out"
    r = run("build", src, "-o", out, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_a_missing_bootstrap_is_named(mountpoint: Path, tmp_path: Path, run_env: dict[str, str]) -> None:
    one_line(run("mount", tmp_path / "nonexist", mountpoint, "--cache-dir", tmp_path / "c", env=run_env), 2,
             f"bootstrap {tmp_path / 'nonexist'} does not exist")  # fmt: skip
    boot = tmp_path / "lonely" / "image.boot"  # a bootstrap without blobs/ beside it
    boot.parent.mkdir()
    boot.write_bytes(b"")
    one_line(run("mount", boot, mountpoint, "--cache-dir", tmp_path / "c", env=run_env), 2,
             f"no blobs/ beside {boot}: give --blob-dir DIR")  # fmt: skip


@pytest.mark.kernel("erofs")
def test_full_mode_draws_a_progress_line(big_image: Path, mountpoint: Path, tmp_path: Path,
                                         run_env: dict[str, str]) -> None:  # fmt: skip
    r = run_in_terminal([CLI, "mount", big_image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c",
                         "--mode", "full"], env=run_env)  # fmt: skip
    assert r.returncode == 0, r.terminal
    lines = [ln for ln in r.progress_lines() if ln.startswith("\rfetching: ")]
    assert lines and "%" in lines[-1] and "MiB of 64.0 MiB" in lines[-1], r.terminal
    assert run("umount", mountpoint, env=run_env).returncode == 0
    # --json: the record only, no progress line
    r = run_in_terminal([CLI, "mount", big_image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c2",
                         "--mode", "full", "--json"], env=run_env)  # fmt: skip
    assert r.returncode == 0 and "fetching" not in r.terminal and json.loads(r.stdout)["mode"] == "full"
    assert run("umount", mountpoint, env=run_env).returncode == 0


@pytest.mark.kernel("erofs", "fanotify")
def test_mounts_lists_them_with_their_logs(big_image: Path, tmp_path: Path, run_env: dict[str, str]) -> None:
    r = run("mounts", env=run_env)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "no nydus-erofs mounts\n"
    mps = {}
    try:
        for mode in ("fanotify", "full"):
            mp = mps[mode] = tmp_path / f"mountpoint-{mode}"
            mp.mkdir()
            r = run("mount", big_image / "image.boot", mp, "--cache-dir", tmp_path / f"c-{mode}", "--mode", mode,
                    env=run_env)  # fmt: skip
            assert r.returncode == 0, r.stderr
            if mode == "fanotify":  # the success line says where the daemon logs
                assert r.stdout.rstrip().endswith(".log)") and f"log {tmp_path / 'run'}/" in r.stdout, r.stdout
        listed = json.loads(run("mounts", "--json", env=run_env).stdout)
        by_mp = {m["mountpoint"]: m for m in listed}
        fan, full = by_mp[str(mps["fanotify"])], by_mp[str(mps["full"])]
        assert (fan["mode"], fan["state"], full["mode"], full["state"]) == ("fanotify", "serving", "full", "mounted")
        assert fan["boot"] == str(big_image / "image.boot") and fan["cache_dir"] == str(tmp_path / "c-fanotify")
        assert fan["pid"] and Path(fan["log"]).is_file() and full["pid"] is None
        human = run("mounts", env=run_env).stdout
        assert f"{mps['fanotify']}: fanotify mode, serving, daemon pid {fan['pid']}" in human
        assert f"log {fan['log']}" in human and f"{mps['full']}: full mode, mounted, no daemon" in human
    finally:
        for mp in mps.values():
            if is_mounted(mp):
                run("umount", mp, env=run_env)
    assert json.loads(run("mounts", "--json", env=run_env).stdout) == []


@pytest.mark.kernel("erofs", "fanotify")
def test_ctrl_c_on_foreground_exits_130(big_image: Path, mountpoint: Path, tmp_path: Path,
                                        run_env: dict[str, str]) -> None:  # fmt: skip
    proc = subprocess.Popen([CLI, "mount", big_image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c",
                             "--mode", "fanotify", "--foreground"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env)  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # the daemon logs to stderr in the foreground: it says when it serves
            seen.append(line)
            if "INFO: serving " in line:
                break
        assert is_mounted(mountpoint), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(60) == 130, rest
        assert rest.rstrip().endswith("nydus-erofs: aborted")
        assert not is_mounted(mountpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.network
@pytest.mark.tools("docker-registry")
@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.parametrize("mode", ["full", "fanotify"])
def test_plain_http_registry_suggests_plain_http(mode: str, big_image: Path, mountpoint: Path, tmp_path: Path,
                                                 registry_server: RegistryServer,
                                                 run_env: dict[str, str]) -> None:  # fmt: skip
    r = run("mount", big_image / "image.boot", mountpoint, "--cache-dir", tmp_path / "c", "--mode", mode,
            "--backend", "registry", "--backend-config", f"host={registry_server.host},repo=first/hour",
            env=run_env)  # fmt: skip
    one_line(r, 4, "the server speaks plain HTTP, not HTTPS: add plain_http=true to --backend-config")
    assert "SSL" not in r.stderr and "attempts" not in r.stderr
    assert not is_mounted(mountpoint)
