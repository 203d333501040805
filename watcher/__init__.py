"""The watcher: tracks Magic Hour projects until they finish and saves every output.

Package map (one module per responsibility):

- ``settings``     configuration from ``WATCHER_*`` environment variables
- ``logs``         structlog set-up and secret redaction
- ``models``       project kinds, ids, states and the API's project snapshot
- ``errors``       the exception hierarchy
- ``clock``        the one place that reads the clock
- ``backoff``      pure decisions: when to poll next
- ``api``          the Magic Hour API client (retries, rate-limit gate)
- ``paths``        where an output is saved, safely inside the download directory
- ``downloader``   streaming, verified, resumable downloads
- ``store``        the durable state behind one interface (memory, SQLite)
- ``daemon``       the wiring: poll, download and delete loops, shutdown
- ``http``         the control plane: tracking API, health, metrics, webhook receiver (uvicorn)
- ``webhooks``     signing and verifying webhook events, both ways
- ``notify``       delivering the notification outbox to ``WATCHER_NOTIFY_URL``
- ``simulator``    a local Magic Hour API for demos and tests
- ``cli``          the ``watcher`` command
"""

from __future__ import annotations

__version__ = "0.1.0"
