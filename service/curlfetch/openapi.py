"""The OpenAPI 3.1 document of the REST API v1, as a Python dict (served at
``GET /openapi.json``).

Schemas are JSON Schema 2020-12 (OpenAPI 3.1's dialect), strict where the API is strict
(``additionalProperties: false`` on what clients send and on error objects), so that
``tests/service/test_openapi.py`` can validate real responses against them. Keep this in
step with ``service/curlfetch/api.py``: that test fails when a route, a method or a response shape
is missing on either side.
"""

from __future__ import annotations

from typing import Any

from .jobs import JobState, Limits
from .metrics import METRIC_NAMES

_LIMITS = Limits()
_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json_content(_ref("Error"))}
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer", "minimum": 0},
}

_NUMBER_OR_NULL = {"type": ["number", "null"]}

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_OPEN: list[dict[str, list[str]]] = []
_BAD_AUTH = "A malformed `Authorization` header (`invalid_request`)"


def _schemas(max_batch: int) -> dict[str, Any]:
    header_pair = {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "string"}],
        "minItems": 2,
        "maxItems": 2,
        "items": False,
    }
    return {
        "Error": {
            "type": "object",
            "description": "Every error response.",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {
                            "type": "string",
                            "description": (
                                "Stable, machine-readable: invalid_request (400), "
                                "unauthorized and invalid_token (401), not_found "
                                "(404), method_not_allowed (405), conflict and "
                                "idempotency_key_in_progress (409), "
                                "payload_too_large and too_many_jobs (413), "
                                "unsupported_media_type (415), idempotency_key_reused "
                                "(422), quota_exceeded and "
                                "rate_limited (429), queue_full, draining and "
                                "store_unavailable (503), internal_error (500, a bug)."
                            ),
                        },
                        "message": {"type": "string"},
                        "field": {
                            "type": "string",
                            "description": (
                                "Where in the request the problem is: a JSON path into "
                                "the body (`headers[2]`, `jobs[3].url`), a query "
                                "parameter (`wait`) or a header (`Idempotency-Key`)."
                            ),
                        },
                    },
                }
            },
        },
        "JobSpec": {
            "type": "object",
            "description": (
                "One job to run. Only `url` is required; everything else has a default "
                "(shown normalized in the job's `request`). Unknown fields are refused."
            ),
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": _LIMITS.max_url_length,
                    "description": "An http or https URL, without whitespace.",
                },
                "method": {
                    "type": "string",
                    "default": "GET",
                    "description": f"One of {sorted(_LIMITS.methods)} (by default).",
                },
                "headers": {
                    "type": "array",
                    "items": header_pair,
                    "maxItems": _LIMITS.max_headers,
                    "description": (
                        "[name, value] pairs, sent in order; names are RFC 9110 tokens, "
                        "values must not contain CR, LF or NUL."
                    ),
                },
                "body": {
                    "type": ["string", "null"],
                    "description": "A text body, sent as UTF-8.",
                },
                "body_base64": {
                    "type": ["string", "null"],
                    "contentEncoding": "base64",
                    "description": "A binary body (give `body` or this, not both).",
                },
                "timeout": {
                    **_NUMBER_OR_NULL,
                    "exclusiveMinimum": 0,
                    "maximum": _LIMITS.max_timeout,
                    "description": "Seconds for the whole transfer.",
                },
                "connect_timeout": {
                    **_NUMBER_OR_NULL,
                    "exclusiveMinimum": 0,
                    "maximum": _LIMITS.max_timeout,
                },
                "follow_redirects": {"type": "boolean", "default": True},
                "max_redirects": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": _LIMITS.max_redirects,
                },
                "max_body_bytes": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "maximum": _LIMITS.max_body_bytes,
                },
                "http_version": {"enum": ["1.1", "2", "3", None]},
                "priority": {
                    "type": ["integer", "null"],
                    "minimum": -(2**31),
                    "maximum": 2**31 - 1,
                    "description": "Higher runs first; FIFO within a priority.",
                },
                "retry": {
                    "type": ["object", "null"],
                    "additionalProperties": False,
                    "properties": {
                        "max_attempts": {
                            "type": ["integer", "null"],
                            "minimum": 1,
                            "maximum": _LIMITS.max_attempts,
                        },
                        "backoff": {
                            **_NUMBER_OR_NULL,
                            "minimum": 0,
                            "maximum": _LIMITS.max_backoff,
                        },
                    },
                },
                "deadline": {
                    **_NUMBER_OR_NULL,
                    "exclusiveMinimum": 0,
                    "maximum": _LIMITS.max_deadline,
                    "description": "Seconds after submission by which the job must finish.",
                },
                "metadata": {
                    "type": ["object", "null"],
                    "description": "Yours; returned unchanged in the job view.",
                },
            },
        },
        "Batch": {
            "type": "object",
            "required": ["jobs"],
            "additionalProperties": False,
            "properties": {
                "jobs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_batch,
                    "items": _ref("JobSpec"),
                }
            },
        },
        "Request": {
            "type": "object",
            "description": "The job spec as accepted, with every default filled in.",
            "required": [
                "url",
                "method",
                "headers",
                "timeout",
                "connect_timeout",
                "follow_redirects",
                "max_redirects",
                "max_body_bytes",
                "http_version",
                "priority",
                "retry",
                "deadline",
            ],
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string"},
                "method": {"type": "string"},
                "headers": {"type": "array", "items": header_pair},
                "body_base64": {"type": "string", "contentEncoding": "base64"},
                "timeout": {"type": "number"},
                "connect_timeout": {"type": "number"},
                "follow_redirects": {"type": "boolean"},
                "max_redirects": {"type": "integer"},
                "max_body_bytes": {"type": "integer"},
                "http_version": {"enum": ["1.1", "2", "3", None]},
                "priority": {"type": "integer"},
                "retry": {
                    "type": "object",
                    "required": ["max_attempts", "backoff"],
                    "additionalProperties": False,
                    "properties": {
                        "max_attempts": {"type": "integer"},
                        "backoff": {"type": "number"},
                    },
                },
                "deadline": _NUMBER_OR_NULL,
            },
        },
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
            ],
            "additionalProperties": False,
            "properties": {
                "status": {"type": "integer"},
                "http_version": {"type": "string"},
                "headers": {"type": "array", "items": header_pair},
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
                "body": _nullable(_ref("Body")),
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
                "state": {"enum": [s.value for s in JobState]},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "When the latest attempt started.",
                },
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "attempts": {"type": "integer", "minimum": 0},
                "request": _ref("Request"),
                "metadata": {"type": ["object", "null"]},
                "result": {
                    **_nullable(_ref("Result")),
                    "description": "Once a response arrived (state succeeded).",
                },
                "error": {
                    **_nullable(_ref("JobError")),
                    "description": "Once the job failed.",
                },
            },
        },
        "JobBatch": {
            "type": "object",
            "required": ["jobs"],
            "additionalProperties": False,
            "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "next_cursor"],
            "additionalProperties": False,
            "properties": {
                "jobs": {"type": "array", "items": _ref("Job")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last.",
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}},
        },
        "Ready": {
            "type": "object",
            "required": ["status"],
            "additionalProperties": False,
            "properties": {
                "status": {"enum": ["ready", "draining", "unavailable"]},
                "error": {"$ref": "#/components/schemas/Error/properties/error"},
            },
        },
    }


def build_openapi(
    *,
    max_batch: int,
    max_request_bytes: int,
    max_wait: float,
    max_list_limit: int,
    default_list_limit: int,
) -> dict[str, Any]:
    """The document, with this instance's limits filled in."""
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    not_found = {"$ref": "#/components/responses/NotFound"}
    unauthorized = {"$ref": "#/components/responses/Unauthorized"}
    bad_auth = _error_response(f"{_BAD_AUTH}.")
    internal = {"$ref": "#/components/responses/InternalError"}
    unavailable = {"$ref": "#/components/responses/StoreUnavailable"}
    job_response = {"description": "The job.", "content": _json_content(_ref("Job"))}
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "curlfetch",
            "version": "1.0.0",
            "description": (
                "Fetch jobs: submit URLs to fetch, then read each job's result and body.\n\n"
                "All bodies are JSON (`application/json`) except a job's body and "
                '`/metrics`. Every error is `{"error": {"code", "message", '
                '"field"?}}`. An unknown path answers 404 and a known path with a '
                "method it does not support answers 405 with an `Allow` header, both "
                "with that error body (components `NotFound`, `MethodNotAllowed`). "
                "Request bodies larger than "
                f"{max_request_bytes} bytes are refused with 413 as soon as "
                "`Content-Length` shows it.\n\n"
                "Authentication: when the service has tokens configured, the `/v1` "
                "routes (and `/metrics`, unless configured open) need "
                "`Authorization: Bearer <token>` (RFC 6750). No token, or another "
                "scheme, is 401 `unauthorized`; an unknown token is 401 "
                "`invalid_token`; a malformed header (or two of them) is 400 "
                "`invalid_request`; each with a `WWW-Authenticate: Bearer` challenge. "
                "Each token is one client, which sees only its own jobs: another "
                "client's job id is 404. Without tokens (loopback only) no header is "
                "needed. Per-client quotas on queued jobs and on jobs submitted per "
                "second answer 429 with Retry-After; a client's transfers in flight "
                "are capped by the scheduler (the rest wait queued)."
            ),
        },
        "security": _BEARER,
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "submitJobs",
                    "summary": "Submit one job, or a batch of jobs.",
                    "description": (
                        'Send one job spec, or `{"jobs": [spec, ...]}` with up to '
                        f"{max_batch} specs. All or nothing: if any spec is invalid, "
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
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": (
                                "Any unique value (a UUID), compared verbatim; "
                                "remembered for 24 hours."
                            ),
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 255,
                                "pattern": "^[!-~]+$",
                            },
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": _json_content({"anyOf": [_ref("JobSpec"), _ref("Batch")]}),
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
                            "content": _json_content({"oneOf": [_ref("Job"), _ref("JobBatch")]}),
                        },
                        "400": _error_response(
                            "Malformed JSON, an invalid spec or an invalid "
                            f"`Idempotency-Key`. {_BAD_AUTH}."
                        ),
                        "401": unauthorized,
                        "409": _error_response(
                            "A request with this `Idempotency-Key` is still being accepted "
                            "(`idempotency_key_in_progress`); retry for its response.",
                            **{"Retry-After": _RETRY_AFTER},
                        ),
                        "413": _error_response(
                            f"The body exceeds {max_request_bytes} bytes, or the batch "
                            f"has more than {max_batch} jobs (`too_many_jobs`)."
                        ),
                        "415": _error_response("Content-Type is not application/json."),
                        "422": _error_response(
                            "This `Idempotency-Key` was used with another request body "
                            "(`idempotency_key_reused`)."
                        ),
                        "429": _error_response(
                            "Over the client's quota: too many of its jobs queued "
                            "(`quota_exceeded`) or submitted too fast (`rate_limited`); "
                            "nothing accepted.",
                            **{"Retry-After": _RETRY_AFTER},
                        ),
                        "500": internal,
                        "503": _error_response(
                            "Too many jobs waiting (`queue_full`), shutting down "
                            "(`draining`) or the store is unavailable; nothing accepted.",
                            **{"Retry-After": _RETRY_AFTER},
                        ),
                    },
                },
                "get": {
                    "operationId": "listJobs",
                    "summary": "List jobs, newest first, a page at a time.",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": [s.value for s in JobState]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": max_list_limit,
                                "default": default_list_limit,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "`next_cursor` of the previous page (opaque).",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of jobs.",
                            "content": _json_content(_ref("JobList")),
                        },
                        "400": _error_response(f"A bad state, limit or cursor. {_BAD_AUTH}."),
                        "401": unauthorized,
                        "500": internal,
                        "503": unavailable,
                    },
                },
            },
            "/v1/jobs/{job_id}": {
                "parameters": [job_id],
                "get": {
                    "operationId": "getJob",
                    "summary": "A job; optionally wait until it is finished.",
                    "parameters": [
                        {
                            "name": "wait",
                            "in": "query",
                            "description": (
                                "Long-poll: answer once the job is terminal or after this "
                                f"many seconds (capped at {max_wait:g}), whichever is first."
                            ),
                            "schema": {"type": "number", "minimum": 0},
                        }
                    ],
                    "responses": {
                        "200": job_response,
                        "400": _error_response(f"`wait` is not a number >= 0. {_BAD_AUTH}."),
                        "401": unauthorized,
                        "404": not_found,
                        "500": internal,
                        "503": unavailable,
                    },
                },
                "delete": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a queued or running job (a transfer stops at once).",
                    "responses": {
                        "200": {
                            "description": "The job, now cancelled.",
                            "content": _json_content(_ref("Job")),
                        },
                        "400": bad_auth,
                        "401": unauthorized,
                        "404": not_found,
                        "409": _error_response("The job had already finished."),
                        "500": internal,
                        "503": unavailable,
                    },
                },
            },
            "/v1/jobs/{job_id}/body": {
                "parameters": [job_id],
                "get": {
                    "operationId": "getJobBody",
                    "summary": "The response body, as stored.",
                    "description": (
                        "The bytes with the original Content-Type (or "
                        "application/octet-stream); `ETag` is the quoted sha256."
                    ),
                    "responses": {
                        "200": {
                            "description": "The body.",
                            "headers": {
                                "ETag": {
                                    "description": "The body's sha256, quoted.",
                                    "schema": {"type": "string"},
                                }
                            },
                            "content": {"*/*": {"schema": {}}},
                        },
                        "304": {"description": "Not modified (If-None-Match matched)."},
                        "400": bad_auth,
                        "401": unauthorized,
                        "404": not_found,
                        "500": internal,
                        "503": unavailable,
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: the process answers.",
                    "security": _OPEN,
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": _json_content(_ref("Health")),
                        },
                        "500": internal,
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: not draining, and the store answers.",
                    "security": _OPEN,
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": _json_content(_ref("Ready")),
                        },
                        "500": internal,
                        "503": {
                            "description": "Draining, or the store does not answer.",
                            "content": _json_content(_ref("Ready")),
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics.",
                    "description": (
                        "Families: "
                        + ", ".join(f"`{n}`" for n in METRIC_NAMES)
                        + ". Needs a token when the service has tokens, unless it is "
                        "configured open (`--metrics-auth=open`)."
                    ),
                    "security": [*_BEARER, {}],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "400": bad_auth,
                        "401": unauthorized,
                        "500": internal,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "security": _OPEN,
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": _json_content({"type": "object"}),
                        },
                        "500": internal,
                    },
                }
            },
        },
        "components": {
            "schemas": _schemas(max_batch),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "A token from the service's tokens file or CURLFETCH_TOKENS; "
                        "it names the client."
                    ),
                }
            },
            "responses": {
                "Unauthorized": _error_response(
                    "No bearer token (`unauthorized`) or an unknown one (`invalid_token`).",
                    **{
                        "WWW-Authenticate": {
                            "description": (
                                'The challenge: `Bearer realm="curlfetch"`, with '
                                '`error="invalid_token"` for an unknown token.'
                            ),
                            "schema": {"type": "string"},
                        }
                    },
                ),
                "NotFound": _error_response("No such job (or another client's), or no such path."),
                "MethodNotAllowed": _error_response(
                    "The path exists, but not with this method.",
                    Allow={
                        "description": "The methods the path supports.",
                        "schema": {"type": "string"},
                    },
                ),
                "InternalError": _error_response("A bug in the service."),
                "StoreUnavailable": _error_response(
                    "The job store is not available (`store_unavailable`).",
                    **{"Retry-After": _RETRY_AFTER},
                ),
            },
        },
    }
