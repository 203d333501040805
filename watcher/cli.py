"""The ``watcher`` command: ``run``, ``track``, ``untrack``, ``status``, ``health``,
``simulate`` and ``demo``.

Exit codes: 0 success (a plain ``run`` stopped by SIGTERM/SIGINT included); 1 a project of this
run did not end as configured (``run --until-done``) or the command failed; 2 bad settings or
arguments, or a port in use (one line per problem, no traceback); 3 the API token was refused
(``run --until-done``); 130 a second signal ended the daemon at once; 141 stdout was closed
early (``watcher status | head``). ``daemon_stopped`` logs the code ``run`` exits with.

Signals of ``run``: SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP re-reads
the ``*_FILE`` secrets and keeps running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import structlog

from watcher import __version__, clock, logs
from watcher.errors import ConfigError, InvalidProjectId, WatcherError
from watcher.models import Kind, ProjectRef, State, parse_kind, parse_project_spec
from watcher.settings import Settings, configured, load_settings, unknown_variables
from watcher.store import (
    OutputRecord,
    ProjectRecord,
    Store,
    TrackResult,
    create_store,
    sqlite_path,
)
from watcher.table import render_status
from watcher.terminal import printable
from watcher.views import project_json
from watcher.wiring import build, run_daemon

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell shows for a tool cut off by `head`

log = structlog.get_logger("watcher")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand.

    Given the command line it will parse, the options of ``simulate`` are added only when that
    is the command: they come from the simulator, which no other command imports."""
    parser = argparse.ArgumentParser(
        prog="watcher",
        description="Track Magic Hour projects until they finish and save every output.",
        epilog="Settings come from WATCHER_* environment variables; see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument(
        "--until-done",
        action="store_true",
        help="exit once every tracked project is final; 0 if every project of this run "
        "(active at start, named in WATCHER_PROJECTS, tracked while it ran, or worked on) ended "
        "as configured",
    )
    run.add_argument(
        "--judge",
        choices=("run", "all"),
        default="run",
        help="with --until-done, whose end decides the exit code: this run's projects, or "
        "every project in the store (a fleet's finisher) (default: run)",
    )
    run.set_defaults(func=cmd_run)

    track = sub.add_parser(
        "track", help="track project ids (KIND:ID or ID); a not_found one is tracked again"
    )
    track.add_argument("ids", nargs="+", metavar="ID", help="ID or KIND:ID")
    track.add_argument("--kind", default="image", help="kind of bare ids: image, video, audio")
    track.add_argument(
        "--delete-after-download",
        choices=["true", "false"],
        help="override WATCHER_DELETE_AFTER_DOWNLOAD for these projects",
    )
    _add_url_argument(track)
    track.set_defaults(func=cmd_track)

    untrack = sub.add_parser(
        "untrack", help="stop tracking project ids (files stay; nothing is deleted remotely)"
    )
    untrack.add_argument("ids", nargs="+", metavar="ID", help="ID or KIND:ID")
    _add_url_argument(untrack)
    untrack.set_defaults(func=cmd_untrack)

    status = sub.add_parser("status", help="show tracked projects")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    status.add_argument("--state", help="only projects in this state")
    status.add_argument(
        "--limit", type=_positive_int, default=100, help="at most this many rows (100)"
    )
    status.add_argument("--wide", action="store_true", help="notes in full, not cut to fit")
    _add_url_argument(status)
    status.set_defaults(func=cmd_status)

    health = sub.add_parser(
        "health", help="exit 0 if this machine's daemon answers /healthz (container HEALTHCHECK)"
    )
    health.set_defaults(func=cmd_health)

    simulate = sub.add_parser("simulate", help="serve a local simulator of the Magic Hour API")
    if argv is None or _command_of(argv) == "simulate":
        from watcher.simulator import cli as simulator_cli  # noqa: PLC0415 - only to simulate

        simulator_cli.add_arguments(simulate)
        simulate.set_defaults(func=simulator_cli.run)

    demo = sub.add_parser("demo", help="try the watcher against the simulator, no setup needed")
    demo.add_argument("--dir", help="where to put the database and downloads (a new temp dir)")
    demo.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level
    options, ``--help`` and ``--version``, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="a running watcher's API, e.g. http://127.0.0.1:8080 (token: WATCHER_CONTROL_TOKEN);"
        " without it, the database of WATCHER_DATABASE_URL is used directly",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``watcher`` command."""
    logs.repair_standard_streams()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    code: int | None = None
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as an ignored exception
    except BrokenPipeError:
        # The reader went away (`watcher status | head -1`): what it wanted it has. Point
        # stdout at /dev/null so the interpreter's own flush at exit cannot fail again. The
        # daemon's own exit code stands: its log shipper dying is not how its work ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return code if code is not None and args.command == "run" else EXIT_BROKEN_PIPE
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"watcher: {printable(line)}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidProjectId as exc:
        print(f"watcher: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except WatcherError as exc:
        print(f"watcher: {printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    return code


def _settings() -> Settings:
    settings = load_settings()
    secrets = (
        settings.api_token,
        settings.control_token,
        settings.webhook_secret,
        settings.notify_secret,
    )
    for secret in secrets:
        logs.register_secret(secret.get_secret_value() if secret else None)
    return settings


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``watcher run``: the daemon, its HTTP server and its notifier."""
    settings = _settings()
    settings.require_token()
    # Each part is imported only when the settings use it (see the README's "Start-up").
    if settings.http_enabled:
        from watcher.http.server import check_settings  # noqa: PLC0415 - uvicorn only if served

        check_settings(settings)
    if settings.notify_url is not None:
        from watcher.notify import check_settings as check_notify  # noqa: PLC0415 - if used

        check_notify(settings)
    logs.configure(settings.log_level, settings.log_format)
    for name in unknown_variables():
        log.warning("unknown_setting", variable=name, hint="not a WATCHER_* setting; a typo?")
    daemon = build(
        settings,
        until_done=args.until_done,
        judge_all=args.judge == "all",
        serve=True,
        notify_out=True,
    )
    return asyncio.run(run_daemon(daemon)).exit_code


# --- health ----------------------------------------------------------------------------------

HEALTH_TIMEOUT = 3.0


def cmd_health(_args: argparse.Namespace) -> int:
    """``watcher health``: ask the daemon of these settings for ``/healthz``; 0 if it answers.

    The container's HEALTHCHECK: it asks the address the daemon listens on (loopback when that is
    every interface), and passes when the HTTP server is switched off, since then there is
    nothing to ask and the process supervisor is the only judge.
    """
    settings = _settings()
    if not settings.http_enabled:
        print("the HTTP server is off (WATCHER_HTTP_ENABLED=false): nothing to check")
        return 0
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104 - compared
        settings.http_host, settings.http_host
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.http_port}/healthz"
    try:
        response = httpx.get(url, timeout=HEALTH_TIMEOUT)
    except httpx.HTTPError as exc:
        print(f"watcher: health: {url} did not answer ({type(exc).__name__})", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"watcher: health: {url} answered HTTP {response.status_code}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


# --- track and status ------------------------------------------------------------------------


def cmd_track(args: argparse.Namespace) -> int:
    """``watcher track``: add ids through a running daemon's API (``--url``), or to the store
    directly (a running daemon picks them up)."""
    settings = _settings()
    refs = _parse_refs(args.ids, parse_kind(args.kind))
    override = None if args.delete_after_download is None else args.delete_after_download == "true"
    if args.url:
        from watcher.http.client import ControlClient  # noqa: PLC0415 - keep start-up light

        with ControlClient(args.url, configured(settings.control_token)) as client:
            for ref in refs:
                created, _ = client.track(ref, delete_after_download=override)
                print(f"{'tracked' if created else 'already tracked'} {ref.id}")
        return 0
    delete = settings.delete_after_download if override is None else override
    result, conflicts = asyncio.run(_track_in_store(settings, refs, delete=delete))
    for pid in result.added:
        print(f"tracked {pid}")
    for pid in result.revived:
        print(f"tracked {pid} again (it was not_found)")
    for pid in result.existing:
        if pid not in conflicts and pid not in result.revived:
            print(f"already tracked {pid}")
    for message in conflicts.values():
        print(f"watcher: track: {printable(message)}", file=sys.stderr)
    return EXIT_FAILED if conflicts else 0


def _parse_refs(raw_ids: list[str], kind: Kind) -> list[ProjectRef]:
    """Every id parsed, or one error naming every bad one (not only the first)."""
    refs, bad = [], []
    for raw in raw_ids:
        try:
            refs.append(parse_project_spec(raw, kind))
        except InvalidProjectId as exc:
            bad.append(str(exc))
    if bad:
        raise ConfigError("\n".join(bad))
    return refs


async def _track_in_store(
    settings: Settings, refs: list[ProjectRef], *, delete: bool
) -> tuple[TrackResult, dict[str, str]]:
    """Track ``refs``, reviving those that ended ``not_found``: what the store did, and
    {id: message} for those tracked as another kind."""
    async with create_store(settings.database_url) as store:
        now = clock.now()
        result = await store.track(refs, now=now, delete_after_download=delete)
        wanted = {r.id: r.kind for r in refs}
        if result.existing:
            again = [r for r in refs if r.id in set(result.existing)]
            result.revived = await store.revive(again, now=now, delete_after_download=delete)
        conflicts = {}
        for pid in result.existing:
            record = await store.get(pid)
            if record is not None and record.kind != wanted[pid]:
                conflicts[pid] = (
                    f"{pid} is already tracked as {record.kind.value}, "
                    f"not {wanted[pid].value}; untrack it first to change its kind"
                )
        return result, conflicts


def cmd_untrack(args: argparse.Namespace) -> int:
    """``watcher untrack``: forget ids, through a running daemon's API (``--url``) or in the
    store. Saved files stay; nothing is deleted at Magic Hour."""
    settings = _settings()
    ids = [ref.id for ref in _parse_refs(args.ids, Kind.IMAGE)]
    if args.url:
        from watcher.http.client import ControlClient  # noqa: PLC0415 - keep start-up light

        with ControlClient(args.url, configured(settings.control_token)) as client:
            gone = {pid: client.untrack(pid) for pid in ids}
    else:
        _require_database(settings.database_url)
        gone = asyncio.run(_untrack_in_store(settings, ids))
    for pid, was_tracked in gone.items():
        if was_tracked:
            print(f"untracked {pid}")
        else:
            print(f"watcher: untrack: {pid} is not tracked", file=sys.stderr)
    return 0 if all(gone.values()) else EXIT_FAILED


async def _untrack_in_store(settings: Settings, ids: list[str]) -> dict[str, bool]:
    async with create_store(settings.database_url) as store:
        return {pid: await store.untrack(pid) for pid in ids}


async def _collect(
    store: Store, state: State | None, limit: int
) -> tuple[dict[State, int], list[tuple[ProjectRecord, list[OutputRecord]]]]:
    counts = await store.count_by_state()
    page = await store.list_projects(state=state, limit=limit)
    outputs = await store.outputs_of([p.id for p in page.projects])
    rows = [(p, outputs[p.id]) for p in page.projects]
    return counts, rows


def cmd_status(args: argparse.Namespace) -> int:
    """``watcher status``: a table (or JSON) of tracked projects, from a running daemon's API
    (``--url``) or from the store."""
    settings = _settings()
    if args.state:
        try:
            State(args.state)
        except ValueError:
            names = ", ".join(s.value for s in State)
            raise ConfigError(f"--state: unknown state {args.state!r}: one of {names}") from None
    if args.url:
        from watcher.http.client import ControlClient  # noqa: PLC0415 - keep start-up light

        with ControlClient(args.url, configured(settings.control_token)) as client:
            doc = client.status(state=args.state, limit=args.limit)
    else:
        state = State(args.state) if args.state else None
        _require_database(settings.database_url)

        async def work() -> tuple[dict[State, int], list[tuple[ProjectRecord, list[OutputRecord]]]]:
            async with create_store(settings.database_url) as store:
                return await _collect(store, state, args.limit)

        counts, rows = asyncio.run(work())
        doc = {
            "counts": {s.value: n for s, n in sorted(counts.items())},
            "projects": [
                project_json(p, o, settings.download_dir, settings.storage) for p, o in rows
            ],
        }
    text = (
        json.dumps(doc, indent=2) if args.json else render_status(doc, args.state, wide=args.wide)
    )
    print(text)
    return 0


def _require_database(url: str) -> None:
    """Refuse to look at a SQLite database that does not exist: opening it would create it (and
    its folder), and an empty table would hide a wrong ``WATCHER_DATABASE_URL``."""
    if url.startswith("sqlite:") and not Path(sqlite_path(url)).exists():
        raise WatcherError(
            f"status: no database at {sqlite_path(url)} (WATCHER_DATABASE_URL): "
            "nothing has been tracked there"
        )


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``watcher demo``: simulator + daemon + a report of where the files are."""
    from watcher.demo import run_demo  # noqa: PLC0415 - only the demo needs the simulator

    return run_demo(directory=args.dir, seed=args.seed)
