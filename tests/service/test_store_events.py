"""Batches, the event log and the webhook outbox in the store, on SQLite and PostgreSQL:
events written in the transaction of their state change, resumable in order without
loss, a batch finished exactly once (also by two instances at once), the outbox claimed
by one sender at a time, and retention that says when events were lost."""

from __future__ import annotations

import json
import threading
from typing import Any

import attrs
import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer, threads

from curlfetch.jobs import Job, JobError, JobState, Notify
from curlfetch.store import BatchRecord, EventsExpiredError
from curlfetch.store.events import parse_event_id

from .backends import AnyStore, Backend
from .conftest import make_job, open_backend, reactor, within

NOW = 1_700_000_000.0


def batch_of(
    store_client: str, n: int, notify: Notify | None = None
) -> tuple[BatchRecord, list[Job]]:
    record = BatchRecord(f"{n:04d}" + "b" * 28, store_client, NOW, {"k": "v"}, notify)
    jobs = [attrs.evolve(make_job(store_client), batch=record.id) for _ in range(n)]
    return record, jobs


async def run_all(
    store: AnyStore, jobs: list[Job], state: JobState = JobState.SUCCEEDED
) -> list[Job]:
    """Claim the jobs and save them finished (``state``)."""
    claimed = await within(store.claim(len(jobs), NOW + 1, ()))
    assert len(claimed) == len(jobs)
    done = [
        attrs.evolve(
            j,
            state=state,
            finished_at=NOW + 2,
            error=JobError("COULDNT_CONNECT", "refused", 7) if state is JobState.FAILED else None,
        )
        for j in claimed
    ]
    await within(store.save(done))
    return done


async def all_events(store: AnyStore, client: str = "alice") -> list[Any]:
    return await within(store.events_after(client, (0, 0), 10_000))


@pytest_twisted.ensureDeferred
async def test_a_batch_is_stored_with_its_jobs_and_counted_from_them(store: AnyStore) -> None:
    """add(batch=...) stores the batch row, its jobs and batch.created in one
    transaction; the batch's counts come from its jobs; finishing the last job finishes
    the batch with one batch.completed carrying the final counts."""
    record, jobs = batch_of("alice", 3)
    await within(store.add(jobs, None, record))
    batch = await within(store.get_batch("alice", record.id))
    assert batch is not None
    assert batch.total == 3
    assert batch.counts["queued"] == 3
    assert batch.finished_at is None
    assert batch.metadata == {"k": "v"}
    assert await within(store.get_batch("bob", record.id)) is None
    await run_all(store, jobs[:2])
    batch = await within(store.get_batch("alice", record.id))
    assert batch is not None
    assert (batch.counts["succeeded"], batch.counts["queued"], batch.done) == (2, 1, 2)
    assert batch.finished_at is None
    await run_all(store, jobs[2:], JobState.FAILED)
    batch = await within(store.get_batch("alice", record.id))
    assert batch is not None
    assert batch.finished_at is not None
    assert batch.errors == (("COULDNT_CONNECT", 1, (jobs[2].id,)),)
    events = await all_events(store)
    kinds = [e.type for e in events]
    assert kinds == [
        "batch.created",
        "job.succeeded",
        "job.succeeded",
        "job.failed",
        "batch.completed",
    ]
    completed = json.loads(events[-1].data)["batch"]
    assert completed["counts"]["succeeded"] == 2
    assert completed["counts"]["failed"] == 1
    assert completed["state"] == "completed"
    ids = [parse_event_id(e.id) or (-1, -1) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


@pytest_twisted.ensureDeferred
async def test_resuming_after_an_event_returns_exactly_the_rest(store: AnyStore) -> None:
    """events_after(cursor) returns the events after that id, in order, for that client
    only, filtered by batch and type; the start cursor is past every event so far."""
    record, jobs = batch_of("alice", 5)
    await within(store.add(jobs, None, record))
    await within(store.add([make_job("bob")]))
    await run_all(store, jobs)
    events = await all_events(store)
    assert len(events) == 7
    for i, event in enumerate(events):
        cursor = parse_event_id(event.id)
        assert cursor is not None
        rest = await within(store.events_after("alice", cursor, 100))
        assert [e.id for e in rest] == [e.id for e in events[i + 1 :]]
    only = await within(store.events_after("alice", (0, 0), 100, types={"batch.completed"}))
    assert [e.type for e in only] == ["batch.completed"]
    other = await within(store.events_after("alice", (0, 0), 100, batch="x" * 32))
    assert other == []
    assert await within(store.events_after("bob", (0, 0), 100)) == []
    start = await within(store.events_start())
    assert await within(store.events_after("alice", start, 100)) == []


@pytest_twisted.ensureDeferred
async def test_retries_and_cancels_are_events_and_drains_are_not(store: AnyStore) -> None:
    """A requeue after an attempt is job.retrying; a drain's hand-back (started_at None)
    writes nothing; a cancel is job.cancelled and may finish the batch."""
    record, jobs = batch_of("alice", 2)
    await within(store.add(jobs, None, record))
    claimed = await within(store.claim(2, NOW + 1, ()))
    retry = attrs.evolve(claimed[0], state=JobState.QUEUED, not_before=NOW + 60)
    drained = attrs.evolve(claimed[1], state=JobState.QUEUED, started_at=None, attempts=0)
    await within(store.save([retry, drained]))
    assert [e.type for e in await all_events(store)] == ["batch.created", "job.retrying"]
    for job in jobs:
        await within(store.cancel("alice", job.id, NOW + 3))
    kinds = [e.type for e in await all_events(store)]
    assert kinds == [
        "batch.created",
        "job.retrying",
        "job.cancelled",
        "job.cancelled",
        "batch.completed",
    ]


@pytest_twisted.ensureDeferred
async def test_cancel_batch_cancels_what_has_not_finished(store: AnyStore) -> None:
    """cancel_batch cancels queued and running jobs (returning the running ones), keeps
    finished ones, finishes the batch once, and a second cancel changes nothing."""
    record, jobs = batch_of("alice", 4)
    await within(store.add(jobs, None, record))
    await run_all(store, jobs[:1])
    running = await within(store.claim(1, NOW + 1, ()))
    outcome = await within(store.cancel_batch("alice", record.id, NOW + 5))
    assert outcome is not None
    batch, was_running = outcome
    assert was_running == [running[0].id]
    assert batch.counts["cancelled"] == 3
    assert batch.counts["succeeded"] == 1
    assert batch.finished_at is not None
    assert batch.cancelled_at is not None
    assert store.queued() == 0
    again = await within(store.cancel_batch("alice", record.id, NOW + 6))
    assert again is not None
    assert again[1] == []
    kinds = [e.type for e in await all_events(store)]
    assert kinds.count("batch.completed") == 1
    assert kinds.count("job.cancelled") == 3
    assert await within(store.cancel_batch("bob", record.id, NOW)) is None


@pytest_twisted.ensureDeferred
async def test_notify_writes_deliveries_with_the_events(store: AnyStore) -> None:
    """A job's notify and its batch's notify each get a delivery for the events they
    name, in the event's transaction; a delivery is claimed by one sender and recorded."""
    hook = Notify("http://127.0.0.1:9/hook", ("job.succeeded", "batch.completed"))
    record, jobs = batch_of("alice", 2, hook)
    own = Notify("http://127.0.0.1:9/own", ("job.succeeded",))
    jobs[0] = attrs.evolve(jobs[0], spec=attrs.evolve(jobs[0].spec, notify=own))
    await within(store.add(jobs, None, record))
    await run_all(store, jobs)
    t = reactor().seconds()  # deliveries are due from their event's time
    found = await within(store.list_deliveries("alice", None, 100, None))
    kinds = sorted((d.type, d.url.rsplit("/", 1)[1]) for d in found)
    assert kinds == [
        ("batch.completed", "hook"),
        ("job.succeeded", "hook"),
        ("job.succeeded", "hook"),
        ("job.succeeded", "own"),
    ]
    body = json.loads(found[0].payload)
    assert set(body) == {"type", "timestamp", "data"}
    first = await within(store.claim_deliveries(3, t + 10, 60))
    second = await within(store.claim_deliveries(3, t + 10, 60))
    assert len(first) == 3
    assert len(second) == 1
    assert not {d.id for d in first} & {d.id for d in second}
    attempt = {"at": t + 11, "status": 500}
    mine = await within(
        store.finish_delivery(
            first[0].id,
            state="pending",
            next_at=t + 20,
            finished_at=None,
            error="http_status: 500",
            attempt=attempt,
        )
    )
    assert mine
    assert await within(store.claim_deliveries(5, t + 15, 60)) == []
    again = await within(store.claim_deliveries(5, t + 21, 60))
    assert [d.id for d in again] == [first[0].id]
    assert again[0].attempts == 1
    assert again[0].log == (attempt,)
    stats = await within(store.delivery_stats())
    assert stats[0] == 4


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_puts_a_delivery_back(store: AnyStore) -> None:
    """A delivery whose sender's lease expired is pending again after reap_deliveries;
    one whose lease is live stays with its sender unless ``own`` says it is ours."""
    record, jobs = batch_of("alice", 1, Notify("http://127.0.0.1:9/h", ("batch.completed",)))
    await within(store.add(jobs, None, record))
    await run_all(store, jobs)
    t = reactor().seconds()
    [d] = await within(store.claim_deliveries(5, t, 60))
    assert await within(store.reap_deliveries(t + 30)) == 0
    assert await within(store.reap_deliveries(t + 61)) == 1
    [again] = await within(store.claim_deliveries(5, t + 61, 60))
    assert again.id == d.id
    assert await within(store.reap_deliveries(t + 62, own=True)) == 1


@pytest_twisted.ensureDeferred
async def test_retention_deletes_events_and_says_so_on_resume(store: AnyStore) -> None:
    """purge_loop deletes old events and remembers the newest deleted: a resume from
    before it fails with EventsExpiredError, one after it still works."""
    record, jobs = batch_of("alice", 2)
    await within(store.add(jobs, None, record))
    await run_all(store, jobs)
    events = await all_events(store)
    deleted = await within(store.purge_loop(NOW + 1e9, NOW - 1))
    assert deleted == len(events)
    with pytest.raises(EventsExpiredError):
        await within(store.events_after("alice", (0, 0), 10))
    last = parse_event_id(events[-1].id)
    assert last is not None
    assert await within(store.events_after("alice", last, 10)) == []


@pytest_twisted.ensureDeferred
async def test_batch_jobs_are_purged_with_their_batch(store: AnyStore) -> None:
    """Retention keeps a batch's finished jobs while the batch runs (its counts stay
    whole), and deletes them with it once it finished before the cutoff."""
    record, jobs = batch_of("alice", 2)
    await within(store.add(jobs, None, record))
    await run_all(store, jobs[:1])
    assert await within(store.purge(NOW + 100)) == []
    await run_all(store, jobs[1:])
    cutoff = reactor().seconds() + 100  # the batch finished by the reactor's clock
    purged: list[str] = await within(store.purge(cutoff))
    assert sorted(purged) == sorted(j.id for j in jobs)
    await within(store.purge_loop(NOW, cutoff))
    assert await within(store.get_batch("alice", record.id)) is None


# -- PostgreSQL: several instances -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_instances_finishing_the_last_jobs_complete_the_batch_once(pg: Backend) -> None:
    """The last two jobs of a batch, finished by two instances at once, many times over:
    every batch is completed exactly once (the batch row's lock), never zero times."""
    a = await open_backend(pg, instance_id="a")
    b = await open_backend(pg, instance_id="b")
    try:
        for round_ in range(15):
            record = BatchRecord(f"{round_:032x}", "alice", NOW)
            jobs = [attrs.evolve(make_job(), batch=record.id) for _ in range(2)]
            await within(a.add(jobs, None, record))
            [ja] = await within(a.claim(1, NOW + 1, ()))
            [jb] = await within(b.claim(1, NOW + 1, ()))
            done = [
                attrs.evolve(j, state=JobState.SUCCEEDED, finished_at=NOW + 2) for j in (ja, jb)
            ]
            await within(defer.gatherResults([a.save(done[:1]), b.save(done[1:])]))
            batch = await within(a.get_batch("alice", record.id))
            assert batch is not None
            assert batch.finished_at is not None, f"round {round_}: never completed"
        events = await within(a.events_after("alice", (0, 0), 1000, types={"batch.completed"}))
        assert len(events) == 15
    finally:
        await within(defer.gatherResults([a.close(), b.close()]))


@pytest_twisted.ensureDeferred
async def test_a_reader_never_skips_an_event_of_a_transaction_still_open(pg: Backend) -> None:
    """An event written by a transaction that began earlier but commits later (another
    instance) is not skipped: readers see nothing past a transaction still running, then
    both in (txid, seq) order once it commits."""
    assert pg.pg is not None
    store = await open_backend(pg)
    ready, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with psycopg.connect(pg.pg.dsn) as conn:  # type: ignore[union-attr]
            conn.execute("SELECT txid_current()")
            conn.execute(
                "INSERT INTO events (client, type, created_at, data) "
                "VALUES ('alice', 'job.succeeded', 0, '{}')"
            )
            ready.set()
            release.wait(20)
            conn.commit()

    try:
        writer = threads.deferToThread(slow_writer)
        while not ready.is_set():
            await _nap()
        start = await within(store.events_start())
        record, jobs = batch_of("alice", 1)
        await within(store.add(jobs, None, record))  # commits first, with a later txid
        assert await within(store.events_after("alice", (0, 0), 10)) == []
        release.set()
        await within(writer)
        events = await within(store.events_after("alice", (0, 0), 10))
        assert [e.type for e in events] == ["job.succeeded", "batch.created"]
        from_start = await within(store.events_after("alice", start, 10))
        assert [e.type for e in from_start] == ["job.succeeded", "batch.created"]
    finally:
        release.set()
        await within(store.close())


@pytest_twisted.ensureDeferred
async def test_two_instances_never_claim_one_delivery(pg: Backend) -> None:
    """Deliveries claimed by two instances at once (SKIP LOCKED): each row goes to one."""
    a = await open_backend(pg, instance_id="a")
    b = await open_backend(pg, instance_id="b")
    try:
        hook = Notify("http://127.0.0.1:9/h", ("job.succeeded",))
        jobs = [
            attrs.evolve(make_job(), spec=attrs.evolve(make_job().spec, notify=hook))
            for _ in range(200)
        ]
        await within(a.add(jobs))
        await run_all(a, jobs)
        claims = await within(
            defer.gatherResults(
                [
                    s.claim_deliveries(30, reactor().seconds() + 10, 60)
                    for s in (a, b)
                    for _ in range(5)
                ]
            )
        )
        ids = [d.id for claim in claims for d in claim]
        assert len(ids) == 200
        assert len(set(ids)) == 200
    finally:
        await within(defer.gatherResults([a.close(), b.close()]))


async def _nap() -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor(), 0.02, lambda: None)
