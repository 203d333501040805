"""The ``watcher simulate`` command: serve a simulated Magic Hour API in the foreground.

This module owns the command's options and its run: it pre-creates projects, prints them as
``kind:id`` lines on stdout, then a ``# simulator listening on URL with token TOKEN`` line, and
serves until SIGINT or SIGTERM. The ``watcher`` command line itself wires it in.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, TypeVar

from watcher.errors import ConfigError
from watcher.models import Kind
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.server import SimulatorServer
from watcher.simulator.state import Simulator

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from types import FrameType

_T = TypeVar("_T")

DEFAULT_PORT = 8787
_CONFIG = SimConfig()
_FAULTS = Faults()
_DEFAULT = "(default: %(default)s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``watcher simulate`` to ``parser``."""
    _add_server_arguments(parser)
    _add_project_arguments(parser)
    _add_fault_arguments(parser)
    _add_webhook_arguments(parser)


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help=f"address to bind {_DEFAULT}")
    group.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to bind; 0 picks a free one {_DEFAULT}",
    )
    group.add_argument("--token", default=_CONFIG.token, help=f"accepted API token {_DEFAULT}")
    group.add_argument(
        "--seed", type=int, default=_CONFIG.seed, help=f"seed of every draw {_DEFAULT}"
    )


def _add_project_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("projects")
    for kind in Kind:
        group.add_argument(
            f"--{kind.value}",
            type=int,
            default=0,
            metavar="N",
            help=f"{kind.value} projects to create {_DEFAULT}",
        )
    _add_pair(group, "--queued-seconds", float, _CONFIG.queued_seconds, "time spent queued")
    _add_pair(group, "--rendering-seconds", float, _CONFIG.rendering_seconds, "time rendering")
    _add_pair(group, "--image-outputs", int, _CONFIG.image_outputs, "outputs per image project")
    _add_pair(group, "--output-bytes", int, _CONFIG.output_bytes, "size of each output")
    _add_number(
        group, "--error-rate", _CONFIG.error_rate, "P", "share of projects that end in error"
    )
    _add_number(
        group, "--cancel-rate", _CONFIG.cancel_rate, "P", "share of projects that end canceled"
    )
    _add_number(
        group,
        "--url-lifetime",
        _CONFIG.url_lifetime,
        "SECONDS",
        "how long a signed download URL stays valid",
    )
    _add_choice(
        group,
        "--timeline-start",
        ("created", "first_get"),
        _CONFIG.timeline_start,
        "when the render clock starts",
    )
    _add_choice(
        group,
        "--after-delete",
        ("404", "disabled"),
        _CONFIG.after_delete,
        "what GET answers after DELETE: 404, or 200 with enabled=false",
    )


def _add_number(
    group: argparse._ArgumentGroup, flag: str, default: float, metavar: str, what: str
) -> None:
    group.add_argument(
        flag, type=float, default=default, metavar=metavar, help=f"{what} {_DEFAULT}"
    )


def _add_choice(
    group: argparse._ArgumentGroup, flag: str, choices: tuple[str, ...], default: str, what: str
) -> None:
    group.add_argument(flag, choices=choices, default=default, help=f"{what} {_DEFAULT}")


def _add_pair(
    group: argparse._ArgumentGroup,
    flag: str,
    kind: Callable[[str], float],
    default: tuple[float, float],
    what: str,
) -> None:
    low, high = default
    group.add_argument(
        flag,
        type=kind,
        nargs=2,
        default=default,
        metavar=("MIN", "MAX"),
        help=f"{what}, drawn uniformly per project (default: {low} {high})",
    )


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("faults (probabilities per request)")
    for name in ("429", "5xx", "reset", "slow", "broken-json", "truncate"):
        _add_number(group, f"--rate-{name}", 0.0, "P", f"chance of a {name} fault per request")
    _add_number(group, "--retry-after", _FAULTS.retry_after, "SECONDS", "the delay a 429 asks for")
    _add_choice(
        group,
        "--retry-after-form",
        ("alternate", "seconds", "http-date"),
        _FAULTS.retry_after_form,
        "how Retry-After is written",
    )
    _add_number(
        group, "--slow-seconds", _FAULTS.slow_seconds, "SECONDS", "how long a slow response stalls"
    )


def _add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("webhooks (signed events, as Magic Hour sends them)")
    group.add_argument(
        "--webhook-url",
        default=None,
        metavar="URL",
        help="POST image/video/audio .started, .completed, .errored events here, e.g. "
        f"http://127.0.0.1:8080/webhooks/magic-hour; off without one {_DEFAULT}",
    )
    group.add_argument(
        "--webhook-secret",
        default=None,
        metavar="SECRET",
        help=f"the key that signs them (WATCHER_WEBHOOK_SECRET) {_DEFAULT}",
    )
    _add_number(
        group,
        "--webhook-delay",
        _CONFIG.webhook_delay,
        "SECONDS",
        "how long after each transition its event is sent",
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build the simulator's configuration from parsed options; raises :class:`ConfigError`."""
    faults = Faults(
        rate_429=args.rate_429,
        retry_after=args.retry_after,
        retry_after_form=args.retry_after_form,
        rate_5xx=args.rate_5xx,
        rate_reset=args.rate_reset,
        rate_slow=args.rate_slow,
        slow_seconds=args.slow_seconds,
        rate_broken_json=args.rate_broken_json,
        rate_truncate=args.rate_truncate,
    )
    return SimConfig(
        token=args.token,
        seed=args.seed,
        queued_seconds=_pair(args.queued_seconds),
        rendering_seconds=_pair(args.rendering_seconds),
        error_rate=args.error_rate,
        cancel_rate=args.cancel_rate,
        image_outputs=_pair(args.image_outputs),
        output_bytes=_pair(args.output_bytes),
        url_lifetime=args.url_lifetime,
        timeline_start=args.timeline_start,
        after_delete=args.after_delete,
        faults=faults,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        webhook_delay=args.webhook_delay,
    )


def _pair(values: Sequence[_T]) -> tuple[_T, _T]:
    low, high = values
    return (low, high)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the process exit code."""
    try:
        config = config_from_args(args)
        counts = _project_counts(args)
    except ConfigError as exc:
        sys.stderr.write(f"watcher simulate: {exc}\n")
        return 2
    simulator = Simulator(config)
    refs = [
        f"{kind.value}:{project_id}"
        for kind, count in counts.items()
        if count
        for project_id in simulator.create_projects(kind, count)
    ]
    return _serve(simulator, refs, args.host, args.port)


def _project_counts(args: argparse.Namespace) -> dict[Kind, int]:
    counts: dict[Kind, int] = {kind: getattr(args, kind.value) for kind in Kind}
    if any(count < 0 for count in counts.values()):
        raise ConfigError("project counts must not be negative")
    return counts


def _serve(simulator: Simulator, refs: list[str], host: str, port: int) -> int:
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SimulatorServer(simulator, host=host, port=port) as server:
            lines = [
                *refs,
                f"# simulator listening on {server.base_url} with token {simulator.config.token}",
            ]
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()
            while not stop.wait(0.5):
                pass
    except BrokenPipeError:
        raise  # stdout closed (`watcher simulate | head -1`): the command's exit, not the port's
    except OSError as exc:  # the port is taken, or the address is not this machine's
        sys.stderr.write(
            f"watcher simulate: cannot listen on {host}:{port}: {exc.strerror or exc}\n"
        )
        return 2
    except RuntimeError as exc:
        sys.stderr.write(f"watcher simulate: cannot serve on {host}:{port}: {exc}\n")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
