"""Raw-socket loopback servers that misbehave on purpose, below what ``twisted.web`` can do.

Each is a ``Protocol`` on 127.0.0.1 driven by a script: a test gets ``FaultServer.url``
and the server does exactly one wrong thing.
"""

from __future__ import annotations

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
