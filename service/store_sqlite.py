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
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from .jobs import Job, JobError, JobResult, JobState, spec_from_stored

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
# With a per-host cap: rank each host's runnable jobs in claim order and take at most its
# room (the JSON object's value for hosts already busy, else the cap), so one host's
# backlog cannot fill a whole claim. PostgreSQL can run the same window query.
_CLAIM_PER_HOST = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608 - constant columns
    "WHERE seq IN (SELECT seq FROM ("
    "SELECT seq, priority, host, ROW_NUMBER() OVER "
    "(PARTITION BY host ORDER BY priority DESC, seq) AS rank "
    "FROM jobs WHERE state = 'queued' AND not_before <= ?) AS ranked "
    "LEFT JOIN (SELECT key AS host, value AS room FROM json_each(?)) AS rooms USING (host) "
    "WHERE rank <= COALESCE(rooms.room, ?) "
    "ORDER BY priority DESC, seq LIMIT ?) "
    f"RETURNING {_COLUMNS}"
)
# With a per-client cap as well: clients and hosts without room are left out first (so
# their backlog cannot rank ahead of others' jobs), then each client's runnable jobs are
# ranked and cut to its room, then what is left is ranked per host and cut to the host's
# room. The result never exceeds a room; it may take fewer than a greedy walk would (a
# client whose first jobs are cut by their host's room), which the next claim makes up.
_CLAIM_PER_HOST_CLIENT = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608 - constant columns
    "WHERE seq IN (SELECT seq FROM ("
    "SELECT seq, priority, host, ROW_NUMBER() OVER "
    "(PARTITION BY host ORDER BY priority DESC, seq) AS hrank FROM ("
    "SELECT seq, priority, host, client, ROW_NUMBER() OVER "
    "(PARTITION BY client ORDER BY priority DESC, seq) AS crank "
    "FROM jobs WHERE state = 'queued' AND not_before <= ? "
    "AND host NOT IN (SELECT key FROM json_each(?) WHERE value <= 0) "
    "AND client NOT IN (SELECT key FROM json_each(?) WHERE value <= 0)) AS by_client "
    "LEFT JOIN (SELECT key AS client, value AS croom FROM json_each(?)) AS crooms "
    "USING (client) WHERE crank <= COALESCE(crooms.croom, ?)) AS by_host "
    "LEFT JOIN (SELECT key AS host, value AS hroom FROM json_each(?)) AS hrooms "
    "USING (host) WHERE hrank <= COALESCE(hrooms.hroom, ?) "
    "ORDER BY priority DESC, seq LIMIT ?) "
    f"RETURNING {_COLUMNS}"
)

_PURGE = (
    "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
    "AND finished_at < ? RETURNING id"
)


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
    """What the store needs from a reactor: a clock for the flush, and the triggers adbapi
    registers. (adbapi also calls ``callFromThread``, which every reactor has, but whose
    argument name differs between them, so a Protocol cannot spell it.)"""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
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
    """The embedded ``JobStore`` (see ``service.store``): one SQLite file, WAL mode.

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
        self._reactor = reactor
        self._pool: _Pool | None = None
        self._closing = False
        self._queued = 0
        self._queued_by: dict[str, int] = {}
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
            self._queued = sum(queued.values())
            self._queued_by = queued
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
                self._count_queued(outcome.queued_delta)
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

    def _count_queued(self, delta: _Delta) -> None:
        by = self._queued_by
        for client, change in delta.items():
            self._queued += change
            left = by.get(client, 0) + change
            if left:
                by[client] = left
            else:
                by.pop(client, None)

    # -- the JobStore interface ------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def ping(conn: sqlite3.Connection) -> tuple[None, _Delta]:
            conn.execute("SELECT 1").fetchone()
            return None, _NONE

        return self._submit(ping, write=False)

    def add(self, jobs: Sequence[Job]) -> Deferred[None]:
        for job in jobs:
            if job.state is not JobState.QUEUED:
                return fail(ValueError(f"job {job.id} is {job.state}, not queued"))
        if not jobs:
            return succeed(None)
        batch = list(jobs)

        def add(conn: sqlite3.Connection) -> tuple[None, _Delta]:
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
        """One ``UPDATE ... WHERE seq IN (SELECT ... LIMIT ?) RETURNING``; the subquery
        walks ``jobs_claim`` in claim order and filters ``not_before`` and hosts."""
        if limit <= 0:
            return succeed([])
        if per_client is not None:
            hosts = dict(host_room or {})
            hosts.update(dict.fromkeys(skip_hosts, 0))
            host_json, client_json = json.dumps(hosts), json.dumps(dict(client_room or {}))
            sql = _CLAIM_PER_HOST_CLIENT
            params: tuple[object, ...] = (
                now,
                now,
                host_json,
                client_json,
                client_json,
                per_client,
                host_json,
                limit if per_host is None else per_host,
                limit,
            )
        elif per_host is not None:
            rooms = dict(host_room or {})
            rooms.update(dict.fromkeys(skip_hosts, 0))
            sql = _CLAIM_PER_HOST
            params = (now, now, json.dumps(rooms), per_host, limit)
        elif skip_hosts:
            sql = _CLAIM_SKIPPING
            params = (now, now, json.dumps(list(skip_hosts)), limit)
        else:
            sql = _CLAIM_ALL
            params = (now, now, limit)

        def claim(conn: sqlite3.Connection) -> tuple[list[Job], _Delta]:
            claimed = [(row[0], _job(row)) for row in conn.execute(sql, params)]
            # RETURNING comes in no defined order; restore the claim order.
            claimed.sort(key=lambda sj: (-sj[1].spec.priority, sj[0]))
            jobs = [job for _, job in claimed]
            return jobs, _negated(Counter(job.client for job in jobs))

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
        return self._queued

    def queued_for(self, client: str) -> int:
        return self._queued_by.get(client, 0)

    def purge(self, finished_before: float) -> Deferred[list[str]]:
        def purge(conn: sqlite3.Connection) -> tuple[list[str], _Delta]:
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


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _row(job: Job) -> tuple[object, ...]:
    spec = job.spec
    return (
        job.id,
        job.client,
        job.state.value,
        spec.priority,
        spec.host,
        job.created_at,
        job.not_before,
        job.started_at,
        job.finished_at,
        job.attempts,
        _dumps(spec.to_json()),
        None if spec.metadata is None else _dumps(spec.metadata),
        None if job.result is None else _dumps(job.result.to_json()),
        None if job.error is None else _dumps(job.error.to_json()),
    )


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


def _job(row: Sequence[Any]) -> Job:
    (
        _seq,
        job_id,
        client,
        state,
        created_at,
        not_before,
        started_at,
        finished_at,
        attempts,
        spec,
        metadata,
        result,
        error,
    ) = row
    return Job(
        id=job_id,
        client=client,
        state=JobState(state),
        spec=spec_from_stored(json.loads(spec), None if metadata is None else json.loads(metadata)),
        created_at=created_at,
        attempts=attempts,
        not_before=not_before,
        started_at=started_at,
        finished_at=finished_at,
        result=None if result is None else JobResult.from_json(json.loads(result)),
        error=None if error is None else JobError.from_json(json.loads(error)),
    )
