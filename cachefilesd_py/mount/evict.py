"""A bounded blob cache for fanotify mounts (``--cache-size-limit``): the least recently used chunks are punched out.

The cache files of a fanotify mount are sparse; what they hold counts against the limit, chunk by chunk
(page-rounded: what the filesystem allocates for it).  Before a verified chunk is written (:meth:`CacheLimit.writer`
wraps every writer: event fills, readahead, prefetch) it is charged; if the charge would take the cache over the
limit, resident chunks are evicted first, least recently used first (:class:`LruPolicy`).  The limit thus holds on
disk at every instant: the victims are punched out before the new chunk is written, and the bytes being punched
still count until they are.

Evicting a chunk keeps the design's one piece of state true, in this order:

1. its cache file is marked for pre-content events (a mount with a limit never unmarks a complete file, so this
   is a check; ``rearm`` does it the way the server re-marks a file changed under the mount);
2. the chunk is absent: the page map (a read of it is an event from now on, and a fill) and the chunk map
   (its byte cleared, then ``fdatasync`` of the map) say so;
3. its range is punched out (``fallocate(PUNCH_HOLE|KEEP_SIZE)``).

Steps 1-2 happen under the lock the event thread takes to answer a read of present data (:meth:`serve_present`),
so a read is either allowed before the chunk is chosen, or becomes a fill.  A fill wanting a chunk being punched
waits until the hole is there (else the punch could land on its fresh write).

What is never evicted: a chunk pinned by a fill in progress (the range an event asked for, from before the fill
until after the event is allowed: :meth:`pinned`), a chunk being written, and a chunk read (touched) less than
:data:`GRACE` seconds ago: after an event is allowed the kernel reads the cache file's pages without telling us
when it is done, and the grace covers that.  When nothing can go (everything young or pinned) a charge waits,
for at most :data:`WAIT` seconds; then it goes over the limit (counted in ``over_limit``, logged once).

Files another mount serves too (``shared``) and files a restarted worker has no event fd for yet (``watched``) are
never punched: the other daemon's page map would still say present.  Counters (:meth:`CacheLimit.stats`, and as
attributes): ``evictions``, ``bytes_evicted``, ``used``, ``over_limit``, ``waits``, ``punch_failures``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from erofs.errors import UsageError
from erofs.reader.bootstrap import Bootstrap
from erofs.units import format_size

from ..pipeline import WriteFn
from .cachefile import CacheFile

__all__ = ["GRACE", "WAIT", "CacheLimit", "LruPolicy", "check_whole_image_fits"]

log = logging.getLogger(__name__)

GRACE = 1.0  # seconds after its last read a chunk cannot be evicted (the kernel may still be copying it)
WAIT = 10.0  # seconds a charge waits for something to become evictable before it goes over the limit


class LruPolicy:
    """Which resident chunks go when room is needed: least recently touched first, never a pinned one, never one
    touched less than ``grace`` seconds ago.  Keys are any hashables (``(CacheFile, chunk index)``); sizes in bytes.
    Not locked: :class:`CacheLimit` holds its lock around every call.

    ``used``: bytes resident (charged); ``punching``: bytes chosen as victims whose holes are not punched yet (they
    still take room on disk).  ``evictions``/``bytes_evicted`` count what :meth:`done` finished.
    """

    def __init__(self, limit: int, *, grace: float = GRACE, clock: Callable[[], float] = time.monotonic,
                 can_evict: Callable[[Hashable], bool] | None = None) -> None:  # fmt: skip
        if limit <= 0:
            raise ValueError(f"cache size limit must be > 0, got {limit}")
        self.limit = limit
        self.grace = grace
        self.clock = clock
        self.can_evict = can_evict or (lambda key: True)
        self.used = 0
        self.punching = 0
        self.evictions = 0
        self.bytes_evicted = 0
        self._lru: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()  # key → (size, last touch), oldest first
        self._pins: dict[Hashable, int] = {}
        self._evicting: set[Hashable] = set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def add(self, key: Hashable, size: int, *, cold: bool = False) -> None:
        """``key`` is resident (``size`` bytes), most recently used (``cold``: least recently, never read: what a
        warm cache holds at start); a key already resident is only touched."""
        if key in self._lru:
            self.touch(key)
            return
        self._lru[key] = (size, float("-inf") if cold else self.clock())
        if cold:
            self._lru.move_to_end(key, last=False)
        self.used += size

    def touch(self, key: Hashable) -> None:
        """``key`` was just read (no-op when not resident)."""
        entry = self._lru.get(key)
        if entry is not None:
            self._lru[key] = (entry[0], self.clock())
            self._lru.move_to_end(key)

    def discard(self, key: Hashable) -> None:
        """``key`` is not resident any more (its write failed)."""
        entry = self._lru.pop(key, None)
        if entry is not None:
            self.used -= entry[0]

    def pin(self, key: Hashable) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        n = self._pins.get(key, 0) - 1
        if n > 0:
            self._pins[key] = n
        else:
            self._pins.pop(key, None)

    def pinned(self, key: Hashable) -> bool:
        return key in self._pins

    def evicting(self, key: Hashable) -> bool:
        """Whether ``key`` was chosen as a victim and its hole is not punched yet."""
        return key in self._evicting

    def room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the limit now."""
        return self.used + self.punching + size <= self.limit

    def choose(self, size: int) -> tuple[list[tuple[Hashable, int]], bool]:
        """The victims that make room for ``size`` more bytes, oldest first (none when it fits), and whether they
        are enough: the walk skips pinned keys and stops at the first key touched within the grace."""
        over = self.used + self.punching + size - self.limit
        if over <= 0:
            return [], True
        now = self.clock()
        out: list[tuple[Hashable, int]] = []
        freed = 0
        for key, (sz, touched) in self._lru.items():
            if now - touched < self.grace:
                break  # every later key is younger
            if key in self._pins or not self.can_evict(key):
                continue
            out.append((key, sz))
            freed += sz
            if freed >= over:
                return out, True
        return out, False

    def take(self, victims: Sequence[tuple[Hashable, int]]) -> None:
        """The victims leave the resident set; their bytes count as ``punching`` until :meth:`done`."""
        for key, size in victims:
            del self._lru[key]
            self.used -= size
            self.punching += size
            self._evicting.add(key)

    def done(self, victims: Sequence[tuple[Hashable, int]]) -> None:
        """The victims' holes are punched."""
        for key, size in victims:
            self.punching -= size
            self._evicting.discard(key)
            self.evictions += 1
            self.bytes_evicted += size

    def ripe_in(self) -> float | None:
        """Seconds until the least recently used unpinned key is past the grace (None: no such key)."""
        now = self.clock()
        for key, (_, touched) in self._lru.items():
            if key not in self._pins and self.can_evict(key):
                return max(touched + self.grace - now, 0.0)
        return None


class CacheLimit:
    """The cache size limit of one fanotify mount's cache files (thread-safe; see the module's docstring).

    ``rearm(cf)``: marks ``cf`` for pre-content events if it is not (the server's); called before a chunk of it
    is dropped.  The server holds this object (``FanotifyServer.limit``).
    """

    def __init__(self, files: Sequence[CacheFile], limit: int, *, grace: float = GRACE, wait: float = WAIT,
                 rearm: Callable[[CacheFile], None] | None = None) -> None:  # fmt: skip
        self.files = list(files)
        self.policy = LruPolicy(limit, grace=grace, can_evict=_evictable)
        self.wait = wait
        self.rearm = rearm
        self.over_limit = 0  # charges that went over the limit (nothing evictable within `wait`)
        self.waits = 0  # charges that waited for something to become evictable
        self.punch_failures = 0
        self._cond = threading.Condition()
        self._warned = False
        for cf in self.files:
            if not cf.watched:
                self._trim(cf)
            for ci, size in cf.resident_chunks():
                self.policy.add((cf, ci), size, cold=True)

    # -- counters -------------------------------------------------------------------------------------------
    limit = property(lambda self: self.policy.limit, doc="The limit, in bytes.")
    used = property(lambda self: self.policy.used, doc="Bytes of resident chunks (and chunks being written).")
    evictions = property(lambda self: self.policy.evictions, doc="Chunks evicted so far.")
    bytes_evicted = property(lambda self: self.policy.bytes_evicted, doc="Bytes evicted so far.")

    def allocated(self) -> int:
        """Bytes the filesystem has allocated for the cache files and their chunk maps (``st_blocks``)."""
        total = 0
        for cf in self.files:
            for fd in (cf.fd, cf.chunks.fd):
                if fd >= 0:
                    total += os.fstat(fd).st_blocks * 512
        return total

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"limit": self.limit, "used": self.used, "evictions": self.evictions,
                    "bytes_evicted": self.bytes_evicted, "over_limit": self.over_limit, "waits": self.waits,
                    "punch_failures": self.punch_failures}  # fmt: skip

    def _trim(self, cf: CacheFile) -> None:
        if cf.shared:  # what another daemon wrote and has not recorded yet is not garbage
            return
        punched = cf.trim_unrecorded()
        if punched:
            log.info("cache file %s: %s written but never recorded punched out", cf.path, format_size(punched))

    # -- the event thread -----------------------------------------------------------------------------------
    def adopted(self, cf: CacheFile) -> None:
        """A restarted worker's ``cf`` has an fd that raises no event now, before any fill of it: the data its
        dead predecessor wrote but never recorded goes (it would take room, counting for nothing)."""
        with self._cond:
            self._trim(cf)

    def serve_present(self, cf: CacheFile, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` of ``cf`` is present (then its chunks are touched): the event
        thread's check before it allows a read.  No chunk can be chosen for eviction in between."""
        with self._cond:
            if not cf.known(offset, length):
                return False
            for ci in cf.handle.meta.chunks_for_range(offset, length):
                self.policy.touch((cf, ci))
            return True

    def has_room(self, length: int) -> bool:
        """Whether ``length`` more bytes fit now, by evicting what may go (readahead is skipped otherwise)."""
        with self._cond:
            return self.policy.choose(length)[1]

    # -- fills ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, cf: CacheFile, offset: int, length: int) -> Iterator[None]:
        """The chunks of ``[offset, offset + length)`` are not evicted in this block (an event's fill, up to the
        moment it is allowed); at its end they are touched."""
        keys = [(cf, ci) for ci in cf.handle.meta.chunks_for_range(offset, length)]
        with self._cond:
            for key in keys:
                self.policy.pin(key)
        try:
            yield
        finally:
            with self._cond:
                for key in keys:
                    self.policy.touch(key)
                    self.policy.unpin(key)
                self._cond.notify_all()

    def writer(self, cf: CacheFile, write: WriteFn) -> WriteFn:
        """``write`` (a pipeline writer into ``cf``) charging each chunk against the limit before writing it."""

        def charged(offset: int, data: memoryview) -> object:
            ci = cf.handle.meta.find(offset)
            if ci is None:  # not a chunk's start (the pipeline writes whole chunks only)
                return write(offset, data)
            key = (cf, ci)
            self._charge(key, -(-data.nbytes // 4096) * 4096)
            try:
                return write(offset, data)
            except BaseException:
                with self._cond:
                    self.policy.discard(key)
                raise
            finally:
                with self._cond:
                    self.policy.unpin(key)
                    self._cond.notify_all()

        return charged

    def _charge(self, key: tuple[CacheFile, int], size: int) -> None:
        """Make room for ``key`` (evicting), then count it resident and pinned (until its write ends)."""
        give_up = time.monotonic() + self.wait
        while True:
            with self._cond:
                while self.policy.evicting(key):  # its old bytes are being punched: write after the hole
                    self._cond.wait()
                if key in self.policy:  # written again (a waiter's copy): takes no more room
                    self.policy.add(key, size)
                    self.policy.pin(key)
                    return
                victims, enough = self.policy.choose(size)
                if not victims:
                    if enough or self._wait_or_give_up(give_up):
                        self.policy.add(key, size)
                        self.policy.pin(key)
                        return
                    continue
                self._take(victims)
            self._punch(victims)

    def _wait_or_give_up(self, give_up: float) -> bool:
        """Nothing can go now: wait (lock held) for a punch, an unpin or a chunk to age; True when the wait is over
        and the charge goes over the limit."""
        left = give_up - time.monotonic()
        if left <= 0:
            self.over_limit += 1
            if not self._warned:
                self._warned = True
                log.warning("cache size limit %s: nothing could be evicted for %gs (every chunk is in use): going "
                            "over it", format_size(self.limit), self.wait)  # fmt: skip
            return True
        ripe = self.policy.ripe_in()
        self.waits += 1
        self._cond.wait(left if self.policy.punching or ripe is None else min(left, ripe + 0.01))
        return False

    def _take(self, victims: Sequence[tuple[Any, int]]) -> None:
        """Steps 1 and 2 (lock held): each victim's file marked, the chunk absent in its page map and chunk map."""
        self.policy.take(victims)
        try:
            for (cf, ci), _ in victims:
                if not cf.marked and self.rearm is not None:
                    self.rearm(cf)
                cf.drop_chunk(ci)
        except BaseException:
            self.policy.done(victims)
            raise

    def _punch(self, victims: Sequence[tuple[Any, int]]) -> None:
        """Step 3 (lock not held): the chunk maps made durable, then the holes punched; then they are done."""
        try:
            files = {id(cf): cf for (cf, _), _ in victims}
            for cf in files.values():
                cf.sync_chunk_map()
            failed = sum(not cf.punch_chunk(ci) for (cf, ci), _ in victims)
        finally:
            with self._cond:
                self.policy.done(victims)
                self._cond.notify_all()
        with self._cond:
            self.punch_failures += failed

    def shrink(self) -> None:
        """Evict down to the limit (a warm cache found over it at start)."""
        while True:
            with self._cond:
                victims, _ = self.policy.choose(0)
                if not victims:
                    return
                self._take(victims)
            self._punch(victims)


def _evictable(key: Hashable) -> bool:
    cf = key[0]  # type: ignore[index]
    return not (cf.shared or cf.watched)


def check_whole_image_fits(limit: int, boot: str, mode: str) -> None:
    """Full and nbd modes keep the whole image in the cache: a limit it does not fit is a usage error."""
    if not limit:
        return
    with Bootstrap(boot) as bs:
        needed = sum(b.uncompressed_size for b in bs.blobs)
    if needed > limit:
        raise UsageError(f"--cache-size-limit {format_size(limit)}: {mode} mode keeps the whole image "
                         f"({format_size(needed)}) in the cache: use --mode fanotify or a larger limit")  # fmt: skip
