"""The job as the API shows it (``job_view``), next to the JSON Schemas of what
``/v1/jobs`` takes and returns, so that a view and its schema change together.

``tests/service/test_openapi.py`` validates real views against these schemas.
"""

from __future__ import annotations

from typing import Any

from ..jobs import SPEC, Job, JobState, Limits, rfc3339
from ..openapi import HEADER_PAIR, nullable, ref


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
                "warc": None if body.segment is None else result["body"]["warc"],
            }
        )
    return {
        "id": job.id,
        "batch": job.batch,
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


def job_schemas(max_batch: int, limits: Limits) -> dict[str, Any]:
    """The component schemas of the job routes; ``JobSpec`` (what a client sends) and
    ``Request`` (the spec as accepted) come from the spec's field table."""
    return {
        "JobSpec": SPEC.schema(limits),
        "Batch": {
            "type": "object",
            "required": ["jobs"],
            "additionalProperties": False,
            "properties": {
                "jobs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_batch,
                    "items": ref("JobSpec"),
                }
            },
        },
        "Request": SPEC.view(limits),
        "Body": {
            "type": "object",
            "required": ["size", "sha256", "url", "truncated"],
            "additionalProperties": False,
            "properties": {
                "size": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "url": {
                    "type": "string",
                    "description": "Where to download it: `/v1/jobs/{job_id}/body`.",
                },
                "truncated": {"type": "boolean"},
                "warc": {
                    "type": ["object", "null"],
                    "description": (
                        "Where the body's WARC `response` record is: the segment file "
                        "under `segments/`, the record's offset and length in it (a gzip "
                        "member of its own in a `.warc.gz`), and where the payload starts "
                        "in the uncompressed record. Null for a body stored by the "
                        "earlier file-per-body store."
                    ),
                    "required": ["segment", "offset", "length", "payload_at"],
                    "additionalProperties": False,
                    "properties": {
                        "segment": {"type": "string"},
                        "offset": {"type": "integer", "minimum": 0},
                        "length": {"type": "integer", "minimum": 1},
                        "payload_at": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "Result": {
            "type": "object",
            "description": "The final response (any HTTP status counts as a response).",
            "required": [
                "status",
                "http_version",
                "headers",
                "effective_url",
                "primary_ip",
                "redirects",
                "body",
                "timings",
                "etag",
                "last_modified",
                "not_modified",
                "body_of",
            ],
            "additionalProperties": False,
            "properties": {
                "status": {"type": "integer"},
                "http_version": {"type": "string"},
                "headers": {"type": "array", "items": HEADER_PAIR},
                "effective_url": {"type": "string"},
                "primary_ip": {"type": "string"},
                "redirects": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["status", "location"],
                        "additionalProperties": False,
                        "properties": {
                            "status": {"type": "integer"},
                            "location": {"type": ["string", "null"]},
                        },
                    },
                },
                "body": nullable(ref("Body")),
                "etag": {
                    "type": ["string", "null"],
                    "description": "The response's ETag (for a 304 without one: the "
                    "revalidated job's).",
                },
                "last_modified": {
                    "type": ["string", "null"],
                    "description": "The response's Last-Modified (likewise).",
                },
                "not_modified": {
                    "type": "boolean",
                    "description": "A 304 to a conditional request: nothing was stored; "
                    "`body` is the revalidated job's.",
                },
                "body_of": {
                    "type": ["string", "null"],
                    "description": "The job whose fetch stored `body`, when not this one.",
                },
                "timings": {
                    "type": "object",
                    "description": "Seconds from the start, cumulative (like curl's -w).",
                    "required": ["queue", "namelookup", "connect", "tls", "first_byte", "total"],
                    "additionalProperties": False,
                    "properties": {
                        name: {"type": "number"}
                        for name in ("queue", "namelookup", "connect", "tls", "first_byte", "total")
                    },
                },
            },
        },
        "JobError": {
            "description": "Why a job failed: a curl error, or a service-level code.",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["code", "curl_code", "curl_name", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"const": "curl_error"},
                        "curl_code": {"type": "integer"},
                        "curl_name": {"type": "string", "examples": ["OPERATION_TIMEDOUT"]},
                        "message": {"type": "string"},
                    },
                },
                {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {
                            "type": "string",
                            "not": {"const": "curl_error"},
                            "examples": ["deadline_exceeded", "egress_denied"],
                        },
                        "message": {"type": "string"},
                    },
                },
            ],
        },
        "Job": {
            "type": "object",
            "required": [
                "id",
                "batch",
                "state",
                "created_at",
                "started_at",
                "finished_at",
                "attempts",
                "request",
                "metadata",
                "result",
                "error",
            ],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "batch": {
                    "type": ["string", "null"],
                    "description": "The batch it was submitted in (`/v1/batches/{id}`).",
                },
                "state": {"enum": [s.value for s in JobState]},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "When the latest attempt started.",
                },
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "attempts": {"type": "integer", "minimum": 0},
                "request": ref("Request"),
                "metadata": {"type": ["object", "null"]},
                "result": {
                    **nullable(ref("Result")),
                    "description": "Once a response arrived (state succeeded).",
                },
                "error": {
                    **nullable(ref("JobError")),
                    "description": "Once the job failed.",
                },
            },
        },
        "JobBatch": {
            "type": "object",
            "required": ["jobs", "batch"],
            "additionalProperties": False,
            "properties": {
                "jobs": {"type": "array", "items": ref("Job")},
                "batch": {"type": "string", "description": "The batch these jobs make."},
            },
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "next_cursor"],
            "additionalProperties": False,
            "properties": {
                "jobs": {"type": "array", "items": ref("Job")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last.",
                },
            },
        },
    }
