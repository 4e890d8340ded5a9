"""The batch routes: submit a batch (JSON, or NDJSON up to 100,000 jobs read as a stream),
read its progress (with a long-poll until it is finished), list its jobs, cancel it, and
list the client's batches.

A batch is what one submission created (``curlfetch.store.events``): its counts are read
from its jobs when asked, so they are exact. An NDJSON body is read twice from the
request's spool file, never held: once to validate every line (all or nothing; the error
names the line), then in the database thread, a chunk at a time, inside the one
transaction that stores the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import attrs
from twisted.web.iweb import IRequest

from ..jobs import (
    DEFAULT_BATCH_NOTIFY,
    Job,
    JobSpec,
    JobState,
    Notify,
    SpecError,
    new_job_id,
    notify_schema,
    parse_notify,
)
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
    Batch,
    BatchRecord,
    IdempotencyRecord,
    StoredResponse,
)
from ..store.events import batch_summary
from .http import (
    JSON_TYPE,
    ApiError,
    check_length,
    dumps,
    json_response,
    parse_json,
    read_body,
    send_stored,
)
from .idempotency import IDEMPOTENCY_KEY, idempotency_key, idempotently
from .jobs import (
    CURSOR,
    DEFAULT_LIST_LIMIT,
    FILTERS,
    LIMIT,
    WAIT,
    JobsResource,
    earlier_validators,
    job_filter,
    refuse_if_draining,
    require_secret,
    revalidating,
)
from .routes import ApiResource, route
from .views import job_view

if TYPE_CHECKING:
    from . import JobAPI

NDJSON_TYPE = "application/x-ndjson"
MAX_NDJSON_JOBS = 100_000
CHUNK = 1000
"""Jobs parsed and inserted at a time from an NDJSON batch."""
_BATCH_ERRORS = {**V1_ERRORS, "404": NOT_FOUND}


def batch_url(batch_id: str) -> str:
    return f"/v1/batches/{batch_id}"


def batch_view(batch: Batch) -> dict[str, Any]:
    """A batch as the API shows it (schema ``BatchView``): what events say of it, and
    its webhook, failures and jobs' link."""
    return {
        **batch_summary(batch),
        "notify": None if batch.notify is None else batch.notify.to_json(),
        "errors": [
            {"code": code, "count": count, "jobs": list(jobs)} for code, count, jobs in batch.errors
        ],
        "jobs_url": batch_url(batch.id) + "/jobs",
    }


def _new_view(record: BatchRecord, total: int) -> dict[str, Any]:
    """The view of a batch just stored: every job queued."""
    counts = {s.value: 0 for s in JobState}
    counts[JobState.QUEUED.value] = total
    batch = Batch(
        id=record.id,
        client=record.client,
        total=total,
        created_at=record.created_at,
        finished_at=None,
        cancelled_at=None,
        metadata=record.metadata,
        notify=record.notify,
        counts=counts,
        bytes=0,
        errors=(),
    )
    return batch_view(batch)


# -- OpenAPI -------------------------------------------------------------------------------


def _schemas(api: JobAPI) -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    return {
        "BatchSubmission": {
            "type": "object",
            "required": ["jobs"],
            "additionalProperties": False,
            "properties": {
                "jobs": {
                    "type": "array",
                    "items": ref("JobSpec"),
                    "minItems": 1,
                    "maxItems": api.max_batch,
                },
                "metadata": {"type": "object", "description": "Yours; shown in the view."},
                "notify": notify_schema(
                    DEFAULT_BATCH_NOTIFY,
                    "Webhooks for this batch and, for job.* events, for each of its jobs.",
                ),
            },
        },
        "BatchView": {
            "type": "object",
            "required": ["id", "state", "total", "done", "counts", "bytes", "created_at"],
            "properties": {
                "id": {"type": "string"},
                "state": {"enum": ["running", "completed", "cancelling", "cancelled"]},
                "total": count,
                "done": count,
                "counts": {
                    "type": "object",
                    "properties": {s.value: count for s in JobState},
                },
                "bytes": {**count, "description": "Body bytes stored for its jobs."},
                "created_at": {"type": "string", "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "cancelled_at": {"type": ["string", "null"], "format": "date-time"},
                "metadata": {"type": ["object", "null"]},
                "notify": {"type": ["object", "null"]},
                "errors": {
                    "type": "array",
                    "description": "Failed jobs by error code, most frequent first "
                    "(10 codes at most), with up to 3 job ids each.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "count": count,
                            "jobs": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
                "jobs_url": {"type": "string"},
            },
        },
        "BatchList": {
            "type": "object",
            "required": ["batches", "next_cursor"],
            "properties": {
                "batches": {"type": "array", "items": ref("BatchView")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
    }


def _submit_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "submitBatch",
        "summary": "Submit a batch of jobs (JSON, or NDJSON up to 100,000 jobs).",
        "description": (
            'JSON: `{"jobs": [spec, ...], "metadata": {...}, "notify": {...}}` with up to '
            f"{api.max_batch} specs. NDJSON (`{NDJSON_TYPE}`): one spec per line, up to "
            f"{MAX_NDJSON_JOBS:,} lines and {api.max_batch_bytes} bytes, read as a stream; "
            'the first line may be `{"batch": {"metadata": ..., "notify": ...}}`. All or '
            "nothing: an invalid spec refuses the batch, and the error names it (`line` "
            "for NDJSON). Answered 201 once the batch and its jobs are committed. "
            "Quotas, backpressure and `Idempotency-Key` as for `POST /v1/jobs`."
        ),
        "parameters": [IDEMPOTENCY_KEY.doc()],
        "requestBody": {
            "required": True,
            "content": {
                **json_content(ref("BatchSubmission")),
                NDJSON_TYPE: {"schema": {"type": "string"}},
            },
        },
        "responses": {
            "201": {
                "description": "The batch, every job queued.",
                "headers": {
                    "Location": {
                        "description": "`/v1/batches/{batch_id}`.",
                        "schema": {"type": "string"},
                    }
                },
                "content": json_content(ref("BatchView")),
            },
            "400": error_response(
                f"Malformed JSON, an invalid spec (named by `field`, and `line` for "
                f"NDJSON), a `notify` without a webhook secret. {BAD_AUTH}."
            ),
            "401": UNAUTHORIZED,
            "409": error_response(
                "This `Idempotency-Key` is still being accepted.",
                **{"Retry-After": RETRY_AFTER},
            ),
            "413": error_response("Too many jobs, or too many bytes (`too_many_jobs`)."),
            "415": error_response(f"Content-Type is neither JSON nor {NDJSON_TYPE}."),
            "422": error_response("This `Idempotency-Key` was used with another body."),
            "429": error_response(
                "Over the client's quota; nothing accepted.", **{"Retry-After": RETRY_AFTER}
            ),
            "500": INTERNAL,
            "503": error_response(
                "Queue full, draining, or the store is unavailable; nothing accepted.",
                **{"Retry-After": RETRY_AFTER},
            ),
        },
    }


def _get_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getBatch",
        "summary": "A batch's progress; optionally wait until it is finished.",
        "parameters": [WAIT.doc()],
        "responses": {
            "200": {"description": "The batch.", "content": json_content(ref("BatchView"))},
            "400": error_response(f"`wait` is not a number >= 0. {BAD_AUTH}."),
            **_BATCH_ERRORS,
        },
    }


def _list_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "listBatches",
        "summary": "The client's batches, newest first.",
        "parameters": [LIMIT.doc(), CURSOR.doc()],
        "responses": {
            "200": {"description": "A page.", "content": json_content(ref("BatchList"))},
            "400": error_response(f"A bad limit or cursor. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


def _jobs_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "listBatchJobs",
        "summary": "A batch's jobs, newest first, filtered as `GET /v1/jobs`.",
        "parameters": [*(f.doc() for f in FILTERS if f.name != "batch"), LIMIT.doc(), CURSOR.doc()],
        "responses": {
            "200": {"description": "A page of jobs.", "content": json_content(ref("JobList"))},
            "400": error_response(f"A bad filter, limit or cursor. {BAD_AUTH}."),
            **_BATCH_ERRORS,
        },
    }


def _cancel_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "cancelBatch",
        "summary": "Cancel every job of the batch that has not finished.",
        "description": (
            "Queued jobs are cancelled, running transfers are aborted (on any instance). "
            "Finished jobs keep their results. Cancelling a finished batch changes nothing."
        ),
        "responses": {
            "200": {
                "description": "The batch after the cancel.",
                "content": json_content(ref("BatchView")),
            },
            "400": BAD_AUTH_RESPONSE,
            **_BATCH_ERRORS,
        },
    }


# -- the resource ----------------------------------------------------------------------------


class BatchesResource(ApiResource):
    """``/v1/batches``: a client's batches."""

    schemas = staticmethod(_schemas)

    @route("/v1/batches", "POST", _submit_doc)
    async def submit(self, request: IRequest) -> bytes:
        api = self.api
        client = api.client(request)
        refuse_if_draining(api)
        key = idempotency_key(request)
        media = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if media == NDJSON_TYPE.encode():
            check_length(request, api.max_batch_bytes)
            submission: _Submission = _NdjsonSubmission(api, request)
        elif media == JSON_TYPE.encode():
            check_length(request, api.max_request_bytes)
            submission = _JsonSubmission(api, read_body(request, api.max_request_bytes))
        else:
            shown = media.decode("latin-1") or "none"
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json or {NDJSON_TYPE} (got {shown})",
            )
        submission.validate()
        if submission.has_notify():
            await require_secret(api, client)
        if submission.revalidations:
            submission.found = await earlier_validators(api, client, submission.revalidations)
        return await idempotently(
            api.store,
            api.reactor,
            request,
            client=client,
            key=key,
            fingerprint=submission.fingerprint,
            accept=lambda stored: self._accept(request, client, submission, stored),
        )

    async def _accept(
        self, request: IRequest, client: str, submission: _Submission, key: str | None
    ) -> bytes:
        api = self.api
        jobs_resource = api.component(JobsResource)
        total = submission.total
        jobs_resource.admit(client, total)
        now = api.reactor.seconds()
        record = BatchRecord(new_job_id(now), client, now, submission.metadata, submission.notify)
        response = StoredResponse(
            201,
            (("Content-Type", JSON_TYPE), ("Location", batch_url(record.id))),
            dumps(_new_view(record, total)),
        )
        stored = None if key is None else IdempotencyRecord(client, key, response)
        added = submission.store(client, record, now, stored)
        await jobs_resource.commit(client, total, added)
        return send_stored(request, response, replayed=False)

    @route("/v1/batches", "GET", _list_doc)
    async def list_batches(self, request: IRequest) -> bytes:
        client = self.api.client(request)
        limit = LIMIT.get(request) or DEFAULT_LIST_LIMIT
        batches = await self.api.store.list_batches(client, limit + 1, CURSOR.get(request))
        next_cursor = batches[limit - 1].id if len(batches) > limit else None
        return json_response(
            request,
            {"batches": [batch_view(b) for b in batches[:limit]], "next_cursor": next_cursor},
        )

    @route("/v1/batches/<batch_id>", "GET", _get_doc)
    async def get_batch(self, request: IRequest, batch_id: str) -> bytes:
        """With ``?wait=N``: once the batch is finished or N seconds have passed; woken
        by every commit of events (here, or another instance's on PostgreSQL)."""
        api = self.api
        client = api.client(request)
        wait = WAIT.get(request) or 0.0
        deadline = api.reactor.seconds() + wait
        pulse = api.event_pulse
        pulse.watch("*")
        waited = False
        try:
            # The version is noted before each read: a commit that lands while the read
            # is in flight then wakes the wait at once (instead of after poll_interval).
            seen = pulse.version("*")
            batch = await self._get(client, batch_id)
            finished: bool | None = batch.finished_at is not None
            while not finished and not api.draining:
                remaining = deadline - api.reactor.seconds()
                if remaining <= 0:
                    break
                await pulse.wait("*", min(remaining, api.poll_interval), seen)
                waited = True
                seen = pulse.version("*")
                # One row per wake-up; the jobs are counted once, at the end.
                finished = await api.store.batch_finished(client, batch_id)
                if finished is None:
                    raise _not_found(batch_id)
        finally:
            pulse.unwatch("*")
        if waited:
            batch = await self._get(client, batch_id)
        return json_response(request, batch_view(batch))

    @route("/v1/batches/<batch_id>/jobs", "GET", _jobs_doc)
    async def batch_jobs(self, request: IRequest, batch_id: str) -> bytes:
        client = self.api.client(request)
        await self._get(client, batch_id)
        where = attrs.evolve(job_filter(request), batch=batch_id)
        limit = LIMIT.get(request) or DEFAULT_LIST_LIMIT
        jobs = await self.api.store.list_jobs(client, where, limit + 1, CURSOR.get(request))
        next_cursor = jobs[limit - 1].id if len(jobs) > limit else None
        return json_response(
            request, {"jobs": [job_view(j) for j in jobs[:limit]], "next_cursor": next_cursor}
        )

    @route("/v1/batches/<batch_id>", "DELETE", _cancel_doc)
    async def cancel_batch(self, request: IRequest, batch_id: str) -> bytes:
        api = self.api
        client = api.client(request)
        outcome = await api.store.cancel_batch(client, batch_id, api.reactor.seconds())
        if outcome is None:
            raise _not_found(batch_id)
        batch, running = outcome
        for job_id in running:
            api.scheduler.abort(job_id)
            api.waiters.notify(job_id)
        return json_response(request, batch_view(batch))

    async def _get(self, client: str, batch_id: str) -> Batch:
        batch = await self.api.store.get_batch(client, batch_id)
        if batch is None:
            raise _not_found(batch_id)
        return batch


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no batch {batch_id}")


# -- submissions ------------------------------------------------------------------------------


class _Submission:
    total = 0
    metadata: dict[str, Any] | None = None
    notify: Notify | None = None
    revalidations: dict[str, str]
    """The job ids ``revalidate`` names -> the field that names each first."""
    found: dict[str, tuple[str | None, str | None]]
    """Their validators (``earlier_validators``), applied as the jobs are made."""

    def __init__(self) -> None:
        self.revalidations = {}
        self.found = {}

    def _refers(self, spec: JobSpec, field: str) -> None:
        if spec.revalidate is not None:
            self.revalidations.setdefault(spec.revalidate, field)

    def validate(self) -> None:
        raise NotImplementedError

    def has_notify(self) -> bool:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def store(
        self, client: str, record: BatchRecord, now: float, key: IdempotencyRecord | None
    ) -> Any:
        raise NotImplementedError


def _batch_fields(api: JobAPI, raw: dict[str, Any], where: str) -> tuple[Any, Notify | None]:
    metadata = raw.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ApiError(400, "invalid_request", "must be an object", field=f"{where}metadata")
        if len(dumps(metadata)) > api.limits.max_metadata_bytes:
            raise ApiError(
                400,
                "invalid_request",
                f"more than {api.limits.max_metadata_bytes} bytes",
                field=f"{where}metadata",
            )
    notify = None
    if raw.get("notify") is not None:
        try:
            notify = parse_notify(raw["notify"], api.limits, DEFAULT_BATCH_NOTIFY)
        except SpecError as e:
            raise ApiError(400, "invalid_request", e.message, field=where + e.field) from None
    return metadata, notify


class _JsonSubmission(_Submission):
    def __init__(self, api: JobAPI, data: bytes) -> None:
        super().__init__()
        self.api = api
        self.data = data
        self.specs: list[JobSpec] = []

    def validate(self) -> None:
        payload = parse_json(self.data)
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", 'must be {"jobs": [...]}')
        for key in payload:
            if key not in ("jobs", "metadata", "notify"):
                raise ApiError(400, "invalid_request", "unknown field", field=str(key))
        self.metadata, self.notify = _batch_fields(self.api, payload, "")
        items = payload.get("jobs")
        if not isinstance(items, list) or not items:
            raise ApiError(
                400, "invalid_request", "must be a non-empty list of job specs", field="jobs"
            )
        if len(items) > self.api.max_batch:
            raise ApiError(
                413,
                "too_many_jobs",
                f"{len(items)} jobs in one JSON request; at most {self.api.max_batch} "
                f"({NDJSON_TYPE} takes up to {MAX_NDJSON_JOBS})",
                field="jobs",
            )
        for i, raw in enumerate(items):
            try:
                spec = JobSpec.from_json(raw, self.api.limits)
            except SpecError as e:
                e = e.within(f"jobs[{i}]")
                raise ApiError(400, "invalid_request", e.message, field=e.field) from None
            self._refers(spec, f"jobs[{i}].revalidate")
            self.specs.append(spec)
        self.total = len(self.specs)

    def has_notify(self) -> bool:
        return self.notify is not None or any(s.notify is not None for s in self.specs)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def store(
        self, client: str, record: BatchRecord, now: float, key: IdempotencyRecord | None
    ) -> Any:
        specs = [revalidating(spec, self.found) for spec in self.specs]
        jobs = JobsResource.new_jobs(client, specs, now, record)
        return self.api.store.add(jobs, key, record)


class _NdjsonSubmission(_Submission):
    """Read from the request's spool file, twice, a line at a time."""

    def __init__(self, api: JobAPI, request: IRequest) -> None:
        super().__init__()
        self.api = api
        content = request.content
        if content is None:
            raise ApiError(400, "invalid_request", "the body is empty")
        self.content: IO[bytes] = content
        self._notify_seen = False
        self._digest = ""

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of the non-blank lines, the header line included."""
        self.content.seek(0)
        for number, line in enumerate(iter(self.content.readline, b""), 1):
            if line.strip():
                yield number, line

    def validate(self) -> None:
        limits = self.api.limits
        digest = hashlib.sha256()
        first = True
        count = 0
        for number, line in self._lines():
            digest.update(line)
            raw = _parse_line(line, number)
            if first and isinstance(raw, dict) and set(raw) == {"batch"}:
                first = False
                header = raw["batch"]
                if not isinstance(header, dict) or set(header) - {"metadata", "notify"}:
                    raise _line_error(number, "batch", 'must be {"metadata": ..., "notify": ...}')
                try:
                    self.metadata, self.notify = _batch_fields(self.api, header, "batch.")
                except ApiError as e:
                    raise _line_error(number, e.field or "batch", e.message) from None
                continue
            first = False
            count += 1
            if count > MAX_NDJSON_JOBS:
                raise ApiError(
                    413,
                    "too_many_jobs",
                    f"more than {MAX_NDJSON_JOBS} jobs in one request",
                    field=f"line {number}",
                )
            try:
                spec = JobSpec.from_json(raw, limits)
            except SpecError as e:
                raise _line_error(number, e.field, e.message) from None
            if spec.notify is not None:
                self._notify_seen = True
            self._refers(spec, f"line {number}: revalidate")
        if count == 0:
            raise ApiError(400, "invalid_request", "no job specs in the body")
        self.total = count
        self._digest = digest.hexdigest()

    def has_notify(self) -> bool:
        return self.notify is not None or self._notify_seen

    def fingerprint(self) -> str:
        return self._digest

    def store(
        self, client: str, record: BatchRecord, now: float, key: IdempotencyRecord | None
    ) -> Any:
        limits, total, found = self.api.limits, self.total, self.found
        ids = sorted(new_job_id(now) for _ in range(total))  # ~4 MB for 100,000

        def chunks() -> Iterator[Sequence[Job]]:
            """In the database thread: the validated lines again, as jobs."""
            chunk: list[Job] = []
            taken = 0
            for _number, line in self._lines():
                raw = _parse_line(line, _number)
                if isinstance(raw, dict) and set(raw) == {"batch"} and taken == 0 and not chunk:
                    continue
                chunk.append(
                    Job(
                        id=ids[taken],
                        client=client,
                        state=JobState.QUEUED,
                        spec=revalidating(JobSpec.from_json(raw, limits), found),
                        created_at=now,
                        batch=record.id,
                    )
                )
                taken += 1
                if len(chunk) == CHUNK:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
            if taken != total:
                raise RuntimeError(f"the NDJSON body changed: {taken} jobs, not {total}")

        return self.api.store.add_stream(client, chunks, total, record, key)


def _parse_line(line: bytes, number: int) -> object:
    try:
        return parse_json(line)
    except ApiError as e:
        raise _line_error(number, None, e.message) from None


def _line_error(number: int, field: str | None, message: str) -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        f"line {number}: {message}",
        field=f"line {number}" + (f": {field}" if field else ""),
    )
