"""``backend.json`` beside a bootstrap snapshot: the one backend shape, and an older snapshotter's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachefilesd_py.backends.config import BackendSpec
from cachefilesd_py.snapshotter.nydus import load_backend, registry_backend, save_backend
from erofs.errors import UsageError


def test_saved_as_the_one_backend_shape(tmp_path: Path) -> None:
    spec = registry_backend("127.0.0.1:5000/test/app:v1", plain_http=True)
    save_backend(spec, tmp_path)
    saved = json.loads((tmp_path / "backend.json").read_text())
    assert saved == {"type": "registry", "config": {"host": "127.0.0.1:5000", "repo": "test/app", "plain_http": True}}
    assert load_backend(tmp_path) == spec


def test_an_older_snapshotters_file_still_loads(tmp_path: Path) -> None:
    (tmp_path / "backend.json").write_text(json.dumps({"kind": "localfs", "config": {"dir": "/blobs"}}))
    assert load_backend(tmp_path) == BackendSpec("localfs", {"dir": "/blobs"})


def test_an_unknown_backend_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "backend.json").write_text(json.dumps({"type": "ftp", "config": {}}))
    with pytest.raises(UsageError, match="not one of"):
        load_backend(tmp_path)
