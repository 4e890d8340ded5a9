"""The REST API v1 (Klein): submit, inspect, long-poll, download and cancel fetch jobs.

Every response is JSON except a job's body and ``/metrics``; every error is
``{"error": {"code", "message", "field"?}}`` with a precise status. A submission is
answered 201 only after the store has committed it. The document of record is
``GET /openapi.json`` (``service/curlfetch/openapi.py``); ``tests/service/test_openapi.py`` checks
that it matches the routes and the real responses.

Long-polls (``GET /v1/jobs/{id}?wait=N``) sleep on a per-job waiter (``JobWaiters``).
The scheduler tells ``Metrics`` about every finished attempt, ``Metrics`` tells the
waiters, and a woken long-poll re-reads the job on the next reactor turn, when the
scheduler's save is already queued ahead of that read; a slow timer (``poll_interval``)
covers changes nobody announces (another instance). A client that disconnects cancels
its waiter, and ``start_draining`` releases them all.

Authentication (``service/curlfetch/auth.py``): with tokens configured, every ``/v1`` route (and
``/metrics`` unless it is configured open) needs ``Authorization: Bearer <token>``, and
the token's client is the only one whose jobs the request can see: another client's job
is 404, exactly like a job that does not exist. Without tokens every request is the
anonymous client ``""``. ``/healthz``, ``/readyz`` and ``/openapi.json`` are always open.
Per-client quotas on submissions (``service/curlfetch/quotas.py``) answer 429 with Retry-After.

``POST /v1/jobs`` takes an optional ``Idempotency-Key`` (IETF
draft-ietf-httpapi-idempotency-key-header, Stripe's semantics): see ``submit``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from io import BytesIO
from typing import IO, Any, TypeVar

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from zope.interface import implementer

from .auth import AuthFailure, TokenSet, authenticate
from .bodies import BodyStore
from .engine import Response
from .jobs import Job, JobError, JobSpec, JobState, Limits, SpecError, new_job_id
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import build_openapi
from .quotas import ClientQuotas, RateLimiter, retry_after
from .scheduler import Scheduler
from .store import (
    IdempotencyInProgressError,
    IdempotencyMismatchError,
    IdempotencyRecord,
    JobStore,
    StoreClosedError,
    StoredResponse,
)

log = Logger()
T = TypeVar("T")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_BATCH = 1000
MAX_WAIT = 60.0
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
REFUSE_GRACE = 5.0
"""Seconds an early-refused request's body is still read (and discarded) so that the
413 reaches the client before the connection closes (closing with unread input would
reset it)."""

_CURSOR = re.compile(r"[0-9A-Za-z_-]{1,128}\Z")
_DIGITS = re.compile(r"[0-9]{1,9}\Z")
_SAFE_CONTENT_TYPE = re.compile(r"[\x20-\x7e]{1,256}\Z")
_JSON_TYPE = "application/json"
_IDEMPOTENCY_KEY = re.compile(rb"[\x21-\x7e]{1,255}\Z")
IDEMPOTENCY_HEADER = "Idempotency-Key"
IN_PROGRESS_RETRY_AFTER = 1
"""Retry-After (seconds) of a 409 for a key whose first request is still being accepted:
that normally takes milliseconds (a reservation left by a crashed process takes up to
``IDEMPOTENCY_ABANDONED_AFTER``)."""


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


# -- the job view --------------------------------------------------------------------------


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds (``...T12:00:00.123Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def job_view(job: Job) -> dict[str, Any]:
    """A job as the API shows it (schema ``Job`` in the OpenAPI document)."""
    result: dict[str, Any] | None = None
    if job.result is not None:
        result = job.result.to_json()
        body = job.result.body
        result["body"] = (
            None
            if body is None
            else {
                "size": body.size,
                "sha256": body.sha256,
                "url": job_url(job.id) + "/body",
                "truncated": body.truncated,
            }
        )
    return {
        "id": job.id,
        "state": job.state.value,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "attempts": job.attempts,
        "request": job.spec.to_json(),
        "metadata": job.spec.metadata,
        "result": result,
        "error": None if job.error is None else job.error.to_json(),
    }


# -- long-poll waiters ---------------------------------------------------------------------


@attrs.define(eq=False)
class _Waiter:
    deferred: Deferred[None]
    timer: IDelayedCall | None = None


class JobWaiters:
    """Long-poll bookkeeping: which jobs are watched, a change count per watched job, and
    Deferreds that fire when a watched job may have changed (or after a timeout).

    It is a ``SchedulerObserver``: a finished attempt of a watched job counts as a change
    on the next reactor turn, by which time the scheduler has queued its save, so a read
    issued after that is ordered after the save in the store. A long-poll notes the count
    before each read and, if it moved meanwhile, reads again instead of sleeping: a change
    that lands while a read is in flight is never missed.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._watchers: dict[str, int] = {}
        self._changes: dict[str, int] = {}
        self._by_job: dict[str, list[_Waiter]] = {}

    def __len__(self) -> int:
        """Long-polls in progress."""
        return sum(self._watchers.values())

    @property
    def sleeping(self) -> int:
        """Long-polls blocked on a Deferred right now."""
        return sum(len(ws) for ws in self._by_job.values())

    def watch(self, job_id: str) -> None:
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        left = self._watchers.get(job_id, 0) - 1
        if left > 0:
            self._watchers[job_id] = left
        else:
            self._watchers.pop(job_id, None)
            self._changes.pop(job_id, None)

    def version(self, job_id: str) -> int:
        return self._changes.get(job_id, 0)

    def wait(self, job_id: str, timeout: float, seen: int) -> Deferred[None]:
        """Fires with None once ``job_id`` changed after version ``seen`` (at once if it
        already has), or after ``timeout``; cancellable."""
        if self.version(job_id) != seen:
            return succeed(None)
        waiter = _Waiter(Deferred(lambda _: self._forget(job_id, waiter)))
        waiter.timer = self._reactor.callLater(max(0.0, timeout), self._fire, job_id, waiter)
        self._by_job.setdefault(job_id, []).append(waiter)
        return waiter.deferred

    def notify(self, job_id: str) -> None:
        """``job_id`` changed (a read issued from now on sees it)."""
        if job_id in self._watchers:
            self._changes[job_id] = self._changes.get(job_id, 0) + 1
        for waiter in self._by_job.pop(job_id, []):
            self._release(waiter)

    def release_all(self) -> None:
        by_job, self._by_job = self._by_job, {}
        for waiters in by_job.values():
            for waiter in waiters:
                self._release(waiter)

    def attempt_finished(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None:
        if job.id in self._watchers:
            self._reactor.callLater(0, self.notify, job.id)

    def _fire(self, job_id: str, waiter: _Waiter) -> None:
        waiter.timer = None
        self._forget(job_id, waiter)
        waiter.deferred.callback(None)

    def _release(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        if not waiter.deferred.called:
            waiter.deferred.callback(None)

    def _forget(self, job_id: str, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        waiters = self._by_job.get(job_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._by_job[job_id]


# -- request bodies: bounded, refused early ------------------------------------------------


class _BoundedContent:
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
            self.content = _BoundedContent(0, 0, self._overflowed)
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_early(
                failure.status,
                error_json(failure.code, failure.message),
                {b"WWW-Authenticate": failure.challenge.encode("ascii")},
            )
            return
        self.content = _BoundedContent(self.max_body, length, self._overflowed)
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
) -> Callable[..., BoundedRequest]:
    """A ``Site(requestFactory=...)`` for ``BoundedRequest`` with this limit, clock and
    gate."""
    attributes: dict[str, object] = {"max_body": max_body, "clock": clock}
    if gate is not None:
        attributes["gate"] = staticmethod(gate)
    cls: type[BoundedRequest] = type("BoundedRequest", (BoundedRequest,), attributes)
    return cls


# -- bodies --------------------------------------------------------------------------------


@implementer(IPullProducer)
class _FileProducer:
    """Streams an open file to a request, one read per transport drain (never whole)."""

    chunk_size = 64 * 1024

    def __init__(self, request: Request, file: IO[bytes]) -> None:
        self._request: Request | None = request
        self._file = file

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        data = self._file.read(self.chunk_size)
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


class _BodyResource(Resource):
    """One stored body, rendered by a ``_FileProducer``."""

    isLeaf = True

    def __init__(self, file: IO[bytes], size: int) -> None:
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


# -- the API -------------------------------------------------------------------------------


class JobAPI:
    """The v1 REST API over a store, a scheduler and a body store.

    ``resource()`` is the Klein resource; ``site()`` wraps it in a ``Site`` whose requests
    refuse too-large bodies before reading them (use it rather than a bare ``Site``).
    """

    app = Klein()

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        store: JobStore,
        scheduler: Scheduler,
        bodies: BodyStore,
        limits: Limits,
        metrics: Metrics,
        max_queued: int,
        tokens: TokenSet | None = None,
        metrics_auth: bool = True,
        quotas: ClientQuotas | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_batch: int = MAX_BATCH,
        retry_after: int = 5,
        poll_interval: float = 1.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._scheduler = scheduler
        self._bodies = bodies
        self._limits = limits
        self._metrics = metrics
        self.max_queued = max_queued
        self.tokens = tokens or TokenSet()
        self.metrics_auth = metrics_auth
        self.quotas = quotas or ClientQuotas()
        self.rates = RateLimiter(reactor, self.quotas.rate, self.quotas.bucket_size)
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.retry_after = retry_after
        self.poll_interval = poll_interval
        self.ping_timeout = ping_timeout
        self.draining = False
        self.waiters = JobWaiters(reactor)
        self._adding = 0  # jobs accepted but not yet committed: backpressure counts them
        self._adding_by: dict[str, int] = {}  # the same per client, for its quota
        self._openapi: bytes | None = None
        metrics.track(store=store, scheduler=scheduler)
        metrics.subscribe(self.waiters)

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def site(self, **kwargs: Any) -> Site:
        """A ``Site`` serving ``resource()`` with ``BoundedRequest`` requests."""
        gate = self._auth_failure if self.tokens else None
        site = Site(
            self.resource(),
            requestFactory=bounded_request_factory(self.max_request_bytes, self._reactor, gate),
            **kwargs,
        )
        site.displayTracebacks = False
        return site

    def start_draining(self) -> None:
        """Fail readiness and refuse submissions from now on; answer long-polls at once."""
        self.draining = True
        self.waiters.release_all()

    def openapi(self) -> dict[str, Any]:
        return build_openapi(
            max_batch=self.max_batch,
            max_request_bytes=self.max_request_bytes,
            max_wait=MAX_WAIT,
            max_list_limit=MAX_LIST_LIMIT,
            default_list_limit=DEFAULT_LIST_LIMIT,
        )

    # -- jobs ------------------------------------------------------------------------------

    @app.route("/v1/jobs", methods=["POST"])
    async def submit(self, request: IRequest) -> bytes:
        """One spec, or ``{"jobs": [...]}``; all accepted or none.

        With an ``Idempotency-Key``, only a request that passed validation reserves the
        key (scoped to the client); the same key and body then replay the 201 as first
        sent, another body is 422, and a repeat while the first is still being accepted
        is 409. A refusal (429, 503, an error) releases the key: only a 201 is recorded,
        in the transaction that stores its jobs. The fingerprint is the sha256 of the
        raw body: a client's retry sends the same bytes (the Content-Type must be JSON
        anyway, and its parameters do not change the meaning)."""
        client = self._client(request)
        if self.draining:
            raise ApiError(
                503,
                "draining",
                "the service is shutting down; submit to another instance or retry",
                headers={"Retry-After": str(self.retry_after)},
            )
        key = _idempotency_key(request)
        self._check_length(request)
        self._check_content_type(request)
        data = self._read_body(request)
        payload = _parse_json(data)
        specs, batch = self._parse_submission(payload)
        if key is None:
            return await self._accept(request, client, specs, batch, None)
        fingerprint = hashlib.sha256(data).hexdigest()
        try:
            stored = await self._reserve(client, key, fingerprint)
            if stored is not None:
                return _send(request, stored, replayed=True)
            try:
                return await self._accept(request, client, specs, batch, key)
            except BaseException:
                # Queued after the add: a no-op if it committed (the key is recorded).
                self._release(client, key)
                raise
        except IdempotencyMismatchError:
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"this {IDEMPOTENCY_HEADER} was used with another request body; "
                "use a new key for a new request",
                field=IDEMPOTENCY_HEADER,
            ) from None
        except IdempotencyInProgressError:
            raise ApiError(
                409,
                "idempotency_key_in_progress",
                f"a request with this {IDEMPOTENCY_HEADER} is still being accepted; "
                "retry it later to get its response",
                field=IDEMPOTENCY_HEADER,
                headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER)},
            ) from None

    async def _accept(
        self, request: IRequest, client: str, specs: list[JobSpec], batch: bool, key: str | None
    ) -> bytes:
        """Quotas and backpressure, then store the jobs (and the key's response) and
        answer 201."""
        count = len(specs)
        self._check_quotas(client, count)
        waiting = self._store.queued() + self._adding
        if waiting + count > self.max_queued:
            raise ApiError(
                503,
                "queue_full",
                f"{waiting} jobs are waiting and at most {self.max_queued} may; "
                f"retry later (nothing was accepted)",
                headers={"Retry-After": str(self.retry_after)},
            )
        now = self._reactor.seconds()
        # A batch shares a millisecond: sorted ids keep submission order in listings.
        ids = sorted(new_job_id(now) for _ in specs)
        jobs = [
            Job(id=job_id, client=client, state=JobState.QUEUED, spec=spec, created_at=now)
            for job_id, spec in zip(ids, specs, strict=True)
        ]
        self.rates.take(client, count)
        views = [job_view(job) for job in jobs]
        response = StoredResponse(
            201,
            (("Content-Type", _JSON_TYPE), ("Location", job_url(jobs[0].id))),
            _dumps({"jobs": views} if batch else views[0]),
        )
        record = None if key is None else IdempotencyRecord(client, key, response)
        await self._add(client, jobs, record)
        return _send(request, response, replayed=False)

    @app.route("/v1/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        """Newest first; ``next_cursor`` continues after the last job of this page."""
        client = self._client(request)
        state_raw = _query(request, "state")
        state: JobState | None = None
        if state_raw is not None:
            try:
                state = JobState(state_raw)
            except ValueError:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"state must be one of {[s.value for s in JobState]}",
                    field="state",
                ) from None
        limit = DEFAULT_LIST_LIMIT
        limit_raw = _query(request, "limit")
        if limit_raw is not None:
            if not _DIGITS.match(limit_raw) or not 1 <= int(limit_raw) <= MAX_LIST_LIMIT:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"limit must be an integer from 1 to {MAX_LIST_LIMIT}",
                    field="limit",
                )
            limit = int(limit_raw)
        cursor = _query(request, "cursor")
        if cursor is not None and not _CURSOR.match(cursor):
            raise ApiError(400, "invalid_request", "cursor is not a valid cursor", field="cursor")
        jobs = await self._store.list_jobs(client, state, limit + 1, cursor)
        next_cursor = jobs[limit - 1].id if len(jobs) > limit else None
        return _json(
            request, {"jobs": [job_view(j) for j in jobs[:limit]], "next_cursor": next_cursor}
        )

    @app.route("/v1/jobs/<job_id>", methods=["GET"])
    async def get_job(self, request: IRequest, job_id: str) -> bytes:
        """The job; with ``?wait=N``, once it is terminal or N seconds have passed."""
        client = self._client(request)
        wait = _wait_arg(request)
        if wait <= 0 or self.draining:
            return _json(request, job_view(await self._get(client, job_id)))
        self.waiters.watch(job_id)
        try:
            job = await self._wait_terminal(client, job_id, wait)
        finally:
            self.waiters.unwatch(job_id)
        return _json(request, job_view(job))

    @app.route("/v1/jobs/<job_id>", methods=["DELETE"])
    async def cancel_job(self, request: IRequest, job_id: str) -> bytes:
        """Queued or running → cancelled (a running transfer is aborted at once)."""
        client = self._client(request)
        # Both in one store batch, in order: the cancel sees exactly what the get saw.
        before_d = self._store.get(client, job_id)
        after_d = self._store.cancel(client, job_id, self._reactor.seconds())

        def settle(results: list[Job | None]) -> tuple[Job | None, Job | None]:
            # Runs even if the client has hung up: a cancelled job's transfer must stop.
            before, after = results
            if (
                before is not None
                and after is not None
                and not before.state.terminal
                and after.state is JobState.CANCELLED
            ):
                self._scheduler.abort(job_id)
                self.waiters.notify(job_id)
            return before, after

        both = gatherResults([before_d, after_d], consumeErrors=True)
        before, after = await _shielded(both.addCallbacks(settle, _first_error))
        if before is None or after is None:
            raise _not_found(job_id)
        if before.state.terminal or after.state is not JobState.CANCELLED:
            raise ApiError(409, "conflict", f"job {job_id} is already {after.state.value}")
        return _json(request, job_view(after))

    @app.route("/v1/jobs/<job_id>/body", methods=["GET"])
    async def get_body(self, request: IRequest, job_id: str) -> bytes | IResource:
        """The stored bytes with the original Content-Type; ETag is the sha256."""
        job = await self._get(self._client(request), job_id)
        info = job.result.body if job.result is not None else None
        if info is None:
            raise ApiError(404, "not_found", f"job {job_id} has no body (yet)")
        try:
            # A local open is quick; reading the file is left to _BodyResource.
            file = open(self._bodies.path(job.id), "rb")  # noqa: SIM115, ASYNC230
        except FileNotFoundError:
            raise ApiError(404, "not_found", f"the body of job {job_id} is gone") from None
        content_type = info.content_type or "application/octet-stream"
        if not _SAFE_CONTENT_TYPE.match(content_type):
            content_type = "application/octet-stream"
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        # Fetched content is untrusted: never sniff it, never run it in our origin.
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"sandbox")
        if request.setETag(f'"{info.sha256}"'.encode("ascii")) is http.CACHED:
            file.close()
            return b""
        size = _file_size(file)
        return _BodyResource(file, size)

    # -- service ---------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """Alive: the reactor answers."""
        return _json(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request: IRequest) -> bytes:
        """Ready for traffic: not draining, and the store answers."""
        if self.draining or self._scheduler.draining:
            return _json(
                request,
                {"status": "draining", **error_json("draining", "the service is shutting down")},
                503,
            )
        try:
            await self._store.ping().addTimeout(self.ping_timeout, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            return _json(
                request,
                {
                    "status": "unavailable",
                    **error_json("store_unavailable", f"the job store does not answer: {e}"),
                },
                503,
            )
        return _json(request, {"status": "ready"})

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: IRequest) -> bytes:
        """Prometheus text exposition (token-protected unless configured open)."""
        if self.metrics_auth:
            self._client(request)
        text = await self._metrics.render()
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(text))
        return text

    @app.route("/openapi.json", methods=["GET"])
    def openapi_json(self, request: IRequest) -> bytes:
        """The OpenAPI 3.1 document of this API."""
        if self._openapi is None:
            self._openapi = json.dumps(self.openapi(), indent=1).encode()
        request.setHeader(b"Content-Type", _JSON_TYPE.encode())
        request.setHeader(b"Content-Length", b"%d" % len(self._openapi))
        return self._openapi

    # -- errors ----------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return _json(request, error.to_json(), error.status)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return _json(request, error_json("not_found", f"no such resource: {path}"), 404)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = sorted(set(error.valid_methods or ()))
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        message = f"{method} is not allowed here; allowed: {', '.join(allowed)}"
        return _json(request, error_json("method_not_allowed", message), 405)

    @app.handle_errors(HTTPException)
    def _http_exception(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        code = (error.name or "error").lower().replace(" ", "_")
        return _json(request, error_json(code, error.description or code), error.code or 500)

    @app.handle_errors(StoreClosedError)
    def _store_closed(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"Retry-After", str(self.retry_after).encode("ascii"))
        message = "the job store is not available; retry later"
        return _json(request, error_json("store_unavailable", message), 503)

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("{method} {path} failed", failure, method=request.method, path=request.path)
        return _json(request, error_json("internal_error", "internal server error"), 500)

    # -- helpers ---------------------------------------------------------------------------

    def _authenticate(self, request: IRequest) -> str | AuthFailure:
        return authenticate(self.tokens, request.requestHeaders.getRawHeaders(b"authorization"))

    def _auth_failure(self, request: IRequest) -> AuthFailure | None:
        """The gate of ``BoundedRequest``: why a request with a body is refused unread."""
        outcome = self._authenticate(request)
        return outcome if isinstance(outcome, AuthFailure) else None

    def _client(self, request: IRequest) -> str:
        """The authenticated client of ``request`` ("" when no tokens are configured);
        raises the 401 (or 400) with its ``WWW-Authenticate`` challenge otherwise."""
        if not self.tokens:
            return ""
        outcome = self._authenticate(request)
        if isinstance(outcome, AuthFailure):
            raise ApiError(
                outcome.status,
                outcome.code,
                outcome.message,
                headers={"WWW-Authenticate": outcome.challenge},
            )
        return outcome

    def _check_quotas(self, client: str, count: int) -> None:
        """429 if ``count`` more jobs would pass the client's queued quota or rate."""
        quotas = self.quotas
        if quotas.max_queued > 0:
            waiting = self._store.queued_for(client) + self._adding_by.get(client, 0)
            if waiting + count > quotas.max_queued:
                raise ApiError(
                    429,
                    "quota_exceeded",
                    f"{waiting} of your jobs are waiting and at most {quotas.max_queued} "
                    "may; retry later (nothing was accepted)",
                    headers={"Retry-After": str(self.retry_after)},
                )
        delay = self.rates.delay(client, count)
        if delay > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"at most {quotas.rate:g} jobs per second (bursts of "
                f"{quotas.bucket_size:g}); retry later (nothing was accepted)",
                headers={"Retry-After": retry_after(delay)},
            )

    async def _get(self, client: str, job_id: str) -> Job:
        job = await self._store.get(client, job_id)
        if job is None:
            raise _not_found(job_id)
        return job

    async def _reserve(self, client: str, key: str, fingerprint: str) -> StoredResponse | None:
        """``reserve_key``, shielded: if the client hangs up meanwhile, a reservation
        made anyway is released once it is made, so it cannot block the key."""
        hung_up = False

        def settle(stored: StoredResponse | None) -> StoredResponse | None:
            if hung_up and stored is None:
                self._release(client, key)
            return stored

        d = self._store.reserve_key(client, key, fingerprint, self._reactor.seconds())
        try:
            return await _shielded(d.addCallback(settle))
        except CancelledError:
            hung_up = True
            raise

    def _release(self, client: str, key: str) -> None:
        """Release a reservation in the background (the response does not wait)."""

        def failed(failure: Failure) -> None:
            log.warn(
                "could not release an Idempotency-Key of {client!r}: {error}",
                client=client,
                error=failure.getErrorMessage(),
            )

        self._store.release_key(client, key).addErrback(failed)

    async def _add(
        self, client: str, jobs: list[Job], record: IdempotencyRecord | None = None
    ) -> None:
        """Commit ``jobs`` (and ``record``), then wake the scheduler. A client that hangs
        up meanwhile does not undo (or lose track of) the commit: the add is shielded."""
        count = len(jobs)
        self._adding += count
        self._adding_by[client] = self._adding_by.get(client, 0) + count

        def done() -> None:
            self._adding -= count
            left = self._adding_by.get(client, 0) - count
            if left > 0:
                self._adding_by[client] = left
            else:
                self._adding_by.pop(client, None)

        def committed(_: None) -> None:
            done()
            self._metrics.jobs_submitted(count)
            self._scheduler.wake()

        def failed(failure: Failure) -> Failure:
            done()
            return failure

        await _shielded(self._store.add(jobs, record).addCallbacks(committed, failed))

    async def _wait_terminal(self, client: str, job_id: str, seconds: float) -> Job:
        deadline = self._reactor.seconds() + seconds
        seen = self.waiters.version(job_id)
        job = await self._get(client, job_id)
        while not job.state.terminal and not self.draining:
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                break
            await self.waiters.wait(job_id, min(remaining, self.poll_interval), seen)
            seen = self.waiters.version(job_id)
            latest = await self._store.get(client, job_id)
            if latest is None:  # purged meanwhile: show what we last saw
                break
            job = latest
        return job

    def _check_length(self, request: IRequest) -> None:
        content = request.content
        overflowed = isinstance(content, _BoundedContent) and content.overflowed
        length = request.getHeader(b"content-length")
        too_long = False
        if length is not None:
            try:
                too_long = int(length) > self.max_request_bytes
            except ValueError:
                raise ApiError(400, "invalid_request", "invalid Content-Length") from None
        if overflowed or too_long:
            raise ApiError(
                413,
                "payload_too_large",
                f"the request body exceeds {self.max_request_bytes} bytes",
            )

    def _check_content_type(self, request: IRequest) -> None:
        raw = request.getHeader(b"content-type")
        media = (raw or b"").split(b";", 1)[0].strip().lower()
        if media != _JSON_TYPE.encode():
            shown = raw.decode("latin-1") if raw else "none"
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json (got {shown})",
            )

    def _read_body(self, request: IRequest) -> bytes:
        content = request.content
        data: bytes = content.read(self.max_request_bytes + 1) if content is not None else b""
        if len(data) > self.max_request_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"the request body exceeds {self.max_request_bytes} bytes",
            )
        return data

    def _parse_submission(self, payload: object) -> tuple[list[JobSpec], bool]:
        """(specs, is_batch); SpecError becomes 400 naming the field (``jobs[3].url``)."""
        if isinstance(payload, dict) and "jobs" in payload:
            for key in payload:
                if key != "jobs":
                    raise ApiError(400, "invalid_request", "unknown field", field=str(key))
            items = payload["jobs"]
            if not isinstance(items, list) or not items:
                raise ApiError(
                    400, "invalid_request", "must be a non-empty list of job specs", field="jobs"
                )
            if len(items) > self.max_batch:
                raise ApiError(
                    413,
                    "too_many_jobs",
                    f"{len(items)} jobs in one request; at most {self.max_batch}",
                    field="jobs",
                )
            specs = []
            for i, raw in enumerate(items):
                try:
                    specs.append(JobSpec.from_json(raw, self._limits))
                except SpecError as e:
                    raise _spec_error(e.within(f"jobs[{i}]")) from None
            return specs, True
        try:
            return [JobSpec.from_json(payload, self._limits)], False
        except SpecError as e:
            raise _spec_error(e) from None


def _shielded(d: Deferred[T]) -> Deferred[T]:
    """``d``'s result, through a Deferred whose cancellation (the client hung up) does
    not cancel ``d``: its callbacks, which finish the work, still run."""
    shield: Deferred[T] = Deferred()
    d.chainDeferred(shield)
    return shield


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in FirstError; unwrap it for handle_errors."""
    error = failure.value
    if isinstance(error, FirstError):
        sub: Failure = error.subFailure
        return sub
    return failure


def _spec_error(e: SpecError) -> ApiError:
    return ApiError(400, "invalid_request", e.message, field=e.field or None)


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id}")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_request", f"malformed JSON: {e}") from None
    except (RecursionError, ValueError) as e:
        raise ApiError(400, "invalid_request", f"unacceptable JSON: {e}") from None


def _idempotency_key(request: IRequest) -> str | None:
    """The ``Idempotency-Key`` header, taken verbatim (a structured-field string keeps
    its quotes): 1-255 visible ASCII characters, at most one header; else 400."""
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if values is None:
        return None
    if len(values) != 1 or not _IDEMPOTENCY_KEY.match(values[0]):
        raise ApiError(
            400,
            "invalid_request",
            f"{IDEMPOTENCY_HEADER} must be one header of 1 to 255 visible ASCII characters",
            field=IDEMPOTENCY_HEADER,
        )
    value: bytes = values[0]
    return value.decode("ascii")


def _dumps(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _send(request: IRequest, response: StoredResponse, *, replayed: bool) -> bytes:
    """A stored response, as first sent (``replayed``: marked ``Idempotent-Replayed``)."""
    request.setResponseCode(response.status)
    for name, value in response.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % len(response.body))
    if replayed:
        request.setHeader(b"Idempotent-Replayed", b"true")
    return response.body


def _json(request: IRequest, body: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON_TYPE.encode())
    request.setHeader(b"Cache-Control", b"no-store")
    data = _dumps(body)
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


def _query(request: IRequest, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    value: bytes = values[-1]
    return value.decode("utf-8", "replace")


def _wait_arg(request: IRequest) -> float:
    raw = _query(request, "wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait < 0:
        raise ApiError(
            400, "invalid_request", "wait must be a number of seconds >= 0", field="wait"
        )
    return min(wait, MAX_WAIT)


def _file_size(file: IO[bytes]) -> int:
    return os.fstat(file.fileno()).st_size
