"""The wiring: one function that builds the running service from its settings.

:func:`build` makes every object once and hands each what it needs: the store, the shared
``httpx.AsyncClient`` (:mod:`watcher.transport`), the API client and its throttle, the
downloader, the metrics, API health
(:mod:`watcher.health`), store health (:mod:`watcher.outage`), the workflow, the dispatcher and
the daemon around them, and on request the HTTP server and the notifier as side tasks. The CLI,
the demo and the tests call it; nothing below reaches up to it. :func:`run_daemon` runs a built
daemon with the process's signals wired to it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import sys
from collections.abc import Callable

import httpx
import structlog

from watcher import __version__, clock, logs
from watcher.announcements import Announcements
from watcher.api import USER_AGENT, MagicHourClient
from watcher.backoff import PollPolicy
from watcher.daemon import EXIT_SECOND_SIGNAL, Daemon, Outcome
from watcher.dispatcher import Dispatcher
from watcher.downloader import Downloader
from watcher.health import ApiHealth
from watcher.liveness import LivenessKeeper
from watcher.metrics import Metrics
from watcher.objects import Uploader, open_bucket
from watcher.objects.bucket import SECRET_VARIABLES
from watcher.outage import StoreHealth
from watcher.priority import PriorityGate
from watcher.receive import TransferLimits
from watcher.schedule import RenderStats
from watcher.settings import Settings
from watcher.store import Store, create_store
from watcher.throttle import SharedBudget, Throttle
from watcher.transport import http_client
from watcher.workflow import Workflow, WorkflowLimits

log = structlog.get_logger("watcher")


def build(
    settings: Settings,
    store: Store | None = None,
    *,
    until_done: bool = False,
    judge_all: bool = False,
    serve: bool = False,
    notify_out: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    metrics: Metrics | None = None,
    limits: WorkflowLimits | None = None,
    now: Callable[[], float] = clock.now,
) -> Daemon:
    """The daemon of ``settings``, ready to :meth:`~watcher.daemon.Daemon.run`.

    ``store`` defaults to the one ``WATCHER_DATABASE_URL`` names; ``serve`` binds the HTTP
    server (if ``WATCHER_HTTP_ENABLED``) now, so a busy port is a :class:`ConfigError` before
    anything starts; ``notify_out`` delivers the outbox (if ``WATCHER_NOTIFY_URL``).
    ``transport``, ``rng``, ``metrics``, ``limits`` and ``now`` are for tests."""
    token = settings.require_token()
    if store is None:
        store = create_store(settings.database_url, exclusive=True, timeout=settings.store_timeout)
    rng = rng or random.Random()
    metrics = metrics or Metrics()
    stopping = asyncio.Event()
    store_health = StoreHealth(
        initial=settings.store_retry_initial, maximum=settings.store_retry_max, rng=rng
    )
    http = http_client(settings, transport)
    # The replica is named in every request, so the far side (and the fleet test) can tell
    # which process did what.
    user_agent = f"{USER_AGENT}/{__version__} (replica {settings.replica_id})"
    shared = fleet_budget(store, store_health, settings) if store.shares_rate_budget else None
    throttle = Throttle(
        rate=settings.max_requests_per_second,
        concurrency=settings.max_concurrent_requests,
        shared=shared,
    )
    health = ApiHealth(settings, until_done=until_done, metrics=metrics, now=now, throttle=throttle)
    api = MagicHourClient(
        http,
        base_url=str(settings.api_base_url),
        token=token,
        throttle=throttle,
        on_retry=health.on_retry,
        metrics=metrics,
        user_agent=user_agent,
        reload_token=health.token_after_401,
    )
    health.set_token = api.set_token
    announcements = Announcements(
        fallback_poll=settings.webhook_fallback_poll, keep_seconds=settings.lease_seconds, now=now
    )
    dispatcher = Dispatcher(
        store=store,
        health=health,
        store_health=store_health,
        owner=settings.replica_id,
        lease_seconds=settings.lease_seconds,
        max_in_flight=max_in_flight(settings),
        claim_interval=settings.claim_interval,
        stopping=stopping,
        until_done=until_done,
        metrics=metrics,
        announcements=announcements,
        now=now,
    )
    render_stats = RenderStats()
    workflow = Workflow(
        store=store,
        api=api,
        downloader=Downloader(
            http,
            user_agent=user_agent,
            limits=transfer_limits(settings),
            on_bytes=metrics.download_bytes.inc,
        ),
        health=health,
        store_health=store_health,
        policy=PollPolicy(settings.poll_initial, settings.poll_max),
        limits=limits or WorkflowLimits(),
        lease_seconds=settings.lease_seconds,
        download_dir=settings.download_dir,
        stopping=stopping,
        on_store_failed=dispatcher.store_failed,
        metrics=metrics,
        render_stats=render_stats,
        download_gate=PriorityGate(settings.max_concurrent_downloads),
        notify=settings.notify_url is not None,
        announcements=announcements,
        uploader=uploader(settings, http, user_agent, metrics),
        now=now,
        rng=rng,
    )
    dispatcher.workflow = workflow
    health.on_release = dispatcher.release_held
    daemon = Daemon(
        dispatcher=dispatcher,
        workflow=workflow,
        http=http,
        render_stats=render_stats,
        rate_paused=lambda: throttle.paused_for,
        judge_all=judge_all,
    )
    dispatcher.on_done = daemon.request_stop
    keep_alive(daemon, settings, rng=rng, metrics=metrics)
    if serve and settings.http_enabled:
        from watcher.http.server import HttpServer  # noqa: PLC0415 - uvicorn only if served

        server = HttpServer.bind(settings.http_host, settings.http_port)
        daemon.side_tasks.append(functools.partial(server.run, daemon, store, metrics))
        daemon.closers.append(server.close)
    if notify_out and settings.notify_url is not None:
        from watcher.notify import Notifier  # noqa: PLC0415 - only a notifying run loads it

        notifier = Notifier.from_settings(settings)
        if notifier is not None:
            daemon.side_tasks.append(functools.partial(notifier.run, daemon, store, metrics))
    return daemon


def uploader(
    settings: Settings, http: httpx.AsyncClient, user_agent: str, metrics: Metrics
) -> Uploader | None:
    """The uploader into ``WATCHER_STORAGE_URL``'s bucket (``None``: outputs go to disk)."""
    location = settings.storage
    if location is None:
        return None
    for name in SECRET_VARIABLES:  # a last line of defence: never in a log line
        logs.register_secret(os.environ.get(name))
    bucket = open_bucket(
        location, allow_http=settings.storage_allow_http, timeout=settings.request_timeout
    )
    return Uploader(http, bucket, user_agent, transfer_limits(settings), metrics.upload_bytes.inc)


def keep_alive(daemon: Daemon, settings: Settings, *, rng: random.Random, metrics: Metrics) -> None:
    """On a store shared by replicas: this replica's liveness session (its proof of life, and
    its ear for the others' wake-ups) and the search for dead replicas, as side tasks; the
    dispatcher claims only while the session is held (see :mod:`watcher.liveness`)."""
    session = daemon.store.liveness(settings.replica_id)
    if session is None:  # one process works on this store: alive while it runs
        metrics.liveness_held.set(1)
        return
    dispatcher = daemon.dispatcher
    keeper = LivenessKeeper(
        session,
        store=daemon.store,
        on_due=dispatcher.wake,
        on_lost=dispatcher.stop_all_work,
        on_back=dispatcher.carry_on,
        store_down=lambda: daemon.store_health.down,
        stopping=dispatcher.stopping,
        retry_initial=settings.store_retry_initial,
        retry_max=settings.store_retry_max,
        rng=rng,
        metrics=metrics,
    )
    dispatcher.proven = lambda: keeper.proven
    daemon.liveness = keeper
    daemon.side_tasks += [keeper.run, keeper.find_dead]


def max_in_flight(settings: Settings) -> int:
    """How many projects one replica works on at once (most of them waiting on a slot)."""
    return max(16, 4 * settings.max_concurrent_requests) + 2 * settings.max_concurrent_downloads


def transfer_limits(settings: Settings) -> TransferLimits:
    """The bounds on one transfer (``WATCHER_DOWNLOAD_*``)."""
    s = settings
    return TransferLimits(
        min_rate=s.download_min_rate,
        rate_window=s.download_rate_window,
        max_seconds=s.download_max_seconds,
        progress_seconds=s.download_progress_seconds,
    )


def fleet_budget(store: Store, store_health: StoreHealth, settings: Settings) -> SharedBudget:
    """The fleet's shared request budget, taken from the store (a shared PostgreSQL)."""

    async def take(want: int) -> int:
        if store_health.down:  # no wait on a store that does not answer: our own limit holds
            return want
        rate = settings.max_requests_per_second
        return await store.take_rate_tokens(
            now=clock.now(), rate=rate, burst=max(1.0, rate), want=want
        )

    return take


async def run_daemon(daemon: Daemon) -> Outcome:
    """Run ``daemon`` with SIGTERM/SIGINT wired to a graceful stop (a second one exits at once)
    and SIGHUP to re-reading the ``*_FILE`` secrets (the daemon keeps running)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if daemon.stopping:
            log.warning("shutdown_forced", signal=signal.Signals(signum).name)
            sys.stdout.flush()
            os._exit(EXIT_SECOND_SIGNAL)
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.request_stop()

    def on_hangup() -> None:
        log.info("signal_received", signal="SIGHUP")
        daemon.reload_secrets("SIGHUP")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        return await daemon.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
