"""The ``watcher`` command: ``run``, ``track``, ``status``, ``simulate`` and ``demo``.

Exit codes: 0 success; 1 a project did not end as configured (``run --until-done``) or the
command failed; 2 bad settings or arguments (one line per problem, no traceback); 3 the API token
was refused (``run --until-done``); 130 a second signal ended the daemon at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence

import structlog

from watcher import __version__, clock, logs
from watcher.daemon import Daemon, Outcome
from watcher.errors import ConfigError, InvalidProjectId, WatcherError
from watcher.models import State, parse_kind, parse_project_spec
from watcher.settings import Settings, load_settings, unknown_variables
from watcher.store import OutputRecord, ProjectRecord, Store, create_store
from watcher.views import project_json

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_SECOND_SIGNAL = 130

log = structlog.get_logger("watcher")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
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
        help="exit once every tracked project is final (0 if all went as configured)",
    )
    run.set_defaults(func=cmd_run)

    track = sub.add_parser("track", help="track project ids (KIND:ID or ID)")
    track.add_argument("ids", nargs="+", metavar="ID", help="ID or KIND:ID")
    track.add_argument("--kind", default="image", help="kind of bare ids: image, video, audio")
    track.add_argument(
        "--delete-after-download",
        choices=["true", "false"],
        help="override WATCHER_DELETE_AFTER_DOWNLOAD for these projects",
    )
    track.set_defaults(func=cmd_track)

    status = sub.add_parser("status", help="show tracked projects")
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")
    status.add_argument("--state", help="only projects in this state")
    status.add_argument("--limit", type=int, default=100, help="at most this many rows (100)")
    status.set_defaults(func=cmd_status)

    from watcher.simulator import cli as simulator_cli  # noqa: PLC0415 - keep start-up light

    simulate = sub.add_parser("simulate", help="serve a local simulator of the Magic Hour API")
    simulator_cli.add_arguments(simulate)
    simulate.set_defaults(func=simulator_cli.run)

    demo = sub.add_parser("demo", help="try the watcher against the simulator, no setup needed")
    demo.add_argument("--dir", help="where to put the database and downloads (a new temp dir)")
    demo.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``watcher`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"watcher: {line}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidProjectId as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WatcherError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def _settings() -> Settings:
    settings = load_settings()
    for secret in (settings.api_token, settings.control_token):
        logs.register_secret(secret.get_secret_value() if secret else None)
    return settings


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``watcher run``."""
    settings = _settings()
    settings.require_token()
    logs.configure(settings.log_level, settings.log_format)
    for name in unknown_variables():
        log.warning("unknown_setting", variable=name, hint="not a WATCHER_* setting; a typo?")
    store = create_store(settings.database_url, exclusive=True)
    outcome = asyncio.run(run_daemon(Daemon(settings, store, until_done=args.until_done)))
    return outcome.exit_code if args.until_done else 0


async def run_daemon(daemon: Daemon) -> Outcome:
    """Run ``daemon`` with SIGTERM/SIGINT wired to a graceful stop (a second one exits at once)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if daemon.stopping:
            log.warning("shutdown_forced", signal=signal.Signals(signum).name)
            sys.stdout.flush()
            os._exit(EXIT_SECOND_SIGNAL)
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await daemon.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


# --- track and status ------------------------------------------------------------------------


def cmd_track(args: argparse.Namespace) -> int:
    """``watcher track``: add ids to the store directly (a running daemon picks them up)."""
    settings = _settings()
    kind = parse_kind(args.kind)
    refs = [parse_project_spec(raw, kind) for raw in args.ids]
    delete = (
        settings.delete_after_download
        if args.delete_after_download is None
        else args.delete_after_download == "true"
    )

    async def work() -> tuple[list[str], list[str]]:
        async with create_store(settings.database_url) as store:
            result = await store.track(refs, now=clock.now(), delete_after_download=delete)
            return result.added, result.existing

    added, existing = asyncio.run(work())
    for pid in added:
        print(f"tracked {pid}")
    for pid in existing:
        print(f"already tracked {pid}")
    return 0


async def _collect(
    store: Store, state: State | None, limit: int
) -> tuple[dict[State, int], list[tuple[ProjectRecord, list[OutputRecord]]]]:
    counts = await store.count_by_state()
    page = await store.list_projects(state=state, limit=limit)
    rows = [(p, await store.outputs(p.id)) for p in page.projects]
    return counts, rows


def cmd_status(args: argparse.Namespace) -> int:
    """``watcher status``: a table (or JSON) of tracked projects."""
    settings = _settings()
    state = State(args.state) if args.state else None

    async def work() -> tuple[dict[State, int], list[tuple[ProjectRecord, list[OutputRecord]]]]:
        async with create_store(settings.database_url) as store:
            return await _collect(store, state, args.limit)

    counts, rows = asyncio.run(work())
    if args.json:
        doc = {
            "counts": {s.value: n for s, n in sorted(counts.items())},
            "projects": [project_json(p, o) for p, o in rows],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(render_table(counts, rows))
    return 0


def render_table(
    counts: dict[State, int], rows: list[tuple[ProjectRecord, list[OutputRecord]]]
) -> str:
    """A readable table of projects, with a summary line of counts by state."""
    summary = ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items())) or "no projects"
    header = ("ID", "KIND", "STATE", "REMOTE", "POLLS", "SAVED", "NOTE")
    lines = [header]
    for p, outputs in rows:
        saved = sum(1 for o in outputs if o.state.value == "saved")
        note = p.failure or (f"{p.error_code}: {p.error_message}" if p.error_code else "")
        lines.append(
            (
                p.id,
                p.kind.value,
                p.state.value,
                p.remote_status.value if p.remote_status else "-",
                str(p.polls),
                f"{saved}/{len(outputs)}" if outputs else "-",
                note[:60],
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    return "\n".join([f"projects: {summary}", *text])


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``watcher demo``: simulator + daemon + a report of where the files are."""
    from watcher.demo import run_demo  # noqa: PLC0415 - only the demo needs the simulator

    return run_demo(directory=args.dir, seed=args.seed)
