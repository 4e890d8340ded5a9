"""What the SQLite and PostgreSQL stores share below SQL: how a ``Job`` becomes a row and
back (spec, metadata, result and error as JSON), how a stored Idempotency-Key is judged,
and the queued-job counters, so both backends behave exactly alike. Pure functions: they
run in the database threads as well as on the reactor."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..jobs import Job, JobError, JobResult, JobState, spec_from_stored
from . import (
    IDEMPOTENCY_ABANDONED_AFTER,
    IDEMPOTENCY_TTL,
    IdempotencyInProgressError,
    IdempotencyMismatchError,
    StoredResponse,
)


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def insert_row(job: Job) -> tuple[object, ...]:
    spec = job.spec
    return (
        job.id,
        job.client,
        job.state.value,
        spec.priority,
        spec.host,
        job.created_at,
        job.not_before,
        job.started_at,
        job.finished_at,
        job.attempts,
        dumps(spec.to_json()),
        None if spec.metadata is None else dumps(spec.metadata),
        None if job.result is None else dumps(job.result.to_json()),
        None if job.error is None else dumps(job.error.to_json()),
        job.batch,
    )


def save_row(job: Job) -> tuple[object, ...]:
    """The columns ``save`` writes, the id last."""
    return (
        job.state.value,
        job.attempts,
        job.not_before,
        job.started_at,
        job.finished_at,
        None if job.result is None else dumps(job.result.to_json()),
        None if job.error is None else dumps(job.error.to_json()),
        None if job.result is None or job.result.body is None else job.result.body.size,
        None if job.error is None else job.error.name,
        job.id,
    )


COLUMNS = (
    "seq, id, client, state, created_at, not_before, started_at, finished_at, attempts, "
    "spec, metadata, result, error, batch"
)
"""What ``job_from_row`` reads, in its order."""


def job_from_row(row: Sequence[Any]) -> Job:
    (
        _seq,
        job_id,
        client,
        state,
        created_at,
        not_before,
        started_at,
        finished_at,
        attempts,
        spec,
        metadata,
        result,
        error,
        batch,
    ) = row
    return Job(
        id=job_id,
        client=client,
        state=JobState(state),
        spec=spec_from_stored(json.loads(spec), None if metadata is None else json.loads(metadata)),
        created_at=created_at,
        attempts=attempts,
        not_before=not_before,
        started_at=started_at,
        finished_at=finished_at,
        result=None if result is None else JobResult.from_json(json.loads(result)),
        error=None if error is None else JobError.from_json(json.loads(error)),
        batch=batch,
    )


def claimed(rows: Iterable[Sequence[Any]]) -> tuple[list[Job], dict[str, int]]:
    """The jobs a claim's ``UPDATE ... RETURNING`` marked, in claim order (RETURNING comes
    in none), and the change to the queued counters."""
    pairs = [(row[0], job_from_row(row)) for row in rows]
    pairs.sort(key=lambda sj: (-sj[1].spec.priority, sj[0]))
    jobs = [job for _, job in pairs]
    return jobs, {c: -n for c, n in Counter(job.client for job in jobs).items()}


def judge_key(
    row: Sequence[Any], key: str, fingerprint: str, owner: str, now: float
) -> StoredResponse | None:
    """Decide on an existing Idempotency-Key row: the recorded response to replay, or None
    when the key is free to (re)take (expired, or another process's reservation that was
    abandoned); raises for another body (422) or a reservation still in progress (409).
    Our own reservations are never taken over, so a slow ``add`` cannot race a second."""
    stored_fp, state, holder, created_at, status, headers, body = row
    expired = created_at <= now - IDEMPOTENCY_TTL
    abandoned = (
        state == "reserved" and holder != owner and created_at <= now - IDEMPOTENCY_ABANDONED_AFTER
    )
    if expired or abandoned:
        return None
    if stored_fp != fingerprint:
        raise IdempotencyMismatchError(
            f"Idempotency-Key {key!r} was used with another request body"
        )
    if state == "reserved":
        raise IdempotencyInProgressError(
            f"the request with Idempotency-Key {key!r} is still in progress"
        )
    pairs = tuple((str(n), str(v)) for n, v in json.loads(headers))
    return StoredResponse(status, pairs, bytes(body))


class QueuedCounts:
    """Queued jobs in all and per client, as of the last committed write: cheap enough for
    the API's backpressure and quota checks on every submission."""

    __slots__ = ("by_client", "total")

    def __init__(self) -> None:
        self.total = 0
        self.by_client: dict[str, int] = {}

    def reset(self, counts: Mapping[str, int]) -> None:
        """Take fresh counts read from the database."""
        self.by_client = {client: n for client, n in counts.items() if n}
        self.total = sum(self.by_client.values())

    def apply(self, delta: Mapping[str, int]) -> None:
        """Add one committed write's change per client."""
        by = self.by_client
        for client, change in delta.items():
            self.total += change
            left = by.get(client, 0) + change
            if left:
                by[client] = left
            else:
                by.pop(client, None)

    def for_client(self, client: str) -> int:
        return self.by_client.get(client, 0)
