"""Raw-socket loopback servers that misbehave on purpose, below what ``twisted.web`` can do.

Each is a ``Protocol`` on 127.0.0.1 driven by a script: a test gets ``FaultServer.url``
and the server does exactly one wrong thing.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol


class FaultProtocol(Protocol):
    """Collects the request head, then hands over to ``on_request(proto)``."""

    def __init__(self, server: FaultServer) -> None:
        self.server = server
        self.buffer = b""
        self.answered = False
        self.calls: list[Any] = []

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        if self.server.on_connect is not None:
            self.server.on_connect(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.answered and b"\r\n\r\n" in self.buffer:
            self.answered = True
            self.server.requests += 1
            if self.server.on_request is not None:
                self.server.on_request(self)

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        if self in self.server.connections:
            self.server.connections.remove(self)

    def later(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` after ``seconds`` unless the connection is gone by then."""
        self.calls.append(self.server.reactor.callLater(seconds, fn))

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        self.transport.abortConnection()  # type: ignore[union-attr]

    def rearm(self) -> None:
        """Wait for the next request on this connection (keep-alive): drop the head just
        answered and call ``on_request`` again when the next one is complete."""
        _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.answered = False


class FaultServer:
    """Listens on 127.0.0.1; ``on_connect``/``on_request`` script the misbehaviour.

    With neither set the server accepts and never answers (the "silent" server).
    """

    def __init__(
        self,
        reactor: Any,
        on_request: Callable[[FaultProtocol], None] | None = None,
        on_connect: Callable[[FaultProtocol], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.on_request = on_request
        self.on_connect = on_connect
        self.requests = 0
        self.connections: list[FaultProtocol] = []
        factory = Factory.forProtocol(lambda: FaultProtocol(self))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port_number: int = self.port.getHost().port
        self.url = f"http://127.0.0.1:{self.port_number}/"

    def stop(self) -> Any:
        """Stop listening and drop every open connection."""
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        return self.port.stopListening()


def silent(reactor: Any) -> FaultServer:
    """Accepts connections and reads requests, but never answers."""
    return FaultServer(reactor)


def canned(reactor: Any, response: bytes, *, close: bool = True) -> FaultServer:
    """Answers every request with exactly ``response`` bytes, then closes (or not)."""

    def answer(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        proto.transport.write(response)
        if close:
            proto.transport.loseConnection()

    return FaultServer(reactor, on_request=answer)


def refused_port() -> int:
    """A loopback port nobody listens on: bound (so the kernel picked it), then closed.

    Connecting to it gets an immediate RST (ECONNREFUSED). Another process could grab
    the port in between, but the ephemeral range is large and the window is tiny.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def close_on_accept(reactor: Any) -> FaultServer:
    """Sends FIN right after accept, before the request, without a byte of response.

    It half-closes (``shutdown(SHUT_WR)``) and keeps reading: a full ``close()`` with
    curl's request unread in the kernel buffer would send RST instead, and the test
    would race between GOT_NOTHING and RECV_ERROR.
    """

    def fin(proto: FaultProtocol) -> None:
        proto.transport.loseWriteConnection()  # type: ignore[union-attr]

    return FaultServer(reactor, on_connect=fin)


def reset_after(reactor: Any, response: bytes, *, after: float = 0.2) -> FaultServer:
    """Answers with ``response`` (typically a head promising more body than it sends),
    then ``after`` seconds later resets the connection (RST, not FIN)."""

    def answer(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        proto.transport.write(response)
        proto.later(after, proto.reset)

    return FaultServer(reactor, on_request=answer)


def drip(reactor: Any, head: bytes, body: bytes, *, interval: float = 1.0) -> FaultServer:
    """Sends ``head`` at once, then ``body`` one byte every ``interval`` seconds."""

    def answer(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        proto.transport.write(head)
        remaining = iter(body)

        def one() -> None:
            byte = next(remaining, None)
            if byte is None or proto.transport is None:
                return
            proto.transport.write(bytes([byte]))
            proto.later(interval, one)

        proto.later(interval, one)

    return FaultServer(reactor, on_request=answer)


def drop_second_request(reactor: Any, response: bytes) -> FaultServer:
    """Keep-alive server that answers the first request on each connection with
    ``response`` (which must leave the connection open) and closes the connection,
    without a byte, when a second request arrives on it: the "stale pooled connection"
    race every client hits against servers with short keep-alive timeouts."""

    served: set[FaultProtocol] = set()

    def answer(proto: FaultProtocol) -> None:
        assert proto.transport is not None
        if proto in served:
            served.discard(proto)
            proto.transport.loseConnection()
            return
        served.add(proto)
        proto.transport.write(response)
        proto.rearm()

    return FaultServer(reactor, on_request=answer)
