"""The curl <-> reactor glue: a ``pycurl.CurlMulti`` driven by ``socket_action``.

It knows pycurl and Twisted and nothing about requests or responses: it attaches easy
handles, tells its owner when one finishes, and keeps libcurl's sockets and timer
registered with the reactor exactly as ``CURLMOPT_SOCKETFUNCTION`` and
``CURLMOPT_TIMERFUNCTION`` ask. Pitfall numbers refer to curl-reactor-pitfalls.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

import pycurl
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import CurlError, CurlMultiError, FetchError

log = Logger()

_POLL_IN = pycurl.POLL_IN
_POLL_OUT = pycurl.POLL_OUT
_POLL_REMOVE = pycurl.POLL_REMOVE
_CSELECT_IN = pycurl.CSELECT_IN
_CSELECT_OUT = pycurl.CSELECT_OUT
_CSELECT_ERR = pycurl.CSELECT_ERR
_SOCKET_TIMEOUT = pycurl.SOCKET_TIMEOUT


class CurlReactor(Protocol):
    """What the glue needs from a reactor: an FD set, a clock, and shutdown triggers."""

    def addReader(self, reader: IReadDescriptor) -> None: ...
    def addWriter(self, writer: IWriteDescriptor) -> None: ...
    def removeReader(self, reader: IReadDescriptor) -> None: ...
    def removeWriter(self, writer: IWriteDescriptor) -> None: ...
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def seconds(self) -> float: ...


def require_async_dns() -> None:
    """Refuse to run on a libcurl whose name resolution would block the reactor."""
    info = pycurl.version_info()
    if not info[4] & pycurl.VERSION_ASYNCHDNS:
        raise RuntimeError(
            f"curlfetch needs a libcurl built with an asynchronous resolver (AsynchDNS); "
            f"this one ({info[1]}) would block the reactor on every DNS lookup. "
            f"Install the pycurl wheel from PyPI, which bundles a suitable libcurl."
        )


class DriverStats:
    """Counters that make the health of the curl integration visible (and testable)."""

    __slots__ = ("callback_errors", "multi_errors", "socket_actions", "timer_fires")

    def __init__(self) -> None:
        self.socket_actions = 0
        self.timer_fires = 0
        self.callback_errors = 0
        self.multi_errors = 0


@implementer(IReadDescriptor, IWriteDescriptor)
class CurlSocket:
    """One registration of one curl socket with the reactor (pitfall 8).

    The object lives from curl's first interest in the fd until ``POLL_REMOVE``; after that
    ``fileno()`` is -1 and events the reactor already queued are ignored.
    """

    __slots__ = ("_driver", "active", "fd", "reading", "writing")

    def __init__(self, fd: int, driver: CurlMultiDriver) -> None:
        self.fd = fd
        self._driver = driver
        self.reading = False
        self.writing = False
        self.active = True

    def fileno(self) -> int:
        return self.fd if self.active else -1

    def logPrefix(self) -> str:
        return "curl"

    def doRead(self) -> None:
        # Never return a value: Twisted treats a truthy one as a disconnect (pitfall 5).
        if self.active:
            self._driver.socket_event(self.fd, _CSELECT_IN)

    def doWrite(self) -> None:
        if self.active:
            self._driver.socket_event(self.fd, _CSELECT_OUT)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw HUP/ERR without IN and dropped us: tell curl (pitfall 6)."""
        if not self.active:
            return
        # The reactor has already removed this descriptor from its sets.
        self.reading = self.writing = False
        self._driver.socket_event(self.fd, _CSELECT_ERR)

    def watch(self, read: bool, write: bool) -> None:
        reactor = self._driver.reactor
        if read != self.reading:
            if read:
                reactor.addReader(self)
            else:
                reactor.removeReader(self)
            self.reading = read
        if write != self.writing:
            if write:
                reactor.addWriter(self)
            else:
                reactor.removeWriter(self)
            self.writing = write

    def stop(self) -> None:
        """Unregister now, while the fd is still open (pitfall 7), and go inert."""
        try:
            self.watch(False, False)
        finally:
            self.active = False

    def __repr__(self) -> str:
        return f"<CurlSocket fd={self.fd} r={self.reading} w={self.writing} a={self.active}>"


DoneCallback = Callable[[pycurl.Curl, FetchError | None], None]


class CurlMultiDriver:
    """Runs easy handles on one ``CurlMulti`` from a reactor.

    ``on_done(curl, error)`` is called once for each attached handle that finishes, after
    the handle was detached, never from inside a libcurl call. ``error`` is None on
    success, a ``CurlError`` on a failed transfer, or a ``CurlMultiError`` when the multi
    handle failed and every transfer was detached (pitfall 3).

    libcurl refuses most calls while one of its callbacks runs (pitfall 1), and user code
    runs inside those callbacks (body consumers). So ``add``, ``remove``, ``pause`` and
    ``close`` issued while inside curl are queued and run as soon as the outermost libcurl
    call returns.
    """

    def __init__(
        self,
        reactor: CurlReactor,
        on_done: DoneCallback,
        multi_options: dict[int, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self._on_done = on_done
        self._multi = pycurl.CurlMulti()
        for option, value in (multi_options or {}).items():
            self._multi.setopt(option, value)
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._sockets: dict[int, CurlSocket] = {}
        self._handles: set[pycurl.Curl] = set()
        self._timer: IDelayedCall | None = None
        self._depth = 0
        self._later: deque[Callable[[], None]] = deque()
        self._closing = False
        self.closed = False
        self.stats = DriverStats()

    # -- public ------------------------------------------------------------------------

    @property
    def inside_curl(self) -> bool:
        """True while a libcurl call (and so possibly one of its callbacks) is running."""
        return self._depth > 0

    @property
    def handles(self) -> frozenset[pycurl.Curl]:
        return frozenset(self._handles)

    @property
    def sockets(self) -> dict[int, CurlSocket]:
        """The live registrations, by fd (read-only view for tests and metrics)."""
        return dict(self._sockets)

    def add(self, curl: pycurl.Curl) -> None:
        """Attach ``curl``; libcurl starts it from its next timer tick."""
        if self._depth:
            self._later.append(lambda: self.add(curl))
            return
        if self._closing:
            raise RuntimeError("the driver is closed")
        self._handles.add(curl)
        self._call(self._multi.add_handle, curl)

    def remove(self, curl: pycurl.Curl, then: Callable[[], None] | None = None) -> None:
        """Detach ``curl`` without reporting it done; ``then`` runs once it is detached."""
        if self._depth:
            self._later.append(lambda: self.remove(curl, then))
            return
        if curl in self._handles:
            self._handles.discard(curl)
            self._call(self._multi.remove_handle, curl)
        if then is not None:
            then()

    def pause(self, curl: pycurl.Curl, bitmask: int) -> None:
        """``curl_easy_pause`` from ordinary reactor code only (pitfall 13).

        Unpausing may deliver buffered data synchronously, inside this call.
        """
        if self._depth:
            self._later.append(lambda: self.pause(curl, bitmask))
            return
        if curl in self._handles:
            self._call(curl.pause, bitmask)

    def after_curl(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, or, if inside a libcurl call, as soon as it returns."""
        if self._depth:
            self._later.append(fn)
        else:
            fn()

    def close(self) -> None:
        """Detach everything, stop the timer and close the multi (pitfall 14).

        Attached handles are dropped without ``on_done``: the owner fails its requests
        first. Outside-curl only; from inside a callback it happens once curl returns.
        """
        if self.closed:
            return
        self._closing = True
        if self._depth:
            self._later.append(self.close)
            return
        for curl in list(self._handles):
            self._handles.discard(curl)
            self._call(self._multi.remove_handle, curl)
        self._cancel_timer()
        # Closing the multi closes pooled connections, announcing each with POLL_REMOVE.
        self._call(self._multi.close)
        self.closed = True
        self._cancel_timer()
        for sock in list(self._sockets.values()):
            sock.stop()
        self._sockets.clear()
        self._later.clear()

    def socket_event(self, fd: int, mask: int) -> None:
        """The reactor says ``fd`` is ready (or broken): let curl act on it."""
        if self._closing:
            return
        self._socket_action(fd, mask)

    # -- called by libcurl ---------------------------------------------------------------

    def _on_socket(
        self, what: int, fd: int, multi: pycurl.CurlMulti, socketp: object
    ) -> Literal[-1, 0]:
        """Called by libcurl when the set of fds it waits on changes."""
        try:
            if what == _POLL_REMOVE:
                sock = self._sockets.pop(fd, None)
                if sock is not None:
                    sock.stop()
                return 0
            sock = self._sockets.get(fd)
            if sock is None:
                if self._closing:
                    return 0
                sock = self._sockets[fd] = CurlSocket(fd, self)
            if self._closing:
                sock.watch(False, False)
            else:
                sock.watch(bool(what & _POLL_IN), bool(what & _POLL_OUT))
            return 0
        except Exception:
            # Returning -1 makes libcurl abort every transfer; socket_action then fails
            # and _recover() fails and detaches them all, leaving the multi usable. The
            # alternative, swallowing it, leaves a transfer that never hears its socket.
            self.stats.callback_errors += 1
            log.failure("curl socket callback failed (what={what} fd={fd})", what=what, fd=fd)
            return -1

    def _on_timer(self, timeout_ms: int) -> Literal[-1, 0]:
        """Called by libcurl to (re)arm or delete its single timer; never acts at once."""
        try:
            if timeout_ms < 0 or self._closing:
                self._cancel_timer()
                return 0
            delay = timeout_ms / 1000.0
            timer = self._timer
            if timer is not None and timer.active():
                timer.reset(delay)
            else:
                self._timer = self.reactor.callLater(delay, self._on_timeout)
            return 0
        except Exception:
            self.stats.callback_errors += 1
            log.failure("curl timer callback failed (timeout_ms={ms})", ms=timeout_ms)
            return -1

    # -- called by the reactor -------------------------------------------------------------

    def _on_timeout(self) -> None:
        # Forget the DelayedCall before curl re-arms it from inside socket_action: it is
        # the one running now and cannot be cancelled or reset (pitfall 2).
        self._timer = None
        self.stats.timer_fires += 1
        self._socket_action(_SOCKET_TIMEOUT, 0)
        # The reactor's clock is wall time and curl's is monotonic: if curl wants a
        # timer and did not ask for one, arm it from multi.timeout() (pitfall 17).
        if self._timer is None and self._handles and not self._closing:
            remaining = self._multi.timeout()
            if remaining >= 0:
                self._on_timer(remaining)

    # -- internals -------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _socket_action(self, fd: int, mask: int) -> None:
        self.stats.socket_actions += 1
        self._depth += 1
        try:
            self._multi.socket_action(fd, mask)
        except pycurl.error as e:
            self._depth -= 1
            self._recover(e)
        else:
            self._depth -= 1
        # Completions are read after *every* socket_action, whatever running_handles
        # says: timeouts finish transfers from the timer path too (pitfall 4).
        self._drain()
        self._run_later()

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Call into libcurl, counting depth so re-entrant requests get queued."""
        self._depth += 1
        try:
            fn(*args)
        except pycurl.error as e:
            self._depth -= 1
            self._recover(e)
        else:
            self._depth -= 1
        self._run_later()

    def _drain(self) -> None:
        """Report every finished transfer; callbacks may cancel siblings or close us."""
        while not self.closed:
            queued, succeeded, failed = self._multi.info_read()
            for curl in succeeded:
                self._finish(curl, None)
            for curl, code, message in failed:
                self._finish(curl, CurlError.from_code(code, message))
            if not queued:
                return

    def _finish(self, curl: pycurl.Curl, error: FetchError | None) -> None:
        if self.closed:
            return
        # Always detach, even when the owner already forgot this transfer (pitfall 10).
        if curl in self._handles:
            self._handles.discard(curl)
            self._call(self._multi.remove_handle, curl)
        try:
            self._on_done(curl, error)
        except Exception:
            log.failure("on_done failed")

    def _recover(self, error: pycurl.error) -> None:
        """The multi failed: fail and detach every transfer so it can be used again."""
        self.stats.multi_errors += 1
        code, message = _multi_error_args(error)
        log.error("curl multi failed: {code} {message}", code=code, message=message)
        failed = list(self._handles)
        for curl in failed:
            self._handles.discard(curl)
            self._depth += 1
            try:
                self._multi.remove_handle(curl)
            except pycurl.error:
                log.failure("remove_handle failed during recovery")
            finally:
                self._depth -= 1
        for curl in failed:
            try:
                self._on_done(curl, CurlMultiError(code, message))
            except Exception:
                log.failure("on_done failed")

    def _run_later(self) -> None:
        later = self._later
        while later and not self._depth:
            fn = later.popleft()
            try:
                fn()
            except Exception:
                log.failure("deferred curl operation failed")


def _multi_error_args(error: pycurl.error) -> tuple[int, str]:
    args = error.args
    if len(args) >= 2 and isinstance(args[0], int):
        return args[0], str(args[1])
    # pycurl's own re-entrancy guard raises with a message only.
    return 8, str(args[0]) if args else "unknown multi error"
