"""The OpenAPI 3.1 document of the REST API v1 (served at ``GET /openapi.json``): the
frame (info, security, shared responses, the ``Error`` schema) and the helpers that the
API's resources use to declare their operations and schemas next to their routes.

Schemas are JSON Schema 2020-12 (OpenAPI 3.1's dialect), strict where the API is strict
(``additionalProperties: false`` on what clients send and on error objects), so that
``tests/service/test_openapi.py`` can validate real responses against them. The paths
come from the routes themselves (``api/routes.py``): there is no second list to keep in
step.
"""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": json_content(ref("Error"))}
    if headers:
        out["headers"] = headers
    return out


RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer", "minimum": 0},
}

NUMBER_OR_NULL = {"type": ["number", "null"]}

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
OPEN: list[dict[str, list[str]]] = []
BAD_AUTH = "A malformed `Authorization` header (`invalid_request`)"


HEADER_PAIR: dict[str, Any] = {
    "type": "array",
    "prefixItems": [{"type": "string"}, {"type": "string"}],
    "minItems": 2,
    "maxItems": 2,
    "items": False,
}
NOT_FOUND = {"$ref": "#/components/responses/NotFound"}
UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
INTERNAL = {"$ref": "#/components/responses/InternalError"}
UNAVAILABLE = {"$ref": "#/components/responses/StoreUnavailable"}
BAD_AUTH_RESPONSE = error_response(f"{BAD_AUTH}.")
V1_ERRORS = {"401": UNAUTHORIZED, "500": INTERNAL, "503": UNAVAILABLE}
"""What every authenticated route over the store may answer besides its own."""

ERROR_SCHEMA: dict[str, Any] = {
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
                        "(404), method_not_allowed (405), request_timeout (408), conflict and "
                        "idempotency_key_in_progress (409), "
                        "payload_too_large and too_many_jobs (413), "
                        "unsupported_media_type (415), idempotency_key_reused "
                        "(422), body_lost (410), quota_exceeded and "
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
}


def build_openapi(
    *, paths: dict[str, Any], schemas: dict[str, Any], max_request_bytes: int
) -> dict[str, Any]:
    """The document around ``paths`` and the resources' ``schemas``."""
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
        "security": BEARER,
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, **schemas},
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
                "Unauthorized": error_response(
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
                "NotFound": error_response("No such job (or another client's), or no such path."),
                "MethodNotAllowed": error_response(
                    "The path exists, but not with this method.",
                    Allow={
                        "description": "The methods the path supports.",
                        "schema": {"type": "string"},
                    },
                ),
                "InternalError": error_response("A bug in the service."),
                "StoreUnavailable": error_response(
                    "The job store is not available (`store_unavailable`).",
                    **{"Retry-After": RETRY_AFTER},
                ),
            },
        },
    }
