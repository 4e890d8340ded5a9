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

from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

import pycurl
from twisted.web.iweb import IRequest

from ..egress import EgressPolicy
from ..jobs import JobState
from ..openapi import BAD_AUTH_RESPONSE, INTERNAL, UNAUTHORIZED, V1_ERRORS, json_content, ref
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
                        "required": ["jobs", "hosts"],
                        "properties": {
                            "hosts": {
                                "type": "array",
                                "description": "The caller's busiest hosts (20 at most): "
                                "queued and running jobs, failures of the last 10 minutes "
                                "by error code.",
                                "items": {"type": "object"},
                            },
                            "jobs": {
                                "type": "object",
                                "properties": {
                                    s.value: {"type": "integer", "minimum": 0} for s in JobState
                                },
                            },
                        },
                    }
                ),
            },
            "400": BAD_AUTH_RESPONSE,
            **V1_ERRORS,
        },
    }


_FEATURES = (
    "AsynchDNS",
    "IPV6",
    "SSL",
    "HTTP2",
    "HTTP3",
    "BROTLI",
    "ZSTD",
    "LIBZ",
    "PSL",
    "HTTPS_PROXY",
)


def libcurl_info() -> dict[str, Any]:
    """The libcurl under the engine: version, TLS library, features and protocols."""
    info = pycurl.version_info()
    bits = info[4]
    features = [name for name in _FEATURES if bits & getattr(pycurl, f"VERSION_{name.upper()}", 0)]
    return {
        "version": info[1],
        "ssl": info[5],
        "features": features,
        "protocols": sorted(info[8]),
    }


def _info_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getInfo",
        "summary": "What this service runs and allows: its version, libcurl, the egress "
        "policy and its limits (what `curlfetch doctor` reads).",
        "responses": {
            "200": {
                "description": "The service's settings.",
                "content": json_content(
                    {
                        "type": "object",
                        "required": ["version", "libcurl", "egress", "limits"],
                        "properties": {
                            "version": {"type": "string"},
                            "libcurl": {"type": "object"},
                            "egress": {
                                "type": ["object", "null"],
                                "description": "The egress policy; null where none applies "
                                "(an embedded service without one).",
                            },
                            "limits": {"type": "object"},
                        },
                    }
                ),
            },
            "400": BAD_AUTH_RESPONSE,
            "401": UNAUTHORIZED,
            "500": INTERNAL,
        },
    }


class DashboardResource(ApiResource):
    """``/ui/``, ``/v1/stats`` and ``/v1/info``."""

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
        api = self.api
        client = api.client(request)
        counts = await api.store.client_counts(client)
        hosts = await api.store.client_hosts(client, api.reactor.seconds() - 600, 20)
        return json_response(
            request,
            {
                "jobs": {s.value: n for s, n in counts.items()},
                "hosts": [
                    {"host": h, "queued": q, "running": r, "recent_errors": errors}
                    for h, q, r, errors in hosts
                ],
            },
        )

    @route("/v1/info", "GET", _info_doc)
    def info(self, request: IRequest) -> bytes:
        api = self.api
        api.client(request)
        egress = api.scheduler.config.egress
        try:
            version = metadata.version("curlfetch")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return json_response(
            request,
            {
                "version": version,
                "libcurl": libcurl_info(),
                "egress": None if egress is None else egress_view(egress),
                "limits": {
                    "max_batch": api.max_batch,
                    "max_batch_bytes": api.max_batch_bytes,
                    "max_request_bytes": api.max_request_bytes,
                    "max_queued": api.max_queued,
                    "max_body_bytes": api.limits.max_body_bytes,
                    "max_timeout": api.limits.max_timeout,
                },
            },
        )


def egress_view(policy: EgressPolicy) -> dict[str, Any]:
    """The egress policy as data, and whether loopback (local test servers) is allowed."""
    return {
        "allow_ports": [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in policy.allow_ports],
        "allow_cidrs": [str(n) for n in policy.allow_cidrs],
        "deny_cidrs": [str(n) for n in policy.deny_cidrs],
        "allow_hosts": list(policy.allow_hosts),
        "deny_hosts": list(policy.deny_hosts),
        "loopback_allowed": policy.check_address("127.0.0.1", 8080) is None,
        "private_allowed": policy.check_address("10.0.0.1", 80) is None,
    }


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
