"""Operational routes: liveness, readiness, Prometheus metrics and this API's OpenAPI
document. ``/healthz``, ``/readyz`` and ``/openapi.json`` are always open; ``/metrics``
needs a token when the service has tokens, unless it is configured open.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError
from twisted.web.iweb import IRequest

from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import METRIC_NAMES
from ..openapi import (
    BAD_AUTH_RESPONSE,
    BEARER,
    INTERNAL,
    OPEN,
    UNAUTHORIZED,
    json_content,
    ref,
)
from .http import JSON_TYPE, client_of, error_json, json_response
from .routes import ApiResource, route

if TYPE_CHECKING:
    from . import JobAPI


def _schemas(api: JobAPI) -> dict[str, Any]:
    return {
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


class OpsResource(ApiResource):
    """Health, readiness, metrics and the OpenAPI document."""

    schemas = staticmethod(_schemas)

    def __init__(self, api: JobAPI) -> None:
        super().__init__(api)
        self._openapi: bytes | None = None

    @route(
        "/healthz",
        "GET",
        {
            "operationId": "healthz",
            "summary": "Liveness: the process answers.",
            "security": OPEN,
            "responses": {
                "200": {"description": "Alive.", "content": json_content(ref("Health"))},
                "500": INTERNAL,
            },
        },
    )
    def healthz(self, request: IRequest) -> bytes:
        """Alive: the reactor answers."""
        return json_response(request, {"status": "ok"})

    @route(
        "/readyz",
        "GET",
        {
            "operationId": "readyz",
            "summary": "Readiness: not draining, bodies can be stored, and the store answers.",
            "security": OPEN,
            "responses": {
                "200": {"description": "Ready.", "content": json_content(ref("Ready"))},
                "500": INTERNAL,
                "503": {
                    "description": (
                        "Draining (`draining`), the body directory is full "
                        "(`storage_full`, until space is freed), or the store does not "
                        "answer (`store_unavailable`)."
                    ),
                    "content": json_content(ref("Ready")),
                },
            },
        },
    )
    async def readyz(self, request: IRequest) -> bytes:
        """Ready for traffic: not draining, bodies can be stored (not ``storage_full``),
        and the store answers."""
        api = self.api
        if api.draining or api.scheduler.draining:
            return json_response(
                request,
                {"status": "draining", **error_json("draining", "the service is shutting down")},
                503,
            )
        storage_full = getattr(api.bodies, "storage_full", None)
        full = storage_full() if callable(storage_full) else None
        if full:
            # Jobs would fail with storage_full: send traffic elsewhere until space is freed.
            return json_response(
                request,
                {
                    "status": "unavailable",
                    **error_json("storage_full", f"bodies cannot be stored: {full}"),
                },
                503,
            )
        try:
            await api.store.ping().addTimeout(api.ping_timeout, api.reactor)
        except CancelledError:
            raise
        except Exception as e:
            return json_response(
                request,
                {
                    "status": "unavailable",
                    **error_json("store_unavailable", f"the job store does not answer: {e}"),
                },
                503,
            )
        return json_response(request, {"status": "ready"})

    @route(
        "/metrics",
        "GET",
        {
            "operationId": "metrics",
            "summary": "Prometheus metrics.",
            "description": (
                "Families: "
                + ", ".join(f"`{n}`" for n in METRIC_NAMES)
                + ". Needs a token when the service has tokens, unless it is "
                "configured open (`--metrics-auth=open`)."
            ),
            "security": [*BEARER, {}],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "400": BAD_AUTH_RESPONSE,
                "401": UNAUTHORIZED,
                "500": INTERNAL,
            },
        },
    )
    async def metrics(self, request: IRequest) -> bytes:
        """Prometheus text exposition (token-protected unless configured open)."""
        if self.api.metrics_auth:
            client_of(self.api.tokens, request)
        text = await self.api.metrics.render()
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(text))
        return text

    @route(
        "/openapi.json",
        "GET",
        {
            "operationId": "openapi",
            "summary": "This document.",
            "security": OPEN,
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 document.",
                    "content": json_content({"type": "object"}),
                },
                "500": INTERNAL,
            },
        },
    )
    def openapi_json(self, request: IRequest) -> bytes:
        """The OpenAPI 3.1 document of this API."""
        if self._openapi is None:
            self._openapi = json.dumps(self.api.openapi(), indent=1).encode()
        request.setHeader(b"Content-Type", JSON_TYPE.encode())
        request.setHeader(b"Content-Length", b"%d" % len(self._openapi))
        return self._openapi
