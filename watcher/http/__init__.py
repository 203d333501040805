"""The watcher's own HTTP server: the control plane.

- ``app``      the Starlette app: tracking API, health, metrics, the Magic Hour webhook receiver
- ``openapi``  the OpenAPI document of that API
- ``server``   uvicorn inside the daemon's event loop, and the start-up checks of its settings
- ``client``   the control API's client, for ``watcher track --url`` and ``watcher status --url``

Signatures of webhooks (in and out) are in :mod:`watcher.webhooks`; the outgoing notifications
in :mod:`watcher.notify`.

The package itself imports nothing: ``watcher track --url`` loads the client without Starlette,
and a daemon with ``WATCHER_HTTP_ENABLED=false`` loads neither Starlette nor uvicorn. Import
from the modules (``watcher.http.server.HttpServer``, ``watcher.http.app.create_app``).
"""
