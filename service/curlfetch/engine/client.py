"""``CurlClient``: fetch URLs on the reactor, get Deferreds of full ``Response`` records.

A little over 600 lines, on purpose: the client is one object (the queue, the handle
pool, the sinks and the transfer bookkeeping) whose hot path is tuned as a whole; the
request, response and glue layers are already modules of their own."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import deque
from typing import IO, Any, Protocol, cast

import pycurl
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from typing_extensions import Unpack
from zope.interface import implementer

from .curlmulti import CurlMultiDriver, CurlReactor
from .errors import BodyTooLargeError, ClientClosedError, CurlError, FetchError, WrongThreadError
from .guard import TransferGuard
from .request import Request, RequestOptions, configure
from .response import Response, build_response

log = Logger()

_WRITEFUNC_PAUSE = pycurl.WRITEFUNC_PAUSE
_READFUNC_PAUSE = pycurl.READFUNC_PAUSE
_READFUNC_ABORT = pycurl.READFUNC_ABORT
_UPLOAD_HIGH_WATER = 1 << 20
_FREE_HANDLES = 256
_IDLE_ORIGINS = 4096


class ShutdownReactor(CurlReactor, Protocol):
    """A reactor that can also run our close() before it shuts down."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Any, *args: object, **kwargs: object
    ) -> Any: ...
    def removeSystemEventTrigger(self, triggerID: Any) -> None: ...


@implementer(IPushProducer)
class _DownloadProducer:
    """Handed to a consumer sink, so it can pause and resume the download (pitfall 13)."""

    def __init__(self, client: CurlClient, transfer: _Transfer) -> None:
        self._client = client
        self._transfer = transfer

    def pauseProducing(self) -> None:
        t = self._transfer
        if t.paused or t.finished:
            return
        t.paused = True
        driver = self._client._driver
        # Inside curl, the next write callback refuses its chunk (curl keeps it and
        # pauses); outside, ask curl to pause now.
        if not driver.inside_curl:
            driver.pause(t.curl, pycurl.PAUSE_RECV)

    def resumeProducing(self) -> None:
        t = self._transfer
        if not t.paused or t.finished:
            return
        t.paused = False
        # Buffered data may be written to the consumer synchronously, inside this call.
        self._client._driver.pause(t.curl, pycurl.PAUSE_CONT)

    def stopProducing(self) -> None:
        if not self._transfer.finished:
            self._transfer.deferred.cancel()


@implementer(IConsumer)
class _UploadConsumer:
    """Collects what a request-body producer writes, for curl's READFUNCTION to send."""

    def __init__(self, client: CurlClient, transfer: _Transfer, producer: IBodyProducer) -> None:
        self._client = client
        self._transfer = transfer
        self._producer = producer
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.waiting = False  # curl is paused waiting for data
        self.throttled = False  # we paused the producer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self._transfer.finished or not data:
            return
        self.buffer.append(bytes(data))
        self.buffered += len(data)
        if self.buffered > _UPLOAD_HIGH_WATER and not self.throttled:
            self.throttled = True
            self._producer.pauseProducing()
        self._wake()

    def finish(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        if self.waiting:
            self.waiting = False
            self._client._driver.pause(self._transfer.curl, pycurl.PAUSE_CONT)

    def read(self, size: int) -> bytes | int:
        """curl's READFUNCTION."""
        t = self._transfer
        if t.error is not None or t.finished:
            return _READFUNC_ABORT
        if not self.buffer:
            if self.eof:
                return b""
            self.waiting = True
            return _READFUNC_PAUSE
        chunk = self.buffer.popleft()
        if len(chunk) > size:
            self.buffer.appendleft(chunk[size:])
            chunk = chunk[:size]
        self.buffered -= len(chunk)
        if self.throttled and self.buffered < _UPLOAD_HIGH_WATER // 2:
            self.throttled = False
            self._client._driver.after_curl(self._producer.resumeProducing)
        return chunk


class _Transfer:
    """Everything one fetch needs while it runs; keyed by its easy handle."""

    __slots__ = (
        "body_file",
        "body_file_owned",
        "chunks",
        "consumer",
        "curl",
        "deferred",
        "error",
        "finished",
        "guard",
        "header_lines",
        "origin",
        "paused",
        "queue_wait",
        "queued_at",
        "received",
        "request",
        "stream",
        "truncated",
        "upload",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.deferred: Deferred[Response] = Deferred()
        self.curl: pycurl.Curl = cast(pycurl.Curl, None)
        self.header_lines: list[bytes] = []
        self.guard: TransferGuard | None = None
        self.origin: str | None = None
        self.chunks: list[bytes] | None = None
        self.body_file: IO[bytes] | None = None
        self.body_file_owned = False
        self.consumer: IConsumer | None = None
        self.upload: _UploadConsumer | None = None
        self.stream: IO[bytes] | None = None
        self.error: BaseException | None = None
        self.received = 0
        self.truncated = False  # truncate_body: the cap was reached, the rest refused
        self.queued_at = 0.0
        self.queue_wait = 0.0
        self.paused = False
        self.finished = False

    # -- curl callbacks (run inside libcurl: record, never call back into curl) ------------

    def read_stream(self, size: int) -> bytes | int:
        """READFUNCTION for a file body: its exception comes back as itself (pitfall 12)."""
        if self.finished:
            return _READFUNC_ABORT
        assert self.stream is not None
        try:
            return self.stream.read(size)
        except Exception as e:
            self.error = e
            return _READFUNC_ABORT

    def _over_cap(self, data: bytes) -> bool:
        """Count ``data``; past ``max_body_bytes`` record BodyTooLargeError and say so."""
        received = self.received + len(data)
        limit = self.request.max_body_bytes
        if limit is not None and received > limit:
            self.error = BodyTooLargeError(63, f"body passed max_body_bytes={limit}")
            return True
        self.received = received
        return False

    def write_capped(self, data: bytes) -> int | None:
        assert self.chunks is not None
        if self.request.truncate_body:
            return self._write_truncating(data)
        if self._over_cap(data):
            return 0
        self.chunks.append(data)
        return None

    def _write_truncating(self, data: bytes) -> int | None:
        """Keep up to ``max_body_bytes``, then refuse the rest: curl ends the transfer
        with CURLE_WRITE_ERROR, which ``_on_done`` takes as a success (``truncated``)."""
        assert self.chunks is not None
        assert self.request.max_body_bytes is not None
        keep = self.request.max_body_bytes - self.received
        if len(data) > keep:
            self.chunks.append(data[:keep])
            self.received += keep
            self.truncated = True
            return 0
        self.chunks.append(data)
        self.received += len(data)
        return None

    def write_file(self, data: bytes) -> int | None:
        if self._over_cap(data):
            return 0
        assert self.body_file is not None
        try:
            self.body_file.write(data)
        except OSError as e:
            self.error = e
            return 0
        return None

    def write_consumer(self, data: bytes) -> int | None:
        if self.finished:
            return 0
        if self.paused:
            # Refuse without consuming: curl keeps the chunk and redelivers it on resume.
            return _WRITEFUNC_PAUSE
        if self._over_cap(data):
            return 0
        assert self.consumer is not None
        try:
            self.consumer.write(data)
        except Exception as e:
            # Comes back as itself, not as curl's WRITE_ERROR (pitfall 12).
            self.error = e
            return 0
        return None


def _remaining_size(stream: IO[bytes]) -> int:
    """Bytes left after the current position of a seekable file (regular or in-memory),
    sent with Content-Length; -1 (chunked) when that cannot be known."""
    try:
        if stream.seekable():
            here = stream.tell()
            end = stream.seek(0, os.SEEK_END)
            stream.seek(here)
            return max(0, end - here)
    except (OSError, AttributeError, ValueError):
        pass
    return -1


class CurlClient:
    """Fetches URLs with libcurl's multi socket interface on an injected reactor.

    :param max_concurrent: transfers attached to curl at once; the rest wait in a FIFO
        queue (their wait shows in ``timings.queue``).
    :param max_connections: total open connections (0: no limit).
    :param max_host_connections: open connections per host (0: no limit).
    :param max_streams: HTTP/2 streams per connection (None: libcurl's default, 100).
    :param defaults: request options applied to every fetch unless it overrides them.
    :param close_on_shutdown: run ``close()`` as a "before shutdown" trigger (the default).
        A service that drains its transfers on shutdown passes False and closes the client
        itself, after the drain: the trigger would cancel every transfer the moment
        shutdown begins.

    All methods must be called from the reactor thread; from another thread use
    ``twisted.internet.threads.blockingCallFromThread(reactor, client.fetch, url)``.
    """

    def __init__(
        self,
        reactor: ShutdownReactor,
        *,
        max_concurrent: int = 1000,
        max_connections: int = 0,
        max_host_connections: int = 0,
        max_streams: int | None = None,
        defaults: RequestOptions | None = None,
        close_on_shutdown: bool = True,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self._reactor = reactor
        self._thread = threading.get_ident()
        self._defaults: RequestOptions = defaults or {}
        self._max_concurrent = max_concurrent
        multi_options = {
            pycurl.M_PIPELINING: pycurl.PIPE_MULTIPLEX,
            pycurl.M_MAX_TOTAL_CONNECTIONS: max_connections,
            pycurl.M_MAX_HOST_CONNECTIONS: max_host_connections,
        }
        if max_streams is not None:
            multi_options[pycurl.M_MAX_CONCURRENT_STREAMS] = max_streams
        self._driver = CurlMultiDriver(reactor, self._on_done, multi_options)
        self._active: dict[pycurl.Curl, _Transfer] = {}
        self._queue: deque[_Transfer] = deque()
        self._free: list[pycurl.Curl] = []
        # Estimated idle keep-alive connections per origin, when libcurl's own limits are
        # off: see _pick_connection.
        self._idle: dict[str, int] | None = (
            {} if max_connections == 0 and max_host_connections == 0 else None
        )
        self._closed = False
        self._shutdown_trigger: Any = None
        if close_on_shutdown:
            self._shutdown_trigger = reactor.addSystemEventTrigger("before", "shutdown", self.close)

    # -- public ------------------------------------------------------------------------

    def fetch(self, url: str, **options: Unpack[RequestOptions]) -> Deferred[Response]:
        """Fetch ``url``; see ``Request`` for the options. Fires with a ``Response`` for
        any HTTP status, or fails with a ``FetchError`` (``CurlError`` subclasses carry
        curl's code and name), ``CancelledError``, or whatever a sink raised.

        Bad options raise ``ValueError`` here, before anything is sent.
        """
        merged: dict[str, Any] = {**self._defaults, **options}
        return self.request(Request(url=url, **merged))

    def request(self, request: Request) -> Deferred[Response]:
        """Fetch a prepared ``Request``."""
        self._check_thread()
        if self._closed:
            return fail(ClientClosedError("the client is closed"))
        t = _Transfer(request)
        t.deferred = Deferred(lambda _: self._cancel(t))
        if len(self._active) < self._max_concurrent and not self._queue:
            self._start(t)
        else:
            t.queued_at = self._reactor.seconds()
            self._queue.append(t)
        return t.deferred

    def close(self) -> None:
        """Fail every queued and running fetch with ``CancelledError`` and release
        everything: handles, sockets, the timer, the multi. Idempotent; also runs
        before reactor shutdown."""
        self._check_thread()
        if self._closed:
            return
        self._closed = True
        if self._shutdown_trigger is not None:
            with contextlib.suppress(ValueError, KeyError):  # We may be that very trigger.
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
        for t in [*self._queue, *self._active.values()]:
            t.deferred.cancel()
        self._queue.clear()
        self._driver.close()
        for curl in self._free:
            curl.close()
        self._free.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def driver(self) -> CurlMultiDriver:
        """The glue underneath, for its health counters."""
        return self._driver

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return sum(1 for t in self._queue if not t.finished)

    # -- internals -----------------------------------------------------------------------

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise WrongThreadError(
                "CurlClient must be used from the reactor thread; from another thread call "
                "twisted.internet.threads.blockingCallFromThread(reactor, client.fetch, ...)"
            )

    def _start(self, t: _Transfer) -> None:
        if t.queued_at:
            t.queue_wait = self._reactor.seconds() - t.queued_at
        curl = self._free.pop() if self._free else pycurl.Curl()
        t.curl = curl
        try:
            self._setup(curl, t)
        except Exception:
            failure = Failure()
            self._cleanup_sinks(t, success=False)
            self._release(curl)
            t.finished = True
            t.deferred.errback(failure)
            return
        if self._idle is not None:
            self._pick_connection(curl, t, self._idle)
        self._active[curl] = t
        self._driver.add(curl)

    def _pick_connection(self, curl: pycurl.Curl, t: _Transfer, idle: dict[str, int]) -> None:
        """Skip libcurl's connection-pool search when it cannot find an idle connection.

        libcurl matches each new transfer against every connection to its host, so N
        concurrent HTTP/1 transfers to one origin cost O(N^2) (about 60% of the CPU at
        10,000). We count keep-alive connections handed back per origin; while none can
        be idle, FRESH_CONNECT opens a new one without the search. Overcounting (a server
        closed one) only falls back to libcurl's search. Only for transfers that cannot
        multiplex, and only without libcurl's connection limits, which queue transfers
        for busy connections.
        """
        request = t.request
        url = request.url
        version = request.http_version
        if version in ("2", "3") or (not url.startswith("http://") and version is None):
            return
        end = url.find("/", 8)
        origin = t.origin = url if end < 0 else url[:end]
        count = idle.get(origin, 0)
        if count:
            idle[origin] = count - 1
        else:
            curl.setopt(pycurl.FRESH_CONNECT, 1)

    def _setup(self, curl: pycurl.Curl, t: _Transfer) -> None:
        request = t.request
        configure(curl, request)
        curl.setopt(pycurl.HEADERFUNCTION, t.header_lines.append)
        if (
            request.connect_check is not None
            or request.host_check is not None
            or request.max_header_bytes is not None
        ):
            # Before the sink opens: a refused host fails here, with nothing to undo.
            t.guard = TransferGuard(request, t.header_lines)
            t.guard.install(curl)
        sink = request.sink
        if sink is None:
            chunks = t.chunks = []
            if request.max_body_bytes is None:
                curl.setopt(pycurl.WRITEFUNCTION, chunks.append)
            else:
                curl.setopt(pycurl.WRITEFUNCTION, t.write_capped)
        elif isinstance(sink, str | os.PathLike):
            f = t.body_file = open(sink, "wb")  # noqa: SIM115 - closed when the transfer ends
            # Only a regular file is ours to delete on failure: never /dev/null or a FIFO.
            t.body_file_owned = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
            curl.setopt(pycurl.WRITEFUNCTION, t.write_file)
        else:
            t.consumer = sink
            sink.registerProducer(_DownloadProducer(self, t), True)
            curl.setopt(pycurl.WRITEFUNCTION, t.write_consumer)
        body = request.body
        if body is not None:
            self._setup_body(curl, t, body)
        if request.prepare is not None:
            request.prepare(curl)

    def _setup_body(self, curl: pycurl.Curl, t: _Transfer, body: object) -> None:
        method = t.request.method
        size: int
        if isinstance(body, bytes | bytearray | memoryview):
            curl.setopt(pycurl.POSTFIELDSIZE_LARGE, len(body))
            curl.setopt(pycurl.POSTFIELDS, bytes(body))
            return
        if IBodyProducer.providedBy(body):
            producer = body
            upload = t.upload = _UploadConsumer(self, t, producer)
            read: Any = upload.read
            length = producer.length
            size = -1 if length is UNKNOWN_LENGTH else int(length)
        elif hasattr(body, "read"):
            stream = t.stream = cast(IO[bytes], body)
            read = t.read_stream
            size = _remaining_size(stream)
        else:
            raise TypeError(f"body must be bytes, a binary file or an IBodyProducer, not {body!r}")
        curl.setopt(pycurl.READFUNCTION, read)
        if method == "POST":
            curl.setopt(pycurl.POST, 1)
            curl.setopt(pycurl.POSTFIELDSIZE_LARGE, size)
        else:
            curl.setopt(pycurl.UPLOAD, 1)
            curl.setopt(pycurl.INFILESIZE_LARGE, size)
            curl.setopt(pycurl.CUSTOMREQUEST, method)
        if t.upload is not None:
            upload = t.upload
            started = upload._producer.startProducing(upload)
            started.addCallbacks(lambda _: upload.finish(), lambda f: self._upload_failed(t, f))

    def _upload_failed(self, t: _Transfer, failure: Failure) -> None:
        if t.finished:
            return
        t.error = failure.value
        if t.upload is not None:
            t.upload.finish()  # Wakes curl, whose next read aborts.

    def _on_done(self, curl: pycurl.Curl, error: FetchError | None) -> None:
        """Called by the driver, outside curl, once ``curl`` finished and was detached."""
        t = self._active.pop(curl, None)
        if t is None:
            # Cancelled while curl was finishing it: the canceller answered the Deferred
            # and releases the handle once its detach has run.
            return
        t.finished = True
        result: Response | Failure
        guard = t.guard
        if t.error is not None:
            result = Failure(t.error)
        elif guard is not None and guard.error is not None:
            result = Failure(guard.error)
        elif error is not None and not t.truncated:
            result = Failure(error if guard is None else guard.failure(error))
        else:
            try:
                result = self._response(t, curl)
            except Exception:
                result = Failure()
        close_error = self._cleanup_sinks(t, success=not isinstance(result, Failure))
        if close_error is not None and not isinstance(result, Failure):
            result = Failure(close_error)
        idle = self._idle
        if t.origin is not None and idle is not None and not isinstance(result, Failure):
            if len(idle) >= _IDLE_ORIGINS:
                idle.clear()  # Forgetting only costs libcurl's search; never grow unbounded.
            idle[t.origin] = idle.get(t.origin, 0) + 1
        self._release(curl)
        # Queued fetches take the free slot before user callbacks can add more.
        self._start_queued()
        if isinstance(result, Failure):
            t.deferred.errback(result)
        else:
            t.deferred.callback(result)

    def _response(self, t: _Transfer, curl: pycurl.Curl) -> Response:
        request = t.request
        body: bytes | None = None
        if t.chunks is not None:
            body = b"".join(t.chunks)
        return build_response(
            curl,
            url=request.url,
            method=request.method,
            header_lines=t.header_lines,
            body=body,
            body_path=t.body_file.name if t.body_file is not None else None,
            queue_wait=t.queue_wait,
            truncated=t.truncated,
        )

    def _cancel(self, t: _Transfer) -> None:
        """Deferred canceller: abort now, from anywhere (pitfall 10).

        The Deferred errbacks with CancelledError right after this returns. If we are
        inside a libcurl callback the detach waits until curl returns; until then the
        write callback refuses data for this transfer.
        """
        if t.finished:
            return
        t.finished = True
        curl = t.curl
        if curl is not None and self._active.get(curl) is t:
            del self._active[curl]
            self._cleanup_sinks(t, success=False)
            self._driver.remove(curl, then=lambda: self._release(curl))
            self._start_queued()
        else:
            self._cleanup_sinks(t, success=False)

    def _cleanup_sinks(self, t: _Transfer, *, success: bool) -> OSError | None:
        """Close and unregister the sinks (deleting a partial file on failure); returns
        the error if closing the file sink failed, which makes the body incomplete."""
        close_error: OSError | None = None
        if t.body_file is not None and not t.body_file.closed:
            try:
                t.body_file.close()  # Flushes the last buffered write: it may fail.
            except OSError as e:
                close_error = e
                success = False
            if not success and t.body_file_owned:
                with contextlib.suppress(OSError):
                    os.unlink(cast(str, t.request.sink))
        if t.consumer is not None:
            consumer, t.consumer = t.consumer, None
            try:
                consumer.unregisterProducer()
            except Exception:
                log.failure("sink.unregisterProducer failed")
        if t.upload is not None and not success:
            upload, t.upload = t.upload, None
            # Once its Deferred has fired (eof), IBodyProducer allows no stopProducing.
            if not upload.eof:
                try:
                    upload._producer.stopProducing()
                except Exception:
                    log.failure("body producer stopProducing failed")
        return close_error

    def _release(self, curl: pycurl.Curl) -> None:
        """Reset a detached handle and keep it for the next fetch (pitfall 17: no stale
        options survive reset())."""
        if self._closed or len(self._free) >= _FREE_HANDLES:
            curl.close()
            return
        curl.reset()
        self._free.append(curl)

    def _start_queued(self) -> None:
        queue = self._queue
        while queue and len(self._active) < self._max_concurrent and not self._closed:
            t = queue.popleft()
            if not t.finished:
                self._start(t)


__all__ = [
    "CancelledError",
    "ClientClosedError",
    "CurlClient",
    "CurlError",
    "FetchError",
    "WrongThreadError",
]
