"""The store when its database fails under it: which writes committed, what is retried,
and the self-check that hands back jobs held as ``running`` with nobody running them.

Real SQLite files and the local PostgreSQL; the faults are real too: backends terminated
with ``pg_terminate_backend``, a COMMIT whose answer a loopback proxy swallows, and a
SQLite file locked by another connection."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

from curlfetch.jobs import JobState
from curlfetch.store import StoreClosedError, StoreUnavailableError
from curlfetch.store.postgres import PostgresJobStore
from curlfetch.store.sqlite import SQLiteJobStore

from .backends import POSTGRES_URL, AnyStore, Backend
from .conftest import db_path, make_job, reactor, until, within

pytestmark = pytest.mark.timeout(60)


def finished(job: Any) -> Any:
    return attrs.evolve(job, state=JobState.SUCCEEDED, finished_at=time.time())


# -- the self-check ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requeue_orphans_hands_back_running_jobs_nobody_runs(store: AnyStore) -> None:
    """``requeue_orphans(alive)`` puts back to ``queued`` every job the store holds as
    running for this store that is not in ``alive``, keeps its attempts (at-least-once),
    leaves the alive one running, counts the requeued ones as queued again, and returns
    their ids."""
    jobs = [make_job() for _ in range(3)]
    await within(store.add(jobs))
    claimed = await within(store.claim(3, time.time(), ()))
    assert len(claimed) == 3
    assert store.queued() == 0
    orphans = await within(store.requeue_orphans({jobs[0].id}))
    assert sorted(orphans) == sorted(j.id for j in jobs[1:])
    assert store.queued() == 2
    states = {j.id: await within(store.get("alice", j.id)) for j in jobs}
    assert states[jobs[0].id].state is JobState.RUNNING  # type: ignore[union-attr]
    for job in jobs[1:]:
        got = states[job.id]
        assert got is not None
        assert got.state is JobState.QUEUED
        assert got.attempts == 1
    assert await within(store.requeue_orphans({jobs[0].id})) == []


@pytest_twisted.ensureDeferred
async def test_requeue_orphans_leaves_other_instances_jobs_alone(pg: Backend) -> None:
    """On PostgreSQL the self-check touches only this instance's running jobs: another
    live instance's claims are its own business (its lease, its self-check)."""
    a = pg.new(instance_id="a")
    b = pg.new(instance_id="b")
    await within(a.open())
    await within(b.open())
    try:
        await within(a.add([make_job(), make_job()]))
        mine = await within(a.claim(1, time.time(), ()))
        theirs = await within(b.claim(1, time.time(), ()))
        assert len(mine) == len(theirs) == 1
        assert await within(a.requeue_orphans(set())) == [mine[0].id]
        got = await within(b.get("alice", theirs[0].id))
        assert got is not None
        assert got.state is JobState.RUNNING
    finally:
        await within(a.close())
        await within(b.close())


# -- SQLite: locked ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sqlite_locked_fails_a_submission_and_retries_a_save(tmp_path: Path) -> None:
    """While another process holds the database locked past the busy timeout, an add
    fails with ``StoreUnavailableError`` (a ``StoreClosedError``: the API's 503 with
    Retry-After), nothing of it stored; a save is not dropped but run again until the
    lock is gone, and then commits."""
    path = db_path(tmp_path)
    store = SQLiteJobStore(reactor(), path, busy_timeout=0.1)
    await within(store.open())
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        job = make_job()
        await within(store.add([job]))
        (claimed,) = await within(store.claim(1, time.time(), ()))
        locker.execute("BEGIN EXCLUSIVE")
        refused = make_job()
        with pytest.raises(StoreUnavailableError, match="locked") as caught:
            await within(store.add([refused]))
        assert isinstance(caught.value, StoreClosedError)
        saved = store.save([finished(claimed)])
        await until(lambda: store.retried_ops >= 2, "the save to be run again")
        assert not saved.called
        locker.execute("ROLLBACK")
        await within(saved)
        got = await within(store.get("alice", job.id))
        assert got is not None
        assert got.state is JobState.SUCCEEDED
        assert await within(store.get("alice", refused.id)) is None
    finally:
        with contextlib.suppress(sqlite3.Error):
            locker.execute("ROLLBACK")
        locker.close()
        await within(store.close())


# -- PostgreSQL: lost connections ------------------------------------------------------------


def _terminate(pg: Backend, name: str) -> int:
    assert pg.pg is not None
    killed = pg.pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        (f"curlfetch {name}",),
    )
    return len(killed)


@pytest_twisted.ensureDeferred
async def test_pg_a_save_on_a_dead_connection_is_run_again_until_it_commits(
    pg: Backend,
) -> None:
    """The writer's connection is terminated between a claim and its save: the save's
    batch fails before COMMIT (known: not committed), so the store runs it again on a new
    connection, and the job ends ``succeeded``, not ``running`` forever."""
    store = pg.new(instance_id="a")
    await within(store.open())
    try:
        job = make_job()
        await within(store.add([job]))
        (claimed,) = await within(store.claim(1, time.time(), ()))
        assert _terminate(pg, "a") >= 1
        await within(store.save([finished(claimed)]))
        assert store.retried_ops >= 1
        got = await within(store.get("alice", job.id))
        assert got is not None
        assert got.state is JobState.SUCCEEDED
    finally:
        await within(store.close())


class _CommitCutter(protocol.Protocol):
    """Client side of the proxy: forwards to PostgreSQL, until an armed COMMIT goes by;
    then the server's answer to it is swallowed and the client's connection cut."""

    def __init__(self, armed: list[bool], upstream: tuple[str, int]) -> None:
        self.armed = armed
        self.upstream = upstream
        self.server: _Upstream | None = None
        self.buffer: list[bytes] = []
        self.cutting = False

    @property
    def out(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        self.out.pauseProducing()
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _Upstream(self)
        reactor().connectTCP(self.upstream[0], self.upstream[1], factory)

    def upstream_ready(self, server: _Upstream) -> None:
        self.server = server
        self.out.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.armed[0] and b"COMMIT" in data:
            self.armed[0] = False
            self.cutting = True
        assert self.server is not None
        self.server.out.write(data)

    def from_server(self, data: bytes) -> None:
        if self.cutting:
            # PostgreSQL has the COMMIT (and answers it): the client never hears.
            self.out.abortConnection()
            return
        self.out.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.server is not None:
            self.server.out.loseConnection()


class _Upstream(protocol.Protocol):
    def __init__(self, client: _CommitCutter) -> None:
        self.client = client

    @property
    def out(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.from_server(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.out.loseConnection()


@pytest_twisted.ensureDeferred
async def test_pg_a_commit_whose_answer_is_lost_is_known_to_have_committed(
    pg: Backend,
) -> None:
    """The connection dies after PostgreSQL received a save's COMMIT but before its
    answer arrived (a proxy swallows it): the store asks ``txid_status`` on a new
    connection, learns that the batch committed, and fires the save as a success with
    nothing run twice; the job is ``succeeded``."""
    assert pg.pg is not None
    target = conninfo_to_dict(POSTGRES_URL)
    upstream = (str(target.get("host") or "127.0.0.1"), int(target.get("port") or 5432))
    armed = [False]
    factory = protocol.ServerFactory()
    factory.protocol = lambda: _CommitCutter(armed, upstream)
    port: IListeningPort = reactor().listenTCP(0, factory, interface="127.0.0.1")
    dsn = make_conninfo(pg.pg.dsn, host="127.0.0.1", port=str(port.getHost().port))  # type: ignore[attr-defined]
    store = PostgresJobStore(reactor(), dsn, "a")
    await within(store.open())
    try:
        job = make_job()
        await within(store.add([job]))
        (claimed,) = await within(store.claim(1, time.time(), ()))
        before = store.transactions
        armed[0] = True
        await within(store.save([finished(claimed)]))
        assert not armed[0], "the proxy saw no COMMIT"
        assert store.retried_ops == 0  # known committed: not run again
        assert store.skipped_saves == 0
        assert store.transactions == before + 1
        got = await within(store.get("alice", job.id))
        assert got is not None
        assert got.state is JobState.SUCCEEDED
    finally:
        await within(store.close())
        await Deferred.fromCoroutine(_stop(port))


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
