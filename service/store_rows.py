"""How a ``Job`` becomes a row and back, shared by the SQLite and PostgreSQL stores so
both read and write exactly the same columns (spec, metadata, result and error as JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .jobs import Job, JobError, JobResult, JobState, spec_from_stored


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
    )


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
    )
