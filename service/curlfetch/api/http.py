"""HTTP plumbing every resource shares: bounded requests refused early, ``ApiError`` and
the JSON error body, JSON in and out, streaming a file, authentication and per-client
quota checks.

Nothing here knows a route: a resource module (``jobs.py``, ``ops.py``) calls these
helpers, so adding a resource never means changing this module.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import IO, Any, Literal, Protocol, TypeVar

from klein import Klein
from twisted.internet.defer import Deferred, FirstError
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from zope.interface import implementer

from ..auth import AuthFailure, TokenSet, authenticate
from ..quotas import ClientQuotas, RateLimiter, retry_after
from ..store import StoreClosedError, StoredResponse

log = Logger()
T = TypeVar("T")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
"""``POST /v1/batches`` may send this much NDJSON (100,000 jobs at ~670 bytes each)."""
BATCH_PATH = b"/v1/batches"
REFUSE_GRACE = 5.0
"""Seconds an early-refused request's body is still read (and discarded) so that the
413 reaches the client before the connection closes (closing with unread input would
reset it)."""
JSON_TYPE = "application/json"


class ApiError(Exception):
    """An error response: status, a stable ``code``, a message, and the offending
    ``field`` of the request when there is one."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        return error_json(self.code, self.message, self.field)


def error_json(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


# -- request bodies: bounded, refused early ------------------------------------------------


class BoundedContent:
    """A request body spool that keeps at most ``limit`` bytes and notes an overflow."""

    def __init__(self, limit: int, length: int | None, on_overflow: Callable[[], None]) -> None:
        self.limit = limit
        self.size = 0
        self.overflowed = False
        self._on_overflow = on_overflow
        small = length is not None and length < 100_000
        self._file: IO[bytes] = BytesIO() if small else tempfile.TemporaryFile()  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.overflowed:
                self.overflowed = True
                self._on_overflow()
            return
        self._file.write(data)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def readline(self, size: int = -1) -> bytes:
        return self._file.readline(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class BoundedRequest(Request):
    """A ``Request`` whose body may not exceed ``max_body`` bytes.

    Over HTTP/1.1 a too-large body is refused as soon as ``Content-Length`` says so (or
    as soon as a chunked body passes the limit): a 413 goes out at once, the rest of the
    body is read and dropped for ``REFUSE_GRACE`` seconds, then the connection closes.
    Over HTTP/2 the body is capped the same way and the resource answers 413.

    With a ``gate`` (authentication), a request that has a body but fails the gate is
    refused the same way (401/400) before any of its body is stored: an unauthenticated
    peer cannot make the service spool anything.
    """

    max_body = DEFAULT_MAX_REQUEST_BYTES
    max_batch_body = DEFAULT_MAX_BATCH_BYTES
    """The limit of ``POST /v1/batches`` (NDJSON batches are larger; the route checks
    the media type)."""
    clock: IReactorTime | None = None
    gate: Callable[[IRequest], AuthFailure | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.refused = False
        self._grace: IDelayedCall | None = None

    def gotLength(self, length: int | None) -> None:
        gate = type(self).gate
        failure = None if gate is None or length == 0 else gate(self)
        if failure is not None:
            # Keeps nothing: every byte of the body is dropped as it arrives.
            self.content = BoundedContent(0, 0, self._overflowed)
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_early(
                failure.status,
                error_json(failure.code, failure.message),
                {b"WWW-Authenticate": failure.challenge.encode("ascii")},
            )
            return
        # The request line is the channel's until the body is in (Twisted sets our
        # method and path only then).
        channel = self.channel
        path = getattr(channel, "_path", b"").split(b"?", 1)[0]
        if getattr(channel, "_command", b"") == b"POST" and path == BATCH_PATH:
            self.max_body = max(self.max_body, self.max_batch_body)
        self.content = BoundedContent(self.max_body, length, self._overflowed)
        if length is not None and length > self.max_body:
            # Never ask for a body we refuse (Expect: 100-continue is answered after this).
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_too_large()

    def _overflowed(self) -> None:
        self._refuse_too_large()

    def _refuse_too_large(self) -> None:
        message = f"the request body exceeds {self.max_body} bytes"
        self._refuse_early(413, error_json("payload_too_large", message))

    def _refuse_early(
        self, status: int, error: dict[str, Any], headers: Mapping[bytes, bytes] | None = None
    ) -> None:
        channel = self.channel
        if self.refused or not isinstance(channel, http.HTTPChannel):
            return
        transport = channel.transport
        if transport is None:
            return
        self.refused = True
        body = json.dumps(error).encode()
        reason = b"Content Too Large" if status == 413 else http.RESPONSES.get(status, b"Error")
        extra = b"".join(b"%s: %s\r\n" % item for item in (headers or {}).items())
        transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n%s" % (status, reason, len(body), extra, body)
        )
        if self.clock is not None:
            self._grace = self.clock.callLater(REFUSE_GRACE, channel.loseConnection)
        else:
            channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            # Answered already; the whole body has been read, so closing now is clean.
            self._cancel_grace()
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_grace()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_grace(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None


def bounded_request_factory(
    max_body: int,
    clock: IReactorTime | None,
    gate: Callable[[IRequest], AuthFailure | None] | None = None,
    max_batch_body: int = DEFAULT_MAX_BATCH_BYTES,
) -> Callable[..., BoundedRequest]:
    """A ``Site(requestFactory=...)`` for ``BoundedRequest`` with these limits, clock and
    gate."""
    attributes: dict[str, object] = {
        "max_body": max_body,
        "max_batch_body": max_batch_body,
        "clock": clock,
    }
    if gate is not None:
        attributes["gate"] = staticmethod(gate)
    cls: type[BoundedRequest] = type("BoundedRequest", (BoundedRequest,), attributes)
    return cls


def check_length(request: IRequest, max_bytes: int) -> None:
    """413 if the body passed ``max_bytes`` (HTTP/2 bodies are capped, not refused)."""
    content = request.content
    overflowed = isinstance(content, BoundedContent) and content.overflowed
    length = request.getHeader(b"content-length")
    too_long = False
    if length is not None:
        try:
            too_long = int(length) > max_bytes
        except ValueError:
            raise ApiError(400, "invalid_request", "invalid Content-Length") from None
    if overflowed or too_long:
        raise ApiError(413, "payload_too_large", f"the request body exceeds {max_bytes} bytes")


def check_content_type(request: IRequest) -> None:
    raw = request.getHeader(b"content-type")
    media = (raw or b"").split(b";", 1)[0].strip().lower()
    if media != JSON_TYPE.encode():
        shown = raw.decode("latin-1") if raw else "none"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json (got {shown})",
        )


def read_body(request: IRequest, max_bytes: int) -> bytes:
    content = request.content
    data: bytes = content.read(max_bytes + 1) if content is not None else b""
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large", f"the request body exceeds {max_bytes} bytes")
    return data


# -- JSON in and out -----------------------------------------------------------------------


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_request", f"malformed JSON: {e}") from None
    except (RecursionError, ValueError) as e:
        raise ApiError(400, "invalid_request", f"unacceptable JSON: {e}") from None


def dumps(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def json_response(request: IRequest, body: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE.encode())
    request.setHeader(b"Cache-Control", b"no-store")
    data = dumps(body)
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


def send_stored(request: IRequest, response: StoredResponse, *, replayed: bool) -> bytes:
    """A stored response, as first sent (``replayed``: marked ``Idempotent-Replayed``)."""
    request.setResponseCode(response.status)
    for name, value in response.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % len(response.body))
    if replayed:
        request.setHeader(b"Idempotent-Replayed", b"true")
    return response.body


def query(request: IRequest, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    value: bytes = values[-1]
    return value.decode("utf-8", "replace")


# -- streaming files ------------------------------------------------------------------------------


@implementer(IPullProducer)
class _FileProducer:
    """Streams an open file to a request, one read per transport drain (never whole)."""

    chunk_size = 64 * 1024

    def __init__(self, request: Request, file: Readable) -> None:
        self._request: Request | None = request
        self._file = file

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        try:
            data = self._file.read(self.chunk_size)
        except Exception:
            # Damage found midway (a stored body whose bytes are not its sha256): the
            # status is sent, so the honest answer left is a response cut short.
            log.failure("reading a stored body failed midway; closing the connection")
            self._request = None
            self._file.close()
            request.unregisterProducer()
            request.loseConnection()
            return
        if data:
            request.write(data)  # may re-enter resumeProducing: nothing may follow it
            return
        self._request = None
        self._file.close()
        request.unregisterProducer()
        request.finish()

    def stopProducing(self) -> None:
        self._request = None
        self._file.close()


class Readable(Protocol):
    """What ``FileResource`` streams: an open file, or a stored payload's reader."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


def byte_range(  # noqa: PLR0911 - one return per case of the RFC's rules reads best
    request: IRequest, size: int, etag: bytes
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The one byte range ``request`` asks for, as (first, count), by RFC 9110 §14:
    None to answer the whole body (no Range, several ranges, a syntax we do not take,
    or an If-Range that does not match ``etag``); "unsatisfiable" for a 416."""
    header = request.getHeader(b"range")
    if header is None or request.method != b"GET":
        return None
    if_range = request.getHeader(b"if-range")
    if if_range is not None and if_range.strip() != etag:
        return None
    match = _RANGE.match(header.decode("latin-1").replace(" ", ""))
    if match is None:
        return None  # several ranges, other units: the whole body is a valid answer
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), min(suffix, size)
    first = int(first_text)
    if first >= size:
        return "unsatisfiable"
    last = size - 1 if not last_text else min(int(last_text), size - 1)
    if last < first:
        return None  # invalid: ignored, as the RFC says
    return first, last - first + 1


class FileResource(Resource):
    """An open file of known size, rendered by a ``_FileProducer`` (and closed)."""

    isLeaf = True

    def __init__(self, file: Readable, size: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._file = file
        self._size = size

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Length", b"%d" % self._size)
        if request.method == b"HEAD":
            self._file.close()
            return b""
        _FileProducer(request, self._file).start()
        return NOT_DONE_YET

    render_HEAD = render_GET


# -- Deferreds -----------------------------------------------------------------------------


def shielded(d: Deferred[T]) -> Deferred[T]:
    """``d``'s result, through a Deferred whose cancellation (the client hung up) does
    not cancel ``d``: its callbacks, which finish the work, still run."""
    shield: Deferred[T] = Deferred()
    d.chainDeferred(shield)
    return shield


def first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in FirstError; unwrap it for handle_errors."""
    error = failure.value
    if isinstance(error, FirstError):
        sub: Failure = error.subFailure
        return sub
    return failure


# -- authentication and quotas -------------------------------------------------------------


def auth_outcome(tokens: TokenSet, request: IRequest) -> str | AuthFailure:
    return authenticate(tokens, request.requestHeaders.getRawHeaders(b"authorization"))


def client_of(tokens: TokenSet, request: IRequest) -> str:
    """The authenticated client of ``request`` ("" when no tokens are configured);
    raises the 401 (or 400) with its ``WWW-Authenticate`` challenge otherwise."""
    if not tokens:
        return ""
    outcome = auth_outcome(tokens, request)
    if isinstance(outcome, AuthFailure):
        raise ApiError(
            outcome.status,
            outcome.code,
            outcome.message,
            headers={"WWW-Authenticate": outcome.challenge},
        )
    return outcome


def check_quotas(
    quotas: ClientQuotas,
    rates: RateLimiter,
    client: str,
    *,
    waiting: int,
    count: int,
    retry_after_seconds: int,
) -> None:
    """429 if ``count`` more jobs would pass the client's queued quota (``waiting`` of
    its jobs wait already) or its rate."""
    if quotas.max_queued > 0 and waiting + count > quotas.max_queued:
        raise ApiError(
            429,
            "quota_exceeded",
            f"{waiting} of your jobs are waiting and at most {quotas.max_queued} "
            "may; retry later (nothing was accepted)",
            headers={"Retry-After": str(retry_after_seconds)},
        )
    delay = rates.delay(client, count)
    if delay > 0:
        raise ApiError(
            429,
            "rate_limited",
            f"at most {quotas.rate:g} jobs per second (bursts of "
            f"{quotas.bucket_size:g}); retry later (nothing was accepted)",
            headers={"Retry-After": retry_after(delay)},
        )


# -- errors as JSON ------------------------------------------------------------------------


def install_error_handlers(app: Klein) -> None:
    """Every error of every route as ``{"error": ...}`` with a precise status; ``self``
    is the ``JobAPI`` Klein binds."""

    @app.handle_errors(ApiError)
    def _api_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return json_response(request, error.to_json(), error.status)

    @app.handle_errors(NotFound)
    def _not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return json_response(request, error_json("not_found", f"no such resource: {path}"), 404)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = sorted(set(error.valid_methods or ()))
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        message = f"{method} is not allowed here; allowed: {', '.join(allowed)}"
        return json_response(request, error_json("method_not_allowed", message), 405)

    @app.handle_errors(HTTPException)
    def _http_exception(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        code = (error.name or "error").lower().replace(" ", "_")
        body = error_json(code, error.description or code)
        return json_response(request, body, error.code or 500)

    @app.handle_errors(StoreClosedError)
    def _store_closed(self: Any, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"Retry-After", str(self.retry_after).encode("ascii"))
        message = "the job store is not available; retry later"
        return json_response(request, error_json("store_unavailable", message), 503)

    @app.handle_errors(Exception)
    def _internal_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.failure("{method} {path} failed", failure, method=request.method, path=request.path)
        return json_response(request, error_json("internal_error", "internal server error"), 500)


# -- streamed responses --------------------------------------------------------------------


class ClientGoneError(Exception):
    """The client went away: stop reading and writing."""


@implementer(IPushProducer)
class PushStream:
    """Writes to a request, and says when to wait: a push producer the transport
    pauses when its buffer is full and resumes when it drained."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.paused = False
        self.stopped = False
        self._resumed: Deferred[None] | None = None
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self.stopProducing())

    def write(self, data: bytes) -> Deferred[None] | None:
        """Write ``data``; a Deferred to wait on if the client is behind."""
        if self.stopped:
            raise ClientGoneError()
        if data:
            self.request.write(data)
        if self.paused and not self.stopped:
            self._resumed = Deferred()
            return self._resumed
        return None

    def end(self) -> None:
        """The response is complete: finish it (unless the client is gone)."""
        if not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def cut(self, *, abort: bool = False) -> None:
        """End the response short, the only honest signal once the status is sent: close
        the connection, or with ``abort`` drop what is still unwritten too."""
        if self.stopped:
            return
        self.stopped = True
        self.request.unregisterProducer()
        if not abort:
            self.request.loseConnection()
            return
        channel = self.request.channel
        transport = channel.transport if channel is not None else None
        drop = getattr(transport, "abortConnection", None)
        if drop is not None:
            drop()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.called:  # a waiter may have given up
            resumed.callback(None)


async def wait_resumed(resumed: Deferred[None] | None) -> None:
    if resumed is not None:
        await resumed
