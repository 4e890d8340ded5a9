"""A webhook receiver for tests: a real Twisted ``Site`` on 127.0.0.1 that records every
POST (when, headers, body) and answers as its ``plan`` says (by default 204)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

Plan = Callable[[int, "Received"], tuple[int, dict[str, str]]]
"""(how many came before, this one) -> (status, headers)."""


@attrs.frozen
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


class _Resource(Resource):
    isLeaf = True

    def __init__(self, owner: Receiver) -> None:
        super().__init__()
        self.owner = owner

    def render_POST(self, request: Request) -> bytes:
        owner = self.owner
        headers = {
            k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        assert request.content is not None
        got = Received(
            owner.reactor.seconds(), request.path.decode(), headers, request.content.read()
        )
        status, extra = owner.plan(len(owner.received), got)
        owner.received.append(got)
        owner.answers.append(status)
        request.setResponseCode(status)
        for name, value in extra.items():
            request.setHeader(name, value)
        return b""


class Receiver:
    def __init__(self, reactor: Any, plan: Plan | None = None) -> None:
        self.reactor = reactor
        self.plan: Plan = plan or (lambda n, r: (204, {}))
        self.received: list[Received] = []
        self.answers: list[int] = []
        """The status each received request was answered with."""
        self.port: IListeningPort = reactor.listenTCP(
            0, Site(_Resource(self)), interface="127.0.0.1"
        )

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"  # type: ignore[attr-defined]

    def accepted(self) -> dict[str, Received]:
        """webhook-id -> the first attempt answered 2xx."""
        out: dict[str, Received] = {}
        for got, status in zip(self.received, self.answers, strict=True):
            if 200 <= status < 300:
                out.setdefault(got.headers["webhook-id"], got)
        return out

    async def stop(self) -> None:
        await self.port.stopListening()  # type: ignore[misc]
