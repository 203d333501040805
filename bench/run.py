"""Benchmark the watcher against the official SDK on the simulator and print Markdown tables.

    python bench/run.py                      # everything (a few minutes)
    python bench/run.py --quick              # a fast smoke run of every scenario
    python bench/run.py --only fleet --projects 100
    python bench/run.py --write-results      # also refresh the tables in bench/RESULTS.md

Scenarios (see each module's docstring, and RESULTS.md for how to read the numbers):

- ``fleet`` (bench/fleet.py): N image projects, the SDK's ``check_result`` (one task per project)
  vs the watcher (``run --until-done``) with each settings profile;
- ``webhooks`` (bench/webhooks.py): N image projects whose simulator sends a signed webhook 0.2 s
  after each render starts and ends, the SDK vs the watcher with webhooks on;
- ``takeover`` (bench/fleet.py): a fleet of replicas on one PostgreSQL database, with and without
  one SIGKILLed mid-run: the wall time a kill costs and how soon its projects are taken over;
- ``big`` (bench/big.py): one 1 GiB output, curl vs the watcher;
- ``scale`` (bench/scale.py): CPU per poll and RSS with 1,000 vs 100,000 tracked projects;
- ``floor`` (bench/floor.py): CPU per request of each HTTP stack (httpx on httpcore, the
  watcher's httpx on aiohttp, aiohttp alone), the floor under both.

Tables go to stdout, progress to stderr. Every client and the simulator run as separate
processes; nothing here is a pass/fail test (the exit status is 0 unless a run crashed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import big, fleet, floor, machine, scale, webhooks
from bench.common import PROFILES, Profile
from bench.stats import Verdict, markdown_table, verdict_table

GIB = 1 << 30
MIB = 1 << 20
SCENARIOS = ("fleet", "webhooks", "takeover", "big", "scale", "floor")
RESULTS = Path(__file__).with_name("RESULTS.md")
_Run = TypeVar("_Run")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark the watcher against the magic-hour SDK on the simulator.",
    )
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (20 projects, 64 MiB, 200 vs 5,000 tracked)",
    )
    parser.add_argument("--projects", type=int, nargs="+", help="fleet sizes (100 1000)")
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=sorted(PROFILES),
        default=["defaults", "tuned"],
        help="watcher settings profiles for the fleet (defaults tuned)",
    )
    parser.add_argument(
        "--watcher-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra WATCHER_* setting for every fleet watcher run (a profile named 'custom')",
    )
    parser.add_argument("--no-sdk", action="store_true", help="fleet: skip the SDK runs")
    parser.add_argument("--webhook-projects", type=int, help="webhooks: projects (300)")
    parser.add_argument("--takeover-projects", type=int, help="takeover: projects (300)")
    parser.add_argument("--replicas", type=int, default=3, help="takeover: replicas (3)")
    parser.add_argument(
        "--kill-after", type=float, default=2.0, help="takeover: seconds before the kill (2)"
    )
    parser.add_argument("--big-size", type=int, help="bytes of the big output (1 GiB)")
    parser.add_argument("--big-reps", type=int, help="curl/watcher repetitions (3)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    parser.add_argument("--scale-window", type=float, help="measured seconds (20)")
    parser.add_argument("--scale-warmup", type=float, help="seconds before measuring (10)")
    parser.add_argument("--floor-requests", type=int, help="requests of each kind (1000)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per client run (600 s)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).with_name("out"), help="(bench/out)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="replace the generated section of bench/RESULTS.md with this run's tables",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.projects = args.projects or ([20] if quick else [100, 1000])
    args.takeover_projects = args.takeover_projects or (60 if quick else 300)
    args.webhook_projects = args.webhook_projects or (60 if quick else 300)
    args.big_size = args.big_size or (64 * MIB if quick else GIB)
    args.big_reps = args.big_reps or (1 if quick else 3)
    args.scale = args.scale or ([200, 5000] if quick else [1000, 100_000])
    args.scale_window = args.scale_window or (5.0 if quick else 20.0)
    args.scale_warmup = args.scale_warmup or (3.0 if quick else 10.0)
    args.floor_requests = args.floor_requests or (200 if quick else 1000)
    return args


def progress(message: str) -> None:
    """A line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fleet_profiles(args: argparse.Namespace) -> list[Profile]:
    """The watcher profiles to run, plus ``custom`` from ``--watcher-env``."""
    profiles = [PROFILES[name] for name in args.profiles]
    if args.watcher_env:
        pairs = dict(item.split("=", 1) for item in args.watcher_env)
        profiles.append(Profile("custom", pairs))
    return profiles


def each_client(
    args: argparse.Namespace,
    title: str,
    run_one: Callable[[Profile | None], _Run],
    summary: Callable[[_Run], str],
) -> list[_Run]:
    """Run the SDK (``None``; not with ``--no-sdk``), then each watcher profile, in turn."""
    clients: list[Profile | None] = [] if args.no_sdk else [None]
    clients.extend(fleet_profiles(args))
    runs: list[_Run] = []
    for client in clients:
        progress(f"{title}: {fleet.SDK_LABEL if client is None else client.label}")
        runs.append(run_one(client))
        progress(f"  {summary(runs[-1])}")
    return runs


def run_fleet(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """Every fleet size: the SDK, then each watcher profile."""
    verdicts: list[Verdict] = []
    for count in args.projects:

        def one(client: Profile | None, count: int = count) -> fleet.FleetRun:
            return fleet.run_client(count, client, args.workdir, args.timeout)

        runs = each_client(
            args,
            f"fleet {count}",
            one,
            lambda run: (
                f"wall {run.measured.wall_seconds:.1f} s, CPU {run.measured.cpu_seconds:.1f} s, "
                f"outputs {run.outputs_ok}/{run.outputs_expected}"
            ),
        )
        found = fleet.verdicts(count, runs)
        verdicts.extend(found)
        raw[f"fleet-{count}"] = [r.to_json() for r in runs]
        out.extend(
            [
                f"### fleet: {count} image projects",
                fleet.settings_table(runs),
                fleet.table(runs),
                verdict_table(found),
            ]
        )
    return verdicts


def run_webhooks(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """The SDK, then each watcher profile, on projects that send webhooks."""
    count = args.webhook_projects
    runs = each_client(
        args,
        f"webhooks {count}",
        lambda client: webhooks.run_client(count, client, args.workdir, args.timeout),
        lambda w: (
            f"wall {w.run.measured.wall_seconds:.1f} s, "
            f"GETs/project {w.run.gets_per_project:.2f}, "
            f"outputs {w.run.outputs_ok}/{w.run.outputs_expected}"
        ),
    )
    found = webhooks.verdicts(count, runs)
    raw[f"webhooks-{count}"] = [r.to_json() for r in runs]
    out.extend(
        [
            (
                f"### webhooks: {count} image projects, an event {webhooks.DELAY:g} s after each "
                "render starts and ends"
            ),
            fleet.settings_table([r.run for r in runs]),
            webhooks.table(runs),
            verdict_table(found),
        ]
    )
    return found


def run_takeover(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """A fleet of replicas without and with one SIGKILLed."""
    runs = []
    for kill_after in (None, args.kill_after):
        what = "no kill" if kill_after is None else f"r2 SIGKILLed {kill_after:g} s in"
        progress(f"takeover: {args.replicas} replicas, {args.takeover_projects} projects, {what}")
        run = fleet.run_takeover(
            args.takeover_projects,
            args.workdir,
            args.timeout,
            replicas=args.replicas,
            kill_after=kill_after,
        )
        progress(f"  wall {run.wall_seconds:.1f} s, takeover {run.takeover_seconds:.2f} s")
        runs.append(run)
    found = fleet.takeover_verdicts(runs)
    raw["takeover"] = [r.to_json() for r in runs]
    out.extend(
        [
            (
                f"### takeover: {args.replicas} replicas on PostgreSQL, "
                f"{args.takeover_projects} image projects, one SIGKILLed or none"
            ),
            fleet.takeover_table(runs),
            verdict_table(found),
        ]
    )
    return found


def run_big(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """The big download, curl vs watcher."""
    progress(f"big: {args.big_size:,} bytes x {args.big_reps} (curl, watcher)")
    try:
        transfers = big.run(args.big_size, args.big_reps, args.workdir, args.timeout)
    except big.CurlMissing as exc:
        progress(f"big: skipped: {exc}")
        out.extend(["### big download", f"Skipped: {exc}."])
        return [Verdict("big download", str(exc), None)]
    found = big.verdicts(transfers)
    raw["big"] = [t.to_json() for t in transfers]
    out.extend(
        [
            f"### big download: one output of {args.big_size:,} bytes",
            big.table(transfers),
            verdict_table(found),
        ]
    )
    return found


def run_scale(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """Polling cost at two store sizes."""
    runs = []
    for tracked in args.scale:
        progress(f"scale: {tracked:,} tracked projects")
        runs.append(
            scale.run_one(tracked, args.workdir, warmup=args.scale_warmup, window=args.scale_window)
        )
        progress(f"  {runs[-1].polls} polls, {runs[-1].cpu_per_poll_ms:.3f} ms CPU/poll")
    found = scale.verdicts(runs)
    raw["scale"] = [r.to_json() for r in runs]
    out.extend(
        [
            f"### scale: {' vs '.join(f'{n:,}' for n in args.scale)} tracked projects",
            markdown_table(("settings",), [(scale.PROFILE.describe(),)]),
            scale.table(runs),
            verdict_table(found),
        ]
    )
    return found


def run_floor(args: argparse.Namespace, out: list[str], raw: dict[str, Any]) -> list[Verdict]:
    """CPU per request of each HTTP stack; what it implies for every fleet run."""
    progress(f"floor: {args.floor_requests:,} GETs and downloads through each HTTP stack")
    floors = floor.run(args.floor_requests)
    raw["floor"] = [f.to_json() for f in floors]
    found = []
    for key, runs in raw.items():
        if not key.startswith("fleet-"):
            continue
        for run in runs:
            stack = floor.HTTPX if run["client"] == fleet.SDK_LABEL else floor.WATCHER
            get_ms = floor.find(floors, stack, floor.GET).cpu_ms
            download_ms = floor.find(floors, stack, floor.DOWNLOAD).cpu_ms
            least = (run["gets"] * get_ms + run["downloads"] * download_ms) / 1000
            found.append(
                Verdict(
                    f"{run['projects']}: {run['client']}: its HTTP stack ({stack}) alone for "
                    "its requests (context, not a target)",
                    f"{least:.2f} s of its {run['cpu_user'] + run['cpu_system']:.2f} s CPU "
                    f"({run['gets']} GETs x {get_ms:.3f} ms + {run['downloads']} downloads x "
                    f"{download_ms:.3f} ms)",
                    None,
                    info=True,
                )
            )
    out.extend(["### floor: one request through each HTTP stack", floor.table(floors)])
    if found:
        out.append(verdict_table(found))
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print the tables."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    chosen = args.only or list(SCENARIOS)
    out = [machine.describe(argv)]
    raw: dict[str, Any] = {}
    verdicts: list[Verdict] = []
    runners = {
        "fleet": run_fleet,
        "webhooks": run_webhooks,
        "takeover": run_takeover,
        "big": run_big,
        "scale": run_scale,
        "floor": run_floor,
    }
    for name in SCENARIOS:
        if name in chosen:
            verdicts.extend(runners[name](args, out, raw))
    out.extend(["### all targets", verdict_table(verdicts)])
    text = "\n\n".join(out)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    if args.write_results:
        machine.write_results(RESULTS, text)
        progress(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
