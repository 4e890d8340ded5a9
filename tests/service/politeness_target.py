"""A loopback target for the politeness tests: a robots.txt whose answer a test sets
(status, body, redirect, a stall), pages that answer 429/503 with ``Retry-After`` when
told, and a page with validators that answers 304 to a matching conditional request.
Every request is recorded with its arrival time and headers.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server
from twisted.web.server import Site

from .conftest import reactor

ETAG = '"v1"'
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


@attrs.define
class Seen:
    path: str
    at: float
    headers: dict[str, str]


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.target = target

    def render_GET(self, request: server.Request) -> Any:
        t = self.target
        path = request.uri.decode()
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        t.seen.append(Seen(path, time.monotonic(), headers))
        if path == "/robots.txt":
            return self._robots(request)
        if path == "/rules.txt":  # where another origin's robots.txt may redirect
            return t.robots_body
        answer = t.answers.pop(path, None) if path in t.answers else None
        if answer is not None:
            status, retry_after = answer
            request.setResponseCode(status)
            request.setHeader(b"Retry-After", str(retry_after).encode())
            return b"slow down"
        if path.startswith("/page"):
            request.setHeader(b"ETag", ETAG.encode())
            request.setHeader(b"Last-Modified", LAST_MODIFIED.encode())
            if headers.get("if-none-match") == ETAG or (
                "if-none-match" not in headers and headers.get("if-modified-since") == LAST_MODIFIED
            ):
                request.setResponseCode(304)
                return b""
            return b"the page " + path.encode()
        return b"ok " + path.encode()

    def _robots(self, request: server.Request) -> Any:
        t = self.target
        if t.robots_redirect is not None:
            request.setResponseCode(301)
            request.setHeader(b"Location", t.robots_redirect.encode())
            return b""
        if t.robots_stall:
            return server.NOT_DONE_YET  # never answers: the fetch times out
        request.setResponseCode(t.robots_status)
        request.setHeader(b"Content-Type", b"text/plain")
        return t.robots_body


class Target:
    """Listens on 127.0.0.1 (``url(path)``); tests set what robots.txt and pages say."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.robots_status = 200
        self.robots_body = b""
        self.robots_redirect: str | None = None
        self.robots_stall = False
        self.answers: dict[str, tuple[int, int]] = {}
        """path -> (status, Retry-After seconds), answered once."""
        self.port: IListeningPort = reactor().listenTCP(0, Site(_Root(self)), interface="127.0.0.1")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def stop(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
