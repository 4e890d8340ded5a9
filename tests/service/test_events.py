"""GET /v1/events against a running service: every state change of the caller's jobs
and batches as SSE with ids, resumed after any id without loss or repeat, filtered,
scoped to the client, with heartbeats; a resume from before retention is told so; a
client that stops reading is cut off without the service buffering for it, and resumes
from the log; draining ends the streams."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time

import pytest_twisted
from twisted.internet import threads

from curlfetch.api.events import EventsResource

from .apiserver import Service, ServiceFactory, services, svc
from .sse import SSEStream, open_stream

__all__ = ["services", "svc"]  # fixtures

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef0123"


def completed(stream: SSEStream) -> bool:
    return any(f.event == "batch.completed" for f in stream.frames)


@pytest_twisted.ensureDeferred
async def test_a_batch_is_watched_to_the_end_and_resumed_from_any_event(svc: Service) -> None:
    """A stream opened before a 40-job batch gets exactly 42 events (batch.created, 40
    job.succeeded, batch.completed) with increasing ids; resuming after the 10th id gets
    exactly the 32 after it, by header or by query parameter."""
    stream = await open_stream(svc.base, "/v1/events")
    assert stream.status == 200
    assert stream.headers is not None
    assert stream.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    reply = await svc.call(
        "POST", "/v1/batches", json_body={"jobs": [{"url": svc.url("/bytes")}] * 40}
    )
    batch = reply.json()["id"]
    await stream.until(completed)
    stream.close()
    kinds = [f.event for f in stream.events]
    assert kinds[0] == "batch.created"
    assert kinds[-1] == "batch.completed"
    assert kinds.count("job.succeeded") == 40
    assert len(kinds) == 42
    ids = [f.id for f in stream.events]
    assert len(set(ids)) == 42
    body = stream.events[5].json()
    assert body["type"] == "job.succeeded"
    assert body["data"]["job"]["batch"] == batch
    assert body["data"]["job"]["state"] == "succeeded"
    tenth = ids[9]
    assert tenth is not None
    for resumed in (
        await open_stream(svc.base, "/v1/events", last_event_id=tenth),
        await open_stream(svc.base, f"/v1/events?last_event_id={tenth}"),
    ):
        await resumed.until(completed)
        resumed.close()
        assert [f.id for f in resumed.events] == ids[10:]


@pytest_twisted.ensureDeferred
async def test_streams_are_filtered_and_scoped_to_the_client(services: ServiceFactory) -> None:
    """?types and ?batch select events; another client's stream sees none of them."""
    s = await services(tokens={"alice": ALICE, "bob": BOB})
    bob = await open_stream(s.base, "/v1/events?last_event_id=0-0", token=BOB)
    first = (await s.submit({"jobs": [{"url": s.url("/bytes")}] * 2})).json()["batch"]
    second = (await s.submit({"jobs": [{"url": s.url("/bytes")}] * 3})).json()["batch"]
    for batch in (first, second):
        await s.call("GET", f"/v1/batches/{batch}?wait=5")
    only = await open_stream(
        s.base, f"/v1/events?last_event_id=0-0&batch={second}&types=job.succeeded", token=ALICE
    )
    await only.until(lambda st: len(st.events) == 3)
    everything = await open_stream(s.base, "/v1/events?last_event_id=0-0", token=ALICE)
    await everything.until(lambda st: len(st.events) == 9)
    for st in (only, everything):
        st.close()
    assert {f.json()["data"]["job"]["batch"] for f in only.events} == {second}
    bob.close()
    assert bob.events == []
    reply = await s.call("GET", "/v1/events?types=job.started", token=ALICE)
    assert (reply.status, reply.error["field"]) == (400, "types")
    reply = await s.call("GET", "/v1/events", token=ALICE, headers=[("Last-Event-ID", "x")])
    assert reply.status == 400
    too_big = "0-9768809573037993041"  # past a BIGINT: found by the fuzzer
    reply = await s.call("GET", f"/v1/events?last_event_id={too_big}", token=ALICE)
    assert (reply.status, reply.error["field"]) == (400, "last_event_id")


@pytest_twisted.ensureDeferred
async def test_follow_false_sends_the_backlog_and_ends(svc: Service) -> None:
    """?follow=false: the events after the cursor, then the stream ends (a catch-up);
    a bad value is 400."""
    reply = await svc.submit({"jobs": [{"url": svc.url("/bytes")}] * 3})
    await svc.call("GET", f"/v1/batches/{reply.json()['batch']}?wait=5")
    reply = await svc.call("GET", "/v1/events?follow=false&last_event_id=0-0")
    assert reply.status == 200
    assert reply.body.count(b"\nevent: ") == 5
    assert reply.body.endswith(b"\n\n")
    assert (await svc.call("GET", "/v1/events?follow=no")).status == 400


@pytest_twisted.ensureDeferred
async def test_a_quiet_stream_gets_heartbeats(services: ServiceFactory) -> None:
    """With nothing to say, the stream sends a comment every heartbeat interval."""
    s = await services(events_heartbeat=0.2)
    stream = await open_stream(s.base, "/v1/events")
    await stream.until(lambda st: st.comments.count("heartbeat") >= 3, seconds=5)
    stream.close()
    assert stream.frames == []


@pytest_twisted.ensureDeferred
async def test_a_resume_from_before_retention_gets_an_error_event(svc: Service) -> None:
    """After retention deleted events, a resume from before them gets one `error` event
    (events_expired) and the stream ends; a fresh stream works."""
    reply = await svc.submit({"jobs": [{"url": svc.url("/bytes")}] * 2})
    await svc.call("GET", f"/v1/batches/{reply.json()['batch']}?wait=5")
    old = await open_stream(svc.base, "/v1/events?last_event_id=0-0")
    await old.until(lambda st: len(st.events) == 4)
    old.close()
    await svc.store.purge_loop(svc.reactor.seconds() + 10, 0)
    stream = await open_stream(svc.base, "/v1/events", last_event_id=old.events[1].id)
    await stream.closed.addTimeout(5, svc.reactor)
    [error] = stream.frames
    assert error.event == "error"
    assert error.json()["code"] == "events_expired"
    fresh = await open_stream(svc.base, "/v1/events", last_event_id=old.events[-1].id)
    await svc.submit({"url": svc.url("/bytes")})
    await fresh.until(lambda st: len(st.events) == 1)
    fresh.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_off_and_resumes(services: ServiceFactory) -> None:
    """A client with a tiny receive window that reads nothing: the stream writes about a
    page past what the socket takes, then waits (it does not read the log further);
    after the stall timeout it is cut off (a metric counts it). The client then reads
    what it got and resumes after its last id: every event arrives, once."""
    s = await services(events_stall_timeout=1.0)
    total = 30_000
    payload = "x" * 900
    with contextlib.closing(_sqlite(s)) as conn:
        conn.executemany(
            "INSERT INTO events (client, type, created_at, data) "
            "VALUES ('', 'job.succeeded', ?, ?)",
            [(s.reactor.seconds(), f'{{"n":{i},"pad":"{payload}"}}') for i in range(total)],
        )
    events = s.api.component(EventsResource)

    def stalled_client() -> bytes:
        """Read the first events, then nothing until the service cuts the stream."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", s.port_number))
        sock.sendall(b"GET /v1/events?last_event_id=0-0 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while len(_sse_ids(_dechunk(data))) < 20:
            data += sock.recv(1024)
        deadline = time.monotonic() + 15
        while events.streams and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass  # reset: what the kernel held for us may be gone
        sock.close()
        return data

    started = s.reactor.seconds()
    raw = await threads.deferToThread(stalled_client)
    assert s.reactor.seconds() - started < 10
    assert s.metrics.event_streams_cut._value.get() == 1
    got = _sse_ids(_dechunk(raw))
    assert 0 < len(got) < total // 4, len(got)
    resumed = await open_stream(s.base, "/v1/events", last_event_id=got[-1])
    await resumed.until(lambda st: len(st.events) == total - len(got), seconds=30)
    resumed.close()
    ids = got + [f.id for f in resumed.events]
    assert len(ids) == total
    assert len(set(ids)) == total


@pytest_twisted.ensureDeferred
async def test_draining_ends_the_streams(svc: Service) -> None:
    """start_draining ends every open stream cleanly; new ones are refused with 503."""
    stream = await open_stream(svc.base, "/v1/events")
    await svc.until(lambda: bool(svc.api.component(EventsResource).streams))
    svc.api.start_draining()
    await stream.closed.addTimeout(5, svc.reactor)
    assert (await svc.call("GET", "/v1/events")).status == 503


# -- helpers -----------------------------------------------------------------------------------


def _sqlite(s: Service) -> sqlite3.Connection:
    return sqlite3.connect(s.root / "jobs.sqlite3", isolation_level=None)


def _dechunk(raw: bytes) -> bytes:
    """The body of a raw chunked HTTP/1.1 response (possibly cut mid-chunk)."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    out = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return out


def _sse_ids(body: bytes) -> list[str]:
    """The ids of the whole events in an SSE body."""
    ids = []
    for block in body.split(b"\n\n")[:-1]:
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                ids.append(line[4:].decode())
    return ids
