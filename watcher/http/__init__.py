"""The watcher's own HTTP server: the control plane.

- ``app``      the Starlette app: tracking API, health, metrics, the Magic Hour webhook receiver
- ``openapi``  the OpenAPI document of that API
- ``server``   uvicorn inside the daemon's event loop, and the start-up checks of its settings
- ``client``   the control API's client, for ``watcher track --url`` and ``watcher status --url``

Signatures of webhooks (in and out) are in :mod:`watcher.webhooks`; the outgoing notifications
in :mod:`watcher.notify`.
"""

from __future__ import annotations

from watcher.http.app import create_app
from watcher.http.server import HttpServer, check_settings

__all__ = ["HttpServer", "check_settings", "create_app"]
