"""OCI image layouts written directly (no tool): tar layers, manifests, image indexes, tags."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"


def tar_layer(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files (name → content), as an image layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    """An OCI image layout at ``root``, filled blob by blob; :meth:`tag` names a manifest or index in index.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: list[dict] = []

    def blob(self, data: bytes, media: str, **extra: object) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / d).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{d}", "size": len(data), **extra}

    def manifest(self, layers: list[tuple[bytes, str]], config: dict | None = None, **extra: object) -> dict:
        return self.manifest_of([self.blob(data, media) for data, media in layers], config, **extra)

    def manifest_of(self, layers: list[dict], config: dict | None = None, **extra: object) -> dict:
        """A manifest of layers already in the layout (their descriptors)."""
        body = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": self.blob(json.dumps(config or {}).encode(), "application/vnd.oci.image.config.v1+json"),
                "layers": layers}  # fmt: skip
        return self.blob(json.dumps(body).encode(), body["mediaType"], **extra)

    def image_index(self, manifests: list[dict], **extra: object) -> dict:
        body = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
        return self.blob(json.dumps(body).encode(), body["mediaType"], **extra)

    def tag(self, desc: dict, name: str) -> None:
        self.index.append({**desc, "annotations": {"org.opencontainers.image.ref.name": name}})
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.index}))
