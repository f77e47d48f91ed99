"""A daemon's metrics snapshot (:mod:`cachefilesd_py.metrics`) in the Prometheus text format, for ``GET /metrics``.

Prometheus names are ``nydus_erofs_`` + the snapshot's names; each scrape collects the snapshot into a
:class:`~prometheus_client.CollectorRegistry` of its own (:func:`registry`), never the global one.  Only this
module imports prometheus_client, and only the first scrape imports this module (:mod:`cachefilesd_py.api_routes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from erofs.reader.backend import LATENCY_BUCKETS_MS

from .metrics import BACKEND_COUNTERS, PIPELINE_COUNTERS, PREFETCH_GAUGES, Snapshot

__all__ = ["CONTENT_TYPE", "PREFIX", "exposition", "families", "registry"]

PREFIX = "nydus_erofs_"
CONTENT_TYPE = CONTENT_TYPE_LATEST


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
