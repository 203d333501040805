"""Delivering the simulator's webhook events: signed POSTs from a thread of their own.

This module owns :class:`WebhookSender`. The :class:`~watcher.simulator.state.Simulator` plans
the events and builds their bodies (``{"type": "<kind>.<event>", "payload": <the project
object>}``, as the webhook OpenAPI document describes); the sender signs each body the way
Magic Hour does (:func:`watcher.webhooks.signed_headers`), POSTs it to ``webhook_url``, logs it
as a ``webhook`` event, and hands a failed delivery (no answer, or not 2xx) back to be retried
with backoff. Deliveries go one at a time, in the order they fell due.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import httpx

from watcher.simulator.state import Event, Simulator
from watcher.webhooks import signed_headers

if TYPE_CHECKING:
    from watcher.simulator.state import PendingWebhook

TICK = 0.01  # the longest wait before looking for due events again
TIMEOUT = 10.0  # Magic Hour's: a receiver must answer within 10 s


class WebhookSender:
    """Delivers the simulator's due webhook events until stopped (a daemon thread)."""

    def __init__(self, simulator: Simulator, base_url: str) -> None:
        config = simulator.config
        if config.webhook_url is None or not config.webhook_secret:
            raise ValueError("the simulator has no webhook_url and webhook_secret")
        self._sim = simulator
        self._base_url = base_url
        self._url = config.webhook_url
        self._secret = config.webhook_secret
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulator-webhooks", daemon=True)

    def start(self) -> None:
        """Start delivering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering (an event being delivered gets its answer first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT + 1.0)

    def _run(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                for hook in self._sim.due_webhooks(self._base_url):
                    if self._stop.is_set():
                        return
                    self._deliver(client, hook)
                due = self._sim.next_webhook_at()
                wait = TICK if due is None else min(TICK, max(0.0, due - self._sim.now()))
                self._stop.wait(wait)

    def _deliver(self, client: httpx.Client, hook: PendingWebhook) -> None:
        body = json.dumps(hook.body).encode()
        headers = signed_headers(self._secret, body, now=self._sim.now())
        headers["content-type"] = "application/json"
        status: int | None
        try:
            status = client.post(self._url, content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = None
        self._sim.record(Event("POST", "webhook", self._url, status, project_id=hook.project_id))
        if status is None or not 200 <= status < 300:
            self._sim.webhook_failed(hook)
