"""The job routes: submit (one spec or a batch, optionally idempotent), list, get (with
long-polls), cancel, and download a job's body.

A submission is answered 201 only after the store has committed it. With tokens, the
authenticated client is the only one whose jobs a request can see: another client's job
is 404, exactly like a job that does not exist. Per-client quotas answer 429 with
Retry-After. ``POST /v1/jobs`` takes an optional ``Idempotency-Key`` (IETF
draft-ietf-httpapi-idempotency-key-header, Stripe's semantics): see ``submit``.

The OpenAPI operations are declared here, next to their routes: they are about a third
of this module's length, and keeping them elsewhere would make two places to change.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ..bodies import BodyLostError
from ..jobs import Job, JobSpec, JobState, SpecError, new_job_id
from ..openapi import (
    BAD_AUTH,
    BAD_AUTH_RESPONSE,
    INTERNAL,
    NOT_FOUND,
    RETRY_AFTER,
    UNAUTHORIZED,
    V1_ERRORS,
    error_response,
    json_content,
    ref,
)
from ..store import (
    BatchRecord,
    IdempotencyRecord,
    JobFilter,
    StoredResponse,
)
from .http import (
    JSON_TYPE,
    ApiError,
    FileResource,
    byte_range,
    check_content_type,
    check_length,
    check_quotas,
    dumps,
    first_error,
    json_response,
    parse_json,
    read_body,
    send_stored,
    shielded,
)
from .idempotency import IDEMPOTENCY_KEY, idempotency_key, idempotently
from .routes import ApiResource, Param, route
from .views import job_schemas, job_url, job_view
from .waiters import JobWaiters

if TYPE_CHECKING:
    from . import JobAPI

log = Logger()

MAX_BATCH = 1000
MAX_WAIT = 60.0
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
_DIGITS = re.compile(r"[0-9]{1,9}")
_NUMBER = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,9})?")
_SAFE_CONTENT_TYPE = re.compile(r"[\x20-\x7e]{1,256}\Z")


_JOB_ERRORS = {**V1_ERRORS, "404": NOT_FOUND}
"""What every route on one job may answer besides its own."""


# -- parameters ---------------------------------------------------------------------------


def _limit(raw: str) -> int:
    if not _DIGITS.fullmatch(raw):
        raise ValueError(raw)
    limit = int(raw)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(raw)
    return limit


def _wait(raw: str) -> float:
    wait = float(raw)
    if not math.isfinite(wait) or wait < 0:
        raise ValueError(raw)
    return min(wait, MAX_WAIT)


STATE = Param(
    "state",
    {"enum": [s.value for s in JobState]},
    JobState,
    f"state must be one of {[s.value for s in JobState]}",
)
LIMIT = Param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": DEFAULT_LIST_LIMIT},
    _limit,
    f"limit must be an integer from 1 to {MAX_LIST_LIMIT}",
)
CURSOR = Param(
    "cursor",
    {"type": "string"},
    str,
    "cursor is not a valid cursor",
    pattern="[0-9A-Za-z_-]{1,128}",
    description="`next_cursor` of the previous page (opaque).",
)


def _timestamp(raw: str) -> float:
    """RFC 3339 (``2026-12-03T10:00:00Z``, an offset, or a date alone: its midnight UTC)
    or Unix seconds."""
    if _NUMBER.fullmatch(raw):
        value = float(raw)
    else:
        when = datetime.fromisoformat(raw)
        if when.tzinfo is None:
            if "T" in raw or " " in raw:
                raise ValueError(raw)  # a time without an offset is ambiguous
            when = when.replace(tzinfo=UTC)
        value = when.timestamp()
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _metadata(raw: str) -> tuple[str, str | None]:
    key, colon, value = raw.partition(":")
    return key, value if colon else None


CREATED_SINCE = Param(
    "created_since",
    {"type": "string"},
    _timestamp,
    "created_since must be an RFC 3339 time with an offset, a date, or Unix seconds",
    description="Jobs created at or after this time (RFC 3339, or Unix seconds).",
)
CREATED_UNTIL = Param(
    "created_until",
    {"type": "string"},
    _timestamp,
    "created_until must be an RFC 3339 time with an offset, a date, or Unix seconds",
    description="Jobs created before this time (RFC 3339, or Unix seconds).",
)
METADATA = Param(
    "metadata",
    {"type": "string"},
    _metadata,
    "metadata must be KEY or KEY:VALUE, KEY of 1-128 letters, digits, '_', '-' or '.'",
    pattern=r"[A-Za-z0-9_.-]{1,128}(:.{0,1024})?",
    description=(
        "`KEY`: jobs whose metadata has that key; `KEY:VALUE`: jobs whose metadata has "
        "that key with that string value."
    ),
)
BATCH = Param(
    "batch",
    {"type": "string"},
    str,
    "batch is not a batch id",
    pattern="[0-9a-f]{32}",
    description="Jobs of this batch.",
)
HOST = Param(
    "host",
    {"type": "string"},
    str.lower,
    "host must be host:port",
    pattern=r"[^\s:/?#]{1,255}:[0-9]{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}",
    description="Jobs to this `host:port` (`example.org:443`).",
)
ERROR = Param(
    "error",
    {"type": "string"},
    str,
    "error must be an error code or curl name",
    pattern="[A-Za-z0-9_]{1,64}",
    description="Failed jobs with this error (`COULDNT_CONNECT`, `egress_denied`, ...).",
)
FILTERS = (STATE, CREATED_SINCE, CREATED_UNTIL, METADATA, BATCH, HOST, ERROR)
"""What the list and the exports select by."""


def job_filter(request: IRequest) -> JobFilter:
    """The filters of a list or export request; 400 ``invalid_request`` naming a bad
    one."""
    metadata = METADATA.get(request)
    return JobFilter(
        state=STATE.get(request),
        created_since=CREATED_SINCE.get(request),
        created_until=CREATED_UNTIL.get(request),
        metadata_key=None if metadata is None else metadata[0],
        metadata_value=None if metadata is None else metadata[1],
        batch=BATCH.get(request),
        host=HOST.get(request),
        error=ERROR.get(request),
    )


WAIT = Param(
    "wait",
    {"type": "number", "minimum": 0},
    _wait,
    "wait must be a number of seconds >= 0",
    description=(
        "Long-poll: answer once the job is terminal or after this "
        f"many seconds (capped at {MAX_WAIT:g}), whichever is first."
    ),
)


# -- operations ----------------------------------------------------------------------------


def _submit_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "submitJobs",
        "summary": "Submit one job, or a batch of jobs.",
        "description": (
            'Send one job spec, or `{"jobs": [spec, ...]}` with up to '
            f"{api.max_batch} specs. All or nothing: if any spec is invalid, "
            "nothing is accepted and the error's `field` names it "
            "(`jobs[3].headers[2]`). The jobs are committed to the store "
            "before the 201 is sent. `Location` points at the job (for a "
            "batch: at its first job). Over the client's quota (queued jobs, "
            "or jobs per second; a batch counts each job), 429 with "
            "Retry-After and nothing accepted. When more jobs would wait "
            "than the service allows, or while it shuts down, 503 with "
            "Retry-After and nothing accepted.\n\n"
            "Idempotency (optional): with an `Idempotency-Key`, a retry of "
            "the same request (same client, key and body bytes) within "
            "24 hours gets the first 201 again, byte for byte, with "
            "`Idempotent-Replayed: true`, and creates no job. The same key "
            "with another body is 422 `idempotency_key_reused`; a retry "
            "while the first is still being accepted is 409 "
            "`idempotency_key_in_progress` with Retry-After. A request that "
            "is refused (4xx, 429, 503) does not use the key up. Keys are "
            "per client."
        ),
        "parameters": [IDEMPOTENCY_KEY.doc()],
        "requestBody": {
            "required": True,
            "content": json_content({"anyOf": [ref("JobSpec"), ref("Batch")]}),
        },
        "responses": {
            "201": {
                "description": (
                    'Accepted: the job, or `{"jobs": [...]}` in submission '
                    "order for a batch. A replay (`Idempotency-Key`) repeats "
                    "the first 201 and adds `Idempotent-Replayed: true`."
                ),
                "headers": {
                    "Location": {
                        "description": "`/v1/jobs/{job_id}` (a batch: the first).",
                        "schema": {"type": "string"},
                    }
                },
                "content": json_content({"oneOf": [ref("Job"), ref("JobBatch")]}),
            },
            "400": error_response(
                f"Malformed JSON, an invalid spec or an invalid `Idempotency-Key`. {BAD_AUTH}."
            ),
            "401": UNAUTHORIZED,
            "409": error_response(
                "A request with this `Idempotency-Key` is still being accepted "
                "(`idempotency_key_in_progress`); retry for its response.",
                **{"Retry-After": RETRY_AFTER},
            ),
            "413": error_response(
                f"The body exceeds {api.max_request_bytes} bytes, or the batch "
                f"has more than {api.max_batch} jobs (`too_many_jobs`)."
            ),
            "415": error_response("Content-Type is not application/json."),
            "422": error_response(
                "This `Idempotency-Key` was used with another request body "
                "(`idempotency_key_reused`)."
            ),
            "429": error_response(
                "Over the client's quota: too many of its jobs queued "
                "(`quota_exceeded`) or submitted too fast (`rate_limited`); "
                "nothing accepted.",
                **{"Retry-After": RETRY_AFTER},
            ),
            "500": INTERNAL,
            "503": error_response(
                "Too many jobs waiting (`queue_full`), shutting down "
                "(`draining`) or the store is unavailable; nothing accepted.",
                **{"Retry-After": RETRY_AFTER},
            ),
        },
    }


def _list_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "listJobs",
        "summary": "List jobs, newest first, a page at a time.",
        "description": (
            "The filters (state, creation time, a metadata key or key and value) all "
            "hold for every job listed; the exports take the same."
        ),
        "parameters": [*(f.doc() for f in FILTERS), LIMIT.doc(), CURSOR.doc()],
        "responses": {
            "200": {
                "description": "A page of jobs.",
                "content": json_content(ref("JobList")),
            },
            "400": error_response(f"A bad filter, limit or cursor. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


def _get_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getJob",
        "summary": "A job; optionally wait until it is finished.",
        "parameters": [WAIT.doc()],
        "responses": {
            "200": {"description": "The job.", "content": json_content(ref("Job"))},
            "400": error_response(f"`wait` is not a number >= 0. {BAD_AUTH}."),
            **_JOB_ERRORS,
        },
    }


def _cancel_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "cancelJob",
        "summary": "Cancel a queued or running job (a transfer stops at once).",
        "responses": {
            "200": {
                "description": "The job, now cancelled.",
                "content": json_content(ref("Job")),
            },
            "400": BAD_AUTH_RESPONSE,
            **_JOB_ERRORS,
            "409": error_response("The job had already finished."),
        },
    }


def _body_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getJobBody",
        "summary": "The response body, as stored.",
        "description": (
            "The payload of the job's WARC record, with the original Content-Type (or "
            "application/octet-stream); `ETag` is the quoted sha256. One byte range "
            "(`Range: bytes=first-last`, `first-` or `-suffix`) answers 206; a range past "
            "the end answers 416; several ranges, or an `If-Range` that does not match "
            "the ETag, answer the whole body."
        ),
        "parameters": [
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "One byte range: bytes=0-99, bytes=100- or bytes=-100.",
            }
        ],
        "responses": {
            "200": {
                "description": "The body.",
                "headers": {
                    "ETag": {
                        "description": "The body's sha256, quoted.",
                        "schema": {"type": "string"},
                    },
                    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
                },
                "content": {"*/*": {"schema": {}}},
            },
            "206": {
                "description": "The requested range of the body.",
                "headers": {
                    "Content-Range": {
                        "description": "bytes first-last/size",
                        "schema": {"type": "string"},
                    },
                    "ETag": {"schema": {"type": "string"}},
                },
                "content": {"*/*": {"schema": {}}},
            },
            "304": {"description": "Not modified (If-None-Match matched)."},
            "416": {
                **error_response("The range starts past the end of the body: `bad_range`."),
                "headers": {
                    "Content-Range": {
                        "description": "bytes */size",
                        "schema": {"type": "string"},
                    }
                },
            },
            "400": BAD_AUTH_RESPONSE,
            **_JOB_ERRORS,
            "410": error_response(
                "The job succeeded but its stored body is gone or damaged (deleted or "
                "truncated on disk): `body_lost`. The job view still answers; fetching "
                "again needs a new job."
            ),
        },
    }


def _schemas(api: JobAPI) -> dict[str, Any]:
    return job_schemas(api.max_batch, api.limits)


# -- the resource --------------------------------------------------------------------------


class JobsResource(ApiResource):
    """``/v1/jobs``: the jobs of the authenticated client, and their long-poll waiters."""

    schemas = staticmethod(_schemas)

    def __init__(self, api: JobAPI) -> None:
        super().__init__(api)
        self.waiters = JobWaiters(api.reactor)
        self._adding = 0  # jobs accepted but not yet committed: backpressure counts them
        self._adding_by: dict[str, int] = {}  # the same per client, for its quota
        api.metrics.subscribe(self.waiters)

    def start_draining(self) -> None:
        """Answer long-polls at once."""
        self.waiters.release_all()

    @route("/v1/jobs", "POST", _submit_doc)
    async def submit(self, request: IRequest) -> bytes:
        """One spec, or ``{"jobs": [...]}``; all accepted or none.

        An ``Idempotency-Key`` works as ``idempotently`` says. The fingerprint is the
        sha256 of the raw body: a client's retry sends the same bytes (the Content-Type
        must be JSON anyway, and its parameters do not change the meaning)."""
        client = self.api.client(request)
        refuse_if_draining(self.api)
        key = idempotency_key(request)
        check_length(request, self.api.max_request_bytes)
        check_content_type(request)
        data = read_body(request, self.api.max_request_bytes)
        payload = parse_json(data)
        specs, batch = self._parse_submission(payload)
        if any(spec.notify is not None for spec in specs):
            await require_secret(self.api, client)
        refs: dict[str, str] = {}  # each job id referred to -> the field naming it first
        for i, spec in enumerate(specs):
            if spec.revalidate is not None:
                refs.setdefault(spec.revalidate, f"jobs[{i}].revalidate" if batch else "revalidate")
        if refs:
            found = await earlier_validators(self.api, client, refs)
            specs = [revalidating(spec, found) for spec in specs]
        api = self.api
        return await idempotently(
            api.store,
            api.reactor,
            request,
            client=client,
            key=key,
            fingerprint=lambda: hashlib.sha256(data).hexdigest(),
            accept=lambda stored: self._accept(request, client, specs, batch, stored),
        )

    async def _accept(
        self, request: IRequest, client: str, specs: list[JobSpec], batch: bool, key: str | None
    ) -> bytes:
        """Quotas and backpressure, then store the jobs (and the key's response) and
        answer 201. A list makes a batch (without metadata or webhooks: ``POST
        /v1/batches`` takes those)."""
        count = len(specs)
        self.admit(client, count)
        now = self.api.reactor.seconds()
        record = BatchRecord(new_job_id(now), client, now) if batch else None
        jobs = self.new_jobs(client, specs, now, record)
        views = [job_view(job) for job in jobs]
        body = {"jobs": views, "batch": record.id} if record is not None else views[0]
        response = StoredResponse(
            201,
            (("Content-Type", JSON_TYPE), ("Location", job_url(jobs[0].id))),
            dumps(body),
        )
        stored = None if key is None else IdempotencyRecord(client, key, response)
        await self.commit(client, count, self.api.store.add(jobs, stored, record))
        return send_stored(request, response, replayed=False)

    def admit(self, client: str, count: int) -> None:
        """Refuse ``count`` more jobs over the client's quota (429) or the service's
        queue (503); else take them from the client's rate."""
        self._check_quotas(client, count)
        waiting = self.api.store.queued() + self._adding
        if waiting + count > self.api.max_queued:
            raise ApiError(
                503,
                "queue_full",
                f"{waiting} jobs are waiting and at most {self.api.max_queued} may; "
                f"retry later (nothing was accepted)",
                headers={"Retry-After": str(self.api.retry_after)},
            )
        self.api.rates.take(client, count)

    @staticmethod
    def new_jobs(
        client: str, specs: list[JobSpec], now: float, batch: BatchRecord | None
    ) -> list[Job]:
        # A batch shares a millisecond: sorted ids keep submission order in listings.
        ids = sorted(new_job_id(now) for _ in specs)
        return [
            Job(
                id=job_id,
                client=client,
                state=JobState.QUEUED,
                spec=spec,
                created_at=now,
                batch=None if batch is None else batch.id,
            )
            for job_id, spec in zip(ids, specs, strict=True)
        ]

    @route("/v1/jobs", "GET", _list_doc)
    async def list_jobs(self, request: IRequest) -> bytes:
        """Newest first; ``next_cursor`` continues after the last job of this page."""
        client = self.api.client(request)
        where = job_filter(request)
        limit = LIMIT.get(request) or DEFAULT_LIST_LIMIT
        cursor = CURSOR.get(request)
        jobs = await self.api.store.list_jobs(client, where, limit + 1, cursor)
        next_cursor = jobs[limit - 1].id if len(jobs) > limit else None
        return json_response(
            request, {"jobs": [job_view(j) for j in jobs[:limit]], "next_cursor": next_cursor}
        )

    @route("/v1/jobs/<job_id>", "GET", _get_doc)
    async def get_job(self, request: IRequest, job_id: str) -> bytes:
        """The job; with ``?wait=N``, once it is terminal or N seconds have passed."""
        client = self.api.client(request)
        wait = WAIT.get(request) or 0.0
        if wait <= 0 or self.api.draining:
            return json_response(request, job_view(await self._get(client, job_id)))
        self.waiters.watch(job_id)
        try:
            job = await self._wait_terminal(client, job_id, wait)
        finally:
            self.waiters.unwatch(job_id)
        return json_response(request, job_view(job))

    @route("/v1/jobs/<job_id>", "DELETE", _cancel_doc)
    async def cancel_job(self, request: IRequest, job_id: str) -> bytes:
        """Queued or running → cancelled (a running transfer is aborted at once)."""
        client = self.api.client(request)
        # Both in one store batch, in order: the cancel sees exactly what the get saw.
        before_d = self.api.store.get(client, job_id)
        after_d = self.api.store.cancel(client, job_id, self.api.reactor.seconds())

        def settle(results: list[Job | None]) -> tuple[Job | None, Job | None]:
            # Runs even if the client has hung up: a cancelled job's transfer must stop.
            before, after = results
            if (
                before is not None
                and after is not None
                and not before.state.terminal
                and after.state is JobState.CANCELLED
            ):
                self.api.scheduler.abort(job_id)
                self.waiters.notify(job_id)
            return before, after

        both = gatherResults([before_d, after_d], consumeErrors=True)
        before, after = await shielded(both.addCallbacks(settle, first_error))
        if before is None or after is None:
            raise _not_found(job_id)
        if before.state.terminal or after.state is not JobState.CANCELLED:
            raise ApiError(409, "conflict", f"job {job_id} is already {after.state.value}")
        return json_response(request, job_view(after))

    @route("/v1/jobs/<job_id>/body", "GET", _body_doc)
    async def get_body(self, request: IRequest, job_id: str) -> bytes | IResource:
        """The stored bytes with the original Content-Type; ETag is the sha256."""
        job = await self._get(self.api.client(request), job_id)
        info = job.result.body if job.result is not None else None
        if info is None or job.result is None:
            raise ApiError(404, "not_found", f"job {job_id} has no body (yet)")
        etag = f'"{info.sha256}"'.encode("ascii")
        wanted = byte_range(request, info.size, etag)
        if wanted == "unsatisfiable":
            raise ApiError(
                416,
                "bad_range",
                f"the range is past the end of the body ({info.size} bytes)",
                headers={"Content-Range": f"bytes */{info.size}"},
            )
        try:
            # Local opens and preads are quick (a small body is also checked against its
            # sha256 here); reading the payload is left to FileResource.
            payload = self.api.bodies.open_payload(job.result.body_of or job.id, info)
        except BodyLostError as e:
            # Deleted, truncated or damaged under us: never serve short or wrong bytes.
            log.warn("{message}", message=str(e))
            raise ApiError(410, "body_lost", str(e)) from None
        content_type = info.content_type or "application/octet-stream"
        if not _SAFE_CONTENT_TYPE.match(content_type):
            content_type = "application/octet-stream"
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        # Fetched content is untrusted: never sniff it, never run it in our origin.
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"sandbox")
        request.setHeader(b"Accept-Ranges", b"bytes")
        if request.setETag(etag) is http.CACHED:
            payload.close()
            return b""
        if wanted is None:
            return FileResource(payload, info.size)
        first, count = wanted
        payload.seek_payload(first, count)
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(
            b"Content-Range", b"bytes %d-%d/%d" % (first, first + count - 1, info.size)
        )
        return FileResource(payload, count)

    # -- service ---------------------------------------------------------------------------

    def _check_quotas(self, client: str, count: int) -> None:
        """429 if ``count`` more jobs would pass the client's queued quota or rate."""
        api = self.api
        waiting = 0
        if api.quotas.max_queued > 0:
            waiting = api.store.queued_for(client) + self._adding_by.get(client, 0)
        check_quotas(
            api.quotas,
            api.rates,
            client,
            waiting=waiting,
            count=count,
            retry_after_seconds=api.retry_after,
        )

    async def _get(self, client: str, job_id: str) -> Job:
        job = await self.api.store.get(client, job_id)
        if job is None:
            raise _not_found(job_id)
        return job

    async def commit(self, client: str, count: int, added: Deferred[None]) -> None:
        """Wait for the store to commit ``count`` new jobs (``added``), counting them
        against backpressure and the client's quota until then, then wake the
        scheduler. A client that hangs up meanwhile does not undo (or lose track of) the
        commit: the wait is shielded."""
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
            self.api.metrics.jobs_submitted(count)
            self.api.scheduler.wake()

        def failed(failure: Failure) -> Failure:
            done()
            return failure

        await shielded(added.addCallbacks(committed, failed))

    async def _wait_terminal(self, client: str, job_id: str, seconds: float) -> Job:
        deadline = self.api.reactor.seconds() + seconds
        seen = self.waiters.version(job_id)
        job = await self._get(client, job_id)
        while not job.state.terminal and not self.api.draining:
            remaining = deadline - self.api.reactor.seconds()
            if remaining <= 0:
                break
            await self.waiters.wait(job_id, min(remaining, self.api.poll_interval), seen)
            seen = self.waiters.version(job_id)
            latest = await self.api.store.get(client, job_id)
            if latest is None:  # purged meanwhile: show what we last saw
                break
            job = latest
        return job

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
            if len(items) > self.api.max_batch:
                raise ApiError(
                    413,
                    "too_many_jobs",
                    f"{len(items)} jobs in one request; at most {self.api.max_batch}",
                    field="jobs",
                )
            specs = []
            for i, raw in enumerate(items):
                try:
                    specs.append(JobSpec.from_json(raw, self.api.limits))
                except SpecError as e:
                    raise _spec_error(e.within(f"jobs[{i}]")) from None
            return specs, True
        try:
            return [JobSpec.from_json(payload, self.api.limits)], False
        except SpecError as e:
            raise _spec_error(e) from None


def refuse_if_draining(api: JobAPI) -> None:
    """503 ``draining`` for a submission while the service shuts down."""
    if api.draining:
        raise ApiError(
            503,
            "draining",
            "the service is shutting down; submit to another instance or retry",
            headers={"Retry-After": str(api.retry_after)},
        )


async def earlier_validators(
    api: JobAPI, client: str, refs: Mapping[str, str]
) -> dict[str, tuple[str | None, str | None]]:
    """The validators (ETag, Last-Modified) of each job ``revalidate`` names (id -> the
    field naming it first): one of the client's, and succeeded, else 400 naming it."""
    ids = list(refs)
    jobs = await gatherResults(
        [api.store.get(client, job_id) for job_id in ids], consumeErrors=True
    )
    found: dict[str, tuple[str | None, str | None]] = {}
    for job_id, job in zip(ids, jobs, strict=True):
        if job is None:
            raise ApiError(400, "invalid_request", f"no job {job_id}", field=refs[job_id])
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise ApiError(
                400,
                "invalid_request",
                f"job {job_id} is {job.state.value}: only a succeeded job can be revalidated",
                field=refs[job_id],
            )
        found[job_id] = job.result.validators()
    return found


def revalidating(spec: JobSpec, found: Mapping[str, tuple[str | None, str | None]]) -> JobSpec:
    """``spec`` with the validators of the job it revalidates (``earlier_validators``)."""
    if spec.revalidate is None:
        return spec
    return spec.revalidating(spec.revalidate, *found[spec.revalidate])


async def require_secret(api: JobAPI, client: str) -> None:
    """A webhook needs the client's secret to be signed: refuse ``notify`` without one
    rather than accept deliveries that can only fail."""
    if client in api.webhook_secrets:
        return
    if await api.store.webhook_secret(client) is None:
        raise ApiError(
            400,
            "webhook_secret_missing",
            "this client has no webhook secret: create one with POST /v1/webhooks/secret "
            "(or configure it with the tokens)",
            field="notify",
        )


def _spec_error(e: SpecError) -> ApiError:
    return ApiError(400, "invalid_request", e.message, field=e.field or None)


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id}")
