"""What a daemon measures, in one shape for both daemons.

Each daemon (cachefilesd-py, a fanotify mount's worker) builds a *snapshot* from the counters it keeps anyway
(:class:`~erofs.reader.backend.BackendStats` per backend, :class:`~cachefilesd_py.pipeline.PipelineStats`, its
own read counters, the prefetch progress, the cache files); nothing here counts.  ``GET /api/v1/metrics`` answers
the snapshot as JSON, ``GET /metrics`` the same numbers in the Prometheus text format
(:mod:`cachefilesd_py.prometheus`, which the first scrape imports: a daemon never scraped does without
prometheus_client).

The snapshot (:func:`snapshot`):

- ``daemon``: ``version``, ``pid`` (the serving process), ``state``, ``uptime`` (seconds), ``mode``
  (``fscache`` or ``fanotify``), ``restarts`` (of the worker);
- ``backend``: every backend together: ``requests``, ``bytes``, ``errors``, ``retries``, ``latency_count``,
  ``latency_sum_ms``, ``latency_max_ms``, ``latency_le_*`` (cumulative histogram);
- ``pipeline``: the pipeline's counters (``fills``, ``chunks_fetched``, ``bytes_fetched``, ``digest_failures``...);
- ``cache``: ``hits`` (reads answered from the cache without a fetch), ``misses`` (reads that needed one);
- ``inflight``: chunk fetches in flight now (reads waiting on a backend);
- ``images``: per image (fsid, or the mountpoint of a fanotify mount): ``backend`` (its backend's counters, as
  above), ``blobs`` (ids), ``prefetch`` (its progress: ``state``, ``pieces``, ``pieces_done``, ``bytes``...);
- ``blobs``: per blob id: ``image``, ``size`` (uncompressed bytes), ``cached`` (bytes of it in the cache, when
  the daemon knows), ``pipeline`` (the pipeline's counters of that blob: fills, chunks fetched, digest
  failures...).

The tables below name each counter and say what it counts (the help text of its Prometheus metric).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BACKEND_COUNTERS", "PIPELINE_COUNTERS", "PREFETCH_GAUGES", "Snapshot", "daemon_version", "snapshot"]

Snapshot = Mapping[str, Any]

#: backend counters, per image: (snapshot key, help)
BACKEND_COUNTERS = {
    "requests": "Requests sent to the image's backend (ranged reads, size probes, auth).",
    "bytes": "Blob bytes received from the image's backend.",
    "errors": "Failed backend reads.",
    "retries": "Backend attempts repeated after a temporary failure.",
}
#: pipeline counters: (PipelineStats field, Prometheus name, help)
PIPELINE_COUNTERS = (
    ("fills", "fills", "Fills: reads (or readahead/prefetch pieces) the pipeline was asked to complete."),
    ("chunks_fetched", "chunks_fetched", "Chunks fetched from backends."),
    ("bytes_fetched", "fetched_bytes", "Compressed bytes fetched from backends."),
    ("chunks_written", "chunks_written", "Chunks verified, decompressed and written to the cache."),
    ("bytes_written", "written_bytes", "Bytes written to the cache (page-padded)."),
    ("digest_failures", "digest_failures", "Chunks whose digest did not match (never written)."),
    ("fetch_failures", "fetch_failures", "Chunks whose fetch failed."),
    ("timeouts", "fill_timeouts", "Chunks not waited for past the fill deadline."),
)
#: prefetch progress gauges, per image: (progress key, help)
PREFETCH_GAUGES = {
    "pieces": "Pieces the prefetch plan has.",
    "pieces_done": "Pieces prefetched so far.",
    "bytes_fetched": "Bytes the prefetch fetched.",
    "errors": "Prefetch pieces that failed.",
}


def daemon_version() -> str:
    """The installed nydus-erofs's version ("unknown" run from a source tree).  importlib.metadata is imported by the
    first call (an API request), not by every daemon's start."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nydus-erofs")
    except PackageNotFoundError:  # run from a source tree
        return "unknown"


def snapshot(*, daemon: Mapping[str, Any], backend: Mapping[str, Any], pipeline: Mapping[str, Any], hits: int,
             misses: int, inflight: int, images: Mapping[str, Mapping[str, Any]],
             blobs: Mapping[str, Mapping[str, Any]],
             per_blob: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:  # fmt: skip
    """The snapshot (see the module's docstring) from the parts each daemon has (``per_blob``: the pipeline's
    counters of each blob, :meth:`~cachefilesd_py.pipeline.PipelineStats.per_blob`)."""
    return {"daemon": dict(daemon), "backend": dict(backend), "pipeline": dict(pipeline),
            "cache": {"hits": hits, "misses": misses}, "inflight": inflight,
            "images": {k: dict(v) for k, v in images.items()},
            "blobs": {k: {**v, "pipeline": {key: per_blob.get(k, {}).get(key, 0) for key, _, _ in PIPELINE_COUNTERS}}
                      for k, v in blobs.items()}}  # fmt: skip
