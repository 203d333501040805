"""Prometheus metrics of one daemon, in a registry of its own (so tests can run several).

Every metric is listed in the README. Gauges of projects by state are read from the store at
scrape time by the HTTP server; the rest are counted here as things happen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
_LIFETIME = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.polls = Counter(
            "watcher_polls", "GETs of a project's status, by kind.", ["kind"], registry=r
        )
        self.api_responses = Counter(
            "watcher_api_responses",
            "Answers of the Magic Hour API by method and HTTP status (or 'network').",
            ["method", "code"],
            registry=r,
        )
        self.retries = Counter(
            "watcher_retries",
            "Retries of API calls and downloads, by cause.",
            ["cause"],
            registry=r,
        )
        self.rate_limit_pauses = Counter(
            "watcher_rate_limit_pauses", "Client-wide pauses after a 429.", registry=r
        )
        self.rate_limit_paused = Gauge(
            "watcher_rate_limit_paused_seconds", "Seconds left in the current pause.", registry=r
        )
        self.downloads = Counter(
            "watcher_downloads", "Output downloads by result.", ["result"], registry=r
        )
        self.download_bytes = Counter(
            "watcher_download_bytes", "Bytes written to outputs.", registry=r
        )
        self.download_seconds = Histogram(
            "watcher_download_seconds", "Time to download one output.", buckets=_SECONDS, registry=r
        )
        self.time_to_terminal = Histogram(
            "watcher_time_to_terminal_seconds",
            "From tracking a project to seeing it terminal.",
            buckets=_SECONDS,
            registry=r,
        )
        self.url_lifetime_left = Histogram(
            "watcher_url_lifetime_left_seconds",
            "Seconds the signed URL still had to live when its download finished.",
            buckets=_LIFETIME,
            registry=r,
        )
        self.deletes = Counter(
            "watcher_deletes", "DELETEs of projects by result.", ["result"], registry=r
        )
        self.finished = Counter(
            "watcher_projects_finished",
            "Projects that reached a final state.",
            ["state"],
            registry=r,
        )
        self.projects = Gauge(
            "watcher_projects", "Tracked projects by state.", ["state"], registry=r
        )
        self.in_flight = Gauge(
            "watcher_work_in_flight", "Projects being polled, downloaded or deleted.", registry=r
        )
        self.webhooks = Counter(
            "watcher_webhooks",
            "Magic Hour webhook deliveries by result: expedited, tracked, ignored, invalid, "
            "rejected.",
            ["result"],
            registry=r,
        )
        self.notifications = Counter(
            "watcher_notifications",
            "Deliveries to WATCHER_NOTIFY_URL by result: sent, failed.",
            ["result"],
            registry=r,
        )
        self.http_requests = Counter(
            "watcher_http_requests",
            "Requests to the watcher's own HTTP server by route and status code.",
            ["route", "code"],
            registry=r,
        )
