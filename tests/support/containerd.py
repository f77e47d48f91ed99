"""Test helpers: Debian's containerd with a private root, state, socket and config, with ``nydus-erofs snapshotter``
as its proxy snapshotter, and ``ctr`` pointed at it.  Both processes are stopped (and reaped) on exit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

import grpc

from erofs.imagespec import MT_NYDUS_BLOB
from tests.support.cli import CLI

SNAPSHOTTER = "nydus-erofs"
NAMESPACE = "default"
NYDUS_BLOB_PROCESSOR = "io.containerd.nydus-erofs.blob.v1"  # any name: containerd keys payloads by it


def _cri(registry: str | None, annotations: bool = True) -> str:
    """The CRI plugin (kubelet's API) pulling into the snapshotter with layer labels (``annotations``: the
    image's location among them, as the README says; False: containerd's default), ``registry`` over HTTP;
    without ``registry``, no CRI plugin."""
    if registry is None:
        return 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
    disable_snapshot_annotations = {str(not annotations).lower()}
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""


def _config(tmp: Path, snapshotter_sock: Path, cri_registry: str | None, cri_annotations: bool) -> str:
    return f"""version = 2
root = "{tmp / 'root'}"
state = "{tmp / 'state'}"
{_cri(cri_registry, cri_annotations)}

[grpc]
  address = "{tmp / 'containerd.sock'}"

[ttrpc]
  address = "{tmp / 'containerd.sock.ttrpc'}"

[proxy_plugins.{SNAPSHOTTER}]
  type = "snapshot"
  address = "{snapshotter_sock}"

# as the README says: a Nydus data blob goes through unchanged, and is applied as the empty tar it starts with
[stream_processors."{NYDUS_BLOB_PROCESSOR}"]
  accepts = ["{MT_NYDUS_BLOB}"]
  returns = "application/vnd.oci.image.layer.v1.tar"
  path = "/bin/cat"
"""


class SnapshotterProcess:
    """``nydus-erofs snapshotter`` on ``sock`` with root ``root``; :meth:`start` returns once it serves."""

    def __init__(self, sock: Path, root: Path, log: Path, *options: str) -> None:
        self.sock, self.root, self.log, self.options = sock, root, log, options
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([CLI, "snapshotter", "--address", str(self.sock), "--root", str(self.root),
                                          *self.options], stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # its "serving on" line: the socket is there
        if not line.startswith("serving on"):
            self.proc.wait()
            raise RuntimeError(f"snapshotter did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Containerd:
    """containerd (and the snapshotter it proxies to) under ``tmp``; with ``cri_registry`` (``host:port``), its CRI
    plugin too, pulling from that registry over HTTP (``cri_annotations``: see :func:`_cri`)."""

    def __init__(self, tmp: Path, *snapshotter_options: str, cri_registry: str | None = None,
                 cri_annotations: bool = True) -> None:  # fmt: skip
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.sock = tmp / "containerd.sock"
        self.root = tmp / "root"
        self.snapshotter = SnapshotterProcess(tmp / "snapshotter.sock", tmp / "snapshots", tmp / "snapshotter.log",
                                              "--containerd-root", str(self.root), *snapshotter_options)  # fmt: skip
        self.config = tmp / "config.toml"
        self.config.write_text(_config(tmp, self.snapshotter.sock, cri_registry, cri_annotations))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Containerd:
        self.snapshotter.start()
        try:
            with open(self.tmp / "containerd.log", "ab") as log:
                self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log, stderr=log,
                                             start_new_session=True)  # fmt: skip
            with grpc.insecure_channel(f"unix:{self.sock}") as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=60)
                except grpc.FutureTimeoutError:
                    raise RuntimeError(f"containerd did not start: {self.log_tail()}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def log_tail(self) -> str:
        return (self.tmp / "containerd.log").read_text(errors="replace")[-3000:]

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            namespace: str = NAMESPACE) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run(["ctr", "--address", str(self.sock), "--namespace", namespace, *args],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        return proc

    def run(self, ref: str, cid: str, *argv: str, namespace: str = NAMESPACE) -> str:
        """``ctr run --rm`` of ``argv`` in a container of ``ref`` on the snapshotter; what it printed on stdout.  The
        output goes to a file on a bind mount, not through ctr: ctr's copy of a short-lived task's stdout can come
        back empty with exit 0 (a race in containerd's I/O: seen once here, after a pull); a file the task wrote is
        complete when it has exited.  The container's exit status must be 0."""
        out = self.tmp / f"stdout-{cid}"
        out.mkdir()
        try:
            self.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, "--mount",
                     f"type=bind,src={out},dst=/.stdout,options=rbind:rw", ref, cid, "/bin/sh", "-c",
                     '"$0" "$@" > /.stdout/out', *argv, namespace=namespace)  # fmt: skip
            return (out / "out").read_text()
        finally:
            shutil.rmtree(out)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self._remove_all()
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.snapshotter.stop()
        _umount_under(self.tmp)

    def _remove_all(self) -> None:
        """Containers, then images, then a synchronous garbage collection: the snapshotter removes (and unmounts)
        every snapshot."""
        for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
            for cid in self.ctr("containers", "ls", "-q", check=False, namespace=ns).stdout.split():
                self.ctr("tasks", "kill", "-s", "KILL", cid, check=False, namespace=ns)
                self.ctr("tasks", "delete", "-f", cid, check=False, namespace=ns)
                self.ctr("containers", "delete", cid, check=False, namespace=ns)
            images = self.ctr("images", "ls", "-q", check=False, namespace=ns).stdout.split()
            if images:
                self.ctr("images", "rm", "--sync", *images, check=False, namespace=ns)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path`` (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def _umount_under(path: Path) -> None:
    for mp in sorted(mounts_under(path), key=len, reverse=True):  # leftovers of a failed test: deepest first
        subprocess.run(["umount", "-l", mp], check=False)
