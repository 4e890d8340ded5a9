"""Loopback HTTP targets for engine tests: a real Twisted ``Site`` on 127.0.0.1.

Each endpoint is one behaviour a test needs; raw-socket faults (resets, malformed
framing, silence) live in ``faults.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET, Request, Site


def _int_arg(request: Request, name: str, default: int) -> int:
    values = request.args.get(name.encode()) if request.args else None
    return int(values[0]) if values else default


def _float_arg(request: Request, name: str, default: float) -> float:
    values = request.args.get(name.encode()) if request.args else None
    return float(values[0]) if values else default


def pattern_bytes(size: int) -> bytes:
    """Deterministic content whose sha256 tests can compute without the server."""
    block = bytes(range(256)) * 256
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


class Bytes(resource.Resource):
    """``/bytes?n=N``: N bytes of ``pattern_bytes``, with Content-Length."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return pattern_bytes(_int_arg(request, "n", 1024))


class Stream(resource.Resource):
    """``/stream?n=N&chunk=C&delay=S``: N bytes in C-byte chunks, chunked, S s apart."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor

    def render_GET(self, request: Request) -> Any:
        total = _int_arg(request, "n", 1 << 20)
        chunk = _int_arg(request, "chunk", 65536)
        delay = _float_arg(request, "delay", 0.0)
        data = pattern_bytes(total)
        sent = 0
        call: Any = None

        def send() -> None:
            nonlocal sent, call
            call = None
            if request.finished or request._disconnected:
                return
            request.write(data[sent : sent + chunk])
            sent += chunk
            if sent >= total:
                request.finish()
            else:
                call = self._reactor.callLater(delay, send)

        def stop(_: object) -> None:
            if call is not None and call.active():
                call.cancel()

        request.notifyFinish().addErrback(stop)
        send()
        return NOT_DONE_YET


class Delay(resource.Resource):
    """``/delay?s=S``: answer ``b"done"`` after S seconds; cancels itself on disconnect."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor

    def render_GET(self, request: Request) -> Any:
        seconds = _float_arg(request, "s", 1.0)

        def answer() -> None:
            if not request._disconnected:
                request.write(b"done")
                request.finish()

        call = self._reactor.callLater(seconds, answer)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET

    render_POST = render_GET


class Status(resource.Resource):
    """``/status?code=N``: an empty response with that status."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(_int_arg(request, "code", 200))
        return b""


class Redirect(resource.Resource):
    """``/redirect?n=N``: N hops of 302 ending at ``/bytes?n=10``; ``to=URL`` redirects
    once to URL; ``loop=1`` redirects to itself forever."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        args = request.args or {}
        if b"to" in args:
            target = args[b"to"][0]
        elif b"loop" in args:
            target = b"/redirect?loop=1"
        else:
            hops = _int_arg(request, "n", 1)
            target = b"/bytes?n=10" if hops <= 1 else b"/redirect?n=%d" % (hops - 1)
        request.setResponseCode(302)
        request.setHeader(b"Location", target)
        return b""


class Echo(resource.Resource):
    """``/echo``: the request as JSON: method, path, headers (in order), body sha256/size."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                "body_size": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body": body[:1024].decode("latin-1"),
            }
        ).encode()


class Headers(resource.Resource):
    """``/headers``: several multi-valued response headers, in a known order."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.addRawHeader(b"X-Multi", b"one")
        request.responseHeaders.addRawHeader(b"X-Multi", b"two")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
        return b"ok"


class Gzip(resource.Resource):
    """``/gzip?n=N``: N zero bytes, gzip-encoded (a bomb when N is large)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[int, bytes] = {}

    def render_GET(self, request: Request) -> bytes:
        size = _int_arg(request, "n", 1024)
        if size not in self._cache:
            self._cache[size] = gzip.compress(b"\0" * size, compresslevel=9)
        request.setHeader(b"Content-Encoding", b"gzip")
        return self._cache[size]


class Hits(resource.Resource):
    """``/count``: counts requests per path below it, for tests that check the server's
    view (``Root.hits``)."""

    isLeaf = True

    def __init__(self, hits: dict[str, int]) -> None:
        super().__init__()
        self._hits = hits

    def render_GET(self, request: Request) -> bytes:
        path = request.uri.decode()
        self._hits[path] = self._hits.get(path, 0) + 1
        return b"counted"


class ConcurrencyLog:
    """What ``/concurrent`` saw: arrival order, peak overlap, each request's client port
    and arrival time (``reactor.seconds()``)."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.starts: list[str] = []
        self.ports: list[int] = []
        self.times: list[float] = []

    def reset(self) -> None:
        """Forget earlier tests' requests (the site is shared by a module)."""
        self.active = self.peak = 0
        self.starts.clear()
        self.ports.clear()
        self.times.clear()


class Concurrent(resource.Resource):
    """``/concurrent?s=S&id=X``: answers X after S seconds, recording in ``Root.concurrency``
    the arrival order of ids, the peak number of requests in progress at once and the
    client port of each request (one port: one connection)."""

    isLeaf = True

    def __init__(self, reactor: Any, log: ConcurrencyLog) -> None:
        super().__init__()
        self._reactor = reactor
        self._log = log

    def render_GET(self, request: Request) -> Any:
        seconds = _float_arg(request, "s", 0.1)
        args = request.args or {}
        ident = args.get(b"id", [b""])[0].decode()
        log = self._log
        log.starts.append(ident)
        log.times.append(self._reactor.seconds())
        peer: Any = request.getClientAddress()
        log.ports.append(peer.port)
        log.active += 1
        log.peak = max(log.peak, log.active)
        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                log.active -= 1

        def answer() -> None:
            end()
            if not request._disconnected:
                request.write(ident.encode())
                request.finish()

        call = self._reactor.callLater(seconds, answer)

        def lost(_: object) -> None:
            end()
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(lost)
        return NOT_DONE_YET


class Flaky(resource.Resource):
    """``/flaky/KEY?fail=N&code=C&retry_after=V``: the first N requests for a path answer
    status C (503 by default), with ``Retry-After: V`` if given; later ones answer 200
    ``ok``. Arrival times (``reactor.seconds()``) per path are in ``Root.flaky``."""

    isLeaf = True

    def __init__(self, reactor: Any, arrivals: dict[str, list[float]]) -> None:
        super().__init__()
        self._reactor = reactor
        self._arrivals = arrivals

    def render_GET(self, request: Request) -> bytes:
        seen = self._arrivals.setdefault(request.path.decode(), [])
        seen.append(self._reactor.seconds())
        if len(seen) <= _int_arg(request, "fail", 2):
            request.setResponseCode(_int_arg(request, "code", 503))
            args = request.args or {}
            if b"retry_after" in args:
                request.setHeader(b"Retry-After", args[b"retry_after"][0])
            return b"try again"
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok"

    render_POST = render_GET


class Root(resource.Resource):
    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.hits: dict[str, int] = {}
        self.flaky: dict[str, list[float]] = {}
        self.concurrency = ConcurrencyLog()
        self.putChild(b"bytes", Bytes())
        self.putChild(b"stream", Stream(reactor))
        self.putChild(b"delay", Delay(reactor))
        self.putChild(b"status", Status())
        self.putChild(b"redirect", Redirect())
        self.putChild(b"echo", Echo())
        self.putChild(b"headers", Headers())
        self.putChild(b"gzip", Gzip())
        self.putChild(b"count", Hits(self.hits))
        self.putChild(b"concurrent", Concurrent(reactor, self.concurrency))
        self.putChild(b"flaky", Flaky(reactor, self.flaky))

    def render_GET(self, request: Request) -> bytes:
        return b"curlfetch test target"


class LoopbackSite:
    """A running target: ``url(path)`` builds URLs, ``stop()`` closes the port."""

    def __init__(self, reactor: Any, interface: str = "127.0.0.1") -> None:
        self.root = Root(reactor)
        self.site = Site(self.root)
        self.site.displayTracebacks = False
        self.port: IListeningPort = reactor.listenTCP(0, self.site, interface=interface)
        host = f"[{interface}]" if ":" in interface else interface
        self.port_number: int = self.port.getHost().port
        self.base = f"http://{host}:{self.port_number}"

    def url(self, path: str = "/") -> str:
        return self.base + path

    def stop(self) -> Any:
        return self.port.stopListening()


# Keep twisted.web from logging every request during tests.
server.Site.log = lambda self, request: None  # type: ignore[method-assign]
