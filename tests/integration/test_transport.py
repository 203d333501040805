"""The HTTP stack (:mod:`watcher.transport`) against real, misbehaving servers on 127.0.0.1:
every behaviour the watcher had on httpx's default transport holds on aiohttp's. Where both
are run, the same fault must read the same on either stack."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import struct
import subprocess
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.http_support import free_port
from tests.support import api_client
from watcher.api import MagicHourClient, describe_transport_error
from watcher.downloader import Downloader
from watcher.errors import DownloadIncomplete, TransientApiError
from watcher.models import Kind, ProjectRef
from watcher.paths import part_path
from watcher.settings import Settings, load_settings
from watcher.transport import Transport, http_client, trust_of

pytestmark = pytest.mark.anyio

TOKEN = "mhk_live_TransportTestToken0042"
FILE = bytes(range(256)) * 4000  # 1,024,000 bytes
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Seen"], Awaitable[None]]


class Seen:
    """What a server saw: request heads, connections, most connections open at once."""

    def __init__(self) -> None:
        self.heads: list[dict[str, str]] = []
        self.lines: list[str] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0


def settings(**extra: str) -> Settings:
    env = {"WATCHER_API_TOKEN": TOKEN, "WATCHER_REQUEST_TIMEOUT": "0.5"}
    env.update({f"WATCHER_{k.upper()}": v for k, v in extra.items()})
    return load_settings(env)


async def read_head(reader: asyncio.StreamReader, seen: Seen, first: bytes = b"") -> str:
    """One request's head (``first``: its first byte, already read); its path."""
    head = (first + await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *fields = head.split("\r\n")
    seen.lines.append(line)
    seen.heads.append(
        {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
    )
    return line.split(" ")[1]


def answer(code: int, body: bytes, **headers: str) -> bytes:
    fields = {"content-length": str(len(body))} | {
        k.replace("_", "-"): v for k, v in headers.items()
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"HTTP/1.1 {code} X\r\n{head}\r\n".encode() + body


def project(pid: str) -> bytes:
    body = {"id": pid, "name": None, "status": "rendering", "type": "AI_IMAGE", "enabled": True}
    return json.dumps(body | {"downloads": [], "error": None}).encode()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed server or a cut cable does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
    """Keep-alive HTTP/1.1; the last segment of the path says what to do."""
    while True:
        first = await reader.readexactly(1)
        if not first.isalpha():  # a TLS hello: answer as any plain-http server would
            writer.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
            await writer.drain()
            return
        path = await read_head(reader, seen, first)
        what = path.split("?", 1)[0].rsplit("/", 1)[-1]
        if what == "stall-head":
            await asyncio.Event().wait()
        if what == "close":
            return
        if what == "reset-head":
            reset(writer)
            return
        if what == "garbage":
            writer.write(b"HELLO THERE\r\n\r\n")
            return
        if what in {"stall-body", "short", "reset-body"}:
            writer.write(answer(200, b"", content_length="100000") + b"{" * 10)
            await writer.drain()
            if what == "stall-body":
                await asyncio.Event().wait()
            if what == "reset-body":
                reset(writer)
            return
        writer.write(answer(200, project(what), content_type="application/json"))
        await writer.drain()


@asynccontextmanager
async def serving(
    handler: Handler = misbehave, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        seen.open += 1
        seen.most_open = max(seen.most_open, seen.open)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, seen)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            seen.open -= 1
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", seen
    finally:
        for task in list(tasks):
            task.cancel()
        server.close()
        await server.wait_closed()


def api(http: httpx.AsyncClient, base: str) -> MagicHourClient:
    return api_client(http, base, TOKEN)


def default_stack(s: Settings) -> httpx.AsyncClient:
    """httpx's own transport (httpcore), configured as the watcher's client was before."""
    pool = s.max_concurrent_requests + s.max_concurrent_downloads + 4
    return httpx.AsyncClient(
        timeout=httpx.Timeout(s.request_timeout, connect=min(10.0, s.request_timeout)),
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        follow_redirects=True,
    )


STACKS = [pytest.param(default_stack, id="httpcore"), pytest.param(http_client, id="aiohttp")]


async def test_the_watcher_client_runs_on_aiohttp() -> None:
    """The client built from the settings sends through the aiohttp transport."""
    async with http_client(settings()) as http, serving() as (base, _):
        transport = http._transport_for_url(httpx.URL(base))
        assert isinstance(transport, Transport)
        snapshot = await api(http, base).get_project(ProjectRef(Kind.IMAGE, "p1"))
    assert snapshot.id == "p1"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize(
    ("what", "cause", "message"),
    [
        ("stall-head", "timeout", "{where} did not answer in time (ReadTimeout)"),
        ("stall-body", "timeout", "{where} did not answer in time (ReadTimeout)"),
        ("close", "network", "{where} broke off or did not speak HTTP (is it https?)"),
        ("short", "network", "{where} broke off or did not speak HTTP (is it https?)"),
        ("garbage", "network", "{where} broke off or did not speak HTTP (is it https?)"),
        ("reset-head", "network", "connection reset by {where}"),
        ("reset-body", "network", "connection reset by {where}"),
    ],
)
async def test_a_fault_of_the_server_reads_the_same_on_either_stack(
    stack: Callable[[Settings], httpx.AsyncClient], what: str, cause: str, message: str
) -> None:
    """A stalled answer, a connection closed or reset before or during the body, and an answer
    that is not HTTP: the same transient error, cause and message as on httpx's own stack."""
    async with stack(settings()) as http, serving() as (base, _):
        with pytest.raises(TransientApiError) as caught:
            await api(http, base).get_project(ProjectRef(Kind.IMAGE, what))
    where = base.removeprefix("http://")
    assert str(caught.value) == f"GET image:{what}: {message.format(where=where)}"
    assert caught.value.cause == cause


@pytest.mark.parametrize("stack", STACKS)
async def test_a_refused_port_and_tls_to_plain_http_read_the_same(
    stack: Callable[[Settings], httpx.AsyncClient],
) -> None:
    """Nothing listening, a name no resolver knows (``.invalid`` is reserved), and https spoken
    to a plain-http server: the host, port and cause."""
    refused = free_port()
    async with stack(settings()) as http, serving() as (base, _):
        port = base.rsplit(":", 1)[1]
        for url, message in [
            (f"http://127.0.0.1:{refused}", f"connection refused by 127.0.0.1:{refused}"),
            ("http://nonexistent.invalid", "cannot resolve the host 'nonexistent.invalid'"),
            (
                f"https://127.0.0.1:{port}",
                f"TLS handshake failed with 127.0.0.1:{port} (is it plain http?)",
            ),
        ]:
            with pytest.raises(TransientApiError) as caught:
                await api(http, url).get_project(ProjectRef(Kind.IMAGE, "p1"))
            assert str(caught.value) == f"GET image:p1: {message}"
            assert caught.value.cause == "network"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made by the openssl command)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_is_verified_against_the_trust_store_of_the_environment(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate no authority signed is refused, naming why; trusted through
    ``SSL_CERT_FILE`` (as httpx reads it), the same server is accepted."""
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    ref = ProjectRef(Kind.IMAGE, "p1")
    async with serving(tls=tls) as (base, _):
        async with http_client(settings()) as http:
            with pytest.raises(TransientApiError) as caught:
                await api(http, base).get_project(ref)
        assert "GET image:p1: the TLS certificate of 127.0.0.1:" in str(caught.value)
        assert "is not trusted (self-signed certificate)" in str(caught.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with http_client(settings()) as http:
            assert (await api(http, base).get_project(ref)).id == "p1"


async def test_ca_certificates_are_loaded_at_the_first_https_request_into_one_context(
    certificate: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain-http requests load no CA certificate (a run against the simulator pays nothing for
    TLS); the first https request loads the store into the one context that every client of
    that store shares, and its server is trusted."""
    cert, key = certificate
    store = tmp_path / "trusted.pem"  # a store of its own: no other test has loaded it
    store.write_bytes(cert.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    ref = ProjectRef(Kind.IMAGE, "p1")
    context = trust_of().context
    async with serving() as (plain, _), serving(tls=tls) as (secure, _):
        async with http_client(settings()) as http:
            assert (await api(http, plain).get_project(ref)).id == "p1"
            assert context.cert_store_stats()["x509_ca"] == 0
            assert (await api(http, secure).get_project(ref)).id == "p1"
            assert context.cert_store_stats()["x509_ca"] == 1
        async with http_client(settings()) as again:
            transport = again._transport_for_url(httpx.URL(secure))
            assert isinstance(transport, Transport)
            assert transport.ssl_context is context


async def test_the_token_never_follows_a_redirect_to_another_origin() -> None:
    """A redirect within the API's origin keeps ``Authorization``; one to another origin (here
    another port) arrives without it, and the project is read from there. No redirected GET
    carries a body."""

    async def redirector(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        while True:
            path = await read_head(reader, seen)
            if path == "/v1/image-projects/here":
                writer.write(answer(302, b"", location="/moved/here"))
            elif path == "/v1/image-projects/away":
                writer.write(answer(307, b"", location=f"{away}/moved/away"))
            else:
                writer.write(answer(200, project(path.rsplit("/", 1)[1])))
            await writer.drain()

    async with (
        serving() as (away, elsewhere),
        serving(redirector) as (base, home),
        http_client(settings()) as http,
    ):
        client = api(http, base)
        assert (await client.get_project(ProjectRef(Kind.IMAGE, "here"))).id == "here"
        assert (await client.get_project(ProjectRef(Kind.IMAGE, "away"))).id == "away"
    assert [h.get("authorization") for h in home.heads] == [f"Bearer {TOKEN}"] * 3
    assert len(elsewhere.heads) == 1
    assert "authorization" not in elsewhere.heads[0]
    for head in [*home.heads, *elsewhere.heads]:  # a redirected GET has no body either
        assert "transfer-encoding" not in head
        assert "content-type" not in head


async def test_a_cookie_the_api_sets_is_never_sent_back() -> None:
    """A ``Set-Cookie`` on an API answer, on a redirect and on a download is not kept: neither
    the redirected GET, nor the next API call, nor a download carries a ``Cookie``."""

    async def baker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        while True:
            path = await read_head(reader, seen)
            if path == "/v1/image-projects/moved":
                writer.write(answer(302, b"", location="/there/moved", set_cookie="hop=1; Path=/"))
            else:
                body = project(path.rsplit("/", 1)[1])
                writer.write(answer(200, body, set_cookie="session=abc; Path=/"))
            await writer.drain()

    async with serving(baker) as (base, seen), http_client(settings()) as http:
        client = api(http, base)
        await client.get_project(ProjectRef(Kind.IMAGE, "p1"))
        await client.get_project(ProjectRef(Kind.IMAGE, "moved"))
        await client.get_project(ProjectRef(Kind.IMAGE, "p2"))
        async with http.stream("GET", f"{base}/files/out.png") as response:
            await response.aread()
        assert len(http.cookies) == 0
    assert len(seen.heads) == 5
    assert [h.get("cookie") for h in seen.heads] == [None] * 5


async def test_a_download_carries_no_token_and_resumes_with_range(tmp_path: Path) -> None:
    """A download URL gets no ``Authorization``; a ``.part`` on disk is resumed with ``Range``
    and only the missing bytes are sent."""

    async def cdn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        while True:
            await read_head(reader, seen)
            start = int(seen.heads[-1].get("range", "bytes=0-")[6:-1])
            if start:
                content_range = f"bytes {start}-{len(FILE) - 1}/{len(FILE)}"
                writer.write(answer(206, FILE[start:], content_range=content_range))
            else:
                writer.write(answer(200, FILE))
            await writer.drain()

    final = tmp_path / "0-out.bin"
    part_path(final).write_bytes(FILE[:300_000])
    async with serving(cdn) as (base, seen), http_client(settings()) as http:
        saved = await Downloader(http).fetch(f"{base}/f?sig=secret", final, verified)
    assert final.read_bytes() == FILE
    assert saved.resumed_from == 300_000
    assert seen.heads[0]["range"] == "bytes=300000-"
    assert "authorization" not in seen.heads[0]


async def verified(size: int, sha256: str) -> None:
    assert size == len(FILE)
    assert sha256


async def test_a_compressed_download_reaches_the_downloader_as_sent(tmp_path: Path) -> None:
    """A body gzipped against ``Accept-Encoding: identity`` is not decoded by the transport: the
    downloader decodes it and checks its end, so the file holds the original bytes; cut short,
    it is incomplete."""

    async def cdn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        while True:
            path = await read_head(reader, seen)
            body = gzip.compress(FILE)
            if path.endswith("cut"):
                body = body[: len(body) // 2]
            writer.write(answer(200, body, content_encoding="gzip", connection="close"))
            await writer.drain()
            return

    async with serving(cdn) as (base, seen), http_client(settings()) as http:
        await Downloader(http).fetch(f"{base}/whole", tmp_path / "0-a.bin", verified)
        with pytest.raises(DownloadIncomplete, match="ended before its end of stream"):
            await Downloader(http).fetch(f"{base}/cut", tmp_path / "0-b.bin", verified)
    assert (tmp_path / "0-a.bin").read_bytes() == FILE
    assert seen.heads[0]["accept-encoding"] == "identity"


async def test_a_stalled_or_reset_download_is_incomplete_and_keeps_its_bytes(
    tmp_path: Path,
) -> None:
    """A body that stops arriving times out, one whose connection is reset breaks off: either
    is a ``DownloadIncomplete`` to resume, not a crash."""
    async with serving() as (base, _), http_client(settings()) as http:
        downloader = Downloader(http)
        with pytest.raises(DownloadIncomplete, match="timed out"):
            await downloader.fetch(f"{base}/stall-body", tmp_path / "0-a.bin", verified)
        with pytest.raises(DownloadIncomplete, match="connection broke"):
            await downloader.fetch(f"{base}/reset-body", tmp_path / "0-b.bin", verified)


async def test_a_large_body_streams_in_bounded_memory() -> None:
    """64 MiB pass through the client while it holds well under 4 MiB of them at any time."""
    size = 64 * 1024 * 1024
    block = b"x" * (1024 * 1024)

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await read_head(reader, seen)
        writer.write(answer(200, b"", content_length=str(size)))
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    received = 0
    async with serving(big) as (base, _), http_client(settings()) as http:
        tracemalloc.start()
        try:
            async with http.stream("GET", f"{base}/big") as response:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == size
    assert peak < 4 * 1024 * 1024


async def test_connections_are_pooled_and_bounded() -> None:
    """Requests one after another reuse one connection; at most ``max_connections`` are open at
    once however many requests are in flight."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        while True:
            path = await read_head(reader, seen)
            await asyncio.sleep(0.01)  # the requests pile up meanwhile
            writer.write(answer(200, project(path.rsplit("/", 1)[1])))
            await writer.drain()

    s = settings(max_concurrent_requests="1", max_concurrent_downloads="1")  # a pool of 6
    async with serving(slow) as (base, seen), http_client(s) as http:
        for i in range(10):
            assert (await http.get(f"{base}/v1/image-projects/s{i}")).status_code == 200
        assert seen.connections == 1
        answers = await asyncio.gather(
            *(http.get(f"{base}/v1/image-projects/c{i}") for i in range(40))
        )
    assert all(a.status_code == 200 for a in answers)
    assert seen.most_open == 6


async def test_a_response_closed_early_does_not_poison_the_pool() -> None:
    """A body left unread (an error page cut at 64 KiB, a refused download) closes its
    connection; the next request gets a fresh, working one."""

    async def server(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen
    ) -> None:
        while True:
            path = await read_head(reader, seen)
            body = b"e" * 500_000 if path.endswith("big") else project("p1")
            writer.write(answer(200, body))
            await writer.drain()

    async with serving(server) as (base, seen), http_client(settings()) as http:
        async with http.stream("GET", f"{base}/big") as response:
            await anext(response.aiter_raw())
        reply = await http.get(f"{base}/v1/image-projects/p1")
    assert reply.json()["id"] == "p1"
    assert seen.connections == 2


async def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTP_PROXY`` sends requests through the proxy, as httpx reads it (``NO_PROXY`` aside)."""

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Seen) -> None:
        await read_head(reader, seen)
        writer.write(answer(200, project("p1"), connection="close"))
        await writer.drain()

    async with serving(proxy) as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with http_client(settings()) as http:
            client = api(http, "http://api.magichour.test")
            assert (await client.get_project(ProjectRef(Kind.IMAGE, "p1"))).id == "p1"
    assert seen.lines == ["GET http://api.magichour.test/v1/image-projects/p1 HTTP/1.1"]


async def test_a_header_no_request_can_carry_is_a_local_error() -> None:
    """A header aiohttp refuses to write is ``httpx.LocalProtocolError`` (the API client's
    "cannot be sent"), and its value is not in the message."""
    async with serving() as (base, seen), http_client(settings()) as http:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await http.get(f"{base}/p", headers={"x-secret": f"{TOKEN}\r\nx-injected: 1"})
    assert TOKEN not in str(caught.value)
    assert seen.lines == []


async def drain(http: httpx.AsyncClient, url: str) -> None:
    async with http.stream("GET", url) as response:
        async for _ in response.aiter_raw():
            pass


async def test_messages_hold_no_url() -> None:
    """A mapped error's text has no path or query of the URL (a signed link's is secret)."""
    async with serving() as (base, _), http_client(settings()) as http:
        for what in ["garbage", "reset-body", "short"]:
            with pytest.raises(httpx.TransportError) as caught:
                await drain(http, f"{base}/f/{what}?sig=s3cr3t")
            assert "s3cr3t" not in str(caught.value)
            assert "/f/" not in str(caught.value)
            assert describe_transport_error(caught.value, httpx.URL(base)).startswith(
                ("127.0.0.1", "connection reset by 127.0.0.1")
            )


async def test_settings_fix_the_timeouts_and_the_pool() -> None:
    """``WATCHER_REQUEST_TIMEOUT`` bounds reads and the wait for a connection, connecting at
    most 10 s; the pool holds a connection for every request and download slot."""
    async with http_client(settings(request_timeout="30")) as http:
        assert http.timeout == httpx.Timeout(30.0, connect=10.0)
        transport = http._transport_for_url(httpx.URL("https://api.magichour.ai"))
        assert isinstance(transport, Transport)
        assert transport.limits.max_connections == 8 + 4 + 4
