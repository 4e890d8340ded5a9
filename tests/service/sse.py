"""A Server-Sent Events client for tests: Twisted's ``Agent`` (it undoes the chunked
encoding), parsing frames as they arrive (``id``, ``event``, ``data``, comments)."""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from .conftest import reactor, sleep


@attrs.frozen
class Frame:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SSEStream(Protocol):
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.comments: list[str] = []
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        self.status = 0
        self.headers: Headers | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            if "data" in fields:
                self.frames.append(
                    Frame(fields.get("id"), fields.get("event", "message"), fields["data"])
                )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.closed.called:
            self.closed.callback(None)

    @property
    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.event != "error"]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    async def until(self, check: Any, seconds: float = 10.0, what: str = "events") -> None:
        deadline = reactor().seconds() + seconds
        while not check(self):
            assert reactor().seconds() < deadline, (
                f"timed out waiting for {what}: {self.frames[-3:]}"
            )
            await sleep(0.02)


async def open_stream(
    base: str, path: str, token: str | None = None, last_event_id: str | None = None
) -> SSEStream:
    headers = Headers()
    if token is not None:
        headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
    if last_event_id is not None:
        headers.addRawHeader(b"Last-Event-ID", last_event_id.encode())
    response: Any = (
        await Agent(reactor())
        .request(b"GET", (base + path).encode(), headers)
        .addTimeout(10, reactor())
    )
    stream = SSEStream()
    stream.status = response.code
    stream.headers = response.headers
    response.deliverBody(stream)
    return stream
