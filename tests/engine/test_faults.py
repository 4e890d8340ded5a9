"""The fault matrix: every way a peer can fail a fetch, and the precise curl error for each.

Each test drives real libcurl against a real loopback server that does one wrong thing,
and asserts the exception class *and* curl's ``code`` and ``name``. The ``engine``
fixture then checks that the fault left no descriptor registered, no fd open and no
busy loop behind; ``expect_fault`` also checks that the client is still healthy after
it (the fault stayed inside its transfer: no multi error, the next fetch works).

Observed on libcurl 8.23.0 (the pycurl 7.49.0 wheel); where libcurl's answer differs
from the obvious guess, the test's docstring says so.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from curlfetch.engine import (
    BodyTooLargeError,
    ConnectError,
    CurlClient,
    CurlError,
    CurlTimeoutError,
    ProtocolError,
    TLSError,
    TooManyRedirectsError,
    UnsupportedProtocolError,
)

from .conftest import Engine, _reactor
from .faults import (
    FaultProtocol,
    FaultServer,
    canned,
    close_on_accept,
    drip,
    drop_second_request,
    refused_port,
    reset_after,
    silent,
)
from .servers import LoopbackSite
from .tls import TLSSite

OK_HEAD = b"HTTP/1.1 200 OK\r\n"


# -- helpers -----------------------------------------------------------------------------


@implementer(IConsumer)
class CountingSink:
    """A consumer sink that only counts what it is given."""

    def __init__(self) -> None:
        self.received = 0
        self.writes = 0
        self.producer: IProducer | None = None
        self.unregistered = False

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.writes += 1


_IN_ACCESS = 0x001
_IN_OPEN = 0x020


class FileAccessWatch:
    """inotify on one file: reports whether anything opened or read it."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_OPEN | _IN_ACCESS) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


async def expect_fault(
    engine: Engine,
    client: CurlClient,
    url: str,
    target: LoopbackSite,
    **options: Any,
) -> tuple[CurlError, float]:
    """Fetch ``url``, which must fail with a ``CurlError``; return it and the time taken.

    Then prove the fault stayed inside its transfer: the multi handle never failed, no
    callback raised, and the same client still fetches from a healthy server.
    """
    start = time.monotonic()
    with pytest.raises(CurlError) as info:
        await engine.fetch(client, url, **options)
    elapsed = time.monotonic() - start
    stats = client.driver.stats
    assert (stats.multi_errors, stats.callback_errors) == (0, 0)
    healthy = await engine.fetch(client, target.url("/bytes?n=10"))
    assert healthy.status == 200
    assert len(healthy.body) == 10
    return info.value, elapsed


def assert_error(error: CurlError, cls: type[CurlError], code: int, name: str) -> None:
    """Exactly this class (not a subclass or sibling), curl code and CURLE_ name."""
    assert type(error) is cls, f"{type(error).__name__} {error}"
    assert error.code == code, str(error)
    assert error.name == name, str(error)


@pytest_twisted.async_yield_fixture
async def serve(engine: Engine) -> AsyncIterator[Callable[[FaultServer], FaultServer]]:
    """Registers fault servers started inside a test; stops them before ``engine``
    compares file descriptors (this fixture is set up after it, so torn down first)."""
    started: list[FaultServer] = []

    def keep(server: FaultServer) -> FaultServer:
        started.append(server)
        return server

    yield keep
    for server in started:
        await server.stop()


@pytest.fixture
def tls_site(engine: Engine, tmp_path: Path) -> Iterator[TLSSite]:
    """A TLS target (trustme CA, h2 + http/1.1 by ALPN), stopped before the fd check."""
    site = TLSSite(_reactor(), str(tmp_path))
    yield site
    site.stop()


# -- connecting ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused(engine: Engine, target: LoopbackSite) -> None:
    """A closed loopback port fails at once with ConnectError 7 COULDNT_CONNECT, long
    before the (5 s) connect timeout."""
    port = refused_port()
    client = engine.client()
    error, elapsed = await expect_fault(
        engine, client, f"http://127.0.0.1:{port}/", target, connect_timeout=5
    )
    assert_error(error, ConnectError, 7, "COULDNT_CONNECT")
    assert elapsed < 1.0


@pytest_twisted.ensureDeferred
async def test_closed_right_after_accept(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A server that accepts and sends FIN without a byte gives ProtocolError 52
    GOT_NOTHING ("Empty reply from server")."""
    server = serve(close_on_accept(_reactor()))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 52, "GOT_NOTHING")


# -- the body stops early --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reset_mid_body(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Headers promising 1 MB, 64 KB of body, then RST: ProtocolError 56 RECV_ERROR, after
    the first bytes were already delivered to the sink."""
    head = OK_HEAD + b"Content-Length: 1048576\r\n\r\n"
    server = serve(reset_after(_reactor(), head + b"x" * 65536, after=0.2))
    client = engine.client()
    sink = CountingSink()
    error, _ = await expect_fault(engine, client, server.url, target, sink=sink, timeout=5)
    assert_error(error, ProtocolError, 56, "RECV_ERROR")
    assert 0 < sink.received <= 65536
    assert sink.unregistered


@pytest_twisted.ensureDeferred
async def test_fin_before_content_length(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Content-Length 1000, 3 bytes, then a clean FIN: ProtocolError 18 PARTIAL_FILE."""
    head = OK_HEAD + b"Content-Length: 1000\r\n\r\n"
    server = serve(canned(_reactor(), head + b"abc"))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 18, "PARTIAL_FILE")
    assert "997 bytes missing" in error.message


@pytest_twisted.ensureDeferred
async def test_truncated_chunked_body(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A chunked body cut off by FIN inside a chunk (no terminating 0-chunk):
    ProtocolError 18 PARTIAL_FILE, not a silently short 200."""
    head = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    server = serve(canned(_reactor(), head + b"5\r\nhello\r\n100\r\nabc"))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 18, "PARTIAL_FILE")


# -- too slow ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_silent_server_total_timeout(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A server that reads the request and never answers, with timeout=1: CurlTimeoutError
    28 OPERATION_TIMEDOUT after about 1 s (curl's timer, driven by the reactor)."""
    server = serve(silent(_reactor()))
    client = engine.client()
    error, elapsed = await expect_fault(engine, client, server.url, target, timeout=1)
    assert_error(error, CurlTimeoutError, 28, "OPERATION_TIMEDOUT")
    assert isinstance(error, TimeoutError)
    assert 0.9 <= elapsed < 2.5
    assert server.requests == 1


@pytest_twisted.ensureDeferred
async def test_slow_drip_low_speed(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Headers, then one body byte per second, against low_speed=(100, 1) and no total
    timeout: CurlTimeoutError 28 from the low-speed check ("Operation too slow")."""
    head = OK_HEAD + b"Content-Length: 1000\r\n\r\n"
    server = serve(drip(_reactor(), head, b"z" * 1000, interval=1.0))
    client = engine.client()
    sink = CountingSink()
    error, elapsed = await expect_fault(
        engine, client, server.url, target, low_speed=(100, 1), sink=sink
    )
    assert_error(error, CurlTimeoutError, 28, "OPERATION_TIMEDOUT")
    assert "too slow" in error.message.lower()
    assert 0.9 <= elapsed < 4.0
    assert sink.received < 10


# -- broken HTTP ---------------------------------------------------------------------------

MALFORMED_STATUS = {
    # libcurl 8.23 answers a bad *first* status line with UNSUPPORTED_PROTOCOL (1), not
    # WEIRD_SERVER_REPLY (8): it cannot tell it from a reply of an HTTP version it does
    # not speak. The engine still classifies these as ProtocolError (the peer broke HTTP).
    "letters-for-code": (
        b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
        ProtocolError,
        1,
        "UNSUPPORTED_PROTOCOL",
        "Unsupported HTTP/1 subversion in response",
    ),
    "two-digit-code": (
        b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
        ProtocolError,
        1,
        "UNSUPPORTED_PROTOCOL",
        "Unsupported HTTP/1 subversion in response",
    ),
    "code-000": (
        b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
        ProtocolError,
        1,
        "UNSUPPORTED_PROTOCOL",
        "Unsupported response code in HTTP response",
    ),
    "not-http": (
        b"HELLO WORLD\r\n\r\n",
        ProtocolError,
        1,
        "UNSUPPORTED_PROTOCOL",
        "Received HTTP/0.9 when not allowed",
    ),
    # Only once curl knows it talks HTTP/1.x (here: after a 100 Continue) does a garbage
    # status line give WEIRD_SERVER_REPLY.
    "garbage-after-100": (
        b"HTTP/1.1 100 Continue\r\n\r\nGARBAGE\r\n\r\n",
        ProtocolError,
        8,
        "WEIRD_SERVER_REPLY",
        "Invalid status line",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_STATUS))
@pytest_twisted.ensureDeferred
async def test_malformed_status_line(
    case: str, engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A malformed status line is a ProtocolError. libcurl 8.23 reports a bad first
    status line (letters or two digits for the code, code 000, no "HTTP/" at all) as
    1 UNSUPPORTED_PROTOCOL with an HTTP-version message, and WEIRD_SERVER_REPLY (8)
    only for a bad status line after an interim 1xx response."""
    reply, cls, code, name, message = MALFORMED_STATUS[case]
    server = serve(canned(_reactor(), reply))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, cls, code, name)
    assert message in error.message


MALFORMED_HEADERS = {
    "header-without-colon": (b"NoColonHere\r\nContent-Length: 2\r\n", "Header without colon"),
    "non-numeric-content-length": (b"Content-Length: abc\r\n", "Invalid Content-Length"),
    "conflicting-content-length": (
        b"Content-Length: 2\r\nContent-Length: 3\r\n",
        "Invalid Content-Length",
    ),
    "negative-content-length": (b"Content-Length: -1\r\n", "Invalid Content-Length"),
    "nul-in-header": (b"X-A: a\0b\r\nContent-Length: 2\r\n", "NUL byte in header"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
@pytest_twisted.ensureDeferred
async def test_malformed_headers(
    case: str, engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Header lines curl refuses to guess about (no colon, a bad or ambiguous
    Content-Length, a NUL byte) give ProtocolError 8 WEIRD_SERVER_REPLY, never a
    response with a guessed body length (request smuggling territory)."""
    headers, message = MALFORMED_HEADERS[case]
    server = serve(canned(_reactor(), OK_HEAD + headers + b"\r\nok"))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 8, "WEIRD_SERVER_REPLY")
    assert message in error.message


BAD_CHUNKS = {
    "not-hex": (b"ZZZ\r\nhello\r\n0\r\n\r\n", "not a hex digit"),
    "size-too-long": (b"FFFFFFFFFFFFFFFFFF\r\nhello\r\n", "hex-length longer than"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
@pytest_twisted.ensureDeferred
async def test_bad_chunked_encoding(
    case: str, engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Broken chunk framing (a non-hex chunk size, an absurdly long one) gives
    ProtocolError 56 RECV_ERROR."""
    body, message = BAD_CHUNKS[case]
    reply = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body
    server = serve(canned(_reactor(), reply))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 56, "RECV_ERROR")
    assert message in error.message


@pytest_twisted.ensureDeferred
async def test_too_many_response_headers(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """400 headers of 1 KB each pass libcurl's 300 KiB cap on a response head: it gives
    ProtocolError 56 RECV_ERROR ("Too large response headers"), not 100 TOO_LARGE."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1024) for i in range(400))
    server = serve(canned(_reactor(), OK_HEAD + headers + b"Content-Length: 2\r\n\r\nok"))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 56, "RECV_ERROR")
    assert "Too large response headers" in error.message


@pytest_twisted.ensureDeferred
async def test_one_oversized_header(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A single 200 KB header line passes libcurl's 100 KiB per-header cap: that one is
    ProtocolError 100 TOO_LARGE (libcurl 8.23 leaves the error message empty)."""
    reply = OK_HEAD + b"X-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    server = serve(canned(_reactor(), reply))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, timeout=5)
    assert_error(error, ProtocolError, 100, "TOO_LARGE")


@pytest_twisted.ensureDeferred
async def test_corrupt_gzip(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A body labelled gzip that is not gzip, with decode=True: ProtocolError 61
    BAD_CONTENT_ENCODING."""
    reply = OK_HEAD + b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\nnotgzip!!!"
    server = serve(canned(_reactor(), reply))
    client = engine.client()
    error, _ = await expect_fault(engine, client, server.url, target, decode=True, timeout=5)
    assert_error(error, ProtocolError, 61, "BAD_CONTENT_ENCODING")


@pytest_twisted.ensureDeferred
async def test_stale_keepalive_connection_is_retried(
    engine: Engine, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """Not an error: when the server drops a reused keep-alive connection on the next
    request without a byte, curl retries once on a fresh connection and the fetch
    succeeds (the second response reports one new connection, on another local port)."""
    reply = OK_HEAD + b"Content-Length: 2\r\n\r\nok"
    server = serve(drop_second_request(_reactor(), reply))
    client = engine.client()
    first = await engine.fetch(client, server.url, timeout=5)
    second = await engine.fetch(client, server.url, timeout=5)
    assert (first.status, first.body, first.new_connections) == (200, b"ok", 1)
    assert (second.status, second.body, second.new_connections) == (200, b"ok", 1)
    assert second.local_port != first.local_port
    assert server.requests == 3  # first, the dropped retry victim, the retry


@pytest_twisted.ensureDeferred
async def test_reset_during_upload(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A server that resets as soon as it has the head of an 8 MB POST: ProtocolError 56
    RECV_ERROR ("Connection reset by peer"); libcurl 8.23 reports it from the receive
    side, not as 55 SEND_ERROR, consistently."""
    server = serve(FaultServer(_reactor(), on_request=FaultProtocol.reset))
    client = engine.client()
    error, _ = await expect_fault(
        engine, client, server.url, target, method="POST", body=b"u" * (8 << 20), timeout=5
    )
    assert_error(error, ProtocolError, 56, "RECV_ERROR")
    assert "reset by peer" in error.message
    assert server.requests == 1


# -- proxies -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxy_refuses_connect_tunnel(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """An HTTP proxy that answers CONNECT with 403: ConnectError 7 COULDNT_CONNECT
    ("CONNECT tunnel failed, response 403"); libcurl 8.23 no longer says 56 here. The
    origin is never contacted."""
    seen: list[bytes] = []

    def forbid(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        seen.append(proto.buffer.split(b"\r\n", 1)[0])
        proto.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        proto.transport.loseConnection()

    proxy = serve(FaultServer(_reactor(), on_request=forbid))
    client = engine.client()
    origin_port = refused_port()
    origin = f"https://127.0.0.1:{origin_port}/"
    error, _ = await expect_fault(
        engine, client, origin, target, proxy=f"http://127.0.0.1:{proxy.port_number}", timeout=5
    )
    assert_error(error, ConnectError, 7, "COULDNT_CONNECT")
    assert "CONNECT tunnel failed, response 403" in error.message
    assert seen == [f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1".encode()]


@pytest_twisted.ensureDeferred
async def test_proxy_down(engine: Engine, target: LoopbackSite) -> None:
    """A proxy nobody listens on: ConnectError 7 COULDNT_CONNECT naming the proxy, at
    once; the fetch does not fall back to a direct connection."""
    client = engine.client()
    proxy_port = refused_port()
    error, elapsed = await expect_fault(
        engine,
        client,
        target.url("/bytes?n=10"),
        target,
        proxy=f"http://127.0.0.1:{proxy_port}",
        connect_timeout=5,
    )
    assert_error(error, ConnectError, 7, "COULDNT_CONNECT")
    assert "over proxy" in error.message
    assert elapsed < 1.0


# -- limits --------------------------------------------------------------------------------

BOMB = "/gzip?n=50000000"
CAP = 1_000_000


@pytest.mark.parametrize("sink_kind", ["memory", "consumer"])
@pytest_twisted.ensureDeferred
async def test_gzip_bomb_stops_at_cap(sink_kind: str, engine: Engine, target: LoopbackSite) -> None:
    """50 MB of zeros gzipped to ~50 KB, fetched with decode=True and max_body_bytes=1 MB:
    BodyTooLargeError 63 FILESIZE_EXCEEDED, with at most 1 MB of *decoded* bytes ever
    delivered and the transfer stopped there, not after inflating all 50 MB.

    libcurl 8.23 applies CURLOPT_MAXFILESIZE to the decoded stream itself ("Would have
    exceeded max file size"), so it stops the bomb even before the engine's own write
    cap would; the class, code and name are the same either way."""
    client = engine.client()
    # Warm the server's cache (it compresses 50 MB once), outside the timed fetch.
    raw = await engine.fetch(client, target.url(BOMB))
    assert raw.headers.get("content-encoding") == "gzip"
    assert len(raw.body) < CAP // 10
    sink = CountingSink() if sink_kind == "consumer" else None
    error, elapsed = await expect_fault(
        engine, client, target.url(BOMB), target, decode=True, max_body_bytes=CAP, sink=sink
    )
    assert_error(error, BodyTooLargeError, 63, "FILESIZE_EXCEEDED")
    assert elapsed < 2.0
    if sink is not None:
        assert CAP // 2 < sink.received <= CAP
        assert sink.unregistered


@pytest_twisted.ensureDeferred
async def test_content_length_over_cap_stops_before_body(
    engine: Engine, target: LoopbackSite
) -> None:
    """A Content-Length above max_body_bytes is refused from the head alone:
    BodyTooLargeError 63 FILESIZE_EXCEEDED with not a byte of body delivered."""
    client = engine.client()
    sink = CountingSink()
    error, _ = await expect_fault(
        engine, client, target.url("/bytes?n=2000000"), target, max_body_bytes=CAP, sink=sink
    )
    assert_error(error, BodyTooLargeError, 63, "FILESIZE_EXCEEDED")
    assert sink.received == 0


@pytest_twisted.ensureDeferred
async def test_redirect_loop(engine: Engine, target: LoopbackSite) -> None:
    """A redirect to itself, forever, with max_redirects=5: TooManyRedirectsError 47
    TOO_MANY_REDIRECTS ("Maximum (5) redirects followed")."""
    client = engine.client()
    error, elapsed = await expect_fault(
        engine, client, target.url("/redirect?loop=1"), target, max_redirects=5
    )
    assert_error(error, TooManyRedirectsError, 47, "TOO_MANY_REDIRECTS")
    assert "Maximum (5) redirects" in error.message
    assert elapsed < 2.0


# -- schemes -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redirect_to_file_is_refused(
    engine: Engine, target: LoopbackSite, tmp_path: Path
) -> None:
    """A redirect to file:///etc/hostname (or to any local file) is refused with
    UnsupportedProtocolError 1 UNSUPPORTED_PROTOCOL ("... is disabled (in redirect)"),
    and the file is never opened: inotify sees no open/read and the sink gets nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"must not leak\n")
    watch = FileAccessWatch(secret)
    try:
        client = engine.client()
        for path in ("/etc/hostname", str(secret)):
            sink = CountingSink()
            error, _ = await expect_fault(
                engine, client, target.url(f"/redirect?to=file://{path}"), target, sink=sink
            )
            assert_error(error, UnsupportedProtocolError, 1, "UNSUPPORTED_PROTOCOL")
            assert '"file" is disabled (in redirect)' in error.message
            assert sink.received == 0
        assert watch.events() == b""
        # Positive control: the watch does see an open.
        assert secret.read_bytes()
        assert watch.events() != b""
    finally:
        watch.close()


@pytest_twisted.ensureDeferred
async def test_direct_file_url_is_refused(
    engine: Engine, target: LoopbackSite, tmp_path: Path
) -> None:
    """A file:// URL given directly is refused before anything is opened:
    UnsupportedProtocolError 1 UNSUPPORTED_PROTOCOL, and inotify sees no access."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"must not leak\n")
    watch = FileAccessWatch(secret)
    try:
        client = engine.client()
        error, elapsed = await expect_fault(engine, client, f"file://{secret}", target)
        assert_error(error, UnsupportedProtocolError, 1, "UNSUPPORTED_PROTOCOL")
        assert '"file" is disabled' in error.message
        assert elapsed < 1.0
        assert watch.events() == b""
    finally:
        watch.close()


# -- TLS -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_self_signed_certificate(
    engine: Engine, target: LoopbackSite, tls_site: TLSSite
) -> None:
    """A certificate from an unknown CA fails verification with TLSError 60
    PEER_FAILED_VERIFICATION; the same URL with that CA as ca_bundle succeeds."""
    client = engine.client()
    url = tls_site.url("/bytes?n=100")
    error, _ = await expect_fault(engine, client, url, target, timeout=5)
    assert_error(error, TLSError, 60, "PEER_FAILED_VERIFICATION")
    response = await engine.fetch(client, url, ca_bundle=tls_site.ca_path, timeout=5)
    assert response.status == 200
    assert response.tls_verify_result == 0
    assert len(response.body) == 100


@pytest_twisted.ensureDeferred
async def test_plain_http_on_tls_port(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """An https:// URL whose server answers in plaintext HTTP: TLSError 35
    SSL_CONNECT_ERROR (the handshake reads a record that is not TLS)."""

    def plaintext(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        proto.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = serve(FaultServer(_reactor(), on_connect=plaintext))
    client = engine.client()
    url = f"https://127.0.0.1:{server.port_number}/"
    error, _ = await expect_fault(engine, client, url, target, timeout=5)
    assert_error(error, TLSError, 35, "SSL_CONNECT_ERROR")


@pytest_twisted.ensureDeferred
async def test_tls_handshake_stall_connect_timeout(
    engine: Engine, target: LoopbackSite, serve: Callable[[FaultServer], FaultServer]
) -> None:
    """A server that accepts TCP but never answers the ClientHello, with
    connect_timeout=1 (which covers the TLS handshake) and no total timeout:
    CurlTimeoutError 28 OPERATION_TIMEDOUT after about 1 s."""
    server = serve(silent(_reactor()))
    client = engine.client()
    url = f"https://127.0.0.1:{server.port_number}/"
    error, elapsed = await expect_fault(engine, client, url, target, connect_timeout=1)
    assert_error(error, CurlTimeoutError, 28, "OPERATION_TIMEDOUT")
    assert 0.9 <= elapsed < 2.5


@pytest_twisted.ensureDeferred
async def test_h2_streams_share_connection_one_cancelled(engine: Engine, tls_site: TLSSite) -> None:
    """Four concurrent HTTP/2 fetches of a 0.5 s endpoint multiplex on one TLS
    connection; cancelling one mid-flight fails only it (CancelledError) and the other
    three complete with 200 on that same connection, concurrently."""
    client = engine.client()
    url = tls_site.url("/delay?s=0.5")
    options: dict[str, Any] = {"http_version": "2", "ca_bundle": tls_site.ca_path, "timeout": 5}
    start = time.monotonic()
    fetches = [client.fetch(url, **options) for _ in range(4)]
    await engine.sleep(0.2)
    victim = fetches.pop()
    victim.cancel()
    with pytest.raises(CancelledError):
        await victim
    responses = await engine.within(defer.gatherResults(fetches, consumeErrors=True))
    elapsed = time.monotonic() - start
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.body for r in responses] == [b"done"] * 3
    assert {r.http_version for r in responses} == {"2"}
    assert len({r.local_port for r in responses}) == 1
    assert sum(r.new_connections for r in responses) == 1
    assert elapsed < 1.4  # streams ran side by side, not one after another
    assert client.in_flight == 0
