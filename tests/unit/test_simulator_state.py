"""The simulator without HTTP: timelines on an injected clock, signed URLs, bytes and faults."""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Callable
from dataclasses import replace
from email.utils import parsedate_to_datetime
from functools import partial
from urllib.parse import parse_qs, urlsplit

import pytest

from watcher.errors import ConfigError
from watcher.models import Kind, RemoteStatus
from watcher.simulator import cli
from watcher.simulator.config import Faults, SimConfig
from watcher.simulator.content import (
    BLOCK_SIZE,
    ByteRange,
    RangeNotSatisfiableError,
    parse_range,
)
from watcher.simulator.faults import FaultDrawer
from watcher.simulator.state import Event, Simulator, UnknownProjectError
from watcher.simulator.timeline import ProjectOverrides, plan_project

BASE = "http://sim.test"
T0 = 1_700_000_000.0

# Fixed timings: queued for 2 s, rendering for 3 s, always complete.
FIXED = SimConfig(
    seed=3,
    queued_seconds=(2.0, 2.0),
    rendering_seconds=(3.0, 3.0),
    error_rate=0.0,
    cancel_rate=0.0,
    url_lifetime=60.0,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_sim(config: SimConfig = FIXED) -> tuple[Simulator, FakeClock]:
    clock = FakeClock()
    return Simulator(config, clock=clock, secret=b"k" * 32), clock


def status_of(sim: Simulator, kind: Kind, project_id: str) -> str:
    body = sim.api_get(kind, project_id, BASE)
    assert body is not None
    status: str = body["status"]
    return status


def url_parts(url: str) -> tuple[str, int, str, str | None, str | None]:
    """Split a download URL into (project id, index, name, expires, sig)."""
    parts = urlsplit(url)
    _, _, _, project_id, index, name = parts.path.split("/")
    query = parse_qs(parts.query)
    return project_id, int(index), name, query["expires"][0], query["sig"][0]


def first_download(sim: Simulator, kind: Kind, project_id: str) -> str:
    body = sim.api_get(kind, project_id, BASE)
    assert body is not None
    url: str = body["downloads"][0]["url"]
    return url


# --- ids and timelines ---------------------------------------------------------------------


def test_project_ids_are_cuid_like_unique_and_fixed_by_the_seed() -> None:
    """Ids are 25 lowercase alphanumerics starting with c, fixed per seed, distinct across seeds."""
    ids = make_sim()[0].create_projects(Kind.IMAGE, 50)
    assert all(re.fullmatch(r"c[0-9a-z]{24}", pid) for pid in ids)
    assert len(set(ids)) == 50
    assert make_sim()[0].create_projects(Kind.IMAGE, 50) == ids
    other = Simulator(SimConfig(seed=4)).create_projects(Kind.IMAGE, 50)
    assert not set(other) & set(ids)


def test_the_same_seed_draws_the_same_plans() -> None:
    """Timelines, outputs and sizes depend only on (seed, id): two simulators agree."""
    config = SimConfig(seed=9)
    first = Simulator(config, clock=FakeClock())
    second = Simulator(config, clock=FakeClock())
    for kind in Kind:
        for a, b in zip(
            first.create_projects(kind, 10), second.create_projects(kind, 10), strict=True
        ):
            assert first.truth(a) == second.truth(b)
    plans = {plan_project(SimConfig(seed=s), Kind.VIDEO, "cabc").timeline for s in range(20)}
    assert len(plans) > 1


def test_status_moves_from_queued_to_rendering_to_complete_at_exact_times() -> None:
    """With the clock started at creation, the status changes exactly at 2 s and 5 s."""
    sim, clock = make_sim()
    (pid,) = sim.create_projects(Kind.IMAGE)
    clock.advance(1.999)
    assert status_of(sim, Kind.IMAGE, pid) == "queued"
    clock.advance(0.001)
    assert status_of(sim, Kind.IMAGE, pid) == "rendering"
    clock.advance(2.999)
    assert status_of(sim, Kind.IMAGE, pid) == "rendering"
    clock.advance(0.001)
    assert status_of(sim, Kind.IMAGE, pid) == "complete"
    assert sim.truth(pid).finishes_at == T0 + 5.0


def test_first_get_mode_starts_the_render_clock_at_the_first_get() -> None:
    """In first_get mode a project stays queued however long nobody asks, then takes its time."""
    sim, clock = make_sim(replace(FIXED, timeline_start="first_get"))
    (pid,) = sim.create_projects(Kind.AUDIO)
    clock.advance(1000)
    assert sim.truth(pid).status is RemoteStatus.QUEUED
    assert sim.truth(pid).clock_started_at is None
    assert status_of(sim, Kind.AUDIO, pid) == "queued"
    clock.advance(4.999)
    assert status_of(sim, Kind.AUDIO, pid) == "rendering"
    clock.advance(0.001)
    assert status_of(sim, Kind.AUDIO, pid) == "complete"


def test_error_rate_one_ends_in_error_with_a_reason_and_a_refund() -> None:
    """Every project errs with a documented {code, message}, no downloads and credits refunded."""
    sim, clock = make_sim(replace(FIXED, error_rate=1.0))
    ids = sim.create_projects(Kind.VIDEO, 5)
    clock.advance(5)
    for pid in ids:
        body = sim.api_get(Kind.VIDEO, pid, BASE)
        assert body is not None
        assert body["status"] == "error"
        assert body["error"]["code"]
        assert body["error"]["message"]
        assert body["downloads"] == []
        assert body["download"] is None
        assert body["credits_charged"] == 0


def test_cancel_rate_one_ends_canceled_without_downloads() -> None:
    """Every project ends canceled, with no error object and no downloads."""
    sim, clock = make_sim(replace(FIXED, cancel_rate=1.0))
    (pid,) = sim.create_projects(Kind.IMAGE)
    clock.advance(5)
    body = sim.api_get(Kind.IMAGE, pid, BASE)
    assert body is not None
    assert (body["status"], body["error"], body["downloads"]) == ("canceled", None, [])


def test_overrides_change_only_what_they_name() -> None:
    """An override replaces its own value; every other drawn value stays as the seed chose."""
    config = SimConfig(seed=1, error_rate=0.0, cancel_rate=0.0, image_outputs=(2, 2))
    plain = plan_project(config, Kind.IMAGE, "cfixed")
    forced = plan_project(
        config,
        Kind.IMAGE,
        "cfixed",
        ProjectOverrides(status=RemoteStatus.ERROR, queued_seconds=0.0, outputs=3),
    )
    assert forced.timeline.queued_seconds == 0.0
    assert forced.timeline.rendering_seconds == plain.timeline.rendering_seconds
    assert forced.timeline.final_status is RemoteStatus.ERROR
    assert forced.timeline.error is not None
    assert [o.name for o in forced.outputs] == ["output.png", "output-1.png", "output-2.png"]
    assert [o.size for o in forced.outputs[:2]] == [o.size for o in plain.outputs]
    sized = plan_project(config, Kind.IMAGE, "cfixed", ProjectOverrides(output_size=7))
    assert [o.size for o in sized.outputs] == [7, 7]


def test_overrides_from_json_reject_unknown_keys_and_non_terminal_statuses() -> None:
    """The admin API's overrides are validated, so a typo fails loudly."""
    assert ProjectOverrides.from_json({"output_size": 10}).output_size == 10
    with pytest.raises(ConfigError, match="unknown"):
        ProjectOverrides.from_json({"size": 10})
    with pytest.raises(ConfigError):
        ProjectOverrides.from_json({"status": "rendering"})
    with pytest.raises(ConfigError):
        ProjectOverrides.from_json({"outputs": "2"})


# --- the project object and signed URLs ----------------------------------------------------


def test_downloads_appear_only_when_complete_and_are_signed_afresh_on_every_get() -> None:
    """No downloads before complete; then each GET signs URLs valid url_lifetime from that GET."""
    sim, clock = make_sim()
    (pid,) = sim.create_projects(Kind.VIDEO, overrides=ProjectOverrides(output_size=10))
    clock.advance(2.5)
    body = sim.api_get(Kind.VIDEO, pid, BASE)
    assert body is not None
    assert body["downloads"] == []
    assert body["download"] is None
    clock.advance(2.5)
    first = sim.api_get(Kind.VIDEO, pid, BASE)
    clock.advance(10)
    second = sim.api_get(Kind.VIDEO, pid, BASE)
    assert first is not None
    assert second is not None
    assert first["downloads"][0]["expires_at"] == "2023-11-14T22:14:25.000Z"  # T0 + 5 + 60
    assert second["downloads"][0]["expires_at"] == "2023-11-14T22:14:35.000Z"
    assert first["downloads"][0]["url"] != second["downloads"][0]["url"]
    assert second["download"] == second["downloads"][0]
    path = urlsplit(first["downloads"][0]["url"]).path
    assert path == f"/sim/files/{pid}/0/output.mp4"


def test_a_signed_url_is_honoured_until_it_expires() -> None:
    """The URL opens up to its expiry second and answers 403 'expired' one second later."""
    sim, clock = make_sim()
    (pid,) = sim.create_projects(Kind.IMAGE, overrides=ProjectOverrides(queued_seconds=0.0))
    clock.advance(5)
    project_id, index, name, expires, sig = url_parts(first_download(sim, Kind.IMAGE, pid))
    clock.advance(60)
    grant = sim.open_download(project_id, index, name, expires, sig)
    assert (grant.status_code, grant.output) == (200, sim.output(pid, 0))
    clock.advance(1)
    grant = sim.open_download(project_id, index, name, expires, sig)
    assert (grant.status_code, grant.reason, grant.output) == (403, "expired", None)


@pytest.mark.parametrize("tamper", ["sig", "expires", "name", "index", "missing"])
def test_a_tampered_or_unsigned_url_is_refused(tamper: str) -> None:
    """Changing any signed part of the URL, or dropping the signature, gives 403."""
    sim, clock = make_sim()
    (pid,) = sim.create_projects(Kind.IMAGE, overrides=ProjectOverrides(outputs=2))
    clock.advance(5)
    project_id, index, name, expires, sig = url_parts(first_download(sim, Kind.IMAGE, pid))
    assert expires is not None
    assert sig is not None
    if tamper == "sig":
        sig = ("0" if sig[0] != "0" else "1") + sig[1:]
    elif tamper == "expires":
        expires = str(int(expires) + 3600)
    elif tamper == "name":
        name = "output.jpg"
    elif tamper == "index":
        index = 1
    else:
        sig = None
    assert sim.open_download(project_id, index, name, expires, sig).status_code == 403


def test_delete_then_get_answers_404_by_default() -> None:
    """After DELETE, GET is 404, a second DELETE is 404, and the files are gone."""
    sim, clock = make_sim()
    (pid,) = sim.create_projects(Kind.AUDIO)
    clock.advance(5)
    url = first_download(sim, Kind.AUDIO, pid)
    assert sim.api_delete(Kind.AUDIO, pid)
    assert sim.api_get(Kind.AUDIO, pid, BASE) is None
    assert not sim.api_delete(Kind.AUDIO, pid)
    assert sim.open_download(*url_parts(url)).status_code == 404
    assert sim.truth(pid).deleted


def test_delete_then_get_answers_disabled_when_configured() -> None:
    """In 'disabled' mode GET after DELETE is 200 with enabled false and no downloads."""
    sim, clock = make_sim(replace(FIXED, after_delete="disabled"))
    (pid,) = sim.create_projects(Kind.IMAGE)
    clock.advance(5)
    assert sim.api_delete(Kind.IMAGE, pid)
    body = sim.api_get(Kind.IMAGE, pid, BASE)
    assert body is not None
    assert (body["enabled"], body["downloads"], body["status"]) == (False, [], "complete")


def test_unknown_ids_and_wrong_kinds_are_not_found() -> None:
    """A project is only found under its own kind; unknown ids raise in the Python API."""
    sim, _ = make_sim()
    (pid,) = sim.create_projects(Kind.IMAGE)
    assert sim.api_get(Kind.VIDEO, pid, BASE) is None
    assert not sim.api_delete(Kind.AUDIO, pid)
    assert sim.api_get(Kind.IMAGE, "cnope", BASE) is None
    with pytest.raises(UnknownProjectError):
        sim.truth("cnope")


def test_only_the_configured_bearer_token_is_authorized() -> None:
    """Auth needs 'Bearer <token>' exactly; set_token revokes the old key at once."""
    sim, _ = make_sim()
    assert sim.authorized("Bearer mhk_live_simulator")
    assert sim.authorized("bearer mhk_live_simulator")
    assert not sim.authorized(None)
    assert not sim.authorized("mhk_live_simulator")
    assert not sim.authorized("Bearer mhk_live_other")
    sim.set_token("mhk_live_new")
    assert not sim.authorized("Bearer mhk_live_simulator")
    assert sim.authorized("Bearer mhk_live_new")


# --- output bytes --------------------------------------------------------------------------


def test_output_bytes_are_deterministic_typed_and_hash_to_the_truth() -> None:
    """Bytes start with the kind's magic number, have the planned size and match the sha256."""
    magic = {Kind.IMAGE: b"\x89PNG", Kind.VIDEO: b"\x00\x00\x00\x18ftyp", Kind.AUDIO: b"ID3"}
    sim, again = make_sim()[0], make_sim()[0]
    for kind in Kind:
        (pid,) = sim.create_projects(kind)
        assert again.create_projects(kind) == [pid]
        data = sim.expected_bytes(pid, 0)
        assert data.startswith(magic[kind])
        assert len(data) == sim.truth(pid).outputs[0].size
        assert hashlib.sha256(data).hexdigest() == sim.expected_sha256(pid, 0)
        assert again.expected_bytes(pid, 0) == data


def test_any_range_of_a_multi_block_output_matches_the_whole() -> None:
    """Chunks for ranges that cross 64 KiB blocks equal the same slice of the whole output."""
    sim, _ = make_sim()
    size = 3 * BLOCK_SIZE + 123
    (pid,) = sim.create_projects(Kind.VIDEO, overrides=ProjectOverrides(output_size=size))
    whole = sim.expected_bytes(pid, 0)
    output = sim.output(pid, 0)
    for start, end in [(0, size), (1, 2), (BLOCK_SIZE - 5, BLOCK_SIZE + 5), (size - 7, size)]:
        chunks = list(sim.chunks(output, start, end))
        assert b"".join(chunks) == whole[start:end]
        assert max(len(c) for c in chunks) <= BLOCK_SIZE
    blocks = [whole[i : i + BLOCK_SIZE] for i in range(0, 3 * BLOCK_SIZE, BLOCK_SIZE)]
    assert len(set(blocks)) == 3


def test_a_huge_output_is_never_built_in_memory() -> None:
    """A 1 GiB output has its size, serves its tail, and refuses expected_bytes."""
    sim, _ = make_sim()
    overrides = ProjectOverrides(output_size=1 << 30)
    (pid,) = sim.create_projects(Kind.VIDEO, overrides=overrides)
    output = sim.output(pid, 0)
    tail = b"".join(sim.chunks(output, (1 << 30) - 10, 1 << 30))
    assert len(tail) == 10
    with pytest.raises(ValueError, match="too large"):
        sim.expected_bytes(pid, 0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", ByteRange(0, 100)),
        ("bytes=10-19", ByteRange(10, 20)),
        ("bytes=90-500", ByteRange(90, 100)),
        ("bytes=-30", ByteRange(70, 100)),
        ("bytes=-500", ByteRange(0, 100)),
        ("bytes=20-10", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=abc", None),
    ],
)
def test_range_headers_parse_as_rfc_9110_says(header: str | None, expected: ByteRange) -> None:
    """Single byte ranges are honoured; malformed, multiple or foreign ranges are ignored."""
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_ranges_past_the_end_are_not_satisfiable(header: str) -> None:
    """A range that selects no byte raises RangeNotSatisfiableError (a 416 over HTTP)."""
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, 100)


# --- faults, events, config ----------------------------------------------------------------


def test_fault_draws_follow_the_seed_and_the_rates() -> None:
    """The same seed draws the same faults; rate 0 never faults; rate 1 always does."""
    faults = Faults(rate_429=0.2, rate_5xx=0.2, rate_reset=0.1, rate_broken_json=0.1)
    drawer_a, drawer_b = FaultDrawer(1, faults), FaultDrawer(1, faults)
    first = [drawer_a.draw("api", T0) for _ in range(200)]
    assert first == [drawer_b.draw("api", T0) for _ in range(200)]
    names = {f.name for f in first if f is not None}
    assert names == {"429", "5xx", "reset", "broken_json"}
    assert 0.4 < sum(f is not None for f in first) / 200 < 0.8
    assert all(f.status_code in {500, 502, 503, 504} for f in first if f and f.name == "5xx")
    quiet = FaultDrawer(1, Faults())
    assert all(quiet.draw(target, T0) is None for target in ("api", "download") * 50)
    always = FaultDrawer(1, Faults(rate_truncate=1.0))
    truncations = [always.draw("download", T0) for _ in range(20)]
    assert all(f is not None and f.name == "truncate" and 0 < f.fraction < 1 for f in truncations)
    assert always.draw("api", T0) is None


def test_retry_after_alternates_between_seconds_and_an_http_date() -> None:
    """Alternate mode gives delta-seconds, then the HTTP-date of now + delay, and so on."""
    drawer = FaultDrawer(0, Faults(rate_429=1.0, retry_after=2.5))
    values = [drawer.draw("api", T0) for _ in range(3)]
    assert [v.retry_after if v else None for v in values][::2] == ["3", "3"]
    second = values[1]
    assert second is not None
    assert second.retry_after is not None
    assert parsedate_to_datetime(second.retry_after).timestamp() == T0 + 3
    dated = FaultDrawer(0, Faults(rate_429=1.0, retry_after_form="http-date")).draw("api", T0)
    assert dated is not None
    assert dated.retry_after is not None
    assert dated.retry_after.endswith("GMT")


def test_events_are_numbered_timed_and_downloads_marked_complete() -> None:
    """record() stamps seq and clock time; finish_download() updates the completion flag."""
    sim, clock = make_sim()
    sim.record(Event("GET", "get", "/v1/image-projects/x", 200, project_id="x"))
    clock.advance(1)
    seq = sim.record(Event("GET", "download", "/sim/files/x/0/a", 200, index=0, completed=False))
    sim.finish_download(seq, completed=True, bytes_sent=7)
    first, second = sim.events()
    assert (first.seq, first.at, first.what) == (1, T0, "get")
    assert (second.seq, second.at, second.completed) == (2, T0 + 1, True)
    assert second.to_json()["completed"] is True
    assert second.bytes_sent == 7


@pytest.mark.parametrize(
    "build",
    [
        partial(SimConfig, queued_seconds=(2.0, 1.0)),
        partial(SimConfig, rendering_seconds=(-1.0, 1.0)),
        partial(SimConfig, error_rate=1.5),
        partial(SimConfig, error_rate=0.6, cancel_rate=0.6),
        partial(SimConfig, output_bytes=(0, 10)),
        partial(SimConfig, image_outputs=(0, 1)),
        partial(SimConfig, url_lifetime=0.0),
        partial(SimConfig, timeline_start="later"),  # type: ignore[arg-type]
        partial(SimConfig, after_delete="410"),  # type: ignore[arg-type]
        partial(SimConfig, token=""),
        partial(Faults, rate_429=0.6, rate_5xx=0.6),
        partial(Faults, rate_truncate=-0.1),
        partial(ProjectOverrides, output_size=0),
    ],
)
def test_invalid_configs_are_rejected(build: Callable[[], object]) -> None:
    """Every setting is validated when the config is built."""
    with pytest.raises(ConfigError):
        build()


def test_cli_options_build_the_config() -> None:
    """`watcher simulate` options map onto SimConfig and Faults."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--seed=5",
            "--image=3",
            "--queued-seconds",
            "0",
            "1",
            "--rate-429=0.25",
            "--retry-after-form=seconds",
            "--rate-broken-json=0.1",
            "--after-delete=disabled",
            "--timeline-start=first_get",
            "--token=mhk_live_x",
        ]
    )
    config = cli.config_from_args(args)
    assert (config.seed, config.token, config.queued_seconds) == (5, "mhk_live_x", (0.0, 1.0))
    assert (config.after_delete, config.timeline_start) == ("disabled", "first_get")
    assert config.faults == Faults(rate_429=0.25, retry_after_form="seconds", rate_broken_json=0.1)
    assert (args.image, args.video, args.port) == (3, 0, cli.DEFAULT_PORT)
