"""The job store on the real reactor, each test against both backends (``store`` and
``backend`` fixtures): SQLite in ``tmp_path``, PostgreSQL in a throwaway schema. The
SQLite-only ones (WAL, the file surviving a crash) say so."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, utils

from curlfetch.jobs import BodyInfo, Job, JobError, JobResult, JobState
from curlfetch.store import JobFilter, JobStore, SchemaVersionError, StoreClosedError
from curlfetch.store import postgres as store_pg
from curlfetch.store import sqlite as store_sqlite
from curlfetch.store.postgres import PostgresJobStore
from curlfetch.store.sqlite import SQLiteJobStore

from .backends import AnyStore, Backend
from .conftest import db_path, make_job, open_backend, open_store, reactor, within

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = 1_700_000_000.0


def finished(job: Job, state: JobState, at: float, **changes: Any) -> Job:
    return attrs.evolve(job, state=state, finished_at=at, **changes)


def test_implements_the_job_store_protocol(tmp_path: Path) -> None:
    """Both stores are JobStores (mypy checks the assignments), and constructing one
    touches nothing until open() (no file; no connection to an unreachable server)."""
    store: JobStore = SQLiteJobStore(reactor(), db_path(tmp_path))
    assert store.queued() == 0
    assert not os.path.exists(db_path(tmp_path))
    pg: JobStore = PostgresJobStore(reactor(), "postgresql://127.0.0.1:1/none", "i")
    assert pg.queued() == 0


# -- add, get, list ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_then_get_round_trips_every_field(store: AnyStore) -> None:
    """A job reads back equal to what was added: spec (body bytes, headers, retry,
    deadline), metadata, timestamps."""
    job = make_job(
        url="https://Example.test:8443/p?q=1",
        method="POST",
        body_base64="AAEC/w==",
        headers=[["X-A", "1"], ["X-A", "2"]],
        retry={"max_attempts": 5, "backoff": 2.5},
        deadline=60,
        priority=7,
        metadata={"k": [1, "x", None]},
        not_before=T0 + 3,
    )
    await within(store.add([job]))
    assert await within(store.get("alice", job.id)) == job
    assert await within(store.get("alice", "0" * 32)) is None


@pytest_twisted.ensureDeferred
async def test_reads_see_writes_made_before_them(store: AnyStore) -> None:
    """Calls apply in call order: a get() issued right after add(), without waiting for
    add() to fire, already sees the job."""
    job = make_job()
    added = store.add([job])
    got = store.get("alice", job.id)
    await within(added)
    assert await within(got) == job


@pytest_twisted.ensureDeferred
async def test_list_is_newest_first_with_a_cursor(store: AnyStore) -> None:
    """list_jobs pages newest first; ``before_id`` continues after the last page's last
    id, and ``state`` filters."""
    jobs = [make_job(created_at=T0 + i) for i in range(5)]
    await within(store.add(jobs))
    newest = list(reversed(jobs))

    page1 = await within(store.list_jobs("alice", None, 2, None))
    page2 = await within(store.list_jobs("alice", None, 2, page1[-1].id))
    page3 = await within(store.list_jobs("alice", None, 2, page2[-1].id))
    page4 = await within(store.list_jobs("alice", None, 2, page3[-1].id))
    assert [j.id for j in page1 + page2 + page3] == [j.id for j in newest]
    assert page4 == []

    await within(store.cancel("alice", jobs[2].id, T0 + 10))
    cancelled = await within(
        store.list_jobs("alice", JobFilter(state=JobState.CANCELLED), 10, None)
    )
    queued = await within(store.list_jobs("alice", JobFilter(state=JobState.QUEUED), 10, None))
    assert [j.id for j in cancelled] == [jobs[2].id]
    assert [j.id for j in queued] == [j.id for j in newest if j.id != jobs[2].id]


@pytest_twisted.ensureDeferred
async def test_list_filters_by_creation_time_and_metadata(store: AnyStore) -> None:
    """Creation time: since is inclusive, until exclusive. Metadata: a key alone selects
    jobs that have it; a key and value those where it is that string (a number 5 is not
    "5"; a key with a dot is one key, not a path). Filters combine."""
    jobs = [
        make_job(created_at=T0, metadata={"crawl": "a"}),
        make_job(created_at=T0 + 1, metadata={"crawl": "b", "n": 5}),
        make_job(created_at=T0 + 2, metadata={"n": "5", "odd.key": "x"}),
        make_job(created_at=T0 + 3),
    ]
    await within(store.add(jobs))

    async def ids(**where: Any) -> list[int]:
        found = await within(store.list_jobs("alice", JobFilter(**where), 10, None))
        return [jobs.index(next(j for j in jobs if j.id == f.id)) for f in found]

    assert await ids() == [3, 2, 1, 0]
    assert await ids(created_since=T0 + 1) == [3, 2, 1]
    assert await ids(created_until=T0 + 1) == [0]
    assert await ids(created_since=T0 + 1, created_until=T0 + 3) == [2, 1]
    assert await ids(metadata_key="crawl") == [1, 0]
    assert await ids(metadata_key="crawl", metadata_value="b") == [1]
    assert await ids(metadata_key="n") == [2, 1]
    assert await ids(metadata_key="n", metadata_value="5") == [2]
    assert await ids(metadata_key="odd.key", metadata_value="x") == [2]
    assert await ids(metadata_key="odd") == []
    assert await ids(metadata_key="crawl", created_since=T0 + 1) == [1]
    assert await ids(state=JobState.QUEUED, metadata_key="nope") == []


@pytest_twisted.ensureDeferred
async def test_clients_cannot_see_or_cancel_each_others_jobs(store: AnyStore) -> None:
    """Another client's job is unknown to get, list and cancel, and stays as it was."""
    job = make_job("alice")
    await within(store.add([job]))
    assert await within(store.get("bob", job.id)) is None
    assert await within(store.list_jobs("bob", None, 10, None)) == []
    assert await within(store.cancel("bob", job.id, T0)) is None
    assert await within(store.get("alice", job.id)) == job
    assert store.queued() == 1


@pytest_twisted.ensureDeferred
async def test_add_only_takes_queued_jobs(store: AnyStore) -> None:
    """add() refuses a job that is not queued, before touching the database."""
    job = attrs.evolve(make_job(), state=JobState.RUNNING)
    with pytest.raises(ValueError, match="not queued"):
        await within(store.add([job]))
    assert store.queued() == 0


# -- claim ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_claim_takes_highest_priority_first_then_fifo(store: AnyStore) -> None:
    """Claims come in priority order, and in insertion order within a priority, even for
    jobs created in the same millisecond, whose ids sort in any order (here: reversed)."""
    low = make_job(priority=-1)
    normal = sorted((make_job() for _ in range(3)), key=lambda j: j.id, reverse=True)
    high = sorted((make_job(priority=5) for _ in range(2)), key=lambda j: j.id, reverse=True)
    await within(store.add([normal[0], low, high[0], normal[1], high[1], normal[2]]))

    first = await within(store.claim(2, T0, ()))
    rest = await within(store.claim(10, T0, ()))
    assert [j.id for j in first] == [j.id for j in high]
    assert [j.id for j in rest] == [j.id for j in [*normal, low]]


@pytest_twisted.ensureDeferred
async def test_claim_marks_running_and_counts_the_attempt(store: AnyStore) -> None:
    """A claimed job is running, with attempts + 1 and started_at = now, as returned and
    as stored; it is not claimed twice, and queued() drops."""
    jobs = [make_job() for _ in range(3)]
    await within(store.add(jobs))
    assert store.queued() == 3

    claimed = await within(store.claim(2, T0 + 5, ()))
    assert [(j.state, j.attempts, j.started_at) for j in claimed] == [
        (JobState.RUNNING, 1, T0 + 5)
    ] * 2
    assert await within(store.get("alice", claimed[0].id)) == claimed[0]
    assert store.queued() == 1
    again = await within(store.claim(10, T0 + 6, ()))
    assert [j.id for j in again] == [jobs[2].id]
    assert await within(store.claim(10, T0 + 7, ())) == []
    assert store.queued() == 0


@pytest_twisted.ensureDeferred
async def test_claim_waits_for_not_before(store: AnyStore) -> None:
    """A job with ``not_before`` in the future is not claimed until then."""
    job = make_job(not_before=T0 + 100)
    await within(store.add([job]))
    assert await within(store.claim(10, T0 + 99.9, ())) == []
    assert [j.id for j in await within(store.claim(10, T0 + 100, ()))] == [job.id]


@pytest_twisted.ensureDeferred
async def test_claim_skips_busy_hosts(store: AnyStore) -> None:
    """Jobs whose host:port is in ``skip_hosts`` stay queued; other ports of the same
    host name are other hosts."""
    a80 = make_job(url="http://a.test/", priority=9)
    a8080 = make_job(url="http://a.test:8080/")
    b443 = make_job(url="https://B.test/")
    await within(store.add([a80, a8080, b443]))

    claimed = await within(store.claim(10, T0, {"a.test:80"}))
    assert [j.id for j in claimed] == [a8080.id, b443.id]
    assert await within(store.claim(10, T0, ["a.test:80", "zzz:1"])) == []
    assert [j.id for j in await within(store.claim(10, T0, set()))] == [a80.id]


@pytest_twisted.ensureDeferred
async def test_claim_caps_each_host(store: AnyStore) -> None:
    """With ``per_host``, one host's backlog cannot fill a claim: each host yields at most
    its room (``host_room`` for busy hosts, else the cap), in priority-then-FIFO order, and
    the claim still honours ``limit`` across hosts."""
    a = [make_job(url="http://a.test/") for _ in range(5)]
    b = [make_job(url="http://b.test/") for _ in range(5)]
    urgent_a = make_job(url="http://a.test/", priority=5)
    await within(store.add([*a, *b, urgent_a]))

    claimed = await within(store.claim(10, T0, (), per_host=2, host_room={"b.test:80": 1}))
    assert [j.id for j in claimed] == [urgent_a.id, a[0].id, b[0].id]
    claimed = await within(store.claim(3, T0, (), per_host=2, host_room={"a.test:80": 0}))
    assert [j.id for j in claimed] == [b[1].id, b[2].id]
    claimed = await within(store.claim(3, T0, ["b.test:80"], per_host=4))
    assert [j.id for j in claimed] == [a[1].id, a[2].id, a[3].id]


@pytest_twisted.ensureDeferred
async def test_capped_claims_look_past_a_long_backlog(store: AnyStore) -> None:
    """Jobs queued behind hundreds of jobs of a host (or a client) that has no room are
    still claimed, in order, up to their hosts' rooms: the backlog holds nobody back."""
    backlog = [make_job("alice", url="http://a.test/") for _ in range(600)]
    b = [make_job("bob", url="http://b.test/") for _ in range(3)]
    c = [make_job("carol", url="http://c.test/") for _ in range(3)]
    await within(store.add([*backlog, *b, *c]))

    claimed = await within(store.claim(10, T0, (), per_host=2))
    expected = [backlog[0], backlog[1], b[0], b[1], c[0], c[1]]
    assert [j.id for j in claimed] == [j.id for j in expected]
    claimed = await within(
        store.claim(10, T0, (), per_host=2, per_client=5, client_room={"alice": 0, "bob": 1})
    )
    assert [j.id for j in claimed] == [b[2].id, c[2].id]


# -- save and batching ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_saves_in_one_reactor_turn_share_one_transaction(store: AnyStore) -> None:
    """Several save() calls made in the same reactor turn commit as one transaction."""
    await within(store.add([make_job() for _ in range(4)]))
    claimed = await within(store.claim(4, T0, ()))
    before = store.transactions

    saves = [store.save([finished(j, JobState.SUCCEEDED, T0 + 1)]) for j in claimed]
    await within(defer.gatherResults(saves))

    assert store.transactions == before + 1
    counts = await within(store.counts())
    assert counts[JobState.SUCCEEDED] == 4


@pytest_twisted.ensureDeferred
async def test_calls_in_one_turn_apply_in_call_order_in_one_transaction(
    store: AnyStore,
) -> None:
    """An add, a save (a retry) and a claim made in the same turn commit together, in
    call order: the claim already sees the new job and the requeued one."""
    old = make_job()
    await within(store.add([old]))
    (running,) = await within(store.claim(1, T0, ()))
    before = store.transactions

    new = make_job()
    added = store.add([new])
    saved = store.save([attrs.evolve(running, state=JobState.QUEUED)])
    claimed = store.claim(10, T0 + 1, ())
    await within(defer.gatherResults([added, saved]))
    jobs = await within(claimed)

    assert store.transactions == before + 1
    assert [(j.id, j.attempts) for j in jobs] == [(old.id, 2), (new.id, 1)]
    assert store.queued() == 0


@pytest_twisted.ensureDeferred
async def test_adding_a_batch_of_500_is_one_transaction(store: AnyStore) -> None:
    """add() of 500 jobs is a single transaction."""
    before = store.transactions
    await within(store.add([make_job() for _ in range(500)]))
    assert store.transactions == before + 1
    assert store.queued() == 500


@pytest_twisted.ensureDeferred
async def test_save_stores_results_errors_and_retries(store: AnyStore) -> None:
    """A finished job keeps its result or error; a job saved back as queued with a later
    ``not_before`` is claimable again from then, with its attempts counted."""
    ok, retry = [make_job(), make_job()]
    await within(store.add([ok, retry]))
    ok, retry = await within(store.claim(2, T0, ()))
    result = JobResult(
        status=200,
        http_version="2",
        headers=(("content-type", "text/plain"),),
        effective_url="https://example.test/final",
        primary_ip="127.0.0.1",
        redirects=((301, "https://example.test/final"),),
        body=BodyInfo(size=5, sha256="ab" * 32, truncated=False, content_type="text/plain"),
        timings={"total": 0.25},
    )
    ok = finished(ok, JobState.SUCCEEDED, T0 + 1, result=result)
    retry = attrs.evolve(
        retry,
        state=JobState.QUEUED,
        not_before=T0 + 30,
        error=JobError("COULDNT_CONNECT", "refused", curl_code=7),
    )
    await within(store.save([ok, retry]))

    assert await within(store.get("alice", ok.id)) == ok
    assert await within(store.get("alice", retry.id)) == retry
    assert store.queued() == 1
    assert await within(store.claim(10, T0 + 29, ())) == []
    again = await within(store.claim(10, T0 + 30, ()))
    assert [(j.id, j.attempts) for j in again] == [(retry.id, 2)]


@pytest_twisted.ensureDeferred
async def test_save_leaves_a_job_cancelled_while_it_ran(store: AnyStore) -> None:
    """save() only updates jobs that are still running: a cancel that came in while the
    job ran wins, and the skipped save is counted."""
    await within(store.add([make_job()]))
    (job,) = await within(store.claim(1, T0, ()))
    await within(store.cancel("alice", job.id, T0 + 1))
    await within(store.save([attrs.evolve(job, state=JobState.QUEUED, not_before=T0 + 5)]))
    stored = await within(store.get("alice", job.id))
    assert stored is not None
    assert stored.state is JobState.CANCELLED
    assert store.skipped_saves == 1
    assert store.queued() == 0


@pytest_twisted.ensureDeferred
async def test_a_failing_call_fails_alone(backend: Backend, store: AnyStore) -> None:
    """In a shared transaction, a call that fails (a duplicate id) is rolled back by
    itself; the calls beside it commit."""
    first = make_job()
    await within(store.add([first]))
    other = make_job()
    duplicate = store.add([make_job(), first])  # the first job is new, the second is not
    good = store.add([other])
    with pytest.raises(backend.integrity_error):
        await within(duplicate)
    await within(good)
    counts = await within(store.counts())
    assert counts[JobState.QUEUED] == 2
    assert store.queued() == 2


# -- cancel, counts, purge --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_semantics(store: AnyStore) -> None:
    """Queued and running jobs become cancelled at ``now``; a terminal job comes back
    unchanged; an unknown id gives None."""
    queued, running = make_job(), make_job()
    await within(store.add([running, queued]))
    await within(store.claim(1, T0, ()))
    assert store.queued() == 1

    c1 = await within(store.cancel("alice", queued.id, T0 + 1))
    c2 = await within(store.cancel("alice", running.id, T0 + 2))
    assert c1 is not None
    assert c2 is not None
    assert (c1.state, c1.finished_at) == (JobState.CANCELLED, T0 + 1)
    assert (c2.state, c2.finished_at, c2.attempts) == (JobState.CANCELLED, T0 + 2, 1)
    assert store.queued() == 0

    again = await within(store.cancel("alice", queued.id, T0 + 9))
    assert again == c1
    assert await within(store.cancel("alice", "f" * 32, T0)) is None


@pytest_twisted.ensureDeferred
async def test_counts_every_state(store: AnyStore) -> None:
    """counts() has every state, zero included."""
    assert await within(store.counts()) == dict.fromkeys(JobState, 0)
    await within(store.add([make_job() for _ in range(5)]))
    a, b, _ = await within(store.claim(3, T0, ()))
    await within(
        store.save([finished(a, JobState.SUCCEEDED, T0), finished(b, JobState.FAILED, T0)])
    )
    assert await within(store.counts()) == {
        JobState.QUEUED: 2,
        JobState.RUNNING: 1,
        JobState.SUCCEEDED: 1,
        JobState.FAILED: 1,
        JobState.CANCELLED: 0,
    }


@pytest_twisted.ensureDeferred
async def test_purge_deletes_terminal_jobs_finished_before_the_cutoff(
    store: AnyStore,
) -> None:
    """purge() deletes terminal jobs that finished before the cutoff and returns their
    ids; newer terminal jobs and unfinished jobs, however old, stay."""
    jobs = [make_job(created_at=T0 - 1000) for _ in range(6)]
    await within(store.add(jobs))
    old_ok, old_failed, new_ok, running = await within(store.claim(4, T0, ()))
    await within(
        store.save(
            [
                finished(old_ok, JobState.SUCCEEDED, T0 + 10),
                finished(old_failed, JobState.FAILED, T0 + 20),
                finished(new_ok, JobState.SUCCEEDED, T0 + 100),
            ]
        )
    )
    old_cancelled = await within(store.cancel("alice", jobs[4].id, T0 + 30))
    assert old_cancelled is not None

    purged = await within(store.purge(T0 + 100))
    assert sorted(purged) == sorted([old_ok.id, old_failed.id, old_cancelled.id])
    left = await within(store.list_jobs("alice", None, 10, None))
    assert sorted(j.id for j in left) == sorted([new_ok.id, running.id, jobs[5].id])
    assert await within(store.purge(T0 + 100)) == []


# -- queued() ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queued_count_follows_every_write(backend: Backend) -> None:
    """queued() equals the stored count of queued jobs after adds, claims, retries,
    cancels and a reopen."""
    store = await open_backend(backend)

    async def check() -> None:
        assert store.queued() == (await within(store.counts()))[JobState.QUEUED]

    await within(store.add([make_job() for _ in range(10)]))
    await check()
    claimed = await within(store.claim(4, T0, ()))
    await check()
    await within(store.save([attrs.evolve(claimed[0], state=JobState.QUEUED)]))
    await within(store.save([finished(claimed[1], JobState.FAILED, T0)]))
    await check()
    queued = await within(store.list_jobs("alice", JobFilter(state=JobState.QUEUED), 2, None))
    await within(store.cancel("alice", queued[0].id, T0))
    await check()
    await within(store.close())

    store = await open_backend(backend)  # two jobs were left running: requeued
    await check()
    assert store.queued() == 8
    await within(store.close())


# -- open, recovery, schema -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_requeues_jobs_left_running(backend: Backend) -> None:
    """Jobs a previous process left running are queued again on open (at-least-once),
    keeping their attempt count; open() fires with how many. (PostgreSQL: the previous
    process had the same instance id; other instances' jobs wait for their lease.)"""
    first = await open_backend(backend)
    await within(first.add([make_job() for _ in range(3)]))
    claimed = await within(first.claim(2, T0, ()))
    await within(first.close())

    second = backend.new()
    assert await within(second.open()) == 2
    try:
        for job in claimed:
            stored = await within(second.get("alice", job.id))
            assert stored is not None
            assert (stored.state, stored.attempts) == (JobState.QUEUED, 1)
        assert second.queued() == 3
    finally:
        await within(second.close())


@pytest_twisted.ensureDeferred
async def test_schema_migration_is_idempotent(backend: Backend) -> None:
    """Opening again (the same store after close, then a second store on the same
    database) applies no migration twice and keeps the data."""
    store = await open_backend(backend)
    job = make_job()
    await within(store.add([job]))
    await within(store.close())

    assert await within(store.open()) == 0
    assert await within(store.get("alice", job.id)) == job
    await within(store.close())

    other = await open_backend(backend, instance_id="other")
    assert await within(other.get("alice", job.id)) == job
    await within(other.close())
    migrations = store_pg.MIGRATIONS if backend.pg else store_sqlite.MIGRATIONS
    assert backend.schema_versions() == list(range(1, len(migrations) + 1))


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    """A database migrated by a newer version is not touched; the failed open leaves
    no thread behind and the store closed."""
    await within((await open_backend(backend)).close())
    backend.add_schema_version(99)
    threads = set(threading.enumerate())

    store = backend.new()
    with pytest.raises(SchemaVersionError):
        await within(store.open())
    assert set(threading.enumerate()) <= threads
    with pytest.raises(StoreClosedError):
        await within(store.ping())


@pytest_twisted.ensureDeferred
async def test_open_twice_is_an_error(store: AnyStore) -> None:
    """A second open() of an open store fails instead of requeueing its running jobs."""
    with pytest.raises(RuntimeError, match="already open"):
        await within(store.open())


@pytest_twisted.ensureDeferred
async def test_database_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    """SQLite: the file is in WAL mode, and the store's connection fsyncs every commit."""
    store = await open_store(db_path(tmp_path))
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._pool is not None
    sync = await within(
        store._pool.runWithConnection(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    )
    assert sync == 2  # FULL
    await within(store.close())


# -- close, durability ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_flushes_pending_writes_and_stops_the_thread(backend: Backend) -> None:
    """close() commits writes still waiting for their turn, then stops the pool's threads
    (PostgreSQL: the NOTIFY listener's too); later calls fail with StoreClosedError."""
    threads = set(threading.enumerate())
    store = await open_backend(backend)
    job = make_job()
    added = store.add([job])
    await within(store.close())
    assert added.called
    await within(added)
    assert set(threading.enumerate()) <= threads
    with pytest.raises(StoreClosedError):
        await within(store.get("alice", job.id))
    with pytest.raises(StoreClosedError):
        await within(store.ping())

    reopened = await open_backend(backend)
    assert await within(reopened.get("alice", job.id)) == job
    await reopened.close()


@pytest_twisted.ensureDeferred
async def test_ping(store: AnyStore) -> None:
    """ping() succeeds on an open store."""
    await within(store.ping())


@pytest_twisted.ensureDeferred
async def test_added_job_survives_the_process_exiting_at_once(tmp_path: Path) -> None:
    """SQLite: once add() has fired the job is on disk: a process that exits right then (no
    close, no checkpoint) leaves it for the next open."""
    path = db_path(tmp_path)
    out, err, code = await within(
        utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "tests.service.store_child", "add", path],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=ROOT,
            reactor=reactor(),
        ),
        30,
    )
    assert code == 0, err
    job_id = out.decode().strip()
    assert os.path.exists(path + "-wal")  # noqa: ASYNC240 - it never got to checkpoint

    store = await open_store(path)
    try:
        job = await within(store.get("alice", job_id))
        assert job is not None
        assert job.state is JobState.QUEUED
        assert job.spec.url == "http://example.test/durable"
    finally:
        await within(store.close())
