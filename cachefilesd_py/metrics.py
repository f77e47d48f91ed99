"""What a daemon measures, in one shape for both daemons, and its Prometheus exposition.

Each daemon (cachefilesd-py, a fanotify mount's worker) builds a *snapshot* from the counters it keeps anyway
(:class:`~erofs.reader.backend.BackendStats` per backend, :class:`~cachefilesd_py.pipeline.PipelineStats`, its
own read counters, the prefetch progress, the cache files); nothing here counts.  ``GET /api/v1/metrics`` answers
the snapshot as JSON, ``GET /metrics`` the same numbers in the Prometheus text format (:func:`exposition`).

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

Prometheus names are ``nydus_erofs_`` + the names below; each daemon has its own
:class:`~prometheus_client.CollectorRegistry` (:func:`registry`), never the global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from erofs.reader.backend import LATENCY_BUCKETS_MS

__all__ = ["CONTENT_TYPE", "PREFIX", "daemon_version", "exposition", "registry", "snapshot"]

PREFIX = "nydus_erofs_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
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


def _latency(family: HistogramMetricFamily, labels: list[str], stats: Mapping[str, Any]) -> None:
    buckets = []
    for ms in LATENCY_BUCKETS_MS:
        name = f"latency_le_{ms}ms" if ms < 1000 else f"latency_le_{ms // 1000}s"
        buckets.append((repr(ms / 1000.0), float(stats.get(name, 0))))
    buckets.append(("+Inf", float(stats.get("latency_count", 0))))
    family.add_metric(labels, buckets, float(stats.get("latency_sum_ms", 0.0)) / 1000.0)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families."""
    d = snap["daemon"]
    info = GaugeMetricFamily(PREFIX + "daemon_info", "The daemon: version and mode (always 1).",
                             labels=["version", "mode"])  # fmt: skip
    info.add_metric([str(d.get("version", "")), str(d.get("mode", ""))], 1)
    yield info
    yield GaugeMetricFamily(PREFIX + "daemon_uptime_seconds", "Seconds since the serving process started.",
                            value=float(d.get("uptime", 0)))  # fmt: skip
    yield GaugeMetricFamily(PREFIX + "daemon_restarts", "Times the worker was restarted.",
                            value=float(d.get("restarts") or 0))  # fmt: skip
    images = snap["images"]
    for key, text in BACKEND_COUNTERS.items():
        c = CounterMetricFamily(PREFIX + f"backend_{key}", text, labels=["image"])
        for image, m in images.items():
            c.add_metric([image], float(m["backend"].get(key, 0)))
        yield c
    lat = HistogramMetricFamily(PREFIX + "backend_latency_seconds", "Latency of backend reads (retries included).",
                                labels=["image"])  # fmt: skip
    for image, m in images.items():
        _latency(lat, [image], m["backend"])
    yield lat
    yield CounterMetricFamily(PREFIX + "cache_hits", "Reads answered from the cache without a fetch.",
                              value=float(snap["cache"]["hits"]))  # fmt: skip
    yield CounterMetricFamily(PREFIX + "cache_misses", "Reads that needed a fetch.",
                              value=float(snap["cache"]["misses"]))  # fmt: skip
    pipeline = snap["pipeline"]
    for key, name, text in PIPELINE_COUNTERS:
        yield CounterMetricFamily(PREFIX + name, text, value=float(pipeline.get(key, 0)))
    yield GaugeMetricFamily(PREFIX + "inflight_fetches", "Chunk fetches in flight (reads waiting on a backend).",
                            value=float(snap["inflight"]))  # fmt: skip
    for key, text in PREFETCH_GAUGES.items():
        g = GaugeMetricFamily(PREFIX + f"prefetch_{key}", text, labels=["image"])
        for image, m in images.items():
            if m.get("prefetch"):
                g.add_metric([image], float(m["prefetch"].get(key, 0)))
        yield g
    size = GaugeMetricFamily(PREFIX + "blob_size_bytes", "Uncompressed size of a blob.", labels=["blob", "image"])
    cached = GaugeMetricFamily(PREFIX + "blob_cached_bytes", "Bytes of a blob in the cache.", labels=["blob", "image"])
    for blob, b in snap["blobs"].items():
        size.add_metric([blob, str(b.get("image", ""))], float(b.get("size", 0)))
        if b.get("cached") is not None:
            cached.add_metric([blob, str(b.get("image", ""))], float(b["cached"]))
    yield size
    yield cached
    for key, name, text in PIPELINE_COUNTERS:
        c = CounterMetricFamily(PREFIX + f"blob_{name}", f"{text} (this blob)", labels=["blob", "image"])
        for blob, b in snap["blobs"].items():
            c.add_metric([blob, str(b.get("image", ""))], float(b["pipeline"].get(key, 0)))
        yield c


class _SnapshotCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return families(self.source())


def registry(source: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) collecting ``source()`` at each scrape."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_SnapshotCollector(source))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(reg)
