"""``GET /v1/hosts`` and ``GET /v1/hosts/{host}``: how the service is treating each host
the caller fetches from (its jobs queued and in flight there, the interval in force, a
pause and why, the last errors, robots.txt).

Counts and failed jobs are the caller's own; a host's pause and its robots.txt are the
service's (they apply to every client's jobs there).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from ..jobs import JobState, origin_of, rfc3339
from ..openapi import BAD_AUTH, V1_ERRORS, error_response, json_content, nullable, ref
from ..robots import Robots
from ..store import Cooldown, JobFilter, RobotsRow
from .http import ApiError, json_response
from .routes import ApiResource, Param, route

if TYPE_CHECKING:
    from . import JobAPI

RECENT = 600.0
"""Failures counted in ``recent_errors``: those of the last 10 minutes."""
MAX_HOSTS = 1000
_HOST_KEY = re.compile(r"[^\s/?#]{1,300}:[0-9]{1,5}\Z")


def _hosts_limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_HOSTS:
        raise ValueError(text)
    return value


HOSTS_LIMIT = Param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_HOSTS, "default": 100},
    _hosts_limit,
    f"limit must be an integer from 1 to {MAX_HOSTS}",
    pattern="[0-9]{1,4}",
)


def _schemas(api: JobAPI) -> dict[str, Any]:
    robots = {
        "type": "object",
        "required": ["origin", "state", "status", "fetched_at", "expires_at", "message"],
        "properties": {
            "origin": {"type": "string"},
            "state": {
                "enum": ["rules", "allow_all", "unreachable"],
                "description": "rules: a 2xx, parsed; allow_all: 4xx, too many redirects "
                "or refused by the egress policy; unreachable: 429, 5xx or no answer "
                "(everything disallowed until `expires_at`).",
            },
            "status": {"type": ["integer", "null"]},
            "fetched_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "bytes": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean", "description": "Cut at 500 KiB."},
            "message": {"type": "string"},
            "crawl_delay": {"type": ["number", "null"]},
        },
    }
    error = {
        "type": "object",
        "required": ["at", "code", "message"],
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "code": {"type": "string"},
            "message": {"type": "string"},
            "job": {"type": "string"},
        },
    }
    return {
        "Host": {
            "type": "object",
            "required": [
                "host",
                "in_flight",
                "queued",
                "interval",
                "crawl_delay",
                "cooldown",
                "recent_errors",
                "robots",
            ],
            "properties": {
                "host": {"type": "string", "description": "`host:port`, as jobs are grouped."},
                "in_flight": {"type": "integer", "description": "Your jobs running there."},
                "queued": {"type": "integer", "description": "Your jobs waiting for it."},
                "interval": {
                    "type": "number",
                    "description": "Least seconds between two request starts there: "
                    "`--per-host-interval`, or robots.txt's Crawl-delay (for jobs that "
                    "obey it) when longer, up to `--max-crawl-delay`.",
                },
                "crawl_delay": {"type": ["number", "null"]},
                "cooldown": nullable(
                    {
                        "type": "object",
                        "description": "The host is paused: none of its queued jobs "
                        "start before `until` (on any instance).",
                        "required": ["until", "reason", "since"],
                        "properties": {
                            "until": {"type": "string", "format": "date-time"},
                            "reason": {"type": "string"},
                            "since": {"type": "string", "format": "date-time"},
                        },
                    }
                ),
                "recent_errors": {
                    "type": "object",
                    "description": "Your jobs failed there in the last 10 minutes, by code.",
                    "additionalProperties": {"type": "integer"},
                },
                "robots": {
                    "type": "array",
                    "description": "robots.txt of the host's http and https origins, "
                    "where one was fetched.",
                    "items": robots,
                },
                "last_errors": {
                    "type": "array",
                    "description": "(One host only.) Your last 5 failed jobs there.",
                    "items": error,
                },
                "attempt_errors": {
                    "type": "array",
                    "description": "(One host only.) The last 5 attempts that failed "
                    "there on this instance, retried ones included (any client).",
                    "items": error,
                },
            },
        },
    }


def _list_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "listHosts",
        "summary": "The hosts of your queued, running or recently failed jobs, busiest first.",
        "parameters": [HOSTS_LIMIT.doc()],
        "responses": {
            "200": {
                "description": "Hosts.",
                "content": json_content(
                    {
                        "type": "object",
                        "required": ["hosts"],
                        "properties": {"hosts": {"type": "array", "items": ref("Host")}},
                    }
                ),
            },
            "400": error_response(f"A bad `limit`. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


def _get_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "getHost",
        "summary": "One host (`example.org:443`), with its last errors.",
        "responses": {
            "200": {"description": "The host.", "content": json_content(ref("Host"))},
            "400": error_response(f"Not `host:port`. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


class HostsResource(ApiResource):
    """Per-host politeness state."""

    schemas = staticmethod(_schemas)

    @route("/v1/hosts", "GET", _list_doc)
    async def list_hosts(self, request: IRequest) -> bytes:
        api = self.api
        client = api.client(request)
        limit = HOSTS_LIMIT.get(request) or 100
        now = api.reactor.seconds()
        rows = await api.store.client_hosts(client, now - RECENT, limit)
        names = [row[0] for row in rows]
        cooldowns = await api.store.cooldowns(now, names)
        robots = await self._robots(names)
        views = [
            self._view(host, (queued, running, errors), cooldowns.get(host), robots)
            for host, queued, running, errors in rows
        ]
        return json_response(request, {"hosts": views})

    @route("/v1/hosts/<host>", "GET", _get_doc)
    async def get_host(self, request: IRequest, host: str) -> bytes:
        api = self.api
        client = api.client(request)
        host = host.lower()
        if not _HOST_KEY.match(host):
            raise ApiError(
                400, "invalid_request", "give the host as host:port (example.org:443)", field="host"
            )
        now = api.reactor.seconds()
        rows = await api.store.client_hosts(client, now - RECENT, 1, host=host)
        counts = (rows[0][1], rows[0][2], rows[0][3]) if rows else (0, 0, {})
        cooldowns = await api.store.cooldowns(now, [host])
        robots = await self._robots([host])
        view = self._view(host, counts, cooldowns.get(host), robots)
        failed = await api.store.list_jobs(
            client, JobFilter(state=JobState.FAILED, host=host), 5, None
        )
        view["last_errors"] = [
            {
                "at": rfc3339(job.finished_at),
                "code": job.error.name,
                "message": job.error.message,
                "job": job.id,
            }
            for job in failed
            if job.error is not None
        ]
        view["attempt_errors"] = [
            {"at": rfc3339(at), "code": code, "message": message}
            for at, code, message in reversed(api.scheduler.host_book.recent_errors(host))
        ]
        return json_response(request, view)

    async def _robots(self, hosts: list[str]) -> dict[str, Robots]:
        """The robots.txt of each host's origins: this instance's, else the store's."""
        cache = self.api.scheduler.robots
        origins = [origin_of(scheme, host) for host in hosts for scheme in ("http", "https")]
        found: dict[str, Robots] = {}
        missing = []
        for origin in origins:
            robots = None if cache is None else cache.known(origin)
            if robots is None:
                missing.append(origin)
            else:
                found[origin] = robots
        if missing:
            stored: dict[str, RobotsRow] = await self.api.store.robots_get(missing)
            found.update((origin, Robots(row)) for origin, row in stored.items())
        return found

    def _view(
        self,
        host: str,
        counts: tuple[int, int, dict[str, int]],
        cooldown: Cooldown | None,
        robots: dict[str, Robots],
    ) -> dict[str, Any]:
        """(``counts``: queued, running, recent failures by code.)"""
        queued, running, errors = counts
        scheduler = self.api.scheduler
        cache = scheduler.robots
        token = cache.token if cache is not None else "curlfetch"
        known = [
            robots[origin]
            for origin in (origin_of("http", host), origin_of("https", host))
            if origin in robots
        ]
        delays = [d for d in (r.crawl_delay(token) for r in known) if d is not None]
        crawl_delay = max(delays) if delays else None
        interval = scheduler.config.per_host_interval
        if crawl_delay is not None:
            interval = max(interval, min(crawl_delay, scheduler.config.max_crawl_delay))
        return {
            "host": host,
            "in_flight": running,
            "queued": queued,
            "interval": interval,
            "crawl_delay": crawl_delay,
            "cooldown": None if cooldown is None else cooldown.to_json(),
            "recent_errors": errors,
            "robots": [r.to_json(token) for r in known],
        }
