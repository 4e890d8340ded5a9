"""The public client API as a demanding library user expects it, against real loopback
servers: request options, the response record, errors, cancellation, limits, shutdown,
threads and validation.

Every test runs under the ``engine`` fixture (watchdog, no leftover registrations or fds,
socket_action cap). Servers a test needs are fixtures requested before ``engine``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pycurl
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IConsumer
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from curlfetch.engine import (
    BodyTooLargeError,
    ClientClosedError,
    ConnectError,
    CurlClient,
    CurlError,
    CurlTimeoutError,
    Redirect,
    TLSError,
    TooManyRedirectsError,
    WrongThreadError,
)

from .conftest import Engine, _reactor, curl_registrations
from .servers import LoopbackSite, pattern_bytes
from .tls import TLSSite

# -- helpers ------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str | Path) -> str:
    return sha(Path(path).read_bytes())


async def echo(engine: Engine, client: Any, target: LoopbackSite, **opts: Any) -> Any:
    response = await engine.fetch(client, target.url("/echo"), **opts)
    assert response.status == 200
    return json.loads(response.body)


def echo_header(seen: Any, name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


async def failure_of(d: defer.Deferred[Any]) -> BaseException:
    """Await ``d`` and return what it failed with (fails the test if it succeeded)."""
    try:
        result = await d
    except BaseException as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


async def until(engine: Engine, condition: Callable[[], object], within: float = 3.0) -> None:
    """Let the reactor run until ``condition()`` holds (fails after ``within`` s)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await engine.sleep(0.01)


@implementer(IConsumer)
class RecordingConsumer:
    """A sink that hashes what it is given; ``on_write`` lets a test act inside write."""

    def __init__(self, on_write: Callable[[RecordingConsumer, bytes], None] | None = None):
        self.producer: Any = None
        self.streaming: bool | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.chunk_sizes: list[int] = []
        self.unregistered = False
        self.on_write = on_write

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)
        self.chunk_sizes.append(len(data))
        if self.on_write is not None:
            self.on_write(self, data)


@implementer(IBodyProducer)
class SlowProducer:
    """Writes ``data`` in ``pieces`` chunks, one per reactor turn ``interval`` s apart,
    with UNKNOWN_LENGTH; honours pause/resume and records contract violations."""

    def __init__(self, reactor: Any, data: bytes, pieces: int, interval: float = 0.01):
        step = -(-len(data) // pieces)
        self.chunks = [data[i : i + step] for i in range(0, len(data), step)]
        self.length: Any = UNKNOWN_LENGTH
        self.reactor = reactor
        self.interval = interval
        self.consumer: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.call: Any = None
        self.writes = 0
        self.paused = self.stopped = self.finished = False
        self.stopped_after_finish = False

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self.consumer = consumer
        self._schedule()
        return self.done

    def _schedule(self) -> None:
        self.call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self.call = None
        if self.paused or self.stopped:
            return
        if self.chunks:
            self.writes += 1
            self.consumer.write(self.chunks.pop(0))
            if self.call is None and not self.paused and not self.stopped:
                self._schedule()
        else:
            self.finished = True
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.call is None and not self.finished and not self.stopped:
            self._schedule()

    def stopProducing(self) -> None:
        if self.finished:
            self.stopped_after_finish = True
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class _Trap(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.hits += 1
        assert self.transport is not None
        self.transport.loseConnection()


class Trap:
    """A loopback port that counts connections and closes them: where proxies from the
    environment would send traffic."""

    def __init__(self, reactor: Any) -> None:
        self.factory = protocol.Factory.forProtocol(_Trap)
        self.factory.hits = 0  # type: ignore[attr-defined]
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def hits(self) -> int:
        return int(self.factory.hits)  # type: ignore[attr-defined]


class ForwardProxy:
    """A tiny loopback forward proxy (twisted.web.proxy) recording each request URI."""

    def __init__(self, reactor: Any) -> None:
        from twisted.web import http, proxy

        seen: list[str] = []
        self.seen = seen

        class RecordingRequest(proxy.ProxyRequest):
            def process(self) -> None:
                seen.append(self.uri.decode())
                super().process()

        class RecordingProxy(proxy.Proxy):
            requestFactory = RecordingRequest

        factory = http.HTTPFactory()
        factory.protocol = RecordingProxy  # type: ignore[assignment]
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"


@pytest.fixture
def tls_site(tmp_path: Path) -> Iterator[TLSSite]:
    site = TLSSite(_reactor(), str(tmp_path))
    yield site
    site.stop()


@pytest.fixture
def mtls_site(tmp_path: Path) -> Iterator[TLSSite]:
    where = tmp_path / "mtls"
    where.mkdir()
    site = TLSSite(_reactor(), str(where), require_client_cert=True)
    yield site
    site.stop()


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap(_reactor())
    yield t
    t.port.stopListening()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy(_reactor())
    yield p
    p.port.stopListening()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A URL whose TCP connect never completes: a listener with a full accept queue,
    so the kernel drops the SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    for s in fillers:
        s.close()
    listener.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# -- request options ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_method_and_multivalued_headers_in_order(
    engine: Engine, target: LoopbackSite
) -> None:
    """The method is sent as given, and headers (repeated names, empty values) arrive in
    the order given, each value of a repeated header in order; ``user_agent`` is sent
    unless a header of that name (in any case) is given."""
    client = engine.client()
    headers = [
        ("X-Multi", "one"),
        ("X-Second", "mid"),
        ("X-Multi", "two"),
        ("X-Multi", "three"),
        ("X-Empty", ""),
    ]
    for method in ("GET", "DELETE", "OPTIONS", "PATCH", "PUT", "POST"):
        seen = await echo(engine, client, target, method=method, headers=headers)
        assert seen["method"] == method
        assert echo_header(seen, "x-multi") == ["one", "two", "three"]
        assert echo_header(seen, "x-second") == ["mid"]
        assert echo_header(seen, "x-empty") == [""]
        names = [k.lower() for k, _ in seen["headers"] if k.lower().startswith("x-")]
        assert names.index("x-multi") < names.index("x-second") < names.index("x-empty")
        assert seen["body_size"] == 0
    seen = await echo(engine, client, target, headers={"X-Map": "a", "User-Agent": "ua/1"})
    assert echo_header(seen, "x-map") == ["a"]
    assert echo_header(seen, "user-agent") == ["ua/1"]
    seen = await echo(engine, client, target, user_agent="default/2")
    assert echo_header(seen, "user-agent") == ["default/2"]
    seen = await echo(
        engine, client, target, user_agent="default/2", headers={"user-agent": "mine/3"}
    )
    assert echo_header(seen, "user-agent") == ["mine/3"]
    head = await engine.fetch(client, target.url("/echo"), method="HEAD")
    assert head.status == 200
    assert head.body == b""


@pytest_twisted.ensureDeferred
async def test_body_bytes_and_binary_file(
    tmp_path: Path, engine: Engine, target: LoopbackSite
) -> None:
    """A bytes body and a binary-file body arrive intact (size and sha256) for POST and
    PUT, with Content-Length and no Expect: 100-continue stall."""
    client = engine.client()
    data = pattern_bytes(300_000)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    for method in ("POST", "PUT"):
        start = time.monotonic()
        seen = await echo(engine, client, target, method=method, body=data)
        assert (seen["method"], seen["body_size"], seen["body_sha256"]) == (
            method,
            len(data),
            sha(data),
        )
        assert echo_header(seen, "content-length") == [str(len(data))]
        with path.open("rb") as f:
            seen = await echo(engine, client, target, method=method, body=f)
        assert (seen["method"], seen["body_size"], seen["body_sha256"]) == (
            method,
            len(data),
            sha(data),
        )
        assert echo_header(seen, "content-length") == [str(len(data))]
        assert not echo_header(seen, "expect")
        assert time.monotonic() - start < 0.9  # no 1 s wait for 100-continue
    response = await engine.fetch(client, target.url("/echo"), method="POST", body=b"abc")
    assert response.size_upload == 3
    # An in-memory binary file, partly read already: the rest is sent, with its length.
    stream = io.BytesIO(b"skip" + data)
    stream.read(4)
    seen = await echo(engine, client, target, method="PUT", body=stream)
    assert (seen["body_size"], seen["body_sha256"]) == (len(data), sha(data))
    assert echo_header(seen, "content-length") == [str(len(data))]


@pytest_twisted.ensureDeferred
async def test_body_file_body_producer(engine: Engine, target: LoopbackSite) -> None:
    """twisted.web.client.FileBodyProducer bodies (known length; 3 MB exercises the
    upload high-water mark) arrive intact for POST and PUT."""
    client = engine.client()
    for method, size in (("POST", 50_000), ("PUT", 3 * 1024 * 1024)):
        data = pattern_bytes(size)
        producer = FileBodyProducer(io.BytesIO(data))
        seen = await echo(engine, client, target, method=method, body=producer)
        assert (seen["method"], seen["body_size"], seen["body_sha256"]) == (
            method,
            size,
            sha(data),
        )
        assert echo_header(seen, "content-length") == [str(size)]


@pytest_twisted.ensureDeferred
async def test_body_slow_producer_unknown_length(engine: Engine, target: LoopbackSite) -> None:
    """A producer of UNKNOWN_LENGTH that writes over several reactor turns is sent chunked
    and arrives intact, for POST and PUT."""
    client = engine.client()
    data = pattern_bytes(200_000)
    for method in ("POST", "PUT"):
        producer = SlowProducer(engine.reactor, data, pieces=8)
        seen = await echo(engine, client, target, method=method, body=producer)
        assert producer.writes == 8
        assert (seen["method"], seen["body_size"], seen["body_sha256"]) == (
            method,
            len(data),
            sha(data),
        )
        assert echo_header(seen, "transfer-encoding") == ["chunked"]
        assert not producer.stopped
    # The same producer with a known length: sent with Content-Length.
    producer = SlowProducer(engine.reactor, data, pieces=8)
    producer.length = len(data)
    seen = await echo(engine, client, target, method="PUT", body=producer)
    assert (seen["body_size"], seen["body_sha256"]) == (len(data), sha(data))
    assert echo_header(seen, "content-length") == [str(len(data))]


@pytest_twisted.ensureDeferred
async def test_body_producer_failure_fails_the_fetch(engine: Engine, target: LoopbackSite) -> None:
    """When a body producer's startProducing Deferred fails mid-upload, the fetch fails
    with that very exception and the client stays usable."""
    reactor = engine.reactor
    broken = RuntimeError("disk went away")

    @implementer(IBodyProducer)
    class FailingProducer:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer: Any) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            consumer.write(b"x" * 1000)
            reactor.callLater(0.05, d.errback, broken)
            return d

        def pauseProducing(self) -> None:
            pass

        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    client = engine.client()
    error = await failure_of(
        client.fetch(target.url("/echo"), method="POST", body=FailingProducer())
    )
    assert error is broken
    ok = await engine.fetch(client, target.url("/bytes?n=10"))
    assert ok.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_body_file_read_error_fails_the_fetch(engine: Engine, target: LoopbackSite) -> None:
    """When a file body's read() raises mid-upload, the fetch fails with that very
    exception, not curl's generic abort."""
    bad_sector = OSError(5, "bad sector")

    class FlakyFile:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise bad_sector
            return b"x" * min(size, 1000)

    client = engine.client()
    flaky: Any = FlakyFile()
    error = await failure_of(client.fetch(target.url("/echo"), method="PUT", body=flaky))
    assert error is bad_sector
    ok = await engine.fetch(client, target.url("/bytes?n=10"))
    assert ok.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_body_producer_over_http2(tls_site: TLSSite, engine: Engine) -> None:
    """A slow UNKNOWN_LENGTH producer and a FileBodyProducer upload intact over an HTTP/2
    stream (curl pauses the stream while the producer has nothing to give)."""
    client = engine.client()
    data = pattern_bytes(300_000)
    for body in (
        SlowProducer(engine.reactor, data, pieces=6),
        FileBodyProducer(io.BytesIO(data)),
    ):
        r = await engine.fetch(
            client, tls_site.url("/echo"), method="POST", body=body, ca_bundle=tls_site.ca_path
        )
        assert r.http_version == "2"
        seen = json.loads(r.body)
        assert (seen["body_size"], seen["body_sha256"]) == (len(data), sha(data))


@pytest_twisted.ensureDeferred
async def test_connect_timeout(blackhole: str, engine: Engine) -> None:
    """connect_timeout fails a connect that never completes, with CurlTimeoutError (28),
    on time."""
    client = engine.client()
    start = time.monotonic()
    error = await failure_of(client.fetch(blackhole, connect_timeout=0.3))
    elapsed = time.monotonic() - start
    assert isinstance(error, CurlTimeoutError)
    assert (error.code, error.name) == (28, "OPERATION_TIMEDOUT")
    assert 0.25 <= elapsed < 1.5


@pytest_twisted.ensureDeferred
async def test_total_timeout(engine: Engine, target: LoopbackSite) -> None:
    """timeout bounds the whole transfer: a 3 s response fails at ~0.4 s with 28."""
    client = engine.client()
    start = time.monotonic()
    error = await failure_of(client.fetch(target.url("/delay?s=3"), timeout=0.4))
    elapsed = time.monotonic() - start
    assert isinstance(error, CurlTimeoutError)
    assert error.code == 28
    assert 0.35 <= elapsed < 1.5
    ok = await engine.fetch(client, target.url("/delay?s=0.05"), timeout=2)
    assert ok.body == b"done"


@pytest_twisted.ensureDeferred
async def test_low_speed_limit(engine: Engine, target: LoopbackSite) -> None:
    """low_speed=(bytes/s, seconds) fails a trickling body (~500 B/s) with 28 after about
    the given seconds, and leaves a fast transfer alone."""
    client = engine.client()
    fast = await engine.fetch(client, target.url("/bytes?n=200000"), low_speed=(10_000, 1))
    assert len(fast.body) == 200_000
    start = time.monotonic()
    error = await failure_of(
        client.fetch(target.url("/stream?n=100000&chunk=100&delay=0.2"), low_speed=(10_000, 1))
    )
    elapsed = time.monotonic() - start
    assert isinstance(error, CurlTimeoutError)
    assert error.code == 28
    assert 0.9 <= elapsed < 3.5


@pytest_twisted.ensureDeferred
async def test_redirects_followed_off_and_limited(engine: Engine, target: LoopbackSite) -> None:
    """Redirects are followed by default and recorded per hop; follow_redirects=False
    returns the 302 itself; more hops than max_redirects (or a loop) fail with 47."""
    client = engine.client()
    r = await engine.fetch(client, target.url("/redirect?n=3"))
    assert r.status == 200
    assert r.body == pattern_bytes(10)
    assert r.redirect_count == 3
    assert r.effective_url == target.url("/bytes?n=10")
    assert r.redirects == [
        Redirect(302, "/redirect?n=2"),
        Redirect(302, "/redirect?n=1"),
        Redirect(302, "/bytes?n=10"),
    ]
    assert r.headers.get("content-length") == "10"
    assert "location" not in r.headers

    off = await engine.fetch(client, target.url("/redirect?n=3"), follow_redirects=False)
    assert off.status == 302
    assert off.headers.get("Location") == "/redirect?n=2"
    assert off.redirects == []
    assert off.redirect_count == 0
    assert off.effective_url == target.url("/redirect?n=3")

    exact = await engine.fetch(client, target.url("/redirect?n=2"), max_redirects=2)
    assert exact.status == 200
    for url, limit in (("/redirect?n=3", 2), ("/redirect?loop=1", 10), ("/redirect?n=1", 0)):
        error = await failure_of(client.fetch(target.url(url), max_redirects=limit))
        assert isinstance(error, TooManyRedirectsError), url
        assert (error.code, error.name) == (47, "TOO_MANY_REDIRECTS")


@pytest_twisted.ensureDeferred
async def test_max_body_bytes_enforced_mid_transfer(engine: Engine, target: LoopbackSite) -> None:
    """max_body_bytes stops a chunked body as soon as it passes the limit (long before the
    server is done), refuses a too-large Content-Length, applies to the decoded body, and
    lets a body of exactly the limit through."""
    client = engine.client()
    start = time.monotonic()
    error = await failure_of(
        client.fetch(target.url("/stream?n=2000000&chunk=65536&delay=0.05"), max_body_bytes=100_000)
    )
    assert isinstance(error, BodyTooLargeError)
    assert (error.code, error.name) == (63, "FILESIZE_EXCEEDED")
    assert time.monotonic() - start < 0.8  # the whole stream takes ~1.5 s
    error = await failure_of(client.fetch(target.url("/bytes?n=200000"), max_body_bytes=100_000))
    assert isinstance(error, BodyTooLargeError)
    error = await failure_of(
        client.fetch(target.url("/gzip?n=5000000"), decode=True, max_body_bytes=1_000_000)
    )
    assert isinstance(error, BodyTooLargeError)
    exact = await engine.fetch(client, target.url("/bytes?n=1000"), max_body_bytes=1000)
    assert len(exact.body) == 1000
    consumer = RecordingConsumer()
    error = await failure_of(
        client.fetch(
            target.url("/stream?n=1000000&chunk=10000&delay=0.01"),
            sink=consumer,
            max_body_bytes=55_000,
        )
    )
    assert isinstance(error, BodyTooLargeError)
    assert consumer.size <= 55_000
    assert consumer.unregistered


@pytest_twisted.ensureDeferred
async def test_truncate_body_keeps_a_prefix(engine: Engine, target: LoopbackSite) -> None:
    """truncate_body keeps exactly the first max_body_bytes bytes of a body longer than
    that (Content-Length or chunked, stopping long before a slow stream ends) and reports
    it as truncated; a body within the limit is whole and not truncated; truncate_body
    without max_body_bytes is refused before any I/O."""
    client = engine.client()
    cut = await engine.fetch(
        client, target.url("/bytes?n=200000"), max_body_bytes=1000, truncate_body=True
    )
    assert (cut.status, cut.body, cut.truncated) == (200, pattern_bytes(200_000)[:1000], True)
    start = time.monotonic()
    cut = await engine.fetch(
        client,
        target.url("/stream?n=2000000&chunk=65536&delay=0.05"),
        max_body_bytes=100_000,
        truncate_body=True,
    )
    assert cut.body == pattern_bytes(2_000_000)[:100_000]
    assert cut.truncated
    assert time.monotonic() - start < 0.8  # the whole stream takes ~1.5 s
    whole = await engine.fetch(
        client, target.url("/bytes?n=1000"), max_body_bytes=1000, truncate_body=True
    )
    assert (len(whole.body), whole.truncated) == (1000, False)
    with pytest.raises(ValueError, match="truncate_body"):
        client.fetch(target.url("/bytes"), truncate_body=True)


@pytest_twisted.ensureDeferred
async def test_http_versions_over_tls(tls_site: TLSSite, engine: Engine) -> None:
    """http_version "1.1" and "2" are negotiated as asked over TLS; the default is HTTP/2;
    "1.1" never rides a pooled HTTP/2 connection; "3" either works (falling back to TCP
    when the server has no QUIC) or, on a libcurl without HTTP/3, raises ValueError."""
    client = engine.client()
    ca = tls_site.ca_path
    url = tls_site.url("/bytes?n=100")
    # ("2" means "2, or 1.1 if the server cannot": libcurl may reuse a pooled 1.1
    # connection for it, so the HTTP/2 cases come first.)
    for asked, expected, new in ((None, "2", 1), ("2", "2", 0), ("1.1", "1.1", 1)):
        r = await engine.fetch(client, url, ca_bundle=ca, http_version=asked)
        assert (r.http_version, r.new_connections) == (expected, new), asked
        assert r.body == pattern_bytes(100)
    if pycurl.version_info()[4] & pycurl.VERSION_HTTP3:
        r = await engine.fetch(client, url, ca_bundle=ca, http_version="3", timeout=4)
        assert r.status == 200
        assert r.body == pattern_bytes(100)
    else:
        with pytest.raises(ValueError, match="HTTP/3"):
            client.fetch(url, http_version="3")


@pytest_twisted.ensureDeferred
async def test_http3_refused_without_libcurl_support(
    monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """On a libcurl built without HTTP/3, fetch(http_version="3") raises a clear ValueError
    synchronously (simulated by hiding the feature bit; nothing is sent)."""
    real = pycurl.version_info()
    features = real[4] & ~pycurl.VERSION_HTTP3
    monkeypatch.setattr(pycurl, "version_info", lambda: (*real[:4], features, *real[5:]))
    client = engine.client()
    with pytest.raises(ValueError, match=r"cannot speak HTTP/3"):
        client.fetch("https://127.0.0.1:1/", http_version="3")
    assert client.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_decode_gzip(engine: Engine, target: LoopbackSite) -> None:
    """decode=True sends Accept-Encoding (gzip included) and returns the decoded body;
    without it nothing is asked for and the body stays as sent."""
    client = engine.client()
    r = await engine.fetch(client, target.url("/gzip?n=50000"), decode=True)
    assert r.body == b"\0" * 50000
    raw = await engine.fetch(client, target.url("/gzip?n=50000"))
    assert raw.headers.get("content-encoding") == "gzip"
    assert gzip.decompress(raw.body) == b"\0" * 50000
    seen = await echo(engine, client, target, decode=True)
    assert "gzip" in echo_header(seen, "accept-encoding")[0]
    seen = await echo(engine, client, target)
    assert echo_header(seen, "accept-encoding") == []


# -- proxies ------------------------------------------------------------------------------

_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@pytest_twisted.ensureDeferred
async def test_explicit_proxy(
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    target: LoopbackSite,
) -> None:
    """An explicit proxy carries the request (the proxy sees the absolute URL), even when
    NO_PROXY in the environment names the target: the environment never decides."""
    client = engine.client()
    url = target.url("/bytes?n=500")
    r = await engine.fetch(client, url, proxy=forward_proxy.url)
    assert r.status == 200
    assert r.body == pattern_bytes(500)
    assert forward_proxy.seen == [url]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "*")
    r = await engine.fetch(client, url, proxy=forward_proxy.url)
    assert r.body == pattern_bytes(500)
    assert forward_proxy.seen == [url, url]


@pytest_twisted.ensureDeferred
async def test_environment_proxies_ignored(
    trap: Trap,
    tls_site: TLSSite,
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    target: LoopbackSite,
) -> None:
    """With no proxy given, http_proxy/HTTPS_PROXY/ALL_PROXY (any case) are ignored: HTTP
    and HTTPS go direct and the port they name sees no connection."""
    for name in _PROXY_VARS:
        monkeypatch.setenv(name, trap.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = engine.client()
    r = await engine.fetch(client, target.url("/bytes?n=10"))
    assert r.body == pattern_bytes(10)
    r = await engine.fetch(client, tls_site.url("/bytes?n=10"), ca_bundle=tls_site.ca_path)
    assert r.body == pattern_bytes(10)
    await engine.sleep(0.05)
    assert trap.hits == 0


# -- TLS ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_verify_default_ca_bundle_and_opt_out(tls_site: TLSSite, engine: Engine) -> None:
    """Verification is on by default (an unknown CA fails with TLSError 60); ca_bundle makes
    it pass with tls_verify_result 0; verify=False accepts the unknown CA."""
    client = engine.client()
    url = tls_site.url("/bytes?n=10")
    error = await failure_of(client.fetch(url))
    assert isinstance(error, TLSError)
    assert error.code == 60
    r = await engine.fetch(client, url, ca_bundle=tls_site.ca_path)
    assert (r.status, r.tls_verify_result) == (200, 0)
    r = await engine.fetch(client, url, verify=False)
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_tls_client_certificate(mtls_site: TLSSite, engine: Engine) -> None:
    """A server requiring client certificates refuses a client without one (a CurlError)
    and accepts one presenting client_cert and client_key."""
    client = engine.client()
    url = mtls_site.url("/bytes?n=10")
    error = await failure_of(client.fetch(url, ca_bundle=mtls_site.ca_path))
    assert isinstance(error, CurlError)
    assert error.code in {16, 35, 56, 92, 58, 98}, error
    r = await engine.fetch(
        client,
        url,
        ca_bundle=mtls_site.ca_path,
        client_cert=mtls_site.client_cert_path,
        client_key=mtls_site.client_key_path,
    )
    assert r.status == 200
    assert r.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_buffer_size(engine: Engine, target: LoopbackSite) -> None:
    """buffer_size bounds the chunks handed to a sink and does not change the body."""
    client = engine.client()
    consumer = RecordingConsumer()
    await engine.fetch(client, target.url("/bytes?n=300000"), buffer_size=4096, sink=consumer)
    assert consumer.hasher.hexdigest() == sha(pattern_bytes(300_000))
    assert max(consumer.chunk_sizes) <= 4096
    big = await engine.fetch(client, target.url("/bytes?n=300000"), buffer_size=512 * 1024)
    assert big.body == pattern_bytes(300_000)


# -- sinks --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_sink(tmp_path: Path, engine: Engine, target: LoopbackSite) -> None:
    """A path sink (str or PathLike) gets the exact body, Response.body is None and
    body_path names the file."""
    client = engine.client()
    for path in (str(tmp_path / "a.bin"), tmp_path / "b.bin"):
        r = await engine.fetch(client, target.url("/stream?n=1000000&chunk=30000"), sink=path)
        assert r.body is None
        assert r.body_path == str(path)
        assert isinstance(r.body_path, str)
        assert file_sha(path) == sha(pattern_bytes(1_000_000))
        assert r.size_download == 1_000_000


@pytest_twisted.ensureDeferred
async def test_file_sink_deleted_on_failure(
    tmp_path: Path, engine: Engine, target: LoopbackSite
) -> None:
    """A path sink whose transfer fails (limit passed, timeout, cancel) is deleted."""
    client = engine.client()
    path = tmp_path / "partial.bin"
    error = await failure_of(
        client.fetch(
            target.url("/stream?n=1000000&chunk=30000&delay=0.01"),
            sink=path,
            max_body_bytes=100_000,
        )
    )
    assert isinstance(error, BodyTooLargeError)
    assert not path.exists()
    error = await failure_of(
        client.fetch(target.url("/stream?n=100000&chunk=1000&delay=0.05"), sink=path, timeout=0.3)
    )
    assert isinstance(error, CurlTimeoutError)
    assert not path.exists()
    d = client.fetch(target.url("/stream?n=100000&chunk=1000&delay=0.05"), sink=path)
    await engine.sleep(0.2)
    assert path.exists()
    d.cancel()
    assert isinstance(await failure_of(d), defer.CancelledError)
    assert not path.exists()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A named pipe with a reader (so opening it to write does not block); the test may
    close the reader early (pop it from the list)."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    readers = [os.open(path, os.O_RDONLY | os.O_NONBLOCK)]
    yield path, readers
    for fd in readers:
        os.close(fd)


@pytest_twisted.ensureDeferred
async def test_file_sink_that_is_not_a_regular_file(
    fifo: tuple[Path, list[int]], engine: Engine, target: LoopbackSite
) -> None:
    """A sink path that is not a regular file (/dev/null, a FIFO) is written but never
    deleted on failure; a write error surfacing only when the file is closed (broken
    pipe, disk full) fails the fetch with that OSError instead of losing it."""
    path, readers = fifo
    client = engine.client()
    r = await engine.fetch(client, target.url("/bytes?n=5000"), sink=os.devnull)
    assert (r.body, r.body_path) == (None, os.devnull)
    error = await failure_of(
        client.fetch(target.url("/stream?n=30000&chunk=1000&delay=0.05"), sink=path, timeout=0.3)
    )
    assert isinstance(error, CurlTimeoutError)
    assert path.is_fifo()
    d = client.fetch(target.url("/delay?s=0.5"), sink=path)
    await engine.sleep(0.1)
    os.close(readers.pop())
    error = await failure_of(engine.within(d))
    assert isinstance(error, BrokenPipeError)
    assert path.is_fifo()


async def check_backpressure(engine: Engine, url: str, **opts: Any) -> Any:
    """Fetch ``url`` (a 2 MB /stream) into a consumer that pauses at its first write and
    resumes 0.5 s later; check the body is exact and the pause was quiet."""
    reactor = engine.reactor
    state: dict[str, Any] = {"paused": False, "writes_while_paused": 0}

    def resume(consumer: RecordingConsumer) -> None:
        state["actions_paused"] = engine.socket_actions - state["actions_at_pause"]
        state["paused"] = False
        consumer.producer.resumeProducing()

    def on_write(consumer: RecordingConsumer, data: bytes) -> None:
        if state["paused"]:
            state["writes_while_paused"] += 1
        if len(consumer.chunk_sizes) == 1:
            consumer.producer.pauseProducing()
            state["paused"] = True
            state["actions_at_pause"] = engine.socket_actions
            reactor.callLater(0.5, resume, consumer)

    client = engine.client()
    consumer = RecordingConsumer(on_write)
    size = 2 * 1024 * 1024
    start = time.monotonic()
    r = await engine.fetch(client, url, sink=consumer, **opts)
    assert time.monotonic() - start >= 0.5
    assert consumer.streaming is True
    assert consumer.unregistered
    assert r.body is None
    assert consumer.size == size
    assert consumer.hasher.hexdigest() == sha(pattern_bytes(size))
    assert state["writes_while_paused"] == 0
    assert state["actions_paused"] <= 5
    assert r.size_download == size
    return r


@pytest_twisted.ensureDeferred
async def test_consumer_backpressure(engine: Engine, target: LoopbackSite) -> None:
    """An IConsumer sink gets a streaming producer; pausing at the first write stops the
    transfer (no writes, few socket_actions) until resumed 0.5 s later, and the 2 MB body
    arrives exact: nothing duplicated or lost."""
    await check_backpressure(engine, target.url(f"/stream?n={2 * 1024 * 1024}&chunk=65536"))


@pytest_twisted.ensureDeferred
async def test_consumer_backpressure_http2(tls_site: TLSSite, engine: Engine) -> None:
    """The same backpressure contract holds for an HTTP/2 stream (curl buffers a paused
    stream; the body is still exact and the pause quiet)."""
    url = tls_site.url(f"/stream?n={2 * 1024 * 1024}&chunk=65536")
    r = await check_backpressure(engine, url, ca_bundle=tls_site.ca_path)
    assert r.http_version == "2"


@pytest_twisted.ensureDeferred
async def test_cancel_and_close_while_paused(engine: Engine, target: LoopbackSite) -> None:
    """A fetch whose consumer paused it can still be cancelled, and a client with a
    paused fetch can be closed: each fails at once with CancelledError, handle released."""
    url = target.url("/stream?n=3000000&chunk=65536")

    def pause_first(consumer: RecordingConsumer, data: bytes) -> None:
        if len(consumer.chunk_sizes) == 1:
            consumer.producer.pauseProducing()

    client = engine.client()
    consumer = RecordingConsumer(pause_first)
    d = client.fetch(url, sink=consumer)
    await until(engine, lambda: consumer.chunk_sizes)
    await engine.sleep(0.1)
    assert consumer.chunk_sizes == consumer.chunk_sizes[:1]
    assert not d.called
    d.cancel()
    assert isinstance(await failure_of(d), defer.CancelledError)
    assert not client.driver.handles
    assert consumer.unregistered

    other = engine.client()
    consumer = RecordingConsumer(pause_first)
    d = other.fetch(url, sink=consumer)
    await until(engine, lambda: consumer.chunk_sizes)
    await engine.sleep(0.1)
    other.close()
    assert isinstance(await failure_of(d), defer.CancelledError)
    assert not curl_registrations(engine.reactor)


@pytest_twisted.ensureDeferred
async def test_consumer_pause_resume_from_reactor(engine: Engine, target: LoopbackSite) -> None:
    """Pausing and resuming a consumer's producer from ordinary reactor code (outside
    write), several times, still delivers the body exactly once."""
    reactor = engine.reactor
    client = engine.client()
    consumer = RecordingConsumer()
    size = 1024 * 1024
    d = client.fetch(target.url(f"/stream?n={size}&chunk=16384&delay=0.01"), sink=consumer)
    for _ in range(4):
        await engine.sleep(0.05)
        if d.called:
            break
        consumer.producer.pauseProducing()
        before = consumer.size
        await engine.sleep(0.1)
        assert consumer.size == before
        reactor.callLater(0, consumer.producer.resumeProducing)
    await engine.within(d)
    assert consumer.size == size
    assert consumer.hasher.hexdigest() == sha(pattern_bytes(size))


# -- the response record ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_response_headers_multivalued_in_order(engine: Engine, target: LoopbackSite) -> None:
    """Response headers keep repeated names and their order, and look up by any case."""
    client = engine.client()
    r = await engine.fetch(client, target.url("/headers"))
    assert r.headers.get_all("x-multi") == ["one", "two"]
    assert r.headers.get_all("SET-COOKIE") == ["a=1", "b=2"]
    items = [(k.lower(), v) for k, v in r.headers.items()]
    assert items.index(("x-multi", "one")) < items.index(("x-multi", "two"))
    assert items.index(("set-cookie", "a=1")) < items.index(("set-cookie", "b=2"))
    assert r.headers.get("X-Multi") == "one"
    assert "x-missing" not in r.headers


@pytest_twisted.ensureDeferred
async def test_response_record(engine: Engine, target: LoopbackSite) -> None:
    """A response carries status, version, addresses, connection reuse, sizes, speeds and
    timings that are monotone where curl defines them so."""
    client = engine.client()
    first = await engine.fetch(client, target.url("/bytes?n=100000"))
    second = await engine.fetch(client, target.url("/bytes?n=100000"))
    assert (first.status, first.http_version, first.method) == (200, "1.1", "GET")
    assert first.url == target.url("/bytes?n=100000")
    assert (first.primary_ip, first.primary_port) == ("127.0.0.1", target.port_number)
    assert first.local_ip == "127.0.0.1"
    assert first.local_port > 0
    assert (first.new_connections, second.new_connections) == (1, 0)
    assert second.local_port == first.local_port
    assert first.size_download == 100_000
    assert first.speed_download > 0
    assert first.size_upload == 0
    assert first.header_size > 0
    assert first.request_size > 0
    assert first.redirect_count == 0
    assert first.tls_verify_result == 0
    for r in (first, second):
        t = r.timings
        assert 0 <= t.queue < 0.5
        assert 0 <= t.namelookup <= t.connect <= t.pretransfer <= t.starttransfer <= t.total
        assert t.appconnect == 0
        assert t.redirect == 0
        assert t.total < 2

    hops = await engine.fetch(client, target.url("/redirect?n=3"))
    assert hops.redirect_count == 3
    assert 0 < hops.timings.redirect <= hops.timings.total


@pytest_twisted.ensureDeferred
async def test_response_record_https(tls_site: TLSSite, engine: Engine) -> None:
    """Over TLS, appconnect falls between connect and pretransfer, and
    tls_verify_result is 0 for a verified peer."""
    client = engine.client()
    r = await engine.fetch(client, tls_site.url("/bytes?n=1000"), ca_bundle=tls_site.ca_path)
    t = r.timings
    assert 0 <= t.namelookup <= t.connect < t.appconnect <= t.pretransfer
    assert t.pretransfer <= t.starttransfer <= t.total
    assert r.tls_verify_result == 0
    assert r.primary_port == tls_site.port_number
    assert r.new_connections == 1


# -- errors -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_typed_errors_carry_code_name_message(engine: Engine) -> None:
    """A refused connection fails with ConnectError carrying curl's code, name and
    message, and its str() says all three."""
    client = engine.client()
    error = await failure_of(client.fetch(f"http://127.0.0.1:{free_port()}/"))
    assert isinstance(error, ConnectError)
    assert (error.code, error.name) == (7, "COULDNT_CONNECT")
    assert error.message
    assert "7" in str(error)
    assert "COULDNT_CONNECT" in str(error)


@pytest_twisted.ensureDeferred
async def test_unwritable_file_sink_fails_the_fetch(
    tmp_path: Path, engine: Engine, target: LoopbackSite
) -> None:
    """A path sink that cannot be created fails the fetch with the OSError itself, before
    anything is sent."""
    client = engine.client()
    d = client.fetch(target.url("/count?unwritable"), sink=tmp_path / "missing" / "x.bin")
    error = await failure_of(d)
    assert isinstance(error, FileNotFoundError)
    assert "/count?unwritable" not in target.root.hits
    assert client.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_sink_exception_comes_back_as_itself(engine: Engine, target: LoopbackSite) -> None:
    """An exception raised by a sink's write is the fetch's failure, the very instance,
    not curl's WRITE_ERROR; the sink is unregistered."""
    boom = ValueError("sink says no")

    def on_write(consumer: RecordingConsumer, data: bytes) -> None:
        raise boom

    client = engine.client()
    consumer = RecordingConsumer(on_write)
    error = await failure_of(client.fetch(target.url("/bytes?n=100000"), sink=consumer))
    assert error is boom
    assert consumer.unregistered
    assert len(consumer.chunk_sizes) == 1


# -- cancellation -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_in_flight(engine: Engine, target: LoopbackSite) -> None:
    """cancel() of a running fetch fails it with CancelledError at once and releases
    its handle; the client keeps working."""
    client = engine.client()
    d = client.fetch(target.url("/delay?s=3"))
    await engine.sleep(0.1)
    assert client.in_flight == 1
    results: list[Any] = []
    d.addBoth(results.append)
    d.cancel()
    assert len(results) == 1
    assert isinstance(results[0].value, defer.CancelledError)
    assert client.in_flight == 0
    assert not client.driver.handles
    ok = await engine.fetch(client, target.url("/bytes?n=10"))
    assert ok.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_cancel_queued(engine: Engine, target: LoopbackSite) -> None:
    """cancel() of a queued fetch fails it at once; it never reaches the server and the
    fetch ahead of it is unaffected."""
    client = engine.client(max_concurrent=1)
    first = client.fetch(target.url("/delay?s=0.2"))
    queued = client.fetch(target.url("/count?cancelled-in-queue"))
    assert client.queued == 1
    results: list[Any] = []
    queued.addBoth(results.append)
    queued.cancel()
    assert isinstance(results[0].value, defer.CancelledError)
    assert client.queued == 0
    r = await engine.within(first)
    assert r.body == b"done"
    await engine.sleep(0.05)
    assert "/count?cancelled-in-queue" not in target.root.hits


@pytest_twisted.ensureDeferred
async def test_cancel_from_inside_consumer_write(engine: Engine, target: LoopbackSite) -> None:
    """cancel() called inside a sink's write fails the fetch once with CancelledError,
    no further data is written, and the handle is detached soon after."""
    holder: dict[str, Any] = {}
    after_cancel: list[int] = []

    def on_write(consumer: RecordingConsumer, data: bytes) -> None:
        if "cancelled" in holder:
            after_cancel.append(len(data))
            return
        holder["cancelled"] = True
        holder["d"].cancel()

    client = engine.client()
    consumer = RecordingConsumer(on_write)
    d = client.fetch(target.url("/stream?n=3000000&chunk=65536"), sink=consumer)
    holder["d"] = d
    outcomes: list[Any] = []
    d.addBoth(outcomes.append)
    await until(engine, lambda: outcomes)
    await engine.sleep(0.1)  # room for writes that should not come
    assert len(outcomes) == 1
    assert isinstance(outcomes[0].value, defer.CancelledError)
    assert after_cancel == []
    assert consumer.unregistered
    assert client.in_flight == 0
    assert not client.driver.handles
    ok = await engine.fetch(client, target.url("/bytes?n=10"))
    assert ok.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_fetch_from_inside_consumer_write(engine: Engine, target: LoopbackSite) -> None:
    """A fetch started from inside a sink's write (inside a libcurl callback) runs and
    completes, and so does the transfer that was writing."""
    client = engine.client()
    inner: list[defer.Deferred[Any]] = []

    def on_write(consumer: RecordingConsumer, data: bytes) -> None:
        if not inner:
            inner.append(client.fetch(target.url("/bytes?n=777")))

    consumer = RecordingConsumer(on_write)
    await engine.fetch(client, target.url("/stream?n=200000&chunk=20000"), sink=consumer)
    assert consumer.hasher.hexdigest() == sha(pattern_bytes(200_000))
    r = await engine.within(inner[0])
    assert r.body == pattern_bytes(777)


@pytest_twisted.ensureDeferred
async def test_close_from_inside_consumer_write(engine: Engine, target: LoopbackSite) -> None:
    """close() called inside a sink's write fails that fetch and a queued one with
    CancelledError, once each, and releases everything."""
    client = engine.client(max_concurrent=1)
    writes_after_close: list[int] = []

    def on_write(consumer: RecordingConsumer, data: bytes) -> None:
        if client.closed:
            writes_after_close.append(len(data))
        else:
            client.close()

    consumer = RecordingConsumer(on_write)
    running = client.fetch(target.url("/stream?n=3000000&chunk=65536"), sink=consumer)
    queued = client.fetch(target.url("/count?queued-behind-close"))
    outcomes: list[Any] = []
    running.addBoth(outcomes.append)
    queued.addBoth(outcomes.append)
    await until(engine, lambda: outcomes)
    await engine.sleep(0.1)  # room for writes and callbacks that should not come
    assert len(outcomes) == 2
    assert all(isinstance(o.value, defer.CancelledError) for o in outcomes)
    assert writes_after_close == []
    assert client.driver.closed
    assert not client.driver.handles
    assert not curl_registrations(engine.reactor)
    assert "/count?queued-behind-close" not in target.root.hits


@pytest_twisted.ensureDeferred
async def test_cancel_stops_upload_producer(engine: Engine, target: LoopbackSite) -> None:
    """Cancelling mid-upload stops the body producer; cancelling after the producer has
    finished does not call stopProducing on it (IBodyProducer contract)."""
    client = engine.client()
    producing = SlowProducer(engine.reactor, pattern_bytes(100_000), pieces=40, interval=0.05)
    d = client.fetch(target.url("/echo"), method="POST", body=producing)
    await engine.sleep(0.2)
    d.cancel()
    assert isinstance(await failure_of(d), defer.CancelledError)
    assert producing.stopped
    assert 0 < producing.writes < 40

    done = SlowProducer(engine.reactor, pattern_bytes(1000), pieces=2)
    d = client.fetch(target.url("/delay?s=3"), method="POST", body=done)
    await engine.sleep(0.3)
    assert done.finished
    d.cancel()
    assert isinstance(await failure_of(d), defer.CancelledError)
    assert not done.stopped_after_finish


# -- limits -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_concurrent_fifo_and_queue_time(engine: Engine, target: LoopbackSite) -> None:
    """max_concurrent=2: six 0.3 s fetches run two at a time at the server, start in FIFO
    order, and the queued ones report the wait in timings.queue."""
    log = target.root.concurrency
    log.reset()
    client = engine.client(max_concurrent=2)
    ds = [client.fetch(target.url(f"/concurrent?s=0.3&id={i}")) for i in range(6)]
    assert (client.in_flight, client.queued) == (2, 4)
    responses = await engine.within(defer.gatherResults(ds, consumeErrors=True))
    assert [r.body for r in responses] == [str(i).encode() for i in range(6)]
    assert log.peak == 2
    waves = [sorted(log.starts[i : i + 2]) for i in (0, 2, 4)]
    assert waves == [["0", "1"], ["2", "3"], ["4", "5"]]
    for r in responses[:2]:
        assert r.timings.queue < 0.2
    for r in responses[2:4]:
        assert r.timings.queue >= 0.25
    for r in responses[4:]:
        assert r.timings.queue >= 0.5


@pytest_twisted.ensureDeferred
async def test_max_host_connections(engine: Engine, target: LoopbackSite) -> None:
    """max_host_connections=1: concurrent fetches to one host share one connection, one
    request at a time at the server."""
    log = target.root.concurrency
    log.reset()
    client = engine.client(max_host_connections=1)
    ds = [client.fetch(target.url(f"/concurrent?s=0.1&id={i}")) for i in range(4)]
    responses = await engine.within(defer.gatherResults(ds, consumeErrors=True))
    assert sorted(r.body or b"" for r in responses) == [b"0", b"1", b"2", b"3"]
    assert log.peak == 1
    assert len(set(log.ports)) == 1
    assert sum(r.new_connections for r in responses) == 1


@pytest_twisted.ensureDeferred
async def test_http2_multiplexing(tls_site: TLSSite, engine: Engine) -> None:
    """Concurrent fetches to an HTTP/2 server run as streams of one connection, at the
    same time."""
    log = tls_site.root.concurrency
    client = engine.client()
    ds = [
        client.fetch(tls_site.url(f"/concurrent?s=0.3&id={i}"), ca_bundle=tls_site.ca_path)
        for i in range(4)
    ]
    start = time.monotonic()
    responses = await engine.within(defer.gatherResults(ds, consumeErrors=True))
    assert time.monotonic() - start < 1.0
    assert {r.http_version for r in responses} == {"2"}
    assert len({r.local_port for r in responses}) == 1
    assert sum(r.new_connections for r in responses) == 1
    assert len(set(log.ports)) == 1
    assert log.peak == 4


# -- shutdown -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_fails_everything_and_is_final(engine: Engine, target: LoopbackSite) -> None:
    """close() fails in-flight and queued fetches with CancelledError at once, leaves
    nothing registered with the reactor, makes later fetches fail with ClientClosedError,
    and is idempotent."""
    client = engine.client(max_concurrent=1)
    running = client.fetch(target.url("/delay?s=3"))
    queued = client.fetch(target.url("/delay?s=3"))
    await engine.sleep(0.1)
    outcomes: list[Any] = []
    running.addBoth(outcomes.append)
    queued.addBoth(outcomes.append)
    client.close()
    assert len(outcomes) == 2
    assert all(isinstance(o.value, defer.CancelledError) for o in outcomes)
    assert client.closed
    assert client.driver.closed
    assert not curl_registrations(engine.reactor)
    assert not client.driver.sockets
    assert not client.driver.handles
    error = await failure_of(client.fetch(target.url("/bytes?n=10")))
    assert isinstance(error, ClientClosedError)
    client.close()


def test_close_on_shutdown_false_leaves_closing_to_the_owner() -> None:
    """By default the client registers close() as a "before shutdown" trigger; with
    close_on_shutdown=False it registers nothing, so a service can drain its transfers
    before it closes the client itself."""
    reactor = MemoryReactorClock()
    owned = CurlClient(reactor, close_on_shutdown=False)
    assert reactor.triggers == {}
    default = CurlClient(reactor)
    assert [t[0] for t in reactor.triggers["before"]["shutdown"]] == [default.close]
    owned.close()
    default.close()
    assert owned.closed


# -- threads ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fetch_from_other_thread(engine: Engine, target: LoopbackSite) -> None:
    """fetch() from a non-reactor thread raises WrongThreadError; through
    blockingCallFromThread it works."""
    client = engine.client()
    url = target.url("/bytes?n=100")

    def direct() -> BaseException | None:
        try:
            client.fetch(url)
        except BaseException as e:
            return e
        return None

    error = await engine.within(threads.deferToThread(direct))
    assert isinstance(error, WrongThreadError)
    assert "blockingCallFromThread" in str(error)
    fetch: Any = client.fetch

    def via_reactor() -> Any:
        return threads.blockingCallFromThread(engine.reactor, fetch, url)

    response = await engine.within(threads.deferToThread(via_reactor))
    assert response.body == pattern_bytes(100)


# -- validation ---------------------------------------------------------------------------

_BAD_OPTIONS: list[dict[str, Any]] = [
    {"headers": [("X-A", "a\r\nX-Injected: 1")]},
    {"headers": [("X-A", "a\nb")]},
    {"headers": [("X-A", "a\0b")]},
    {"headers": [("Bad Name", "v")]},
    {"headers": [("X:Y", "v")]},
    {"method": "GE T"},
    {"method": ""},
    {"method": "GET\r\n"},
    {"http_version": "4"},
    {"http_version": "2.0"},
    {"timeout": -1},
    {"timeout": 0},
    {"connect_timeout": -0.5},
    {"low_speed": (0, 5)},
    {"low_speed": (100, -1)},
    {"max_redirects": -1},
    {"max_body_bytes": 0},
    {"buffer_size": 10},
    {"client_key": "/tmp/key.pem"},
    {"sink": object()},
    {"method": "HEAD", "body": b"x"},
    {"method": "POST", "body": "text is not bytes"},
    {"method": "POST", "body": 12345},
    {"method": "POST", "body": io.StringIO("text file")},
]


@pytest_twisted.ensureDeferred
async def test_bad_options_raise_value_error(engine: Engine, target: LoopbackSite) -> None:
    """Bad options raise ValueError synchronously from fetch(), before anything is sent."""
    client = engine.client()
    for opts in [*_BAD_OPTIONS]:
        with pytest.raises(ValueError):
            client.fetch(target.url("/count?never"), **opts)
    for url in ("", "http://127.0.0.1/a b", "http://127.0.0.1/\r\nX: 1"):
        with pytest.raises(ValueError):
            client.fetch(url)
    assert (client.in_flight, client.queued) == (0, 0)
    assert "/count?never" not in target.root.hits
    with pytest.raises(ValueError):
        engine.client(max_concurrent=0)


@pytest_twisted.ensureDeferred
async def test_refuses_non_http_schemes(tmp_path: Path, engine: Engine) -> None:
    """file:// and other non-HTTP schemes fail with UNSUPPORTED_PROTOCOL (1), never read
    local files."""
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    client = engine.client()
    for url in (f"file://{secret}", "ftp://127.0.0.1/", "gopher://127.0.0.1/"):
        error = await failure_of(client.fetch(url))
        assert isinstance(error, CurlError)
        assert error.code == 1, url


@pytest_twisted.ensureDeferred
async def test_body_gets_no_invented_content_type(engine: Engine, target: LoopbackSite) -> None:
    """A bytes body is sent without libcurl's default form Content-Type unless one is given."""
    client = engine.client()
    plain = await engine.fetch(client, target.url("/echo"), method="POST", body=b"{}")
    names = [k.lower() for k, _ in json.loads(plain.body)["headers"]]
    assert "content-type" not in names
    typed = await engine.fetch(
        client,
        target.url("/echo"),
        method="POST",
        body=b"{}",
        headers=[("Content-Type", "application/json")],
    )
    sent = json.loads(typed.body)["headers"]
    assert ["Content-Type", "application/json"] in sent


@pytest_twisted.ensureDeferred
async def test_concurrent_waves_reuse_every_connection(
    engine: Engine, target: LoopbackSite
) -> None:
    """N concurrent HTTP/1 fetches open N connections (without libcurl's pool search),
    and the next wave of N reuses all of them: the fresh-connection shortcut never costs
    keep-alive reuse."""
    client = engine.client()
    url = target.url("/delay?s=0.2")
    first = await engine.within(
        defer.gatherResults([client.fetch(url) for _ in range(12)], consumeErrors=True)
    )
    assert sum(r.new_connections for r in first) == 12
    second = await engine.within(
        defer.gatherResults([client.fetch(url) for _ in range(12)], consumeErrors=True)
    )
    assert sum(r.new_connections for r in second) == 0
    assert {r.local_port for r in second} == {r.local_port for r in first}
