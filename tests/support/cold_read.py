"""A cold sequential read in a thread (:class:`ColdReader`): what an upgrade or a failover must not disturb."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path


class ColdReader:
    """A cold sequential read of a file in 256 KiB pieces, in a thread: its sha256 and every error."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.timeout = timeout
        self.read = 0
        self.errors: list[BaseException] = []
        self.digest = ""
        self.done = False
        self.progress = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as f:
                while piece := f.read(256 << 10):
                    h.update(piece)
                    with self.progress:
                        self.read += len(piece)
                        self.progress.notify_all()
        except OSError as e:
            self.errors.append(e)
        self.digest = h.hexdigest()
        with self.progress:
            self.done = True
            self.progress.notify_all()

    def wait_read(self, n: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.read >= n or self.done, self.timeout)
        assert self.read >= n, (self.read, self.errors)

    def join(self) -> None:
        self.thread.join(self.timeout * 2)
        assert not self.thread.is_alive(), "reader blocked"
