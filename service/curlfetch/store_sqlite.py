"""``SQLiteJobStore``: the embedded ``JobStore``, one SQLite file in WAL mode behind adbapi.

How it stays off the reactor and out of the way:

- **One connection, one thread.** ``adbapi.ConnectionPool`` with ``cp_min=cp_max=1``: a
  single writer never sees "database is locked", and every statement runs in the pool's
  thread, never in the reactor's.
- **One transaction per reactor turn.** Every call (writes and reads alike) becomes an
  operation on a queue; ``reactor.callLater(0)`` flushes the queue as one transaction,
  in call order, each operation inside its own SAVEPOINT so that one failing operation
  (a duplicate id) fails alone. While a flush is in the thread, new operations pile up
  for the next one (group commit): the fsync per commit is paid per batch, not per job.
  A Deferred fires only after its transaction has committed.
- **Durability.** ``journal_mode=WAL`` with ``synchronous=FULL``: every commit fsyncs the
  WAL, so a job the API acknowledged survives a power loss, not only a crash of the
  process. (``NORMAL`` would be faster per commit, but batching already amortizes the
  fsync, and ``NORMAL`` may lose the last commits on power loss.)
- **Idempotency-Keys.** Reserved, then recorded in the transaction that inserts the
  jobs (``reserve_key``, ``add``); a reservation names its store instance, so one left
  by a dead process is taken over after ``IDEMPOTENCY_ABANDONED_AFTER`` seconds.
- **Portable SQL.** Plain SQL plus ``UPDATE ... RETURNING`` (PostgreSQL has it too), a
  ``schema_version`` table and numbered migrations applied in ``open()``. The
  SQLite-only parts are marked: ``json_each`` for the skip list, ``BEGIN IMMEDIATE``.

The reactor is injected and handed to adbapi as ``cp_reactor``; this module never imports
the global reactor.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from .jobs import Job, JobState
from .store import (
    IDEMPOTENCY_TTL,
    IdempotencyInProgressError,
    IdempotencyRecord,
    StoredResponse,
)
from .store_rows import QueuedCounts, judge_key
from .store_rows import dumps as _dumps
from .store_rows import insert_row as _row
from .store_rows import job_from_row as _job

T = TypeVar("T")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: jobs. ``seq`` is the FIFO order (a job id is time-sortable only to the
    # millisecond, and a batch of 500 shares one); it aliases SQLite's rowid, so it costs
    # nothing and VACUUM keeps it. PostgreSQL: BIGINT GENERATED ALWAYS AS IDENTITY.
    # ``owner`` and ``lease_until`` are for PostgreSQL's leases; SQLite leaves them NULL.
    (
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            client TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            priority INTEGER NOT NULL,
            host TEXT NOT NULL,
            created_at REAL NOT NULL,
            not_before REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            attempts INTEGER NOT NULL,
            spec TEXT NOT NULL,
            metadata TEXT,
            result TEXT,
            error TEXT,
            owner TEXT,
            lease_until REAL
        )
        """,
        "CREATE INDEX jobs_claim ON jobs (state, priority DESC, seq)",
        "CREATE INDEX jobs_client ON jobs (client, id DESC)",
        "CREATE INDEX jobs_finished ON jobs (state, finished_at)",
    ),
    # 2: Idempotency-Keys, one row per (client, key). ``reserved`` while the first
    # submission is being accepted (``owner`` is the store instance holding it), ``done``
    # with the response once its jobs are committed (same transaction). ``created_at`` is
    # the reservation time: the TTL and the abandonment bound count from it. ``headers``
    # is JSON ``[[name, value], ...]``. PostgreSQL: BYTEA for ``body``,
    # DOUBLE PRECISION for the times.
    (
        """
        CREATE TABLE idempotency_keys (
            client TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('reserved', 'done')),
            owner TEXT,
            created_at REAL NOT NULL,
            status INTEGER,
            headers TEXT,
            body BLOB,
            PRIMARY KEY (client, key),
            CHECK (state = 'reserved' OR (status IS NOT NULL AND headers IS NOT NULL
                AND body IS NOT NULL))
        )
        """,
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)",
    ),
)
"""Migration N (1-based) brings the schema from version N-1 to N. Append; never edit."""

_COLUMNS = (
    "seq, id, client, state, created_at, not_before, started_at, finished_at, attempts, "
    "spec, metadata, result, error"
)

# The SQL is built from these constant fragments only; every value is a parameter.
_SELECT = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608
_GET = f"{_SELECT} WHERE id = ? AND client = ?"
_CANCEL = (
    "UPDATE jobs SET state = 'cancelled', finished_at = ?, owner = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE seq = ? RETURNING {_COLUMNS}"
)

_INSERT = (
    "INSERT INTO jobs (id, client, state, priority, host, created_at, not_before, "
    "started_at, finished_at, attempts, spec, metadata, result, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_SAVE = (
    "UPDATE jobs SET state = ?, attempts = ?, not_before = ?, started_at = ?, "
    "finished_at = ?, result = ?, error = ?, owner = NULL, lease_until = NULL "
    "WHERE id = ? AND state = 'running'"
)

_CLAIM = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608
    "WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND not_before <= ? {skip}"
    "ORDER BY priority DESC, seq LIMIT ?) "
    f"RETURNING {_COLUMNS}"
)
# SQLite-only: the skip list as one JSON parameter keeps a single cached statement for any
# number of hosts. PostgreSQL: ``AND host <> ALL(%s)`` with a list.
_CLAIM_ALL = _CLAIM.format(skip="")
_CLAIM_SKIPPING = _CLAIM.format(skip="AND host NOT IN (SELECT value FROM json_each(?)) ")
# With a per-host (and per-client) cap: walk the runnable jobs in claim order (the
# ``jobs_claim`` index) and take each one whose host and client still have room, up to the
# limit, so one host's backlog cannot fill a claim and a host or client without room does
# not hold back the others' jobs. Hosts and clients without room are left out by the
# query; one that runs out during the walk is skipped in Python, until a long run of
# skips makes it cheaper to query again without it, from where the walk stopped. The cost
# follows the jobs looked at, not the queue: ranking every queued job with window
# functions took ~45 ms per claim with 20,000 queued. PostgreSQL picks the same way.
_WALK = (
    "SELECT seq, priority, host, client FROM jobs "
    "WHERE state = 'queued' AND not_before <= ? "
    "AND host NOT IN (SELECT value FROM json_each(?)) "
    "AND client NOT IN (SELECT value FROM json_each(?)) "
    "{after}ORDER BY priority DESC, seq"
)
_WALK_FROM_START = _WALK.format(after="")
_WALK_AFTER = _WALK.format(after="AND (priority < ? OR (priority = ? AND seq > ?)) ")
_CLAIM_PICKED = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608
    f"WHERE seq IN (SELECT value FROM json_each(?)) RETURNING {_COLUMNS}"
)
_SKIPS_BEFORE_REQUERY = 256

_PURGE = (
    "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
    "AND finished_at < ? RETURNING id"
)

_KEY_GET = (
    "SELECT fingerprint, state, owner, created_at, status, headers, body "
    "FROM idempotency_keys WHERE client = ? AND key = ?"
)
# Inserts a reservation, or turns an expired or abandoned row into one (portable upsert).
_KEY_RESERVE = (
    "INSERT INTO idempotency_keys (client, key, fingerprint, state, owner, created_at) "
    "VALUES (?, ?, ?, 'reserved', ?, ?) ON CONFLICT (client, key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, state = 'reserved', owner = excluded.owner, "
    "created_at = excluded.created_at, status = NULL, headers = NULL, body = NULL"
)
_KEY_RECORD = (
    "UPDATE idempotency_keys SET state = 'done', owner = NULL, status = ?, headers = ?, "
    "body = ? WHERE client = ? AND key = ? AND state = 'reserved' AND owner = ?"
)
_KEY_RELEASE = (
    "DELETE FROM idempotency_keys WHERE client = ? AND key = ? AND state = 'reserved' AND owner = ?"
)
_KEY_PURGE = "DELETE FROM idempotency_keys WHERE created_at <= ?"


class StoreClosedError(RuntimeError):
    """The store is not open (never opened, closing, or closed)."""


class SchemaVersionError(RuntimeError):
    """The database was written by a newer curlfetch: refuse rather than corrupt it."""


class _Pool(Protocol):
    """The typed surface of ``adbapi.ConnectionPool`` that the store uses."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def runWithConnection(
        self, func: Callable[..., T], *args: object, **kw: object
    ) -> Deferred[T]: ...


class StoreReactor(Protocol):
    """What the store needs from a reactor: a clock (the flush, key expiry), and the
    triggers adbapi registers. (adbapi also calls ``callFromThread``, which every reactor
    has, but whose argument name differs between them, so a Protocol cannot spell it.)"""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def seconds(self) -> float: ...
    def callWhenRunning(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any: ...
    def addSystemEventTrigger(
        self,
        phase: str,
        eventType: str,
        callable: Callable[..., Any],
        *args: object,
        **kwargs: object,
    ) -> Any: ...
    def removeSystemEventTrigger(self, triggerID: Any) -> None: ...


# Runs in the database thread: returns its value and the change to the queued count of
# each client it touched.
_Delta = Mapping[str, int]
_Work = Callable[[sqlite3.Connection], tuple[Any, _Delta]]
_NONE: _Delta = {}


@attrs.define
class _Op:
    work: _Work
    write: bool
    deferred: Deferred[Any]


@attrs.frozen
class _Outcome:
    ok: bool
    value: Any
    queued_delta: _Delta


class SQLiteJobStore:
    """The embedded ``JobStore`` (see ``curlfetch.store``): one SQLite file, WAL mode.

    ``transactions`` counts committed transactions (tests use it to see batching);
    ``skipped_saves`` counts saved jobs that were no longer ``running`` (cancelled while
    they ran), which ``save`` leaves alone.
    """

    def __init__(
        self, reactor: StoreReactor, path: str | os.PathLike[str], busy_timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.transactions = 0
        self.skipped_saves = 0
        self.owner = uuid.uuid4().hex
        """Names this instance's Idempotency-Key reservations (see ``reserve_key``)."""
        self._reactor = reactor
        self._pool: _Pool | None = None
        self._closing = False
        self._counts = QueuedCounts()
        self._pending: list[_Op] = []
        self._flush_call: IDelayedCall | None = None
        self._in_flight = False
        self._idle_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> Deferred[int]:
        if self._pool is not None:
            return fail(RuntimeError("the store is already open"))
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        raw = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3",
            self.path,
            cp_min=1,
            cp_max=1,
            cp_reactor=self._reactor,
            cp_openfun=self._configure,
            check_same_thread=False,
            # Autocommit at the driver level: every transaction is our own explicit BEGIN.
            isolation_level=None,
        )
        pool = cast(_Pool, raw)
        # adbapi starts its thread pool when the reactor starts; start it now, so open()
        # also works from a running reactor (start() is idempotent).
        pool.start()
        self._pool = pool
        self._closing = False

        def opened(result: tuple[int, dict[str, int]]) -> int:
            recovered, queued = result
            self._counts.reset(queued)
            return recovered

        def failed(failure: Failure) -> Failure:
            self._pool = None
            pool.close()
            return failure

        return pool.runWithConnection(_open_database).addCallbacks(opened, failed)

    def _configure(self, conn: sqlite3.Connection) -> None:
        """cp_openfun: per-connection settings, in the database thread."""
        # First, so that switching to WAL waits for another process instead of failing.
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        if not self._closing:
            self._closing = True
            Deferred.fromCoroutine(self._close())
        return d

    async def _close(self) -> None:
        """Flush what is queued, wait for it, checkpoint the WAL, then stop the thread."""
        pool = self._pool
        assert pool is not None
        failure: Failure | None = None
        try:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
                self._flush_call = None
                self._flush()
            while self._in_flight or self._pending:
                waiter: Deferred[None] = Deferred()
                self._idle_waiters.append(waiter)
                await waiter
            # Folds the WAL into the database file in the thread, so that closing the
            # connection in the reactor thread (adbapi does) has nothing left to write.
            await pool.runWithConnection(_checkpoint)
        except Exception:
            failure = Failure()
        finally:
            # Joins the pool's thread and closes the connection.
            pool.close()
            self._pool = None
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                if failure is None:
                    w.callback(None)
                else:
                    w.errback(failure)

    # -- the queue -------------------------------------------------------------------------

    def _submit(self, work: _Work, *, write: bool) -> Deferred[Any]:
        if self._pool is None or self._closing:
            return fail(StoreClosedError(f"{self.path}: the job store is not open"))
        d: Deferred[Any] = Deferred()
        self._pending.append(_Op(work, write, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._pending and not self._in_flight and self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._in_flight or not self._pending:
            return
        ops, self._pending = self._pending, []
        self._in_flight = True
        work = [(op.work, op.write) for op in ops]
        assert self._pool is not None
        d = self._pool.runWithConnection(_run_batch, work)
        d.addBoth(self._flushed, ops)

    def _flushed(self, result: list[_Outcome] | Failure, ops: list[_Op]) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            # BEGIN or COMMIT failed: the batch was rolled back, queued() is still right.
            for op in ops:
                if not op.deferred.called:
                    op.deferred.errback(result)
        else:
            self.transactions += 1
            for outcome in result:
                self._counts.apply(outcome.queued_delta)
            for op, outcome in zip(ops, result, strict=True):
                if op.deferred.called:  # cancelled by its caller; the write still happened
                    continue
                if outcome.ok:
                    op.deferred.callback(outcome.value)
                else:
                    op.deferred.errback(Failure(outcome.value))
        self._schedule()
        if not self._in_flight and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    # -- the JobStore interface ------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def ping(conn: sqlite3.Connection) -> tuple[None, _Delta]:
            conn.execute("SELECT 1").fetchone()
            return None, _NONE

        return self._submit(ping, write=False)

    def reserve_key(
        self, client: str, key: str, fingerprint: str, now: float
    ) -> Deferred[StoredResponse | None]:
        """One SELECT, then the decision, then an upsert if the key is (again) free; all
        in the write transaction, so two reservations of one key are serialized.

        A reservation belongs to this instance (``owner``). Another instance's
        reservation older than ``IDEMPOTENCY_ABANDONED_AFTER`` is taken over: its
        process died before recording, and since the record and the jobs commit
        together, no job of it exists. Our own reservations are never taken over, so
        a slow ``add`` cannot race a second one."""
        owner = self.owner

        def reserve(conn: sqlite3.Connection) -> tuple[StoredResponse | None, _Delta]:
            row = conn.execute(_KEY_GET, (client, key)).fetchone()
            if row is not None:
                stored = judge_key(row, key, fingerprint, owner, now)
                if stored is not None:
                    return stored, _NONE
            conn.execute(_KEY_RESERVE, (client, key, fingerprint, owner, now))
            return None, _NONE

        return self._submit(reserve, write=True)

    def release_key(self, client: str, key: str) -> Deferred[None]:
        owner = self.owner

        def release(conn: sqlite3.Connection) -> tuple[None, _Delta]:
            conn.execute(_KEY_RELEASE, (client, key, owner))
            return None, _NONE

        return self._submit(release, write=True)

    def add(
        self, jobs: Sequence[Job], idempotency: IdempotencyRecord | None = None
    ) -> Deferred[None]:
        for job in jobs:
            if job.state is not JobState.QUEUED:
                return fail(ValueError(f"job {job.id} is {job.state}, not queued"))
        if not jobs and idempotency is None:
            return succeed(None)
        batch = list(jobs)
        record = idempotency
        owner = self.owner

        def add(conn: sqlite3.Connection) -> tuple[None, _Delta]:
            if record is not None:
                # First: if the reservation is lost, the savepoint drops nothing but this.
                response = record.response
                headers = _dumps([list(pair) for pair in response.headers])
                params = (response.status, headers, response.body, record.client, record.key)
                if conn.execute(_KEY_RECORD, (*params, owner)).rowcount != 1:
                    raise IdempotencyInProgressError(
                        f"Idempotency-Key {record.key!r} is no longer reserved by this store"
                    )
            conn.executemany(_INSERT, [_row(job) for job in batch])
            return None, Counter(job.client for job in batch)

        return self._submit(add, write=True)

    def get(self, client: str, job_id: str) -> Deferred[Job | None]:
        def get(conn: sqlite3.Connection) -> tuple[Job | None, _Delta]:
            row = conn.execute(_GET, (job_id, client)).fetchone()
            return (None if row is None else _job(row)), _NONE

        return self._submit(get, write=False)

    def list_jobs(
        self, client: str, state: JobState | None, limit: int, before_id: str | None
    ) -> Deferred[list[Job]]:
        where = ["client = ?"]
        params: list[object] = [client]
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
        params.append(max(0, limit))

        def list_jobs(conn: sqlite3.Connection) -> tuple[list[Job], _Delta]:
            return [_job(row) for row in conn.execute(sql, params)], _NONE

        return self._submit(list_jobs, write=False)

    def claim(
        self,
        limit: int,
        now: float,
        skip_hosts: Collection[str],
        *,
        per_host: int | None = None,
        host_room: Mapping[str, int] | None = None,
        per_client: int | None = None,
        client_room: Mapping[str, int] | None = None,
    ) -> Deferred[list[Job]]:
        """Without caps, one ``UPDATE ... WHERE seq IN (SELECT ... LIMIT ?) RETURNING``
        whose subquery walks ``jobs_claim`` in claim order; with caps, the walk picks
        (``_pick``), then one ``UPDATE`` claims the picked jobs."""
        if limit <= 0:
            return succeed([])
        if per_host is not None or per_client is not None:
            rooms = _Rooms(
                limit=limit,
                host_cap=limit if per_host is None else per_host,
                host_room={**(host_room or {}), **dict.fromkeys(skip_hosts, 0)},
                client_cap=limit if per_client is None else per_client,
                client_room=dict(client_room or {}) if per_client is not None else {},
            )

            def pick_and_claim(conn: sqlite3.Connection) -> tuple[list[Job], _Delta]:
                seqs = _pick(conn, now, rooms)
                if not seqs:
                    return [], _NONE
                return _claimed(conn.execute(_CLAIM_PICKED, (now, json.dumps(seqs))))

            return self._submit(pick_and_claim, write=True)
        if skip_hosts:
            sql = _CLAIM_SKIPPING
            params: tuple[object, ...] = (now, now, json.dumps(list(skip_hosts)), limit)
        else:
            sql = _CLAIM_ALL
            params = (now, now, limit)

        def claim(conn: sqlite3.Connection) -> tuple[list[Job], _Delta]:
            return _claimed(conn.execute(sql, params))

        return self._submit(claim, write=True)

    def save(self, jobs: Sequence[Job]) -> Deferred[None]:
        """Only jobs still ``running`` are updated: a job cancelled while it ran stays
        cancelled (its save is counted in ``skipped_saves``). PostgreSQL adds ``AND owner
        = ?``, so a worker whose lease expired cannot overwrite the next one's run."""
        if not jobs:
            return succeed(None)
        batch = list(jobs)

        def save(conn: sqlite3.Connection) -> tuple[int, _Delta]:
            requeued: dict[str, list[tuple[object, ...]]] = {}
            for j in batch:
                if j.state is JobState.QUEUED:
                    requeued.setdefault(j.client, []).append(_save_row(j))
            others = [_save_row(j) for j in batch if j.state is not JobState.QUEUED]
            # One executemany per client: its rowcount is that client's requeued jobs.
            back = {c: conn.executemany(_SAVE, rows).rowcount for c, rows in requeued.items()}
            rest = conn.executemany(_SAVE, others).rowcount if others else 0
            return len(batch) - sum(back.values()) - rest, back

        def skipped(count: int) -> None:
            self.skipped_saves += count

        return self._submit(save, write=True).addCallback(skipped)

    def cancel(self, client: str, job_id: str, now: float) -> Deferred[Job | None]:
        def cancel(conn: sqlite3.Connection) -> tuple[Job | None, _Delta]:
            row = conn.execute(_GET, (job_id, client)).fetchone()
            if row is None:
                return None, _NONE
            job = _job(row)
            if job.state.terminal:
                return job, _NONE
            row = conn.execute(_CANCEL, (now, row[0])).fetchone()
            return _job(row), ({client: -1} if job.state is JobState.QUEUED else _NONE)

        return self._submit(cancel, write=True)

    def counts(self) -> Deferred[dict[JobState, int]]:
        def counts(conn: sqlite3.Connection) -> tuple[dict[JobState, int], _Delta]:
            out = dict.fromkeys(JobState, 0)
            for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                out[JobState(state)] = n
            return out, _NONE

        return self._submit(counts, write=False)

    def queued(self) -> int:
        return self._counts.total

    def queued_for(self, client: str) -> int:
        return self._counts.for_client(client)

    def purge(self, finished_before: float) -> Deferred[list[str]]:
        """Also drops Idempotency-Keys older than ``IDEMPOTENCY_TTL`` by the reactor's
        clock (the argument is about jobs; keys expire on their own schedule)."""
        expired_before = self._reactor.seconds() - IDEMPOTENCY_TTL

        def purge(conn: sqlite3.Connection) -> tuple[list[str], _Delta]:
            conn.execute(_KEY_PURGE, (expired_before,))
            return [row[0] for row in conn.execute(_PURGE, (finished_before,))], _NONE

        return self._submit(purge, write=True)


# -- in the database thread --------------------------------------------------------------


def _open_database(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
    """Migrate, then requeue what a previous process left running; one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise SchemaVersionError(
            f"database schema version {current} is newer than this curlfetch "
            f"(knows up to {len(MIGRATIONS)})"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        for statement in MIGRATIONS[version - 1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
    recovered = conn.execute(
        "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL WHERE state = 'running'"
    ).rowcount
    queued = conn.execute(
        "SELECT client, count(*) FROM jobs WHERE state = 'queued' GROUP BY client"
    ).fetchall()
    return recovered, dict(queued)


@attrs.define
class _Rooms:
    """What a capped claim may still take: in all, per host, per client (absent: the cap)."""

    limit: int
    host_cap: int
    host_room: dict[str, int]
    client_cap: int
    client_room: dict[str, int]


def _pick(conn: sqlite3.Connection, now: float, rooms: _Rooms) -> list[int]:
    """The seqs a capped claim takes: greedy in claim order (see ``_WALK``)."""
    host_room, client_room = dict(rooms.host_room), dict(rooms.client_room)
    full_hosts = [h for h, n in host_room.items() if n <= 0]
    full_clients = [c for c, n in client_room.items() if n <= 0]
    picked: list[int] = []
    after: tuple[int, int] | None = None
    while True:
        params: tuple[object, ...] = (now, json.dumps(full_hosts), json.dumps(full_clients))
        if after is None:
            cursor = conn.execute(_WALK_FROM_START, params)
        else:
            cursor = conn.execute(_WALK_AFTER, (*params, after[0], after[0], after[1]))
        after = None
        skips = 0
        try:
            for seq, priority, host, client in cursor:
                h = host_room.get(host, rooms.host_cap)
                c = client_room.get(client, rooms.client_cap)
                if h <= 0 or c <= 0:
                    skips += 1
                    if skips >= _SKIPS_BEFORE_REQUERY:
                        after = (priority, seq)
                        break
                    continue
                picked.append(seq)
                if len(picked) >= rooms.limit:
                    return picked
                skips = 0
                host_room[host] = h - 1
                client_room[client] = c - 1
                if h == 1:
                    full_hosts.append(host)
                if c == 1:
                    full_clients.append(client)
        finally:
            cursor.close()
        if after is None:
            return picked


def _claimed(rows: Iterable[Sequence[Any]]) -> tuple[list[Job], _Delta]:
    claimed = [(row[0], _job(row)) for row in rows]
    # RETURNING comes in no defined order; restore the claim order.
    claimed.sort(key=lambda sj: (-sj[1].spec.priority, sj[0]))
    jobs = [job for _, job in claimed]
    return jobs, _negated(Counter(job.client for job in jobs))


def _negated(counts: Mapping[str, int]) -> dict[str, int]:
    return {key: -n for key, n in counts.items()}


def _run_batch(conn: sqlite3.Connection, work: list[tuple[_Work, bool]]) -> list[_Outcome]:
    """One transaction, each operation in a savepoint; adbapi commits when this returns."""
    conn.execute("BEGIN IMMEDIATE" if any(write for _, write in work) else "BEGIN")
    outcomes: list[_Outcome] = []
    for fn, _write in work:
        conn.execute("SAVEPOINT op")
        try:
            value, delta = fn(conn)
        except Exception as e:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            outcomes.append(_Outcome(ok=False, value=e, queued_delta=_NONE))
        else:
            conn.execute("RELEASE op")
            outcomes.append(_Outcome(ok=True, value=value, queued_delta=delta))
    return outcomes


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _save_row(job: Job) -> tuple[object, ...]:
    return (
        job.state.value,
        job.attempts,
        job.not_before,
        job.started_at,
        job.finished_at,
        None if job.result is None else _dumps(job.result.to_json()),
        None if job.error is None else _dumps(job.error.to_json()),
        job.id,
    )
