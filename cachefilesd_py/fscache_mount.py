"""``nydus-erofs mount --mode fscache``: the image is bound in a running ``cachefilesd-py`` through its API
(``PUT /api/v1/images/{fsid}``, :mod:`cachefilesd_py.bindings`), then mounted with ``mount -t erofs none -o
fsid=…[,domain_id=…]``; the kernel's fscache asks that daemon for every byte.  ``nydus-erofs umount`` unmounts
and unbinds (``DELETE``), leaving the image bound when another mount still uses it.

The fsid names the image's content, so the same image mounted twice shares it and a tag moved to another image
never meets the kernel's cached bootstrap of the old one: ``nydus-`` and 32 hex digits of the sha256 of the
bootstrap (a file) or of the manifest digest (a reference, which is pinned to that digest), with the backend.
No process of ours serves the mount; the runtime record (:mod:`.mount.record`) says which daemon and fsid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cachefilesd_py.api import request
from cachefilesd_py.defaults import DEFAULT_DAEMON_SOCK
from cachefilesd_py.imageref import is_image_reference
from cachefilesd_py.mount.record import read_record, record_path, run_dir, write_record
from cachefilesd_py.mount.spec import FSCACHE_MODE
from cachefilesd_py.reference import RemoteImage
from erofs.errors import BackendError, ImageError, UsageError
from fscache.cachefiles import DEVICE_PATH
from fscache.mount import MountError, is_mounted, mount_erofs_fscache

__all__ = ["mount_fscache", "unbind"]

IMAGES_PATH = "/api/v1/images/"


def _fsid(identity: dict[str, Any]) -> str:
    return "nydus-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _bind_body(source: str, backend: str | None, config: dict[str, Any], platform: str | None,
               plain_http: bool) -> tuple[dict[str, Any], str]:  # fmt: skip
    """The bind request for ``source`` and the fsid naming its content."""
    if is_image_reference(source):
        opts = {**config, **({"plain_http": True} if plain_http else {})}
        with RemoteImage(source, platform=platform, plain_http=plain_http, insecure=bool(opts.get("insecure")),
                         auth_file=opts.get("docker_config") or None, options=opts) as img:  # fmt: skip
            digest = img.resolve().digest
            pinned = f"docker://{img.ref.host}/{img.ref.repo}@{digest}"
        body: dict[str, Any] = {"reference": pinned}
        if opts:
            body["backend"] = {"type": "registry", "config": opts}
        return body, _fsid({"reference": pinned, "backend": opts})
    boot = os.path.realpath(source)
    sha = hashlib.sha256()
    try:
        with open(boot, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
    except OSError as e:
        raise UsageError(f"bootstrap {source}: {e.strerror}") from None
    body = {"bootstrap": boot}
    if backend is not None:
        body["backend"] = {"type": backend, "config": config}
    return body, _fsid({"bootstrap": sha.hexdigest(), "backend": body.get("backend")})


def _call(sock: str, method: str, fsid: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    try:
        return request(sock, method, IMAGES_PATH + fsid, body, timeout=600)
    except OSError as e:
        raise UsageError(f"no cachefilesd-py API at {sock} ({e.strerror or e}): start cachefilesd-py "
                         f"--api-sock {sock}, or give --daemon-sock") from None  # fmt: skip


def _api_error(status: int, answer: dict[str, Any], what: str) -> Exception:
    message = f"{what}: {answer.get('message') or f'HTTP {status}'}"
    if status in (400, 409):
        return UsageError(message)
    if status == 422:
        return ImageError(message)
    if status in (404, 502):
        return BackendError(message)
    return MountError(errno.EIO, message)


def mount_fscache(source: str, mountpoint: str | os.PathLike[str], *, daemon_sock: str, backend: str | None,
                  backend_config: dict[str, Any], platform: str | None = None, plain_http: bool = False,
                  domain_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Bind ``source`` (a bootstrap or a ``docker://`` reference) in the daemon at ``daemon_sock`` and mount it
    on ``mountpoint``; returns the runtime record."""
    if not os.path.exists(DEVICE_PATH):
        raise UsageError(f"--mode fscache needs {DEVICE_PATH} (the kernel's cachefiles on-demand mode), served by "
                         "cachefilesd-py")  # fmt: skip
    mp = Path(mountpoint).resolve()
    if not mp.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mp, None) or read_record(mp) is not None:
        raise UsageError(f"{mp} is already a mountpoint (nydus-erofs umount {mp} first)")
    body, fsid = _bind_body(source, backend, backend_config, platform, plain_http)
    if domain_id is not None:
        body["domain_id"] = domain_id
    status, answer = _call(daemon_sock, "PUT", fsid, body)
    if status != 200:
        raise _api_error(status, answer, f"binding {source} in cachefilesd-py")
    record = {"mountpoint": str(mp), "boot": "none", "source": "none", "image": source, "mode": FSCACHE_MODE,
              "fsid": fsid, "domain_id": domain_id, "daemon_sock": daemon_sock, "backend": answer.get("backend"),
              "cache_dir": None, "pid": None}  # fmt: skip
    try:
        run_dir().mkdir(parents=True, exist_ok=True)
        write_record(record_path(mp), record)
        try:
            mount_erofs_fscache(fsid, mp, domain_id)
        except BaseException:
            record_path(mp).unlink(missing_ok=True)
            raise
    except BaseException:
        if answer.get("changed"):  # bound for this mount only: unbound again (kept if another mount has it)
            _call(daemon_sock, "DELETE", fsid)
        raise
    return record


def unbind(record: dict[str, Any]) -> dict[str, Any]:
    """After the umount of an fscache mount: unbind its image (``unbound`` False when another mount still
    uses it, or the daemon no longer has it)."""
    sock, fsid = str(record.get("daemon_sock") or DEFAULT_DAEMON_SOCK), str(record["fsid"])
    status, answer = _call(sock, "DELETE", fsid)
    if status not in (200, 404, 409):
        raise _api_error(status, answer, f"unmounted, but unbinding {fsid} from cachefilesd-py")
    return {**record, "unbound": status == 200}

