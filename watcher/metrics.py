"""Prometheus metrics of one daemon, in a registry of its own (so tests can run several).

Every metric is listed in the README. The registry also holds prometheus-client's standard
``process_*`` and ``python_*`` collectors and ``watcher_build_info``.

Gauges of projects by state are read from the store at scrape time by the HTTP server. On a
shared store (PostgreSQL) every replica reads the same rows, so those gauges describe the whole
fleet: they carry ``scope="fleet"`` and only one replica at a time reports them (the store's
:meth:`~watcher.store.Store.reports_fleet_gauges` decides), so ``sum`` and ``max`` over replicas
both give the fleet's count. Every other metric is this process's own and sums across replicas.
The rest are counted here as things happen.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from watcher import __version__

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
HOUR = 3600
# Signed URLs live 24 h: seconds to an hour tell a download that nearly missed its expiry, the
# fine steps on either side of 24 h tell "saved within a minute" from "saved an hour late" (a
# fresh URL can show a little more than 24 h: its expiry is rounded, the clocks differ), and the
# coarse buckets past that catch a longer lifetime.
LIFETIME_BUCKETS = (
    10,
    60,
    300,
    900,
    HOUR,
    3 * HOUR,
    6 * HOUR,
    12 * HOUR,
    18 * HOUR,
    22 * HOUR,
    23 * HOUR,
    23.5 * HOUR,
    23.75 * HOUR,
    24 * HOUR - 300,
    24 * HOUR - 60,
    24 * HOUR,
    24 * HOUR + 60,
    24 * HOUR + 300,
    25 * HOUR,
    48 * HOUR,
)
# The label value of gauges that describe every replica's shared store, not this process.
FLEET = "fleet"

_M = TypeVar("_M", bound=MetricWrapperBase)


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        counter = functools.partial(Counter, registry=r)
        gauge = functools.partial(Gauge, registry=r)
        histogram = functools.partial(Histogram, registry=r)
        _standard_collectors(r)
        self.build_info = gauge(
            "watcher_build_info", "Always 1; the watcher's version.", ["version"]
        )
        self.build_info.labels(__version__).set(1)
        self.polls = counter("watcher_polls", "GETs of a project's status, by kind.", ["kind"])
        self.api_responses = counter(
            "watcher_api_responses",
            "Answers of the Magic Hour API by method and HTTP status (or 'network').",
            ["method", "code"],
        )
        self.retries = counter(
            "watcher_retries",
            "Retries of API calls and downloads, by cause.",
            ["cause"],
        )
        self.rate_limit_pauses = counter(
            "watcher_rate_limit_pauses", "Client-wide pauses after a 429."
        )
        self.rate_limit_paused = gauge(
            "watcher_rate_limit_paused_seconds", "Seconds left in the current pause."
        )
        self.downloads = counter("watcher_downloads", "Output downloads by result.", ["result"])
        self.download_bytes = counter("watcher_download_bytes", "Bytes written to outputs.")
        self.upload_bytes = counter(
            "watcher_upload_bytes",
            "Bytes sent to object storage (WATCHER_STORAGE_URL): each output's bytes into its "
            "temporary object, and again into its final object.",
        )
        self.download_seconds = histogram(
            "watcher_download_seconds", "Time to download one output.", buckets=_SECONDS
        )
        self.time_to_terminal = histogram(
            "watcher_time_to_terminal_seconds",
            "From tracking a project to seeing it terminal.",
            buckets=_SECONDS,
        )
        self.url_lifetime_left = histogram(
            "watcher_url_lifetime_left_seconds",
            "Seconds the signed URL still had to live when its download finished.",
            buckets=LIFETIME_BUCKETS,
        )
        self.deletes = counter("watcher_deletes", "DELETEs of projects by result.", ["result"])
        self.finished = counter(
            "watcher_projects_finished",
            "Projects that reached a final state.",
            ["state"],
        )
        self.projects = gauge(
            "watcher_projects",
            "Tracked projects by state in the whole fleet's store, reported by one replica "
            "at a time.",
            ["state", "scope"],
        )
        self.api_refused = gauge(
            "watcher_api_refused",
            "1 while the Magic Hour API refuses this replica's requests, by reason: "
            "unauthorized (401), payment_required (402).",
            ["reason"],
        )
        self.in_flight = gauge(
            "watcher_work_in_flight", "Projects being polled, downloaded or deleted."
        )
        self.liveness_held = gauge(
            "watcher_liveness_held",
            "1 while this replica holds its liveness session on the shared store (it claims "
            "work only then); always 1 on SQLite, which one process works on.",
        )
        self.leases_taken_over = counter(
            "watcher_leases_taken_over",
            "Leases of replicas found dead (their liveness session ended) that this replica "
            "made due at once, for the fleet to take over.",
        )
        self.webhooks = counter(
            "watcher_webhooks",
            "Magic Hour webhook deliveries by result: announced, expedited, tracked, ignored, "
            "invalid, rejected.",
            ["result"],
        )
        self.webhook_payloads = counter(
            "watcher_webhook_payloads",
            "Webhook payloads a project was acted on with instead of a GET, by kind.",
            ["kind"],
        )
        self.notifications = counter(
            "watcher_notifications",
            "Deliveries to WATCHER_NOTIFY_URL by result: sent, failed.",
            ["result"],
        )
        self.http_requests = counter(
            "watcher_http_requests",
            "Requests to the watcher's own HTTP server by route and status code.",
            ["route", "code"],
        )
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, looked up once: prometheus-client builds its key and
        takes a lock on every call of ``labels``, and a poll counts itself (issue 11)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]  # labels() gives a child of metric's class


def _standard_collectors(registry: CollectorRegistry) -> None:
    """prometheus-client's process, platform and garbage-collector series, in ``registry``
    (the library registers them only in its default registry, which the watcher does not use)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
