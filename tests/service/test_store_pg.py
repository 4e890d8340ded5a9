"""``PostgresJobStore`` as several instances see it: two or three stores (instance ids) on
one throwaway schema of the local PostgreSQL. Claims do not overlap, per-host rooms count
the other instances' running jobs, leases expire and are reaped, heartbeats keep them,
NOTIFY wakes the others and stops a cancelled transfer, migrations run once."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from curlfetch.jobs import JobState
from curlfetch.store import (
    IdempotencyInProgressError,
    IdempotencyRecord,
    StoredResponse,
    StoreUnavailableError,
)
from curlfetch.store.postgres import (
    MIGRATIONS,
    PostgresJobStore,
    StoreClosedError,
    default_instance_id,
    is_postgres_url,
    redact_dsn,
)

from .backends import Backend
from .conftest import make_job, open_backend, reactor, sleep, until, within

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0


async def opened(pg: Backend, *names: str, **kwargs: Any) -> list[PostgresJobStore]:
    stores = []
    for name in names:
        store = await open_backend(pg, instance_id=name, **kwargs)
        assert isinstance(store, PostgresJobStore)
        stores.append(store)
    return stores


async def close_all(*stores: PostgresJobStore) -> None:
    await within(defer.gatherResults([s.close() for s in stores]))


def test_urls_and_instance_ids() -> None:
    """Only postgresql:// URLs select the store; logs show no password; default instance
    ids differ between stores."""
    assert is_postgres_url("postgresql://h/db")
    assert is_postgres_url("postgres://h/db")
    assert not is_postgres_url("sqlite:///x")
    assert redact_dsn("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert default_instance_id() != default_instance_id()


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_never_overlap(pg: Backend) -> None:
    """Three instances claiming at the same time, repeatedly, share 300 jobs: each job
    goes to exactly one of them, owned by it in the database."""
    stores = await opened(pg, "a", "b", "c")
    try:
        await within(stores[0].add([make_job(url=f"http://h{i % 7}.test/") for i in range(300)]))
        got: dict[str, list[str]] = {s.instance_id: [] for s in stores}
        while True:
            rounds = await within(
                defer.gatherResults([s.claim(17, T0, (), per_host=100) for s in stores])
            )
            for store, jobs in zip(stores, rounds, strict=True):
                got[store.instance_id] += [j.id for j in jobs]
            if not any(rounds):
                break
        ids = [job_id for ids in got.values() for job_id in ids]
        assert len(ids) == len(set(ids)) == 300
        assert all(got.values())  # every instance got some
        owners = dict(pg.pg.execute("SELECT id, owner FROM jobs") if pg.pg else [])
        for name, claimed in got.items():
            assert {owners[i] for i in claimed} == {name}
    finally:
        await close_all(*stores)


@pytest_twisted.ensureDeferred
async def test_per_host_room_counts_other_instances_running_jobs(pg: Backend) -> None:
    """With a cap of 4 per host, after instance A holds 3 jobs of h.test, instance B
    (which runs none itself) gets only 1 more of h.test, but its full room elsewhere; once
    A has saved its jobs, B's room is back to 4."""
    a, b = await opened(pg, "a", "b")
    try:
        h = [make_job(url="http://h.test/") for _ in range(10)]
        g = [make_job(url="http://g.test/") for _ in range(10)]
        await within(a.add([*h, *g]))
        held = await within(a.claim(3, T0, (), per_host=4, host_room={}, per_client=None))
        assert [j.spec.host for j in held] == ["h.test:80"] * 3
        claimed = await within(b.claim(20, T0, (), per_host=4, host_room={}))
        by_host = {host: sum(1 for j in claimed if j.spec.host == host) for host in ("h", "g")}
        assert [j.spec.host for j in claimed].count("h.test:80") == 1
        assert [j.spec.host for j in claimed].count("g.test:80") == 4, by_host
        await within(
            a.save([attrs.evolve(j, state=JobState.SUCCEEDED, finished_at=T0) for j in held])
        )
        mine = {"h.test:80": 3, "g.test:80": 0}  # B's own view: 1 of h, 4 of g running
        more = await within(b.claim(20, T0, (), per_host=4, host_room=mine))
        assert [j.spec.host for j in more] == ["h.test:80"] * 3
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_the_shared_cap_applies_to_claims_without_rooms(pg: Backend) -> None:
    """Stores made with max_per_host=4 (as twistd makes them) apply it to plain claims
    too, counting every instance's running jobs, their own included: A takes 3 of h.test,
    then B, and A again, get 1 between them; g.test still gets its 4."""
    a, b = await opened(pg, "a", "b", max_per_host=4)
    try:
        await within(a.add([make_job(url="http://h.test/") for _ in range(10)]))
        await within(a.add([make_job(url="http://g.test/") for _ in range(10)]))
        held = await within(a.claim(3, T0, ()))
        assert len(held) == 3  # all of h.test: claim order
        by_b = await within(b.claim(20, T0, ()))
        by_a = await within(a.claim(20, T0, ()))
        hosts = [j.spec.host for j in by_b + by_a]
        assert (hosts.count("h.test:80"), hosts.count("g.test:80")) == (1, 4)
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_claims_with_a_per_host_cap_are_serialized(pg: Backend) -> None:
    """Claims from two instances in the same instant, each with room for 5 of one host,
    give 5 in all, not 10: the claim lock makes the second see the first's rows."""
    a, b = await opened(pg, "a", "b")
    try:
        await within(a.add([make_job(url="http://h.test/") for _ in range(20)]))
        for _ in range(3):
            first, second = await within(
                defer.gatherResults(
                    [a.claim(10, T0, (), per_host=5), b.claim(10, T0, (), per_host=5)]
                )
            )
            assert len(first) + len(second) == 5
            await within(
                a.save([attrs.evolve(j, state=JobState.FAILED, finished_at=T0) for j in first])
            )
            await within(
                b.save([attrs.evolve(j, state=JobState.FAILED, finished_at=T0) for j in second])
            )
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_a_dead_instances_jobs_are_reaped_after_its_lease(pg: Backend) -> None:
    """Instance A claims and dies (no heartbeat, no save). Once its 1 s lease has expired,
    B's reaper puts the jobs back to queued with their attempts, B runs them again, and
    A's late save is ignored (the jobs are no longer A's)."""
    (a,) = await opened(pg, "a", lease_seconds=1.0)
    await within(a.add([make_job() for _ in range(3)]))
    claimed = await within(a.claim(10, T0, ()))
    await within(a.close())  # as good as dead: its leases are no longer renewed
    (b,) = await opened(pg, "b", lease_seconds=1.0, refresh_interval=0.1)
    woken: list[bool] = []
    b.on_wakeup = lambda: woken.append(True)
    try:
        assert (await within(b.counts()))[JobState.RUNNING] == 3
        await until(lambda: b.reaped == 3, "B reaping A's jobs", 5)
        assert woken
        assert b.queued() == 3
        for job in claimed:
            stored = await within(b.get("alice", job.id))
            assert stored is not None
            assert (stored.state, stored.attempts) == (JobState.QUEUED, 1)
        again = await within(b.claim(10, T0 + 1, ()))
        assert sorted(j.attempts for j in again) == [2, 2, 2]

        (late,) = await opened(pg, "a")  # A's stale view, reopened under its id
        try:
            await within(
                late.save([attrs.evolve(j, state=JobState.FAILED, finished_at=T0) for j in claimed])
            )
            assert late.skipped_saves == 3
        finally:
            await within(late.close())
        assert (await within(b.counts()))[JobState.RUNNING] == 3
    finally:
        await within(b.close())


@pytest_twisted.ensureDeferred
async def test_heartbeats_keep_a_live_instances_leases(pg: Backend) -> None:
    """A live instance's jobs outlive many lease periods: its heartbeat renews them, so
    another instance's reaper leaves them alone."""
    a, b = await opened(pg, "a", "b", lease_seconds=0.6, refresh_interval=0.05)
    try:
        await within(a.add([make_job() for _ in range(2)]))
        await within(a.claim(10, T0, ()))
        await sleep(2.0)
        assert a.reaped == b.reaped == 0
        assert (await within(b.counts()))[JobState.RUNNING] == 2
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_notify_wakes_other_instances_and_stops_a_cancelled_transfer(
    pg: Backend,
) -> None:
    """A's add wakes B (not A itself); B cancelling a job A runs tells A which one, so A
    can abort the transfer; a queued job's cancel tells nobody."""
    a, b = await opened(pg, "a", "b")
    woken: dict[str, int] = {"a": 0, "b": 0}
    cancelled: list[tuple[str, str]] = []
    for store in (a, b):
        name = store.instance_id
        await until(lambda: store.listening, "the listener")
        store.on_wakeup = lambda name=name: woken.__setitem__(name, woken[name] + 1)
        store.on_cancelled = lambda job_id, name=name: cancelled.append((name, job_id))
    try:
        jobs = [make_job() for _ in range(2)]
        await within(a.add(jobs))
        await until(lambda: woken["b"] > 0, "B woken by A's add", 5)
        assert woken["a"] == 0

        (running,) = await within(a.claim(1, T0, ()))
        queued = next(j for j in jobs if j.id != running.id)
        await within(b.cancel("alice", queued.id, T0))
        await within(b.cancel("alice", running.id, T0))
        await until(lambda: bool(cancelled), "A told of the cancel", 5)
        await sleep(0.3)
        assert cancelled == [("a", running.id)]
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_queued_counters_follow_other_instances(pg: Backend) -> None:
    """queued() and queued_for() include what other instances add and claim, within a
    refresh interval."""
    a, b = await opened(pg, "a", "b", refresh_interval=0.1)
    try:
        await within(a.add([make_job("alice") for _ in range(5)]))
        await within(a.add([make_job("bob") for _ in range(2)]))
        await until(lambda: b.queued() == 7 and b.queued_for("bob") == 2, "B's counters")
        await within(a.claim(3, T0, ()))
        await until(lambda: b.queued() == 4 and b.queued_for("alice") == 2, "after A's claim")
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_instances_starting_together_migrate_once(pg: Backend) -> None:
    """Five stores opening at the same moment on an empty schema (it does not even
    exist yet) all open; the migrations ran once."""
    stores = [pg.new(instance_id=f"s{i}") for i in range(5)]
    try:
        results = await within(defer.gatherResults([s.open() for s in stores]), 30)
        assert results == [0] * 5
        assert pg.schema_versions() == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await close_all(*stores)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_is_reserved_once_across_instances(pg: Backend) -> None:
    """Two instances reserving one key at the same moment: one gets it, the other is told
    it is in progress; once recorded, either replays the stored response."""
    a, b = await opened(pg, "a", "b")
    try:
        results = await within(
            defer.DeferredList(
                [s.reserve_key("alice", "k1", "fp", T0) for s in (a, b)], consumeErrors=True
            )
        )
        oks = [ok and value is None for ok, value in results]
        assert sorted(oks) == [False, True]
        loser = next(value for ok, value in results if not ok)
        assert isinstance(loser, Failure)
        assert loser.check(IdempotencyInProgressError)
        winner = a if results[0][0] else b
        response = StoredResponse(201, (("content-type", "application/json"),), b"{}")
        await within(winner.add([make_job()], IdempotencyRecord("alice", "k1", response)))
        for store in (a, b):
            assert await within(store.reserve_key("alice", "k1", "fp", T0 + 1)) == response
    finally:
        await close_all(a, b)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_fails_open_and_leaves_no_thread(tmp_path: Path) -> None:
    """open() against a port where no PostgreSQL listens fails with the driver's error,
    leaves no thread behind, and the store stays closed."""
    threads = set(threading.enumerate())
    store = PostgresJobStore(reactor(), "postgresql://127.0.0.1:9/none", "x", connect_timeout=2)
    with pytest.raises(psycopg.OperationalError):
        await within(store.open(), 10)
    assert set(threading.enumerate()) <= threads
    with pytest.raises(StoreClosedError):
        await within(store.ping())


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_one_call_and_the_next_reconnects(pg: Backend) -> None:
    """When the server drops every connection of the store (writer, readers, listener),
    the next write fails at most once, with ``StoreUnavailableError`` (the API's 503),
    and the next read runs again on a new connection; later calls reconnect and succeed,
    and the NOTIFY listener comes back by itself."""
    (a,) = await opened(pg, "a")
    try:
        await within(a.add([make_job()]))
        assert await within(a.counts())  # a reader connection exists too
        await until(lambda: a.listening, "the listener")
        assert pg.pg is not None
        killed = pg.pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'curlfetch a' AND pid <> pg_backend_pid()"
        )
        assert len(killed) >= 3
        job = make_job()
        # Each may be the call that finds its connection gone.
        with contextlib.suppress(StoreUnavailableError):
            await within(a.add([job]))
        await within(a.get("alice", job.id))  # a read retries once on a new connection
        await within(a.add([make_job()]))
        assert (await within(a.counts()))[JobState.QUEUED] >= 2
        await until(lambda: a.listening, "the listener back", 10)
    finally:
        await within(a.close())
