"""A client of a running watcher's control API, for ``watcher track --url``,
``watcher untrack --url`` and ``watcher status --url``.

It speaks the API of :mod:`watcher.http.app` and turns every failure (unreachable, token
refused, an error answer) into :class:`ControlApiError` with a message fit for a terminal. It
does not decide how results are printed; the CLI does.
"""

from __future__ import annotations

from typing import Any, Self

import httpx

from watcher import __version__
from watcher.errors import WatcherError
from watcher.models import ProjectRef

PAGE = 1000


class ControlApiError(WatcherError):
    """The watcher's API could not be reached, or refused the request."""


class ControlClient:
    """Synchronous client of ``/v1/projects``; use as a context manager."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"user-agent": f"watcher-cli/{__version__}"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        expect: tuple[int, ...],
        body: dict[str, Any] | None = None,
        params: dict[str, str | int] | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise ControlApiError(
                f"cannot reach the watcher's API at {self.url}: {exc or type(exc).__name__}"
            ) from None
        if response.status_code in expect:
            return response
        if response.status_code == 401:
            raise ControlApiError(
                f"the watcher at {self.url} refused the control token: set "
                "WATCHER_CONTROL_TOKEN to the daemon's value"
            )
        try:
            message = str(response.json()["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        raise ControlApiError(f"HTTP {response.status_code} from {self.url}: {message}")

    def track(
        self, ref: ProjectRef, *, delete_after_download: bool | None = None
    ) -> tuple[bool, dict[str, Any]]:
        """Track ``ref``; returns (whether it is new, the project as JSON)."""
        body: dict[str, Any] = {"id": ref.id, "kind": ref.kind.value}
        if delete_after_download is not None:
            body["delete_after_download"] = delete_after_download
        response = self._request("POST", "/v1/projects", body=body, expect=(200, 201))
        project: dict[str, Any] = response.json()
        return response.status_code == 201, project

    def untrack(self, project_id: str) -> bool:
        """Stop tracking ``project_id``; False if it was not tracked."""
        response = self._request("DELETE", f"/v1/projects/{project_id}", expect=(204, 404))
        if response.status_code == 204:
            return True
        try:
            not_tracked = response.json().get("error") == "not_tracked"
        except (ValueError, AttributeError):
            not_tracked = False
        if not not_tracked:  # a 404 from something that is not a watcher's API
            raise ControlApiError(f"HTTP 404 from {self.url}: is this a watcher's API?")
        return False

    def status(self, *, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        """``{"counts": …, "projects": […]}``: at most ``limit`` projects, in id order."""
        projects: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        cursor: str | None = None
        while len(projects) < limit:
            params: dict[str, str | int] = {"limit": min(PAGE, limit - len(projects))}
            if state:
                params["status"] = state
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/projects", params=params, expect=(200,)).json()
            projects.extend(page["projects"])
            counts = page["counts"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return {"counts": counts, "projects": projects[:limit]}
