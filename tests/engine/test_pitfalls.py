"""One test (or a few) per item of curl-reactor-pitfalls.md.

Each test is named after its pitfall and says, in its docstring, what behaviour it checks
and which naive implementation of the curl <-> reactor glue it catches. Every test runs on
the ``engine`` fixture (watchdog, leftover-descriptor, fd-leak and socket_action checks)
and must pass under the epoll, poll, select and asyncio reactors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pycurl
import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from curlfetch.engine import (
    ConnectError,
    CurlClient,
    CurlError,
    CurlSocket,
    CurlTimeoutError,
    FetchError,
    Response,
    WrongThreadError,
    require_async_dns,
)

from .conftest import Engine, _reactor, curl_registrations
from .faults import FaultServer, silent
from .servers import LoopbackSite, pattern_bytes
from .tls import TLSSite

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h2_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSite]:
    """HTTPS + HTTP/2 (ALPN) on 127.0.0.1, shared by the module's TLS tests."""
    site = TLSSite(_reactor(), str(tmp_path_factory.mktemp("h2")))
    yield site
    site.stop()


@pytest.fixture
def silent_server() -> Iterator[FaultServer]:
    """Accepts, reads the request, never answers."""
    server = silent(_reactor())
    yield server
    server.stop()


@pytest.fixture
def log_failures() -> Iterator[list[dict[str, Any]]]:
    """Every event logged with a Failure (log.failure, unhandled errors) during the test."""
    observer = FailureObserver()
    events = observer.events
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


@implementer(ILogObserver)
class FailureObserver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.events.append(event)


def under_root(path: str) -> bool:
    """Whether ``path`` is inside the repository these tests belong to."""
    return Path(path).resolve().is_relative_to(ROOT)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fd_kind(fd: int) -> str:
    """What ``fd`` is, from /proc: ``socket:[…]``, ``anon_inode:[eventfd]``, …"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def closed_port() -> socket.socket:
    """A loopback port that refuses connections: bound, never listening. Keep it open
    while the test runs so nothing else can take the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def settle(engine: Engine, ready: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Let the reactor turn until ``ready()`` or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            return False
        await engine.sleep(0.01)
    return True


def failure_of(result: object) -> BaseException:
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert result.value is not None
    return result.value


@implementer(IConsumer)
class Consumer:
    """A body sink that records what it gets and keeps the producer the client hands it."""

    def __init__(self, on_write: Callable[[Consumer, bytes], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.registered = False
        self.on_write = on_write

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.registered = True

    def unregisterProducer(self) -> None:
        self.registered = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))
        if self.on_write is not None:
            self.on_write(self, data)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


# -- 1. calling back into libcurl from inside a libcurl callback ---------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_01_timer_zero_is_not_synchronous(
    engine: Engine, target: LoopbackSite
) -> None:
    """The very first GET on a fresh client succeeds without any multi error.

    ``add_handle`` calls the timer callback with ``timeout_ms == 0`` synchronously. Catches
    a timer callback that runs ``socket_action`` right away for 0 instead of scheduling it
    with ``callLater(0)``: pycurl's guard ("multi_perform() is currently running") fails
    the first request.
    """
    client = engine.client()
    response = await engine.fetch(client, target.url("/bytes?n=100"))
    assert response.status == 200
    assert response.body == pattern_bytes(100)
    stats = client.driver.stats
    assert stats.multi_errors == 0
    assert stats.callback_errors == 0


@pytest_twisted.ensureDeferred
async def test_pitfall_01_fetch_from_header_callback(engine: Engine, target: LoopbackSite) -> None:
    """``client.fetch(url2)`` called from inside HEADERFUNCTION is started once curl
    returns, and both transfers complete.

    Catches a ``fetch()`` that calls ``add_handle`` while libcurl is running a callback:
    pycurl refuses ("cannot add/remove handle - multi_perform() already running") and the
    new fetch, and with it the outer one, fails.
    """
    client = engine.client()
    inner: list[Deferred[Any]] = []
    header_lines: list[bytes] = []

    def on_header(line: bytes) -> None:
        header_lines.append(line)
        if not inner:
            assert client.driver.inside_curl
            inner.append(client.fetch(target.url("/bytes?n=55")))

    def prepare(curl: pycurl.Curl) -> None:
        curl.setopt(pycurl.HEADERFUNCTION, on_header)

    outer = await engine.fetch(client, target.url("/bytes?n=10"), prepare=prepare)
    assert outer.status == 200
    assert outer.body == pattern_bytes(10)
    assert header_lines[0].startswith(b"HTTP/1.1 200")
    assert len(inner) == 1
    second = await engine.within(inner[0])
    assert second.status == 200
    assert second.body == pattern_bytes(55)
    assert client.driver.stats.multi_errors == 0


# -- 2. the timer callback cancels the running DelayedCall --------------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_02_timer_callback_inside_running_delayedcall(
    engine: Engine, target: LoopbackSite
) -> None:
    """A single loopback GET (and one that needs a re-armed timeout timer) succeeds with no
    callback or multi errors.

    libcurl re-arms its timer from inside the timer-driven ``socket_action``. Catches a
    timer callback that cancels or resets the DelayedCall that is running right now:
    Twisted raises ``AlreadyCalled``, pycurl turns it into -1 and every transfer is aborted
    with CURLM error 11.
    """
    client = engine.client()
    response = await engine.fetch(client, target.url("/bytes?n=10"))
    assert response.status == 200
    delayed = await engine.fetch(client, target.url("/delay?s=0.2"), timeout=3)
    assert delayed.body == b"done"
    stats = client.driver.stats
    assert stats.timer_fires >= 1
    assert stats.callback_errors == 0
    assert stats.multi_errors == 0


# -- 3. exceptions in the socket / timer callbacks, and a dead multi ----------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_03_socket_callback_exception_fails_all_then_recovers(
    engine: Engine, target: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When ``reactor.addReader`` raises once inside the socket callback while an unrelated
    slow request is running, both requests errback promptly with a ``FetchError`` and a
    later fetch on the same client succeeds.

    pycurl >= 7.46 turns the exception into -1, libcurl aborts every transfer and marks the
    multi dead. Catches glue that swallows the ``socket_action`` error (transfers stay
    attached to a dead multi and hang), glue that swallows the callback exception and
    returns 0 (the new socket is never watched: a silent hang), and glue that does not
    detach every handle (the next ``add_handle`` fails).
    """
    reactor = _reactor()
    client = engine.client()
    slow = client.fetch(target.url("/delay?s=3"))
    assert await settle(engine, lambda: bool(curl_registrations(reactor)))
    await engine.sleep(0.05)

    injected: list[object] = []
    real_add_reader = reactor.addReader

    def flaky_add_reader(reader: Any) -> None:
        if isinstance(reader, CurlSocket) and not injected:
            injected.append(reader)
            raise RuntimeError("injected addReader failure")
        real_add_reader(reader)

    monkeypatch.setattr(reactor, "addReader", flaky_add_reader)
    started = time.monotonic()
    fast = client.fetch(target.url("/bytes?n=10"))
    results = await engine.within(DeferredList([slow, fast], consumeErrors=True), 2.5)
    assert injected, "the fault was never injected"
    for ok, result in results:
        assert not ok, f"expected both fetches to fail, got {result!r}"
        error = failure_of(result)
        assert not isinstance(error, CancelledError), "hung: cancelled by the 2.5 s limit"
        assert isinstance(error, FetchError), error
    assert time.monotonic() - started < 2.0
    assert client.driver.stats.callback_errors >= 1
    assert not client.driver.handles

    later = await engine.fetch(client, target.url("/bytes?n=20"))
    assert later.body == pattern_bytes(20)


# -- 4. reading completions only after socket events / while running_handles > 0 ---------


@pytest_twisted.ensureDeferred
async def test_pitfall_04_timeout_completion_read_from_timer_path(
    engine: Engine, silent_server: FaultServer
) -> None:
    """A request to a server that never answers, with ``timeout=1``, errbacks with
    ``CurlTimeoutError`` (code 28) after about one second.

    The transfer finishes inside a timer-driven ``socket_action`` and ``running_handles``
    drops to 0. Catches glue that calls ``info_read`` only after socket events, or only
    while ``running_handles > 0`` (curl's multi-uv.c): the completion is never read and
    the fetch hangs.
    """
    client = engine.client()
    started = time.monotonic()
    with pytest.raises(CurlTimeoutError) as info:
        await engine.within(client.fetch(silent_server.url, timeout=1.0), 3.0)
    elapsed = time.monotonic() - started
    assert info.value.code == 28
    assert 0.9 <= elapsed < 2.5, elapsed
    assert not client.driver.handles


# -- 5. doRead/doWrite return a value -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_05_do_read_returns_none(engine: Engine, target: LoopbackSite) -> None:
    """A GET whose body arrives in several reads (8 chunks, 20 ms apart) completes, as does
    a plain GET, and no curl socket is left registered.

    Catches ``doRead``/``doWrite`` that return ``socket_action``'s ``(0, n)`` (or raise):
    Twisted treats a truthy result as a disconnect, drops the descriptor and curl waits
    forever on a socket nobody watches.
    """
    client = engine.client()
    plain = await engine.fetch(client, target.url("/bytes?n=1000"))
    assert plain.body == pattern_bytes(1000)
    streamed = await engine.within(
        client.fetch(target.url("/stream?n=65536&chunk=8192&delay=0.02")), 3.0
    )
    assert streamed.body == pattern_bytes(65536)
    assert not curl_registrations(_reactor())


# -- 6. the reactor calls connectionLost instead of doWrite -------------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_06_connect_refused_via_connection_lost(engine: Engine) -> None:
    """Connecting to a closed loopback port with ``connect_timeout=4`` fails with
    ``ConnectError`` code 7 well before the connect timeout (< 2 s; ~1 ms in practice).

    epoll and poll report the refused connect as OUT|ERR|HUP, which Twisted delivers as
    ``connectionLost`` rather than ``doWrite``. Catches a ``connectionLost`` that does
    nothing: curl is never told and the fetch fails with code 28 after 4 s.
    """
    refusing = closed_port()
    try:
        port = refusing.getsockname()[1]
        client = engine.client()
        started = time.monotonic()
        with pytest.raises(ConnectError) as info:
            await engine.within(client.fetch(f"http://127.0.0.1:{port}/", connect_timeout=4.0), 6.0)
        elapsed = time.monotonic() - started
    finally:
        refusing.close()
    assert info.value.code == 7, info.value
    assert elapsed < 2.0, f"took {elapsed:.2f}s: the timeout path, not the refusal"
    assert not curl_registrations(_reactor())


# -- 7. POLL_REMOVE handled late or ignored -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_07_poll_remove_before_fd_reuse(
    engine: Engine, target: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sequential ``Connection: close`` requests (each new socket reuses the fd
    number of the one before) all succeed; every curl descriptor is removed from the
    reactor while its fd is still open and ``fileno()`` still returns it; none is left
    registered.

    libcurl sends POLL_REMOVE just before closing the socket. Catches removal deferred
    with ``callLater`` (epoll: EBADF, then ENOENT on the reused fd, then error 11) and an
    ignored POLL_REMOVE (error 11 on epoll/asyncio, stale descriptors on poll/select).
    """
    reactor = _reactor()
    removals: list[tuple[int, int, bool]] = []
    socket_fds: list[int] = []
    real_remove_reader, real_remove_writer = reactor.removeReader, reactor.removeWriter
    real_add_writer = reactor.addWriter

    def record_removal(sock: CurlSocket) -> None:
        try:
            os.fstat(sock.fd)
            open_ = True
        except OSError:
            open_ = False
        removals.append((sock.fd, sock.fileno(), open_))

    def remove_reader(reader: Any) -> None:
        if isinstance(reader, CurlSocket):
            record_removal(reader)
        real_remove_reader(reader)

    def remove_writer(writer: Any) -> None:
        if isinstance(writer, CurlSocket):
            record_removal(writer)
        real_remove_writer(writer)

    def add_writer(writer: Any) -> None:
        if isinstance(writer, CurlSocket) and fd_kind(writer.fd).startswith("socket:"):
            socket_fds.append(writer.fd)
        real_add_writer(writer)

    monkeypatch.setattr(reactor, "removeReader", remove_reader)
    monkeypatch.setattr(reactor, "removeWriter", remove_writer)
    monkeypatch.setattr(reactor, "addWriter", add_writer)

    client = engine.client()
    ports = []
    for n in (10, 20, 30):
        response = await engine.fetch(
            client, target.url(f"/bytes?n={n}"), headers={"Connection": "close"}
        )
        assert response.body == pattern_bytes(n)
        assert response.new_connections == 1
        ports.append(response.local_port)
    assert len(set(ports)) == 3
    assert len(socket_fds) == 3
    assert len(set(socket_fds)) < 3, f"no fd number was reused: {socket_fds}"
    assert removals
    for fd, fileno, was_open in removals:
        assert was_open, f"fd {fd} was already closed when it left the reactor"
        assert fileno == fd, f"fileno() was {fileno} for fd {fd} at removal"
    assert client.driver.stats.multi_errors == 0
    assert not curl_registrations(reactor)
    assert not client.driver.sockets


# -- 8. one descriptor object per registration --------------------------------------------


@pytest.mark.engine(max_socket_actions=99)
@pytest_twisted.ensureDeferred
async def test_pitfall_08_one_descriptor_per_registration(
    engine: Engine, target: LoopbackSite
) -> None:
    """Eight concurrent requests, then four sequential ones, take fewer than 100
    ``socket_action`` calls in all, and leave no descriptor registered.

    select and asyncio key registrations by object. Catches a fresh descriptor object per
    socket callback (``removeReader(new_obj)`` leaves the old one registered): the reactor
    spins (~90,000 calls in 0.8 s) or sequential requests hang.
    """
    reactor = _reactor()
    client = engine.client()
    urls = [target.url(f"/bytes?n={1000 + i}") for i in range(8)]
    responses = await engine.within(defer.gatherResults([client.fetch(u) for u in urls]), 3.0)
    for i, response in enumerate(responses):
        assert response.body == pattern_bytes(1000 + i)
    for i in range(4):
        response = await engine.fetch(client, target.url(f"/bytes?n={i + 1}"))
        assert response.body == pattern_bytes(i + 1)
    await engine.sleep(0.05)
    assert engine.socket_actions < 100, engine.socket_actions
    assert not curl_registrations(reactor)
    client.close()
    assert not curl_registrations(reactor)
    assert engine.socket_actions < 100, engine.socket_actions


# -- 9. not every fd is a TCP socket; a socket is not one request -------------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_09_non_socket_fds(
    engine: Engine, target: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET to 127.0.0.1 succeeds although libcurl also hands the glue a non-socket fd
    (the threaded resolver's eventfd), which gets registered like any other.

    Catches glue that treats every fd as a TCP socket of one request (``getpeername``,
    ``socket.fromfd``…): that fails on the eventfd (and on a socket still connecting) and
    aborts the transfer.
    """
    reactor = _reactor()
    kinds: list[str] = []
    real_add_reader = reactor.addReader

    def add_reader(reader: Any) -> None:
        if isinstance(reader, CurlSocket):
            kinds.append(fd_kind(reader.fd))
        real_add_reader(reader)

    monkeypatch.setattr(reactor, "addReader", add_reader)
    client = engine.client()
    response = await engine.fetch(client, target.url("/bytes?n=10"))
    assert response.body == pattern_bytes(10)
    assert any(not kind.startswith("socket:") for kind in kinds), (
        f"libcurl registered only sockets ({kinds}); this test no longer covers non-socket fds"
    )
    assert client.driver.stats.callback_errors == 0


@pytest.mark.engine(watchdog=8.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_09_http2_streams_share_one_socket(engine: Engine, h2_site: TLSSite) -> None:
    """Four HTTP/2 ``/delay`` requests (``CURL_HTTP_VERSION_2TLS`` with ``PIPEWAIT``) run
    as streams of one connection (one ``LOCAL_PORT``); of four more, cancelling one leaves
    the other three to complete on that shared socket.

    Catches per-socket state keyed by request, e.g. a cancel that unregisters "the
    request's socket": the shared socket stops being watched and the other streams hang.
    """
    client = engine.client()
    opts: dict[str, Any] = {"ca_bundle": h2_site.ca_path, "http_version": "2"}
    first = await engine.within(
        defer.gatherResults([client.fetch(h2_site.url("/delay?s=0.3"), **opts) for _ in range(4)]),
        4.0,
    )
    assert [r.http_version for r in first] == ["2"] * 4
    assert len({r.local_port for r in first}) == 1, [r.local_port for r in first]
    assert sum(r.new_connections for r in first) == 1

    ds = [client.fetch(h2_site.url("/delay?s=0.6"), **opts) for _ in range(4)]
    await engine.sleep(0.2)
    assert client.in_flight == 4
    ds[1].cancel()
    results = await engine.within(DeferredList(ds, consumeErrors=True), 4.0)
    assert isinstance(failure_of(results[1][1]), CancelledError)
    rest = [results[i] for i in (0, 2, 3)]
    assert all(ok for ok, _ in rest), rest
    assert {r.body for _, r in rest} == {b"done"}
    assert {r.local_port for _, r in rest} == {first[0].local_port}
    assert client.driver.stats.multi_errors == 0


# -- 10. cancellation ---------------------------------------------------------------------


@pytest.mark.engine(watchdog=6.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_10_cancel_from_write_callback(engine: Engine, target: LoopbackSite) -> None:
    """Cancelling a 3 MB download from inside WRITEFUNCTION delivers ``CancelledError``
    exactly once, no further data reaches the sink, and one second later the handle is
    detached from the multi (and can be reused for a new fetch).

    ``remove_handle`` is refused inside a libcurl callback. Catches a canceller that
    forgets the handle when that happens: it stays attached, keeps downloading in the
    background, and re-adding it fails with "curl object already on this multi-stack".
    """
    client = engine.client(max_concurrent=1)
    handles: list[pycurl.Curl] = []
    outcomes: list[Failure] = []
    holder: dict[str, Deferred[Any]] = {}
    writes_after_cancel: list[int] = []

    def on_write(consumer: Consumer, data: bytes) -> None:
        if len(consumer.chunks) == 1:
            assert client.driver.inside_curl
            holder["d"].cancel()
        else:
            writes_after_cancel.append(len(data))

    consumer = Consumer(on_write)
    d = client.fetch(target.url(f"/bytes?n={3 << 20}"), sink=consumer, prepare=handles.append)
    holder["d"] = d

    def record(failure: Failure) -> None:
        outcomes.append(failure)

    d.addErrback(record)
    assert await settle(engine, lambda: bool(outcomes), 3.0)
    await engine.sleep(1.0)
    assert len(outcomes) == 1
    assert outcomes[0].check(CancelledError)
    assert not writes_after_cancel
    curl = handles[0]
    assert curl not in client.driver.handles
    assert curl not in client.driver._multi, "the cancelled handle is still on the multi"
    assert client.in_flight == 0

    again = await engine.fetch(client, target.url("/bytes?n=10"), prepare=handles.append)
    assert again.body == pattern_bytes(10)


# -- 11. many completions per call; callbacks change state mid-batch ----------------------


async def _five_timeouts(
    engine: Engine, server: FaultServer, action: Callable[[CurlClient, list[Deferred[Any]]], None]
) -> tuple[CurlClient, list[list[object]]]:
    client = engine.client()
    ds = [client.fetch(server.url, timeout=0.5) for _ in range(5)]
    fired: list[list[object]] = [[] for _ in ds]
    first: list[int] = []

    def make_record(i: int) -> Callable[[object], None]:
        def record(result: object) -> None:
            fired[i].append(result)
            if not first:
                first.append(i)
                action(client, [d for j, d in enumerate(ds) if not fired[j] and j != i])

        return record

    for i, d in enumerate(ds):
        d.addBoth(make_record(i))
    started = time.monotonic()
    await engine.within(DeferredList(ds), 3.0)
    elapsed = time.monotonic() - started
    # On timeout, within() cancels whatever is left: those hung.
    assert elapsed < 2.5, f"fetches hung until the 3 s limit cancelled them: {fired}"
    await engine.sleep(0.05)
    return client, fired


@pytest_twisted.ensureDeferred
async def test_pitfall_11_errback_cancels_sibling_mid_batch(
    engine: Engine, silent_server: FaultServer, log_failures: list[dict[str, Any]]
) -> None:
    """Five requests to a silent server with ``timeout=0.5`` time out in one batch; the
    first errback cancels a sibling still in that batch. Every Deferred fires exactly
    once (four timeouts, one ``CancelledError``) and nothing is logged as a failure.

    Catches a completion loop that looks requests up strictly (``pending.pop(curl)``
    raises ``KeyError`` for the cancelled one) without a ``try/except`` per item: the rest
    of the already-dequeued batch is lost and those fetches hang.
    """
    _, fired = await _five_timeouts(
        engine, silent_server, lambda client, siblings: siblings[0].cancel()
    )
    assert [len(f) for f in fired] == [1] * 5
    errors = [failure_of(f[0]) for f in fired]
    assert sum(isinstance(e, CancelledError) for e in errors) == 1
    timeouts = [e for e in errors if isinstance(e, CurlTimeoutError)]
    assert len(timeouts) == 4
    assert {e.code for e in timeouts} == {28}
    assert not log_failures, [e.get("log_format") for e in log_failures]


@pytest_twisted.ensureDeferred
async def test_pitfall_11_errback_closes_client_mid_batch(
    engine: Engine, silent_server: FaultServer, log_failures: list[dict[str, Any]]
) -> None:
    """As above, but the first errback closes the client: the other four fire exactly
    once each, with ``CancelledError``, the multi is closed and nothing is logged as a
    failure.

    Catches a completion loop that keeps reading (``info_read`` on a closed multi) or
    reporting transfers after a callback closed the client.
    """
    client, fired = await _five_timeouts(
        engine, silent_server, lambda client, siblings: client.close()
    )
    assert [len(f) for f in fired] == [1] * 5
    errors = [failure_of(f[0]) for f in fired]
    assert sum(isinstance(e, CurlTimeoutError) for e in errors) == 1
    assert sum(isinstance(e, CancelledError) for e in errors) == 4
    assert client.closed
    assert client.driver.closed
    assert not log_failures, [e.get("log_format") for e in log_failures]


# -- 12. exceptions and return values in WRITEFUNCTION / HEADERFUNCTION -------------------


@pytest_twisted.ensureDeferred
async def test_pitfall_12_sink_exception_is_delivered(engine: Engine, target: LoopbackSite) -> None:
    """A body consumer whose ``write`` raises ``ValueError`` makes the fetch fail with
    that very ``ValueError``, not with curl's WRITE_ERROR (23).

    Catches a WRITEFUNCTION that lets the exception escape into pycurl (which prints it,
    loses it, and fails the transfer with error 23) or returns a wrong value.
    """
    boom = ValueError("the sink refused this chunk")

    def on_write(consumer: Consumer, data: bytes) -> None:
        raise boom

    client = engine.client()
    with pytest.raises(ValueError) as info:
        await engine.fetch(client, target.url("/bytes?n=100000"), sink=Consumer(on_write))
    assert info.value is boom
    assert not isinstance(info.value, CurlError)
    follow_up = await engine.fetch(client, target.url("/bytes?n=10"))
    assert follow_up.body == pattern_bytes(10)


@pytest_twisted.ensureDeferred
async def test_pitfall_12_header_state_reset_per_response(
    engine: Engine, target: LoopbackSite
) -> None:
    """After three redirects, the response headers are those of the final response only
    (no ``Location``), and the redirect chain lists every hop.

    HEADERFUNCTION sees the headers of every response. Catches header state that is not
    reset on each status line.
    """
    client = engine.client()
    response = await engine.fetch(client, target.url("/redirect?n=3"))
    assert response.status == 200
    assert response.body == pattern_bytes(10)
    assert "location" not in response.headers
    assert response.headers.get("content-length") == "10"
    assert [r.status for r in response.redirects] == [302, 302, 302]


# -- 13. pause and backpressure -----------------------------------------------------------


@pytest.mark.engine(watchdog=6.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_13_pause_inside_write_callback(engine: Engine, target: LoopbackSite) -> None:
    """A 2 MB body paused by the sink at its first chunk (inside WRITEFUNCTION) and resumed
    0.5 s later arrives intact (sha256 matches); while paused, nothing is written and at
    most 5 ``socket_action`` calls happen.

    Catches consuming a chunk and then returning ``WRITEFUNC_PAUSE`` (curl redelivers it
    on resume: duplicated data), and a paused transfer whose socket stays watched (the
    reactor spins while paused).
    """
    reactor = _reactor()
    client = engine.client()
    size = 2 << 20
    marks: dict[str, int] = {}

    def resume(consumer: Consumer) -> None:
        marks["actions_at_resume"] = engine.socket_actions
        marks["chunks_at_resume"] = len(consumer.chunks)
        assert consumer.producer is not None
        consumer.producer.resumeProducing()

    def on_write(consumer: Consumer, data: bytes) -> None:
        if len(consumer.chunks) == 1:
            assert consumer.producer is not None
            consumer.producer.pauseProducing()
            marks["actions_at_pause"] = engine.socket_actions
            reactor.callLater(0.5, resume, consumer)

    consumer = Consumer(on_write)
    response = await engine.within(client.fetch(target.url(f"/bytes?n={size}"), sink=consumer), 4.0)
    assert response.status == 200
    assert marks["chunks_at_resume"] == 1, "the sink was written to while paused"
    assert sha256(consumer.body) == sha256(pattern_bytes(size))
    during = marks["actions_at_resume"] - marks["actions_at_pause"]
    assert during <= 5, f"{during} socket_action calls while paused"


@pytest.mark.engine(watchdog=6.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_13_external_pause(engine: Engine, target: LoopbackSite) -> None:
    """A 4 MB streamed body paused from ordinary reactor code (``pause(PAUSE_RECV)``
    outside any curl callback) for 0.5 s, then resumed, arrives intact; nothing is
    written while paused and at most 5 ``socket_action`` calls happen meanwhile.

    ``pause(PAUSE_RECV)`` fires POLL_REMOVE synchronously and ``pause(PAUSE_CONT)`` delivers
    buffered data synchronously. Catches a paused or downgraded socket left watched by
    the reactor (a busy loop, ~8,600 calls, tripping the engine fixture's cap) and an
    unpause that cannot cope with data arriving inside it.
    """
    reactor = _reactor()
    client = engine.client()
    size = 4 << 20
    marks: dict[str, int] = {}

    def resume(consumer: Consumer) -> None:
        marks["actions_at_resume"] = engine.socket_actions
        marks["chunks_at_resume"] = len(consumer.chunks)
        assert consumer.producer is not None
        consumer.producer.resumeProducing()

    def pause(consumer: Consumer) -> None:
        assert not client.driver.inside_curl
        assert consumer.producer is not None
        consumer.producer.pauseProducing()
        marks["actions_at_pause"] = engine.socket_actions
        marks["chunks_at_pause"] = len(consumer.chunks)
        reactor.callLater(0.5, resume, consumer)

    def on_write(consumer: Consumer, data: bytes) -> None:
        if len(consumer.chunks) == 1:
            reactor.callLater(0.05, pause, consumer)

    consumer = Consumer(on_write)
    url = target.url(f"/stream?n={size}&chunk=65536&delay=0.005")
    response = await engine.within(client.fetch(url, sink=consumer), 5.0)
    assert response.status == 200
    assert marks["chunks_at_pause"] < len(consumer.chunks), "the pause came too late"
    assert marks["chunks_at_resume"] == marks["chunks_at_pause"]
    assert sha256(consumer.body) == sha256(pattern_bytes(size))
    during = marks["actions_at_resume"] - marks["actions_at_pause"]
    assert during <= 5, f"{during} socket_action calls while paused"


# -- 14. shutdown order and multi.close() -------------------------------------------------

_SHUTDOWN_SCRIPT = r"""
import importlib, json, sys
reactor_name, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
importlib.import_module("twisted.internet." + reactor_name + "reactor").install()
from twisted.internet import reactor
import curlfetch.engine
from curlfetch.engine import CurlClient, CurlSocket
from tests.engine.servers import LoopbackSite

site = LoopbackSite(reactor)
client = CurlClient(reactor)
report = {"engine": curlfetch.engine.__file__, "outcome": None, "at_shutdown": None}
d = client.fetch(site.url("/delay?s=5"))
d.addCallbacks(
    lambda r: report.update(outcome="response"),
    lambda f: report.update(outcome=f.type.__name__),
)

def registered():
    return [repr(x) for x in [*reactor.getReaders(), *reactor.getWriters()]
            if isinstance(x, CurlSocket)]

def after_client_close():
    # A "before shutdown" trigger added after the client's: runs right after close().
    report["at_shutdown"] = {
        "outcome": report["outcome"],
        "driver_closed": client.driver.closed,
        "multi_closed": client.driver._multi.closed,
        "registered": registered(),
        "tracked": len(client.driver.sockets),
    }

reactor.addSystemEventTrigger("before", "shutdown", after_client_close)
reactor.callLater(0.3, reactor.stop)
reactor.run(installSignalHandlers=False)
report["after_run"] = {"registered": registered(), "client_closed": client.closed}
print(json.dumps(report))
"""


@pytest.mark.engine(watchdog=10.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_14_reactor_stop_cancels_in_flight(engine: Engine) -> None:
    """In a child process running the same reactor: a ``/delay?s=5`` fetch in flight when
    ``reactor.stop()`` is called 0.3 s in fails with ``CancelledError`` before the reactor
    disconnects everything; by then the multi is closed and no curl descriptor is left.

    ``reactor.stop()`` removes every descriptor and calls ``connectionLost``. Catches a
    client without a "before shutdown" trigger running ``close()``: the in-flight Deferred
    never fires and the multi stays open.
    """
    reactor_name = os.environ.get("TWISTED_REACTOR", "epoll")
    proc = await engine.within(
        threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", _SHUTDOWN_SCRIPT, reactor_name, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=8,
            cwd=str(ROOT),
        ),
        9.0,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert under_root(report["engine"]), report["engine"]
    assert report["outcome"] == "CancelledError", report
    at_shutdown = report["at_shutdown"]
    assert at_shutdown["outcome"] == "CancelledError", report
    assert at_shutdown["driver_closed"], report
    assert at_shutdown["multi_closed"], report
    assert at_shutdown["registered"] == [], report
    assert at_shutdown["tracked"] == 0, report
    assert report["after_run"]["client_closed"], report


@pytest.mark.engine(watchdog=6.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_14_close_after_http2_leaves_nothing(
    engine: Engine, h2_site: TLSSite
) -> None:
    """``close()`` after HTTP/2 traffic (a pooled multiplexed connection) closes the multi
    and leaves no curl descriptor registered or tracked, and no fd open (engine fixture).

    ``multi.close()`` itself fires socket callbacks for pooled connections (POLL_IN, then
    POLL_REMOVE). Catches a close that skips ``multi.close()`` (relying on GC: the pooled
    connection leaks), or that registers readers while closing.
    """
    reactor = _reactor()
    client = engine.client()
    opts: dict[str, Any] = {"ca_bundle": h2_site.ca_path, "http_version": "2"}
    responses = await engine.within(
        defer.gatherResults([client.fetch(h2_site.url("/bytes?n=100"), **opts) for _ in range(3)]),
        4.0,
    )
    assert [r.http_version for r in responses] == ["2"] * 3
    client.close()
    assert client.driver.closed
    assert client.driver._multi.closed
    assert not curl_registrations(reactor)
    assert not client.driver.sockets


# -- 15. DNS and blocking libcurl builds ----------------------------------------------------


@pytest.fixture(scope="module")
def loopback_alias() -> str | None:
    """A host name other than ``localhost`` that the system resolver maps to 127.0.0.1 only
    (the machine's own name in /etc/hosts, typically), or None. libcurl answers
    ``localhost`` itself; this name goes through its threaded resolver."""
    for name in (socket.gethostname(), "localhost.localdomain", "localhost4"):
        try:
            infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        if {info[4][0] for info in infos} == {"127.0.0.1"}:
            return name
    return None


@pytest_twisted.ensureDeferred
async def test_pitfall_15_async_dns_and_socket_action_budget(
    engine: Engine, target: LoopbackSite, loopback_alias: str | None
) -> None:
    """libcurl has AsynchDNS; sequential GETs to ``http://localhost:<port>/`` (and, where
    the system has one, to another name for 127.0.0.1, resolved by libcurl's threaded
    resolver on every GET) take at most 10 ``socket_action`` calls each, and a 10 ms
    ``LoopingCall`` running meanwhile never lags by more than 150 ms.

    Catches a blocking resolver build, and any glue or libcurl spin on an fd that curl
    does not consume (the resolver's wakeup eventfd left readable, curl #21547; a
    direction left watched after curl dropped it): per-GET counts explode.
    """
    require_async_dns()
    assert pycurl.version_info()[4] & pycurl.VERSION_ASYNCHDNS
    reactor = _reactor()
    hosts = ["localhost"] if loopback_alias is None else ["localhost", loopback_alias]

    def no_dns_cache(curl: pycurl.Curl) -> None:
        curl.setopt(pycurl.DNS_CACHE_TIMEOUT, 0)

    ticks: list[float] = []
    loop = LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.clock = reactor
    loop.start(0.01)
    counts: dict[str, list[int]] = {}
    try:
        client = engine.client()
        for host in hosts:
            for i in range(5):
                before = engine.socket_actions
                response = await engine.fetch(
                    client,
                    f"http://{host}:{target.port_number}/bytes?n={i + 1}",
                    headers={"Connection": "close"},
                    prepare=no_dns_cache,
                )
                counts.setdefault(host, []).append(engine.socket_actions - before)
                assert response.body == pattern_bytes(i + 1)
                assert response.primary_ip == "127.0.0.1"
        await engine.sleep(0.05)
    finally:
        loop.stop()
    assert max(max(c) for c in counts.values()) <= 10, counts
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert gaps
    assert max(gaps) - 0.01 <= 0.15, f"the reactor stalled for {max(gaps):.3f}s"


# -- 16. OPENSOCKETFUNCTION and CLOSESOCKETFUNCTION ----------------------------------------


@pytest.mark.engine(watchdog=10.0, max_socket_actions=1500)
@pytest_twisted.ensureDeferred
async def test_pitfall_16_no_fd_growth_over_100_requests(
    engine: Engine, target: LoopbackSite
) -> None:
    """100 requests, each on a new connection (``Connection: close``), ten at a time: the
    number of entries in /proc/self/fd does not grow beyond the first batch's level.

    pycurl ``dup()``s a socket object returned from OPENSOCKETFUNCTION and the original
    stays open. Catches that leak (and any other per-connection fd leak).
    """
    client = engine.client()

    async def batch(start: int) -> None:
        ds = [
            client.fetch(target.url(f"/bytes?n={start + i}"), headers={"Connection": "close"})
            for i in range(10)
        ]
        responses = await engine.within(defer.gatherResults(ds), 4.0)
        for i, response in enumerate(responses):
            assert response.body == pattern_bytes(start + i)

    await batch(1)
    await engine.sleep(0.05)
    baseline = fd_count()
    for round_ in range(1, 10):
        await batch(1 + 10 * round_)
    assert await settle(engine, lambda: fd_count() <= baseline, 2.0), (
        f"fds grew from {baseline} to {fd_count()} over 90 requests"
    )


# -- 17. threads, clocks, handle reuse ----------------------------------------------------


@pytest.mark.engine(watchdog=10.0, max_socket_actions=600)
@pytest_twisted.ensureDeferred
async def test_pitfall_17_threads(engine: Engine, target: LoopbackSite) -> None:
    """50 fetches issued from ``deferToThread`` workers via ``blockingCallFromThread`` all
    succeed, and every handle is set up and attached on the reactor thread; a direct
    ``client.fetch`` from a worker thread raises ``WrongThreadError``.

    Catches a client that lets other threads touch the multi (pycurl releases the GIL
    inside ``socket_action``: "already running" errors or worse) instead of refusing.
    """
    reactor = _reactor()
    reactor_thread = threading.get_ident()
    client = engine.client()
    setup_threads: list[tuple[int, bool]] = []

    def prepare(curl: pycurl.Curl) -> None:
        # Runs right before the driver's add_handle, on the thread that attaches it.
        setup_threads.append((threading.get_ident(), threadable.isInIOThread()))

    # Twisted annotates blockingCallFromThread too narrowly for a Deferred-returning call.
    blocking_call: Any = threads.blockingCallFromThread

    def worker(i: int) -> bytes:
        response: Response = blocking_call(
            reactor, client.fetch, target.url(f"/bytes?n={i + 1}"), prepare=prepare
        )
        assert response.body is not None
        return response.body

    bodies = await engine.within(
        defer.gatherResults([threads.deferToThread(worker, i) for i in range(50)]), 8.0
    )
    assert bodies == [pattern_bytes(i + 1) for i in range(50)]
    assert len(setup_threads) == 50
    assert {ident for ident, _ in setup_threads} == {reactor_thread}
    assert all(in_io for _, in_io in setup_threads)

    def direct() -> BaseException | None:
        try:
            client.fetch(target.url("/bytes?n=1"))
        except BaseException as e:
            return e
        return None

    error = await engine.within(threads.deferToThread(direct), 3.0)
    assert isinstance(error, WrongThreadError), error
    assert len(setup_threads) == 50


@pytest.mark.engine(watchdog=6.0)
@pytest_twisted.ensureDeferred
async def test_pitfall_17_clock_resync(
    engine: Engine, target: LoopbackSite, silent_server: FaultServer
) -> None:
    """After fast, slow and fast requests, a request to a silent server with
    ``timeout=0.3`` fails with code 28 after 0.3 s (accepted: 0.25-0.8 s).

    The reactor clock is wall time, libcurl's monotonic. Catches a timer that is not
    re-armed after a timer-driven ``socket_action`` when libcurl fails to ask for one
    (curl #15627, fixed in 8.11.1; the glue must consult ``multi.timeout()``), and timer
    arithmetic that fires late. With the bundled libcurl 8.23 the re-arm is a safety net:
    only a libcurl that drops the re-arm makes its absence visible.
    """
    client = engine.client()
    assert (await engine.fetch(client, target.url("/bytes?n=5"))).status == 200
    assert (await engine.fetch(client, target.url("/delay?s=0.4"), timeout=2)).body == b"done"
    assert (await engine.fetch(client, target.url("/bytes?n=6"))).status == 200
    started = time.monotonic()
    with pytest.raises(CurlTimeoutError) as info:
        await engine.within(client.fetch(silent_server.url, timeout=0.3), 3.0)
    elapsed = time.monotonic() - started
    assert info.value.code == 28
    assert 0.25 <= elapsed <= 0.8, elapsed


@pytest_twisted.ensureDeferred
async def test_pitfall_17_handle_reuse_no_sticky_options(
    engine: Engine, target: LoopbackSite
) -> None:
    """A handle reused after a ``DELETE`` with a custom header sends a plain ``GET``
    without that header.

    Options are sticky on a curl handle. Catches reuse without ``reset()`` (the second
    request goes out as DELETE with ``X-Sticky``).
    """
    client = engine.client(max_concurrent=1)
    handles: list[pycurl.Curl] = []
    first = await engine.fetch(
        client,
        target.url("/echo"),
        method="DELETE",
        headers={"X-Sticky": "yes"},
        prepare=handles.append,
    )
    seen = json.loads(first.body)
    assert seen["method"] == "DELETE"
    assert ["X-Sticky", "yes"] in seen["headers"]
    second = await engine.fetch(client, target.url("/echo"), prepare=handles.append)
    seen = json.loads(second.body)
    assert handles[0] is handles[1], "the client did not reuse the handle"
    assert seen["method"] == "GET"
    assert all(name.lower() != "x-sticky" for name, _ in seen["headers"]), seen["headers"]
