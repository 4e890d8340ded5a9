"""The dashboard: static HTML, CSS and JS shipped in the package (``curlfetch/ui/``), no
build step and nothing from a CDN, and ``GET /v1/stats`` (the caller's jobs by state)
for its tiles.

The page holds no data: it asks for a token, keeps it in ``sessionStorage`` and calls
the same API as everyone. Every string from a job is attacker-controlled, so the
scripts only ever set ``textContent``. The files are sent with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script,
no framing), ``nosniff`` and no referrer.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from ..jobs import JobState
from ..openapi import BAD_AUTH_RESPONSE, V1_ERRORS, json_content, ref
from .http import ApiError, json_response
from .routes import ApiResource, route

if TYPE_CHECKING:
    from . import JobAPI

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return (resources.files("curlfetch") / "ui" / name).read_bytes()


def _page_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getDashboard",
        "summary": "The dashboard (an HTML page; it asks for a token).",
        "security": [],
        "responses": {"200": {"description": "The page.", "content": {"text/html": {}}}},
    }


def _asset_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getDashboardAsset",
        "summary": "One of the dashboard's files (app.js, app.css).",
        "security": [],
        "responses": {
            "200": {
                "description": "The file.",
                "content": {"text/javascript": {}, "text/css": {}, "text/html": {}},
            },
            "404": {
                "description": "No such file.",
                "content": json_content(ref("Error")),
            },
        },
    }


def _stats_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getStats",
        "summary": "The caller's jobs counted by state.",
        "responses": {
            "200": {
                "description": "Counts by state.",
                "content": json_content(
                    {
                        "type": "object",
                        "required": ["jobs"],
                        "properties": {
                            "jobs": {
                                "type": "object",
                                "properties": {
                                    s.value: {"type": "integer", "minimum": 0} for s in JobState
                                },
                            }
                        },
                    }
                ),
            },
            "400": BAD_AUTH_RESPONSE,
            **V1_ERRORS,
        },
    }


class DashboardResource(ApiResource):
    """``/ui/`` and ``/v1/stats``."""

    @route("/ui/", "GET", _page_doc)
    def page(self, request: IRequest) -> bytes:
        return _send(request, "index.html")

    @route("/ui/<name>", "GET", _asset_doc)
    def asset(self, request: IRequest, name: str) -> bytes:
        if name not in ASSETS:
            raise ApiError(404, "not_found", f"no dashboard file {name!r}")
        return _send(request, name)

    @route("/v1/stats", "GET", _stats_doc)
    async def stats(self, request: IRequest) -> bytes:
        client = self.api.client(request)
        counts = await self.api.store.client_counts(client)
        return json_response(request, {"jobs": {s.value: n for s, n in counts.items()}})


def _send(request: IRequest, name: str) -> bytes:
    data = _asset(name)
    request.setHeader(b"Content-Type", ASSETS[name].encode("ascii"))
    request.setHeader(b"Content-Security-Policy", CSP.encode("ascii"))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-cache")
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data
