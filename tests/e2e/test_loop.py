"""The user's loop end to end, against real ``twistd`` processes and real receivers: a
20,000-job NDJSON batch watched over SSE until done (every event counted), webhook
retries spaced by the backoff, ``kill -9`` with 500 deliveries pending (none lost, the
batch's counts exact), and two PostgreSQL instances each streaming what the other
does, with one of them killed and restarted mid-batch."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
from typing import Any

import pytest_twisted
from standardwebhooks.webhooks import Webhook

from tests.engine.servers import LoopbackSite
from tests.service.backends import PostgresSchema
from tests.service.receiver import Receiver
from tests.service.sse import SSEStream, open_stream

from .conftest import Daemon, Daemons, reactor, rss_kib, sleep

NDJSON = ("Content-Type", "application/x-ndjson")


def completed(stream: SSEStream) -> bool:
    return any(f.event == "batch.completed" for f in stream.frames)


async def post_ndjson(d: Daemon, lines: list[dict[str, Any]], seconds: float = 60) -> Any:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    reply = await d.request("POST", "/v1/batches", body, [NDJSON], seconds=seconds)
    assert reply.status == 201, reply
    return reply.json()


async def secret(d: Daemon) -> str:
    reply = await d.request("POST", "/v1/webhooks/secret")
    assert reply.status == 201, reply
    value: str = reply.json()["secret"]
    return value


async def until(check: Any, seconds: float, what: str) -> None:
    deadline = reactor().seconds() + seconds
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert reactor().seconds() < deadline, f"timed out waiting for {what}"
        await sleep(0.1)


async def batch_view(d: Daemon, batch: str, wait: float = 0) -> dict[str, Any]:
    reply = await d.get(f"/v1/batches/{batch}?wait={wait:g}", seconds=wait + 10)
    assert reply.status == 200, reply
    view: dict[str, Any] = reply.json()
    return view


@pytest_twisted.ensureDeferred
async def test_a_20000_job_ndjson_batch_is_watched_over_sse_to_the_end(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """20,000 specs in one NDJSON request (201 with the batch; the service's memory grows
    by far less than the jobs would take held at once), watched on a stream opened
    before: exactly 20,002 events (batch.created, 20,000 job.succeeded, batch.completed),
    every id once, in increasing order; the batch's counts and bytes are exact."""
    d = await daemons.start("--max-queued=50000", "--max-per-host=256")
    assert d.proc is not None
    stream = await open_stream(d.url(""), "/v1/events")
    before = rss_kib(d.proc.pid)
    lines: list[dict[str, Any]] = [{"batch": {"metadata": {"run": "big"}}}]
    lines += [{"url": target.url(f"/bytes?n={i % 100}")} for i in range(20_000)]
    batch = await post_ndjson(d, lines)
    grown = (rss_kib(d.proc.pid) - before) / 1024
    print(f"RSS growth while accepting 20,000 NDJSON jobs: {grown:.1f} MiB")
    assert batch["total"] == 20_000
    await stream.until(completed, seconds=120, what="batch.completed")
    stream.close()
    kinds = [f.event for f in stream.frames]
    assert len(kinds) == 20_002
    assert kinds[0] == "batch.created"
    assert kinds[-1] == "batch.completed"
    assert kinds.count("job.succeeded") == 20_000
    ids = [tuple(int(x) for x in (f.id or "").split("-")) for f in stream.frames]
    assert ids == sorted(set(ids))
    view = await batch_view(d, batch["id"])
    assert view["counts"]["succeeded"] == 20_000
    assert view["bytes"] == sum(i % 100 for i in range(20_000))
    assert json.loads(stream.frames[-1].data)["data"]["batch"]["done"] == 20_000


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_fails_three_times_gets_retries_spaced_by_the_backoff(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """--webhook-backoff=0.5s: a receiver answering 500, 500, 500, then 204 gets four
    signed attempts of one delivery, the waits in [0.25, 0.5], [0.5, 1] and [1, 2]
    seconds (plus a little slack); the delivery ends succeeded with all four logged."""
    d = await daemons.start("--webhook-backoff=0.5s")
    receiver = Receiver(reactor(), lambda n, r: (500 if n < 3 else 204, {}))
    try:
        key = await secret(d)
        spec = {"url": target.url("/bytes?n=3"), "notify": {"url": receiver.url()}}
        assert (await d.post_json("/v1/jobs", spec)).status == 201
        await until(lambda: len(receiver.received) == 4, 15, "four attempts")
        times = [r.at for r in receiver.received]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, full in zip(gaps, (0.5, 1.0, 2.0), strict=True):
            assert full / 2 - 0.05 <= gap <= full + 0.3, gaps
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
        for r in receiver.received:
            Webhook(key).verify(r.body, r.headers)

        async def succeeded() -> bool:
            reply = await d.get("/v1/webhooks/deliveries?status=succeeded")
            return len(reply.json()["deliveries"]) == 1

        await until(succeeded, 5, "the delivery to be recorded")
        [view] = (await d.get("/v1/webhooks/deliveries")).json()["deliveries"]
        assert [a["status"] for a in view["log"]] == [500, 500, 500, 204]
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_with_500_deliveries_pending_loses_none(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """A 500-job batch whose every job notifies, to a receiver that refuses (503,
    Retry-After: 1): once the batch is done, its 501 deliveries (500 job.succeeded, one
    batch.completed) are all pending in the outbox; kill -9 then. The receiver starts
    accepting and the service restarts: every delivery arrives with a 2xx, signed, none
    fails, and the outbox is empty."""
    d = await daemons.start("--webhook-backoff=0.2s")
    accepting = {"now": False}
    receiver = Receiver(
        reactor(), lambda n, r: (204, {}) if accepting["now"] else (503, {"Retry-After": "1"})
    )
    try:
        key = await secret(d)
        notify = {"url": receiver.url(), "events": ["job.succeeded", "batch.completed"]}
        lines: list[dict[str, Any]] = [{"batch": {"notify": notify}}]
        lines += [{"url": target.url("/bytes?n=5")} for _ in range(500)]
        batch = (await post_ndjson(d, lines))["id"]
        view = await batch_view(d, batch, wait=60)
        assert view["counts"]["succeeded"] == 500
        await until(lambda: len(receiver.received) >= 50, 30, "refused attempts")
        d.signal(signal.SIGKILL)
        await d.wait_exit(10)
        with sqlite3.connect(d.data_dir / "jobs.sqlite3") as conn:
            states = dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"))
        conn.close()
        assert sum(states.get(s, 0) for s in ("pending", "sending")) == 501, states
        accepting["now"] = True
        await d.start()
        await until(lambda: len(receiver.accepted()) >= 501, 60, "501 accepted deliveries")
        accepted = receiver.accepted()
        assert len(accepted) == 501
        kinds = [json.loads(r.body)["type"] for r in accepted.values()]
        assert kinds.count("batch.completed") == 1
        assert kinds.count("job.succeeded") == 500
        jobs = {json.loads(r.body)["data"].get("job", {}).get("id") for r in accepted.values()}
        assert len(jobs - {None}) == 500
        for r in accepted.values():
            Webhook(key).verify(r.body, r.headers)

        async def recorded() -> bool:
            reply = await d.get("/v1/webhooks/deliveries?status=succeeded&limit=1000")
            return len(reply.json()["deliveries"]) == 501

        await until(recorded, 20, "all recorded as succeeded")
        reply = await d.get("/v1/webhooks/deliveries?status=failed")
        assert reply.json()["deliveries"] == []
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_two_postgresql_instances_stream_each_others_events(
    daemons: Daemons, target: LoopbackSite, schema: PostgresSchema
) -> None:
    """Two instances on one PostgreSQL, a stream on each, a 2,000-job batch submitted to
    the second; the first is killed (-9) mid-batch and restarted with its instance id.
    The batch ends with exact counts (2,000 succeeded, one batch.completed), and the
    stream on the instance that lived saw every event exactly once: batch.created,
    2,000 job.succeeded, batch.completed, whichever instance made them."""
    one = await daemons.start(
        f"--database={schema.url}", "--instance-id=one", "--max-concurrency=8", name="one"
    )
    two = await daemons.start(
        f"--database={schema.url}", "--instance-id=two", "--max-concurrency=8", name="two"
    )
    on_one = await open_stream(one.url(""), "/v1/events")
    on_two = await open_stream(two.url(""), "/v1/events")
    lines = [{"url": target.url("/delay?s=0.01")} for _ in range(2000)]
    batch = (await post_ndjson(two, lines))["id"]
    await on_one.until(lambda st: len(st.frames) >= 300, seconds=60, what="events on one")
    on_one.close()
    one.signal(signal.SIGKILL)
    await one.wait_exit(10)
    await one.start()
    view = await batch_view(two, batch, wait=120)
    assert view["state"] == "completed"
    assert view["counts"]["succeeded"] == 2000
    await on_two.until(completed, seconds=30, what="batch.completed on two")
    on_two.close()
    kinds = [f.event for f in on_two.frames]
    assert kinds.count("batch.created") == 1
    assert kinds.count("batch.completed") == 1
    assert kinds.count("job.succeeded") == 2000
    assert len({f.id for f in on_two.frames}) == len(on_two.frames)
    by_instance: dict[str, int] = {}
    for f in on_two.frames:
        job = json.loads(f.data)["data"].get("job")
        if job is not None:
            by_instance[job["id"]] = by_instance.get(job["id"], 0) + 1
    assert set(by_instance.values()) == {1}
    # The restarted instance resumes where the killed one's stream stopped, no gaps.
    last = on_one.frames[-1].id
    resumed = await open_stream(one.url(""), "/v1/events", last_event_id=last)
    await resumed.until(completed, seconds=30, what="the rest on one")
    resumed.close()
    assert [f.id for f in on_one.frames] + [f.id for f in resumed.frames] == [
        f.id for f in on_two.frames
    ][: len(on_one.frames) + len(resumed.frames)]
