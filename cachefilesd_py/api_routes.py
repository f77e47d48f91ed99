"""The routes every daemon's API serves (:mod:`cachefilesd_py.api`), from what the daemon gives: its info, its
images, its metrics snapshot (:mod:`cachefilesd_py.metrics`, also served as Prometheus text) and its GC."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cachefilesd_py.api import Action, Route, Text

__all__ = ["routes"]


def routes(*, info: Callable[[], Mapping[str, Any]], images: Callable[[], Mapping[str, Any]],
           metrics_snapshot: Callable[[], Mapping[str, Any]],
           gc: Callable[[], Mapping[str, Any]]) -> tuple[dict[str, Route], dict[str, Action]]:  # fmt: skip
    """The routes every daemon serves (GET routes, POST actions): ``info`` must give ``version``, ``pid``,
    ``state``, ``uptime`` and ``mode``."""
    def prometheus() -> Text:
        from cachefilesd_py.prometheus import CONTENT_TYPE, exposition, registry  # (by the first scrape)

        return Text(CONTENT_TYPE, exposition(registry(metrics_snapshot)))

    def collect(body: bytes) -> Mapping[str, Any]:
        return gc()

    gets: dict[str, Route] = {"/api/v1/daemon": info, "/api/v1/images": images,
                              "/api/v1/metrics": metrics_snapshot, "/metrics": prometheus}  # fmt: skip
    return gets, {"/api/v1/gc": collect}
