"""Connections to the API: how long one may stay idle, how long a request head (and a
body) may take to arrive, and how many may be open at once.

Twisted's ``HTTPChannel`` has one timer, an idle timeout that every byte received resets:
a client that sends one header byte a second (slowloris) is never timed out, and
thousands of such connections (or merely idle ones) take every file descriptor. Here:

- ``--idle-timeout``: a connection with nothing in progress (before its first request,
  between keep-alive requests) is closed after that long (Twisted's own timer).
- ``--header-timeout``: once the first byte of a request arrives, its whole head must
  arrive within that long, however steadily it trickles; then its body, if any, within
  the same time plus one second per ``MIN_BODY_RATE`` bytes it announces (or the request
  limit, for a chunked body). Past that, a 408 and the connection is closed (aborted if
  the peer does not let it close). A body refused early (413, 401) keeps
  ``BoundedRequest``'s own grace instead.
- ``--max-connections``: beyond that many open connections, a new one is closed as soon
  as it is accepted, rather than running the process out of file descriptors (which
  would fail stores, transfers and bodies too). Default: the file descriptor limit less
  a reserve for transfers, the stores and bodies.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Site

log = Logger()

DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_HEADER_TIMEOUT = 10.0
MIN_BODY_RATE = 64 * 1024
"""Bytes per second below which a request body is too slow (see ``--header-timeout``)."""
ABORT_AFTER = 1.0
"""Seconds a timed-out connection may take to close before it is aborted."""
FD_RESERVE_BASE = 256
"""File descriptors kept from connections besides one per transfer: the stores, bodies
being written and read, the log, the reactor's own."""
REFUSED_LOG_INTERVAL = 10.0
"""At most one "refusing connections" line per this many seconds."""

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s"
)


def default_max_connections(max_concurrency: int) -> int:
    """The soft ``RLIMIT_NOFILE`` less a reserve: one descriptor per transfer and
    ``FD_RESERVE_BASE`` (at least 64)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, soft - max_concurrency - FD_RESERVE_BASE)


class ApiChannel(http.HTTPChannel):
    """An ``HTTPChannel`` with a deadline for each request's head (and body), which,
    unlike the idle timeout, progress does not push back."""

    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT
    max_body: int | None = None

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._deadline: IDelayedCall | None = None
        self._awaiting_body = False

    def dataReceived(self, data: bytes) -> None:
        # The first byte of a request (none is in progress, none being read): arm.
        if (
            self._deadline is None
            and not self._handlingRequest
            and not self._awaiting_body
            and self.header_timeout
            and data
        ):
            self._arm(self.header_timeout)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if self.length == 0 or not self.requests or not self.header_timeout:
            return
        request = self.requests[-1]
        if getattr(request, "refused", False):
            return  # answered already; BoundedRequest closes after its grace
        expected = self.length if self.length is not None else self.max_body
        allowed = self.header_timeout + (expected or 0) / MIN_BODY_RATE
        self._awaiting_body = True
        self._arm(allowed)

    def allContentReceived(self) -> None:
        self._awaiting_body = False
        self._disarm()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, self._too_slow)  # type: ignore[no-untyped-call]

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        what = "body" if self._awaiting_body else "head"
        log.debug(
            "closing {peer}: the request {what} took too long",
            peer=str(transport.getPeer()),
            what=what,
        )
        if not self._handlingRequest and not self.requests[:-1]:
            # Nothing of ours is being written: say why before closing.
            body = (
                b'{"error":{"code":"request_timeout","message":"the request %s took '
                b'too long"}}' % what.encode()
            )
            transport.write(_TIMEOUT_RESPONSE % (len(body), body))
        self._abortingCall = self.callLater(  # type: ignore[no-untyped-call]
            ABORT_AFTER, self.forceAbortClient
        )
        self.loseConnection()  # type: ignore[no-untyped-call]


class _CountedProtocol(http._GenericHTTPChannelProtocol):
    """Counts the open connections of its ``ApiSite``."""

    def connectionMade(self) -> None:
        site = self.factory
        if isinstance(site, ApiSite):
            site.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:
        site = self.factory
        if isinstance(site, ApiSite):
            site.open_connections -= 1
        super().connectionLost(reason)


class ApiSite(Site):
    """A ``Site`` of ``ApiChannel`` connections, at most ``max_connections`` open at once
    (0: no limit); its ``timeOut`` is the idle timeout."""

    def __init__(
        self,
        resource: Any,
        *,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = 0,
        max_body: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)  # type: ignore[no-untyped-call]
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_body = max_body
        self.open_connections = 0
        self.refused_connections = 0
        self._refused_logged_at: float | None = None
        self._refused_since_log = 0

    def protocol(self) -> _CountedProtocol:
        channel = ApiChannel()
        channel.header_timeout = self.header_timeout
        channel.max_body = self.max_body
        return _CountedProtocol(channel)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.max_connections and self.open_connections >= self.max_connections:
            self._note_refused()
            return None  # the port closes the accepted socket at once
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]

    def _note_refused(self) -> None:
        self.refused_connections += 1
        self._refused_since_log += 1
        now = self.reactor.seconds()
        last = self._refused_logged_at
        if last is None or now - last >= REFUSED_LOG_INTERVAL:
            log.warn(
                "refusing connections: {open} are open (--max-connections); "
                "{refused} refused since the last report",
                open=self.open_connections,
                refused=self._refused_since_log,
            )
            self._refused_logged_at = now
            self._refused_since_log = 0
