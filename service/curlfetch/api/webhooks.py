"""The webhook routes: the client's signing secret, and its deliveries with their
attempts (``curlfetch.webhooks`` sends them).

The secret is shown once, when it is made: ``POST /v1/webhooks/secret`` makes a new one
(replacing the old: receivers must be updated, deliveries still pending are signed with
the new one). A secret from the tokens configuration cannot be replaced here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from ..jobs import rfc3339
from ..openapi import (
    BAD_AUTH,
    BAD_AUTH_RESPONSE,
    NOT_FOUND,
    V1_ERRORS,
    error_response,
    json_content,
    ref,
)
from ..store import Delivery
from ..webhooks import new_secret
from .http import ApiError, json_response
from .jobs import CURSOR, DEFAULT_LIST_LIMIT, LIMIT
from .routes import ApiResource, Param, route

if TYPE_CHECKING:
    from . import JobAPI

DELIVERY_STATES = ("pending", "sending", "succeeded", "failed")
STATUS = Param(
    "status",
    {"enum": list(DELIVERY_STATES)},
    str,
    f"status must be one of {list(DELIVERY_STATES)}",
    pattern="|".join(DELIVERY_STATES),
)
_ERRORS = {**V1_ERRORS, "404": NOT_FOUND}


def delivery_view(d: Delivery) -> dict[str, Any]:
    """A delivery as the API shows it (schema ``Delivery``)."""
    return {
        "id": d.id,
        "type": d.type,
        "url": d.url,
        "job": d.job,
        "batch": d.batch,
        "status": d.state,
        "attempts": d.attempts,
        "created_at": rfc3339(d.created_at),
        "next_attempt_at": rfc3339(d.next_at) if d.state == "pending" else None,
        "finished_at": rfc3339(d.finished_at),
        "last_error": d.last_error,
        "log": [
            {
                **{k: v for k, v in a.items() if k not in ("at", "retry_at")},
                "at": rfc3339(a.get("at")),
                **({"retry_at": rfc3339(a["retry_at"])} if "retry_at" in a else {}),
            }
            for a in d.log
        ],
    }


def _schemas(api: JobAPI) -> dict[str, Any]:
    attempt = {
        "type": "object",
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "status": {"type": "integer", "description": "The receiver's HTTP status."},
            "curl_code": {"type": "integer"},
            "error": {"$ref": "#/components/schemas/Error/properties/error"},
            "seconds": {"type": "number"},
            "timings": {"type": "object"},
            "retry_at": {"type": "string", "format": "date-time"},
        },
    }
    return {
        "Delivery": {
            "type": "object",
            "required": ["id", "type", "url", "status", "attempts", "created_at", "log"],
            "properties": {
                "id": {"type": "string", "description": "The `webhook-id` it is sent with."},
                "type": {"type": "string"},
                "url": {"type": "string"},
                "job": {"type": ["string", "null"]},
                "batch": {"type": ["string", "null"]},
                "status": {"enum": list(DELIVERY_STATES)},
                "attempts": {"type": "integer"},
                "created_at": {"type": "string", "format": "date-time"},
                "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "last_error": {"type": ["string", "null"]},
                "log": {"type": "array", "items": attempt},
            },
        },
        "DeliveryList": {
            "type": "object",
            "required": ["deliveries", "next_cursor"],
            "properties": {
                "deliveries": {"type": "array", "items": ref("Delivery")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        "WebhookSecret": {
            "type": "object",
            "required": ["secret"],
            "properties": {
                "secret": {
                    "type": "string",
                    "description": "`whsec_` and base64: give it to your receiver's "
                    "Standard Webhooks library. Shown only now.",
                }
            },
        },
    }


def _secret_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "createWebhookSecret",
        "summary": "Make the client's webhook signing secret (shown once).",
        "responses": {
            "201": {
                "description": "The new secret.",
                "content": json_content(ref("WebhookSecret")),
            },
            "400": error_response(BAD_AUTH),
            "409": error_response(
                "The secret comes from the tokens configuration (`secret_configured`)."
            ),
            **V1_ERRORS,
        },
    }


def _list_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "listDeliveries",
        "summary": "The client's webhook deliveries, newest first, with their attempts.",
        "parameters": [STATUS.doc(), LIMIT.doc(), CURSOR.doc()],
        "responses": {
            "200": {"description": "A page.", "content": json_content(ref("DeliveryList"))},
            "400": error_response(f"A bad status, limit or cursor. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


def _get_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getDelivery",
        "summary": "One delivery with its attempts.",
        "responses": {
            "200": {"description": "The delivery.", "content": json_content(ref("Delivery"))},
            "400": BAD_AUTH_RESPONSE,
            **_ERRORS,
        },
    }


def _retry_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "retryDelivery",
        "summary": "Send a failed delivery again, now (with a fresh retry horizon).",
        "responses": {
            "200": {
                "description": "The delivery, pending again.",
                "content": json_content(ref("Delivery")),
            },
            "400": BAD_AUTH_RESPONSE,
            **_ERRORS,
            "409": error_response("The delivery has not failed (`conflict`)."),
        },
    }


class WebhooksResource(ApiResource):
    """``/v1/webhooks``."""

    schemas = staticmethod(_schemas)

    @route("/v1/webhooks/secret", "POST", _secret_doc)
    async def make_secret(self, request: IRequest) -> bytes:
        api = self.api
        client = api.client(request)
        if client in api.webhook_secrets:
            raise ApiError(
                409,
                "secret_configured",
                "this client's webhook secret comes from the tokens configuration",
            )
        secret = new_secret()
        await api.store.set_webhook_secret(client, secret, api.reactor.seconds())
        return json_response(request, {"secret": secret}, 201)

    @route("/v1/webhooks/deliveries", "GET", _list_doc)
    async def list_deliveries(self, request: IRequest) -> bytes:
        client = self.api.client(request)
        limit = LIMIT.get(request) or DEFAULT_LIST_LIMIT
        found = await self.api.store.list_deliveries(
            client, STATUS.get(request), limit + 1, CURSOR.get(request)
        )
        next_cursor = found[limit - 1].id if len(found) > limit else None
        return json_response(
            request,
            {"deliveries": [delivery_view(d) for d in found[:limit]], "next_cursor": next_cursor},
        )

    @route("/v1/webhooks/deliveries/<delivery_id>", "GET", _get_doc)
    async def get_delivery(self, request: IRequest, delivery_id: str) -> bytes:
        client = self.api.client(request)
        found = await self.api.store.get_delivery(client, delivery_id)
        if found is None:
            raise _not_found(delivery_id)
        return json_response(request, delivery_view(found))

    @route("/v1/webhooks/deliveries/<delivery_id>/retry", "POST", _retry_doc)
    async def retry_delivery(self, request: IRequest, delivery_id: str) -> bytes:
        api = self.api
        client = api.client(request)
        found, retried = await api.store.retry_delivery(client, delivery_id, api.reactor.seconds())
        if found is None:
            raise _not_found(delivery_id)
        if not retried:
            raise ApiError(409, "conflict", f"delivery {delivery_id} is {found.state}, not failed")
        return json_response(request, delivery_view(found))


def _not_found(delivery_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no delivery {delivery_id}")
