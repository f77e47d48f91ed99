"""Images bound at run time through cachefilesd-py's API, each from its own repository of a registry on the host
(tests/support/vm_remote.py converts two images into it; the VM reaches it as ``$VM_HOST``), mounted by fsid
through the kernel's fscache; unbound, the fsid no longer mounts.  Then ``nydus-erofs mount --mode fscache
docker://…`` does the same in one command, and its umount unbinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachefilesd_py.api import request
from tests.support.fstree import assert_same_snapshot, snapshot
from tests.support.kmount import MS_RDONLY, mount, umount
from tests.support.vm_remote import Served
from tests.vm.test_daemon import DaemonProc, mounted, scratch

pytestmark = [pytest.mark.kernel("cachefiles"), pytest.mark.network]

NYDUS_EROFS = str(Path(sys.executable).with_name("nydus-erofs"))


def _ref(served: Served, name: str) -> str:
    image = served.nydus_images[name]
    return f"docker://{os.environ['VM_HOST']}:{served.registry_port}/{image['repo']}:{image['tag']}"


def test_two_images_from_two_repositories_bound_mounted_and_unbound(served: Served) -> None:
    served.require("registry", "nydus")
    d = DaemonProc(scratch() / "bind-api").start()  # no backend of its own: each image brings its own
    backend = {"type": "registry", "config": {"plain_http": True, "auth": served.registry_auth}}
    try:
        for fsid in ("a", "b"):
            status, answer = request(d.api_sock, "PUT", f"/api/v1/images/{fsid}",
                                     {"reference": _ref(served, fsid), "backend": backend})  # fmt: skip
            assert status == 200, answer
            assert answer["backend"] == "registry" and answer["changed"], answer
        for fsid in ("a", "b"):
            with mounted(fsid) as mnt:
                assert_same_snapshot(served.expected_snapshot(served.nydus_images[fsid]["snapshot"]), snapshot(mnt))
        per = d.api("/api/v1/metrics/backend")["backends"]
        assert per["a"]["bytes"] > 0 and per["b"]["bytes"] > 0  # each image's blobs from its own repository
        status, answer = request(d.api_sock, "DELETE", "/api/v1/images/a")
        assert (status, answer) == (200, {"fsid": "a", "unbound": True})
        mnt = scratch() / "mnt" / "a-unbound"
        mnt.mkdir(parents=True, exist_ok=True)
        with pytest.raises(OSError) as failed:
            mount("none", mnt, "erofs", MS_RDONLY, "fsid=a")
            umount(mnt)  # (only if it mounted after all)
        print(f"mount of an unbound fsid: {failed.value}")
        assert not os.path.ismount(mnt)
        with mounted("b") as mnt_b:  # the other image is still served
            assert (mnt_b / "data" / "small.txt").read_text() == "a small file of image 98\n"
        assert [i["fsid"] for i in d.api("/api/v1/images")["images"]] == ["b"]
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()


def test_nydus_erofs_mount_fscache_by_reference(served: Served) -> None:
    served.require("registry", "nydus")
    d = DaemonProc(scratch() / "bind-cli").start()
    mnt = scratch() / "mnt" / "cli"
    mnt.mkdir(parents=True, exist_ok=True)
    config = json.dumps({"auth": served.registry_auth})
    try:
        proc = subprocess.run([NYDUS_EROFS, "mount", _ref(served, "a"), str(mnt), "--mode", "fscache", "--plain-http",
                               "--daemon-sock", str(d.api_sock), "--backend-config", config],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr + d.log_text()
        assert proc.stdout.startswith(f"mounted {_ref(served, 'a')} on {mnt} (fscache mode, fsid nydus-")
        try:
            assert_same_snapshot(served.expected_snapshot(served.nydus_images["a"]["snapshot"]), snapshot(mnt))
        finally:
            done = subprocess.run([NYDUS_EROFS, "umount", str(mnt), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["unbound"] is True
        assert not os.path.ismount(mnt)
        assert d.api("/api/v1/images")["images"] == []
    finally:
        rc = d.stop()
    assert rc == 0, d.log_text()
