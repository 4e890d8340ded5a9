"""``PostgresJobStore``: the ``JobStore`` for several curlfetch instances on one PostgreSQL.

Same semantics as ``SQLiteJobStore`` (``curlfetch.store_sqlite``), with what several
instances need on top:

- **Off the reactor, batched.** psycopg 3 (sync) in threads, never the reactor's. Writes
  queue up; ``reactor.callLater(0)`` flushes the queue as one transaction in the writer
  thread, in call order, and a Deferred fires after its transaction has committed. Each
  call fails alone, as with SQLite's savepoints, but savepoints cost round trips, and
  every round trip makes the thread wait for the GIL while the reactor is busy: a batch
  first runs in pipeline mode without them, and only if a call fails is it rolled back
  and run again with a savepoint per call. Reads (``get``, ``list_jobs``, ``counts``,
  ``ping``) run on reader connections of their own, once the writes submitted before
  them have committed: they see those, and never wait behind later batches (a long
  listing cannot delay a claim). A lost connection fails that batch or read; the next
  one reconnects.
- **Claims.** In batches, priority then FIFO. Without rooms, one ``UPDATE ... WHERE seq
  IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``. With rooms (per host, per client:
  as SQLite's, greedy), the claim index is read in order until enough jobs fit their
  rooms, and those rows are locked (SKIP LOCKED) and marked. Each claimed row gets
  ``owner`` (this instance's id) and ``lease_until`` (the database's clock plus
  ``lease_seconds``).
- **Per-host limits across instances.** With ``max_per_host`` (the deployment's
  ``--max-per-host``, the same on every instance), every claim gives a host at most
  ``max_per_host`` minus its ``running`` rows of all instances; a ``per_host`` and
  ``host_room`` passed in (this instance's own view, as for SQLite) are applied too, less
  the other instances' running rows. Such claims first take one transaction-level
  advisory lock (the first statement of their batch, before any row lock, so it cannot
  deadlock with row locks), so they are serialized across instances and each sees the
  claims committed before it: the running rows of one host, over all instances, never
  exceed ``max_per_host``. A transfer runs only while its row is ``running`` (it starts
  after its claim commits, and its save comes after it ended), so the target never sees
  more at once. The exceptions: an instance whose lease expired while it was still
  alive (reaped; heartbeats every ``lease_seconds / 3`` make this need a stall of a whole
  lease), and a running job cancelled through another instance, whose transfer stops
  when its owner gets the NOTIFY (milliseconds later). The cap is shared, not split:
  one instance may hold all of a host's slots while the others hold none.
- **Leases.** A heartbeat renews this instance's leases every ``lease_seconds / 3``;
  ``save`` only updates rows still ``running`` *and owned by this instance*, so an
  instance whose lease expired cannot overwrite the next run. Every instance reaps:
  each ``refresh_interval`` it requeues ``running`` jobs whose lease expired (attempts
  kept: at-least-once), and ``open()`` does the same, plus jobs a previous process with
  the same ``instance_id`` left running.
- **Wake-ups.** ``NOTIFY curlfetch_wake`` when jobs become runnable (added, requeued,
  reaped); a listener thread calls ``on_wakeup`` on the reactor. A cancelled running job
  sends ``NOTIFY curlfetch_cancel`` to its owner, which calls ``on_cancelled(job_id)``.
  Only an optimization: the scheduler polls every ``poll_interval`` anyway.
- **Counters.** ``queued()``/``queued_for()`` follow this instance's writes exactly (like
  SQLite) and are reset from the database every ``refresh_interval``, which brings in
  the other instances' writes.
- **Schema.** A ``schema_version`` table and numbered migrations, applied by ``open()``
  under a transaction-level advisory lock, so instances starting together migrate once.
  The schema is the connection's ``search_path`` (created if missing): tests and
  deployments can share a database.

The reactor is injected; this module never imports the global reactor.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

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

# One exception type for both backends: the API maps it to 503.
from .store_sqlite import SchemaVersionError, StoreClosedError

__all__ = [
    "DEFAULT_LEASE",
    "PostgresJobStore",
    "SchemaVersionError",
    "StoreClosedError",
    "default_instance_id",
    "is_postgres_url",
    "redact_dsn",
]

log = Logger()

Conn = psycopg.Connection[TupleRow]

DEFAULT_LEASE = 30.0
"""Seconds a claim stays leased without a heartbeat: how long a dead instance's jobs wait
before another instance runs them."""

WAKE_CHANNEL = "curlfetch_wake"
CANCEL_CHANNEL = "curlfetch_cancel"
_LOCK_MIGRATE = 0x43460001
"""Advisory lock keys (the second key is ``hashtext`` of the schema name)."""
_LOCK_CLAIM = 0x43460002
_LISTEN_POLL = 0.25
READERS = 2
"""Reader connections (threads): reads never wait behind the writer's batches."""
"""Seconds the listener waits for a notification before it checks whether to stop."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: jobs and Idempotency-Keys: SQLite's migrations 1 and 2 in PostgreSQL's types.
    # Partial indexes serve the hot paths: the claim walks queued rows in claim order,
    # the per-host count reads running rows by host, the reaper running rows by lease,
    # the heartbeat running rows by owner, the counters queued rows by client.
    (
        """
        CREATE TABLE jobs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            client TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            priority INTEGER NOT NULL,
            host TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            not_before DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL,
            spec TEXT NOT NULL,
            metadata TEXT,
            result TEXT,
            error TEXT,
            owner TEXT,
            lease_until DOUBLE PRECISION
        )
        """,
        "CREATE INDEX jobs_claim ON jobs (priority DESC, seq) WHERE state = 'queued'",
        "CREATE INDEX jobs_queued_client ON jobs (client) WHERE state = 'queued'",
        "CREATE INDEX jobs_running_host ON jobs (host) WHERE state = 'running'",
        "CREATE INDEX jobs_running_lease ON jobs (lease_until) WHERE state = 'running'",
        "CREATE INDEX jobs_running_owner ON jobs (owner) WHERE state = 'running'",
        "CREATE INDEX jobs_client ON jobs (client, id DESC)",
        "CREATE INDEX jobs_finished ON jobs (finished_at) "
        "WHERE state IN ('succeeded', 'failed', 'cancelled')",
        """
        CREATE TABLE idempotency_keys (
            client TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('reserved', 'done')),
            owner TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            status INTEGER,
            headers TEXT,
            body BYTEA,
            PRIMARY KEY (client, key),
            CHECK (state = 'reserved' OR (status IS NOT NULL AND headers IS NOT NULL
                AND body IS NOT NULL))
        )
        """,
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)",
    ),
)
"""Migration N (1-based) brings the schema from version N-1 to N. Append; never edit."""

_DB_NOW = "extract(epoch FROM clock_timestamp())"
"""Leases use the database's clock, shared by every instance (theirs may drift)."""

_COLUMNS = (
    "seq, id, client, state, created_at, not_before, started_at, finished_at, attempts, "
    "spec, metadata, result, error"
)
_J_COLUMNS = ", ".join(f"j.{c.strip()}" for c in _COLUMNS.split(","))

# The SQL is built from these constant fragments only; every value is a parameter.
_SELECT = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608
_GET = f"{_SELECT} WHERE id = %s AND client = %s"
_GET_FOR_CANCEL = f"SELECT {_COLUMNS}, owner FROM jobs WHERE id = %s AND client = %s FOR UPDATE"  # noqa: S608
_CANCEL = (
    "UPDATE jobs SET state = 'cancelled', finished_at = %s, owner = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE seq = %s RETURNING {_COLUMNS}"
)

_INSERT = (
    "INSERT INTO jobs (id, client, state, priority, host, created_at, not_before, "
    "started_at, finished_at, attempts, spec, metadata, result, error) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::text[], "
    "%s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::int[], %s::text[], "
    "%s::text[], %s::text[], %s::text[])"
)

_SAVE = (
    "UPDATE jobs AS j SET state = v.state, attempts = v.attempts, not_before = v.not_before, "
    "started_at = v.started_at, finished_at = v.finished_at, result = v.result, "
    "error = v.error, owner = NULL, lease_until = NULL "
    "FROM unnest(%s::text[], %s::text[], %s::int[], %s::float8[], %s::float8[], "
    "%s::float8[], %s::text[], %s::text[]) "
    "AS v(id, state, attempts, not_before, started_at, finished_at, result, error) "
    "WHERE j.id = v.id AND j.state = 'running' AND j.owner = %s "
    "RETURNING j.client, j.state"
)

_CLAIM_SET = (
    "SET state = 'running', attempts = j.attempts + 1, started_at = %(now)s, "
    f"owner = %(me)s, lease_until = {_DB_NOW} + %(lease)s "
)
# Without a per-host cap: the claim index in order, skipping hosts and locked rows.
_CLAIM_SIMPLE = (
    f"UPDATE jobs AS j {_CLAIM_SET}"  # noqa: S608 - constant fragments
    "WHERE j.seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND not_before <= %(now)s "
    "AND NOT (host = ANY(%(skip)s::text[])) ORDER BY priority DESC, seq LIMIT %(limit)s "
    "FOR UPDATE SKIP LOCKED) "
    f"RETURNING {_J_COLUMNS}"
)
# With rooms: the claim index walked in claim order (in chunks, until ``limit`` jobs are
# picked), skipping hosts and clients without room in SQL and counting
# the others' picks in Python; then the picked rows are locked (SKIP LOCKED) and marked.
# A host's room: this instance's (``host_room``, else the default) less the other
# instances' running jobs when ``host_room`` is this instance's view, and at most the
# shared cap less every running job of the host. For the hosts given or running; any
# other host has the default (at most the shared cap).
_ROOMS_CTE = (
    "WITH hroom AS (SELECT * FROM unnest(%(hosts)s::text[], %(hrooms)s::int[]) AS h(host, room)), "
    "busy AS (SELECT host, count(*) FILTER (WHERE owner <> %(me)s)::int AS others, "
    "count(*)::int AS total FROM jobs WHERE state = 'running' GROUP BY host), "
    "room AS (SELECT host, LEAST(COALESCE(hroom.room, %(default)s) "
    "- CASE WHEN %(count_others)s THEN COALESCE(busy.others, 0) ELSE 0 END, "
    "%(shared)s - COALESCE(busy.total, 0)) AS room FROM hroom FULL JOIN busy USING (host)) "
)
_ROOMS = _ROOMS_CTE + "SELECT host, room FROM room"  # noqa: S608 - constant fragments
_WALK = (
    "SELECT seq, priority, host, client FROM jobs WHERE state = 'queued' "
    "AND not_before <= %(now)s AND NOT (client = ANY(%(full_clients)s::text[])) "
)
_ORDER = "ORDER BY priority DESC, seq LIMIT %(chunk)s"
# The first chunk leaves out the hosts without room in the same statement as _ROOMS
# (both go out together: one round trip).
_WALK_FIRST = (
    _ROOMS_CTE  # noqa: S608 - constant fragments
    + _WALK
    + "AND NOT (host = ANY(ARRAY(SELECT host FROM room WHERE room <= 0))) "
    + _ORDER
)
# The next chunk, after the last row read (keyset pagination in claim order).
_WALK_NEXT = (
    _WALK
    + "AND NOT (host = ANY(%(full_hosts)s::text[])) "
    + "AND (priority < %(priority)s OR (priority = %(priority)s AND seq > %(seq)s)) "
    + _ORDER
)
_CLAIM_PICKED = (
    f"UPDATE jobs AS j {_CLAIM_SET}"  # noqa: S608 - constant fragments
    "FROM (SELECT seq FROM jobs WHERE seq = ANY(%(picked)s::bigint[]) AND state = 'queued' "
    "FOR UPDATE SKIP LOCKED) AS p WHERE j.seq = p.seq "
    f"RETURNING {_J_COLUMNS}"
)

_RENEW = f"UPDATE jobs SET lease_until = {_DB_NOW} + %s WHERE state = 'running' AND owner = %s"  # noqa: S608
_REAP = (
    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE state = 'running' AND lease_until < {_DB_NOW} RETURNING client"
)
_RECOVER_OWN = (
    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "
    "WHERE state = 'running' AND (owner = %s OR owner IS NULL) RETURNING client"
)
_QUEUED_COUNTS = "SELECT client, count(*) FROM jobs WHERE state = 'queued' GROUP BY client"
_PURGE = (
    "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
    "AND finished_at < %s RETURNING id"
)

_KEY_GET = (
    "SELECT fingerprint, state, owner, created_at, status, headers, body "
    "FROM idempotency_keys WHERE client = %s AND key = %s FOR UPDATE"
)
_KEY_INSERT = (
    "INSERT INTO idempotency_keys (client, key, fingerprint, state, owner, created_at) "
    "VALUES (%s, %s, %s, 'reserved', %s, %s) ON CONFLICT (client, key) DO NOTHING RETURNING 1"
)
_KEY_TAKE_OVER = (
    "UPDATE idempotency_keys SET fingerprint = %s, state = 'reserved', owner = %s, "
    "created_at = %s, status = NULL, headers = NULL, body = NULL WHERE client = %s AND key = %s"
)
_KEY_RECORD = (
    "UPDATE idempotency_keys SET state = 'done', owner = NULL, status = %s, headers = %s, "
    "body = %s WHERE client = %s AND key = %s AND state = 'reserved' AND owner = %s RETURNING 1"
)
_KEY_RELEASE = (
    "DELETE FROM idempotency_keys "
    "WHERE client = %s AND key = %s AND state = 'reserved' AND owner = %s"
)
_KEY_PURGE = "DELETE FROM idempotency_keys WHERE created_at <= %s"


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact_dsn(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url


def default_instance_id() -> str:
    """``host-pid-random``: unique per process, readable in ``jobs.owner``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# Runs in the database thread: returns its value and the change to the queued count of
# each client it touched.
_Delta = Mapping[str, int]


@attrs.frozen
class _Later:
    """What a call whose statements cannot fail in Python returns instead of its result:
    how to read the result once the batch's statements have been synced. In a batch,
    such calls cost no round trip of their own."""

    finish: Callable[[], tuple[Any, _Delta]]


_Work = Callable[[Conn], "tuple[Any, _Delta] | _Later"]
_NONE: _Delta = {}


@attrs.define
class _Op:
    work: _Work
    deferred: Deferred[Any]
    claim_lock: bool = False
    """Take the claim lock at the start of the batch (a claim with a per-host cap)."""
    recount: bool = False
    """The value is ``(value, counts)``: ``counts`` replaces the queued counters."""


@attrs.frozen
class _Read:
    work: _Work
    deferred: Deferred[Any]
    after: int
    """How many writes were submitted before it: it runs once they have settled."""


@attrs.frozen
class _Outcome:
    ok: bool
    value: Any
    queued_delta: _Delta


class PostgresJobStore:
    """The ``JobStore`` (see ``curlfetch.store``) for several instances on one PostgreSQL.

    ``dsn``: a libpq URL or conninfo string; the schema is its ``search_path`` (``public``
    by default). ``instance_id`` names this instance's claims (``jobs.owner``); it must be
    unique among live instances. ``on_wakeup``/``on_cancelled`` are called on the
    reactor when another instance makes jobs runnable or cancels one of ours.

    ``transactions`` counts committed batches; ``skipped_saves`` counts saved jobs no
    longer ``running`` under this instance (cancelled, or reaped after a lost lease).
    """

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        instance_id: str | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE,
        refresh_interval: float = 1.0,
        connect_timeout: float = 10.0,
        max_per_host: int | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be more than 0")
        self.dsn = dsn
        self.instance_id = instance_id or default_instance_id()
        self.owner = f"{self.instance_id}/{uuid.uuid4().hex[:8]}"
        """Names this store's Idempotency-Key reservations, as in SQLite: unique per store
        object, so a restart under the same instance id still abandons its predecessor's."""
        self.lease_seconds = lease_seconds
        self.refresh_interval = min(refresh_interval, lease_seconds / 2)
        self.connect_timeout = connect_timeout
        self.max_per_host = max_per_host
        """Running jobs per host over all instances, applied to every claim (also those
        that pass no ``per_host``: the scheduler omits it when its own room is ample)."""
        self.on_wakeup: Callable[[], object] | None = None
        self.on_cancelled: Callable[[str], object] | None = None
        self.transactions = 0
        self.skipped_saves = 0
        self.reaped = 0
        """Jobs of dead instances this one has put back to ``queued``."""
        self.schema = ""
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._conn: Conn | None = None  # used in the pool's thread only
        self._closing = False
        self._counts = QueuedCounts()
        self._pending: list[_Op] = []
        self._flush_call: IDelayedCall | None = None
        self._in_flight = False
        self._idle_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._read_pool: ThreadPool | None = None
        self._idle_readers: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._written = 0  # writes submitted
        self._settled = 0  # writes whose batch has committed (or failed)
        self._parked: deque[_Read] = deque()  # reads waiting for earlier writes
        self._reads_in_flight = 0
        self._loops: list[LoopingCall] = []
        self._listener: Deferred[None] | None = None
        self._listen_pool: ThreadPool | None = None
        self._stop_listening = threading.Event()
        self.listening = False
        """True while the NOTIFY listener is connected."""

    def __repr__(self) -> str:
        return f"<PostgresJobStore {redact_dsn(self.dsn)} instance={self.instance_id}>"

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> Deferred[int]:
        if self._pool is not None:
            return fail(RuntimeError("the store is already open"))
        pool = ThreadPool(minthreads=1, maxthreads=1, name="curlfetch-postgres")
        pool.start()
        self._pool = pool
        readers = ThreadPool(minthreads=0, maxthreads=READERS, name="curlfetch-postgres-read")
        readers.start()
        self._read_pool = readers
        self._closing = False
        self._stop_listening.clear()
        return Deferred.fromCoroutine(self._open(pool))

    async def _open(self, pool: ThreadPool) -> int:
        try:
            schema, recovered, queued = await threads.deferToThreadPool(
                self._reactor, pool, self._open_database
            )
        except BaseException:
            self._pool = None
            await threads.deferToThreadPool(self._reactor, pool, self._disconnect)
            pool.stop()
            if self._read_pool is not None:
                self._read_pool.stop()
                self._read_pool = None
            raise
        self.schema = schema
        self._counts.reset(queued)
        self._start_listener()
        for interval, tick in (
            (self.lease_seconds / 3, self._heartbeat),
            (self.refresh_interval, self._maintain),
        ):
            loop = LoopingCall(tick)
            loop.clock = self._reactor
            loop.start(interval, now=False).addErrback(
                lambda f: log.failure("store maintenance stopped", f)
            )
            self._loops.append(loop)
        return recovered

    def _open_database(self) -> tuple[str, int, dict[str, int]]:
        """Migrate under the migration lock, then requeue what a previous process with our
        instance id left running and whatever has an expired lease; one transaction."""
        conn = self._connection()
        with conn.transaction():
            schema = _ensure_schema(conn)
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_MIGRATE, schema))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = _scalar(conn, "SELECT coalesce(max(version), 0) FROM schema_version")
            if current > len(MIGRATIONS):
                raise SchemaVersionError(
                    f"database schema version {current} is newer than this curlfetch "
                    f"(knows up to {len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (%s, %s)", (version, time.time()))
            own = conn.execute(_RECOVER_OWN, (self.instance_id,)).rowcount
            expired = conn.execute(_REAP).rowcount
            if own + expired:
                _notify(conn, WAKE_CHANNEL, schema, self.instance_id)
            queued = {c: n for c, n in conn.execute(_QUEUED_COUNTS)}
        return schema, own + expired, queued

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
        """Stop the timers and the listener, flush what is queued, then disconnect."""
        pool = self._pool
        assert pool is not None
        failure: Failure | None = None
        try:
            for loop in self._loops:
                if loop.running:
                    loop.stop()
            self._loops.clear()
            self._stop_listening.set()
            if self._listener is not None:
                await self._listener
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
                self._flush_call = None
                self._flush()
            while self._in_flight or self._pending or self._parked or self._reads_in_flight:
                waiter: Deferred[None] = Deferred()
                self._idle_waiters.append(waiter)
                await waiter
            await threads.deferToThreadPool(self._reactor, pool, self._disconnect)
            if self._read_pool is not None:
                await threads.deferToThreadPool(self._reactor, self._read_pool, self._close_readers)
        except Exception:
            failure = Failure()
        finally:
            pool.stop()
            if self._read_pool is not None:
                self._read_pool.stop()
                self._read_pool = None
            if self._listen_pool is not None:
                self._listen_pool.stop()
                self._listen_pool = None
            self._listener = None
            self.listening = False
            self._pool = None
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                if failure is None:
                    w.callback(None)
                else:
                    w.errback(failure)

    # -- the connection, in the pool's thread ----------------------------------------------

    def _connect(self) -> Conn:
        return psycopg.connect(
            self.dsn,
            autocommit=True,  # every transaction is an explicit BEGIN ... COMMIT
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=f"curlfetch {self.instance_id}"[:63],
        )

    def _connection(self) -> Conn:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._conn = self._connect()
            # A queue's statistics are stale most of the time (autovacuum analyzes a
            # table a minute after a burst at best): told "a hundred queued rows" while
            # there are 20,000, the planner sorts them all for a claim (15 ms) instead of
            # reading the first ones off jobs_claim (0.05 ms). Every statement here has an
            # index in the order it wants, so without sorts it always finds that plan.
            conn.execute("SET enable_sort = off")
        return conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run_batch(self, ops: list[tuple[_Work, bool]]) -> list[_Outcome]:
        """One transaction for the batch; commits when this returns.

        Each call in a batch must fail alone, as with SQLite's savepoints, but a
        savepoint costs two round trips per call, each of which waits for the GIL when
        the reactor is busy. So the batch first runs without them; if any call fails,
        the transaction is rolled back and the batch runs again, each call in its own
        savepoint. (Nothing was committed, and a call only touches the database.)"""
        lock = any(lock for _, lock in ops)
        conn = self._connection()
        try:
            try:
                return _attempt(conn, ops, lock)
            except _ReplayError:
                return _attempt_careful(conn, ops, lock)
        except Exception:
            if _gone(conn):
                self._disconnect()  # reconnect for the next batch
            raise

    # -- the queue -------------------------------------------------------------------------

    def _submit(
        self, work: _Work, *, claim_lock: bool = False, recount: bool = False
    ) -> Deferred[Any]:
        """A write: queued for the next batch of the writer thread."""
        if self._pool is None or self._closing:
            return fail(StoreClosedError(f"{self!r}: the job store is not open"))
        d: Deferred[Any] = Deferred()
        self._written += 1
        self._pending.append(_Op(work, d, claim_lock, recount))
        self._schedule()
        return d

    def _read(self, work: _Work) -> Deferred[Any]:
        """A read: on a reader connection, as soon as every write submitted before it
        has committed (so it sees them), without waiting behind the writes after it."""
        if self._pool is None or self._closing:
            return fail(StoreClosedError(f"{self!r}: the job store is not open"))
        read = _Read(work, Deferred(), self._written)
        if read.after <= self._settled:
            self._dispatch(read)
        else:
            self._parked.append(read)
        return read.deferred

    def _dispatch(self, read: _Read) -> None:
        assert self._read_pool is not None
        self._reads_in_flight += 1
        d = threads.deferToThreadPool(self._reactor, self._read_pool, self._run_read, read.work)
        d.addBoth(self._read_done, read)

    def _read_done(self, result: object, read: _Read) -> None:
        self._reads_in_flight -= 1
        if not read.deferred.called:  # else: cancelled by its caller
            if isinstance(result, Failure):
                read.deferred.errback(result)
            else:
                read.deferred.callback(result)
        self._check_idle()

    def _run_read(self, work: _Work) -> Any:
        """In a reader thread: one statement in autocommit, on an idle connection."""
        try:
            conn = self._idle_readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
            conn.execute("SET enable_sort = off")  # see _connection
        try:
            result = work(conn)
            value, _delta = result.finish() if isinstance(result, _Later) else result
        except BaseException:
            if _gone(conn):
                conn.close()  # the next read connects anew
            else:
                self._idle_readers.put(conn)
            raise
        self._idle_readers.put(conn)
        return value

    def _close_readers(self) -> None:
        while True:
            try:
                self._idle_readers.get_nowait().close()
            except queue.Empty:
                return

    def _check_idle(self) -> None:
        if self._in_flight or self._pending or self._parked or self._reads_in_flight:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)

    def _schedule(self) -> None:
        if self._pending and not self._in_flight and self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._in_flight or not self._pending:
            return
        ops, self._pending = self._pending, []
        self._in_flight = True
        assert self._pool is not None
        work = [(op.work, op.claim_lock) for op in ops]
        d = threads.deferToThreadPool(self._reactor, self._pool, self._run_batch, work)
        d.addBoth(self._flushed, ops)

    def _flushed(self, result: list[_Outcome] | Failure, ops: list[_Op]) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            # BEGIN, the claim lock or COMMIT failed: the batch was rolled back.
            for op in ops:
                if not op.deferred.called:
                    op.deferred.errback(result)
        else:
            self.transactions += 1
            for op, outcome in zip(ops, result, strict=True):
                value = outcome.value
                if op.recount and outcome.ok:
                    value, counts = value
                    self._counts.reset(counts)
                else:
                    self._counts.apply(outcome.queued_delta)
                if op.deferred.called:  # cancelled by its caller; the write still happened
                    continue
                if outcome.ok:
                    op.deferred.callback(value)
                else:
                    op.deferred.errback(Failure(value))
        # The reads that were waiting for these writes (committed or failed) can go.
        self._settled += len(ops)
        while self._parked and self._parked[0].after <= self._settled:
            self._dispatch(self._parked.popleft())
        self._schedule()
        self._check_idle()

    # -- heartbeat, reaper, counters -------------------------------------------------------

    def _heartbeat(self) -> Deferred[None]:
        """Renew the leases of every job this instance holds."""
        lease, me = self.lease_seconds, self.instance_id

        def renew(conn: Conn) -> _Later:
            cursor = conn.execute(_RENEW, (lease, me))
            return _Later(lambda: (cursor.rowcount, _NONE))

        def failed(failure: Failure) -> None:
            if not failure.check(StoreClosedError):
                log.failure("renewing the job leases failed", failure)

        return self._submit(renew).addCallbacks(lambda _: None, failed)

    def _maintain(self) -> Deferred[None]:
        """Requeue jobs whose lease expired (their instance is gone) and reset the queued
        counters from the database (other instances' writes)."""
        schema, me = self.schema, self.instance_id

        def maintain(conn: Conn) -> tuple[tuple[int, dict[str, int]], _Delta]:
            # Fetched, not rowcount: in pipeline mode that is known only after a sync.
            reaped = len(conn.execute(_REAP).fetchall())
            if reaped:
                _notify(conn, WAKE_CHANNEL, schema, me)
            counts = {c: n for c, n in conn.execute(_QUEUED_COUNTS)}
            return (reaped, counts), _NONE

        def done(reaped: int) -> None:
            if reaped:
                self.reaped += reaped
                log.info("requeued {count} jobs whose lease expired", count=reaped)
                self._wake()

        def failed(failure: Failure) -> None:
            if not failure.check(StoreClosedError):
                log.failure("store maintenance failed", failure)

        return self._submit(maintain, recount=True).addCallbacks(done, failed)

    # -- notifications ---------------------------------------------------------------------

    def _start_listener(self) -> None:
        listen_pool = ThreadPool(minthreads=1, maxthreads=1, name="curlfetch-postgres-listen")
        listen_pool.start()
        self._listen_pool = listen_pool
        self._listener = threads.deferToThreadPool(
            self._reactor, listen_pool, self._listen
        ).addErrback(lambda f: log.failure("the NOTIFY listener stopped", f))

    def _listen(self) -> None:
        """In its own thread: LISTEN on a connection of its own until ``close()``; each
        notification is handed to the reactor. Reconnects after a lost connection (and
        wakes the scheduler then: notifications may have been missed meanwhile)."""
        stop = self._stop_listening
        backoff = 0.5
        while not stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {WAKE_CHANNEL}")
                    conn.execute(f"LISTEN {CANCEL_CHANNEL}")
                    backoff = 0.5
                    self._reactor.callFromThread(self._listening, True)
                    while not stop.is_set():
                        for note in conn.notifies(timeout=_LISTEN_POLL):
                            self._reactor.callFromThread(self._notified, note.channel, note.payload)
            except psycopg.Error as e:
                self._reactor.callFromThread(self._listening, False)
                self._reactor.callFromThread(
                    log.warn, "NOTIFY listener: {error}; reconnecting", error=str(e)
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _listening(self, up: bool) -> None:
        self.listening = up
        if up:
            self._wake()  # notifications may have been missed while it was down

    def _notified(self, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("schema") != self.schema:
            return  # another deployment sharing the database
        if channel == WAKE_CHANNEL and message.get("from") != self.instance_id:
            self._wake()
        elif channel == CANCEL_CHANNEL and message.get("owner") == self.instance_id:
            callback = self.on_cancelled
            if callback is not None:
                try:
                    callback(str(message.get("job")))
                except Exception:
                    log.failure("on_cancelled failed")

    def _wake(self) -> None:
        callback = self.on_wakeup
        if callback is not None and not self._closing:
            try:
                callback()
            except Exception:
                log.failure("on_wakeup failed")

    # -- the JobStore interface ------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def ping(conn: Conn) -> tuple[None, _Delta]:
            conn.execute("SELECT 1").fetchone()
            return None, _NONE

        return self._read(ping)

    def reserve_key(
        self, client: str, key: str, fingerprint: str, now: float
    ) -> Deferred[StoredResponse | None]:
        """As in SQLite; the row is read ``FOR UPDATE`` and a new one inserted with ``ON
        CONFLICT DO NOTHING``, so two instances reserving one key at once are serialized:
        the second sees the first's reservation (and gets 409), never overwrites it."""
        owner = self.owner

        def reserve(conn: Conn) -> tuple[StoredResponse | None, _Delta]:
            for _ in range(3):
                row = conn.execute(_KEY_GET, (client, key)).fetchone()
                if row is None:
                    inserted = conn.execute(
                        _KEY_INSERT, (client, key, fingerprint, owner, now)
                    ).fetchone()
                    if inserted is not None:
                        return None, _NONE
                    continue  # another instance inserted it just now: read it
                stored = judge_key(row, key, fingerprint, owner, now)
                if stored is not None:
                    return stored, _NONE
                conn.execute(_KEY_TAKE_OVER, (fingerprint, owner, now, client, key))
                return None, _NONE
            raise IdempotencyInProgressError(
                f"the request with Idempotency-Key {key!r} is still in progress"
            )

        return self._submit(reserve)

    def release_key(self, client: str, key: str) -> Deferred[None]:
        owner = self.owner

        def release(conn: Conn) -> tuple[None, _Delta]:
            conn.execute(_KEY_RELEASE, (client, key, owner))
            return None, _NONE

        return self._submit(release)

    def add(
        self, jobs: Sequence[Job], idempotency: IdempotencyRecord | None = None
    ) -> Deferred[None]:
        for job in jobs:
            if job.state is not JobState.QUEUED:
                return fail(ValueError(f"job {job.id} is {job.state}, not queued"))
        if not jobs and idempotency is None:
            return succeed(None)
        columns = _columns([_row(job) for job in jobs], 14)
        clients = Counter(job.client for job in jobs)
        record = idempotency
        owner, schema, me = self.owner, self.schema, self.instance_id

        def add(conn: Conn) -> tuple[None, _Delta] | _Later:
            if record is not None:
                # First: if the reservation is lost, the savepoint drops nothing but this.
                response = record.response
                headers = _dumps([list(pair) for pair in response.headers])
                params = (response.status, headers, response.body, record.client, record.key)
                if conn.execute(_KEY_RECORD, (*params, owner)).fetchone() is None:
                    raise IdempotencyInProgressError(
                        f"Idempotency-Key {record.key!r} is no longer reserved by this store"
                    )
            if clients:
                conn.execute(_INSERT, columns)
                _notify(conn, WAKE_CHANNEL, schema, me)
            # The insert fails only as a statement (a duplicate id), which the batch's
            # sync reports: nothing to wait for here.
            return _Later(lambda: (None, clients))

        return self._submit(add)

    def get(self, client: str, job_id: str) -> Deferred[Job | None]:
        def get(conn: Conn) -> tuple[Job | None, _Delta]:
            row = conn.execute(_GET, (job_id, client)).fetchone()
            return (None if row is None else _job(row)), _NONE

        return self._read(get)

    def list_jobs(
        self, client: str, state: JobState | None, limit: int, before_id: str | None
    ) -> Deferred[list[Job]]:
        where = ["client = %s"]
        params: list[object] = [client]
        if state is not None:
            where.append("state = %s")
            params.append(state.value)
        if before_id is not None:
            where.append("id < %s")
            params.append(before_id)
        query = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s"
        params.append(max(0, limit))

        def list_jobs(conn: Conn) -> tuple[list[Job], _Delta]:
            return [_job(row) for row in conn.execute(query, params)], _NONE

        return self._read(list_jobs)

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
        """Rooms as in SQLite, plus the other instances' running jobs per host (see the
        module docstring: with a per-host cap, claims are serialized across instances).

        With rooms, the pick is greedy in claim order: a job is taken unless its host or
        its client has no room left. That never exceeds a room, and it takes at least what
        SQLite's ranking takes (which may leave a client's job behind for a host whose
        room its earlier jobs used up)."""
        if limit <= 0:
            return succeed([])
        params: dict[str, object] = {
            "now": now,
            "me": self.instance_id,
            "lease": self.lease_seconds,
            "limit": limit,
        }
        shared = self.max_per_host
        if per_host is None and per_client is None and shared is None:
            query = _CLAIM_SIMPLE
            params["skip"] = list(skip_hosts)

            def claim_plain(conn: Conn) -> _Later:
                cursor = conn.execute(query, params)
                return _Later(lambda: _claimed(cursor))

            return self._submit(claim_plain)

        rooms = _Rooms(
            me=self.instance_id,
            limit=limit,
            per_host=per_host,
            host_room={**(host_room or {}), **dict.fromkeys(skip_hosts, 0)},
            shared=shared,
            per_client=per_client,
            client_room=dict(client_room or {}) if per_client is not None else {},
        )

        def claim(conn: Conn) -> tuple[list[Job], _Delta] | _Later:
            picked = rooms.pick(conn, now)
            if not picked:
                return [], _NONE
            cursor = conn.execute(_CLAIM_PICKED, {**params, "picked": picked})
            return _Later(lambda: _claimed(cursor))

        # Host caps are shared between instances: serialize the claims that apply one.
        return self._submit(claim, claim_lock=per_host is not None or shared is not None)

    def save(self, jobs: Sequence[Job]) -> Deferred[None]:
        """Only jobs still ``running`` under this instance are updated: a job cancelled
        while it ran stays cancelled, and an instance whose lease expired cannot overwrite
        the next run (both counted in ``skipped_saves``)."""
        if not jobs:
            return succeed(None)
        columns = _columns([_save_row(job) for job in jobs], 8)
        count = len(jobs)
        me, schema = self.instance_id, self.schema

        requeues = any(job.state is JobState.QUEUED for job in jobs)

        def save(conn: Conn) -> _Later:
            cursor = conn.execute(_SAVE, (*columns, me))
            if requeues:
                _notify(conn, WAKE_CHANNEL, schema, me)  # e.g. a drain hands its jobs over

            def finish() -> tuple[int, _Delta]:
                rows = cursor.fetchall()
                back = Counter(c for c, state in rows if state == JobState.QUEUED.value)
                return count - len(rows), back

            return _Later(finish)

        def skipped(n: int) -> None:
            self.skipped_saves += n

        return self._submit(save).addCallback(skipped)

    def cancel(self, client: str, job_id: str, now: float) -> Deferred[Job | None]:
        """A running job owned by another instance is cancelled here and its owner told
        (NOTIFY), so that it stops the transfer."""
        schema, me = self.schema, self.instance_id

        def cancel(conn: Conn) -> tuple[Job | None, _Delta]:
            row = conn.execute(_GET_FOR_CANCEL, (job_id, client)).fetchone()
            if row is None:
                return None, _NONE
            job, owner = _job(row[:-1]), row[-1]
            if job.state.terminal:
                return job, _NONE
            after = conn.execute(_CANCEL, (now, row[0])).fetchone()
            assert after is not None
            if job.state is JobState.RUNNING and owner is not None and owner != me:
                payload = {"schema": schema, "job": job_id, "owner": owner}
                conn.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, _dumps(payload)))
            return _job(after), ({client: -1} if job.state is JobState.QUEUED else _NONE)

        return self._submit(cancel)

    def counts(self) -> Deferred[dict[JobState, int]]:
        def counts(conn: Conn) -> tuple[dict[JobState, int], _Delta]:
            out = dict.fromkeys(JobState, 0)
            for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                out[JobState(state)] = n
            return out, _NONE

        return self._read(counts)

    def queued(self) -> int:
        return self._counts.total

    def queued_for(self, client: str) -> int:
        return self._counts.for_client(client)

    def purge(self, finished_before: float) -> Deferred[list[str]]:
        """Also drops Idempotency-Keys older than ``IDEMPOTENCY_TTL`` by the reactor's
        clock, as in SQLite."""
        expired_before = self._reactor.seconds() - IDEMPOTENCY_TTL

        def purge(conn: Conn) -> tuple[list[str], _Delta]:
            conn.execute(_KEY_PURGE, (expired_before,))
            return [row[0] for row in conn.execute(_PURGE, (finished_before,))], _NONE

        return self._submit(purge)


# -- in the database thread --------------------------------------------------------------


_WALK_CHUNK = 64
_NO_CAP = 2**31 - 1


@attrs.frozen
class _Rooms:
    """A claim's rooms; ``pick`` runs in the database thread, under the claim lock."""

    me: str
    limit: int
    per_host: int | None
    host_room: dict[str, int]
    shared: int | None
    per_client: int | None
    client_room: dict[str, int]

    def pick(self, conn: Conn, now: float) -> list[int]:
        """The seqs to claim: the claim index in order, each host and client up to its
        room, ``limit`` in all."""
        default = self.per_host if self.per_host is not None else (self.shared or self.limit)
        client_left = dict(self.client_room)
        chunk = max(4 * self.limit, _WALK_CHUNK)
        params: dict[str, object] = {
            "hosts": list(self.host_room),
            "hrooms": list(self.host_room.values()),
            "me": self.me,
            "default": default,
            "count_others": self.per_host is not None,  # host_room: this instance's jobs
            "shared": _NO_CAP if self.shared is None else self.shared,
            "now": now,
            "full_clients": [c for c, n in client_left.items() if n <= 0],
            "chunk": chunk,
        }
        with conn.pipeline():
            rooms_cur = conn.execute(_ROOMS, params)
            rows_cur = conn.execute(_WALK_FIRST, params)
        host_left: dict[str, int] = dict(rooms_cur.fetchall())
        rows = rows_cur.fetchall()
        other_host = default if self.shared is None else min(default, self.shared)
        picked: list[int] = []
        while True:
            for seq, _priority, host, client in rows:
                hleft = host_left.get(host, other_host)
                cleft = client_left.get(client, self.per_client)
                if hleft <= 0 or (cleft is not None and cleft <= 0):
                    continue
                picked.append(seq)
                host_left[host] = hleft - 1
                if cleft is not None:
                    client_left[client] = cleft - 1
                if len(picked) >= self.limit:
                    return picked
            if len(rows) < chunk:
                return picked
            # Rare: a chunk's rows were mostly of hosts or clients that ran out of room.
            last = rows[-1]
            params.update(
                priority=last[1],
                seq=last[0],
                full_hosts=[h for h, n in host_left.items() if n <= 0],
                full_clients=[c for c, n in client_left.items() if n <= 0],
            )
            rows = conn.execute(_WALK_NEXT, params).fetchall()


def _claimed(cursor: psycopg.Cursor[TupleRow]) -> tuple[list[Job], _Delta]:
    claimed = [(row[0], _job(row)) for row in cursor]
    # RETURNING comes in no defined order; restore the claim order.
    claimed.sort(key=lambda sj: (-sj[1].spec.priority, sj[0]))
    jobs = [job for _, job in claimed]
    return jobs, {c: -n for c, n in Counter(job.client for job in jobs).items()}


class _ReplayError(Exception):
    """A call failed in a batch run without savepoints: run it again with them."""


_LOCK = b"SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))"


def _attempt(conn: Conn, ops: list[tuple[_Work, bool]], lock: bool) -> list[_Outcome]:
    """Run the batch in one transaction, in pipeline mode: statements go out without
    waiting for each other; a call's own fetches sync, and ``_Later`` results are read
    after one sync for all. COMMIT goes out only once every result has been read. If
    anything fails while the connection lives, the transaction is rolled back and
    ``_ReplayError`` raised (run it again with ``_attempt_careful``)."""
    try:
        with conn.pipeline() as pipeline:
            conn.execute(b"BEGIN")
            if lock:
                # Before any row lock: a claim waits here holding nothing. The
                # statements after it start (and take their snapshots) once it is held.
                conn.execute(_LOCK, (_LOCK_CLAIM,))
            results = [work(conn) for work, _lock in ops]
            pipeline.sync()
            outcomes = []
            for result in results:
                value, delta = result.finish() if isinstance(result, _Later) else result
                outcomes.append(_Outcome(ok=True, value=value, queued_delta=delta))
            conn.execute(b"COMMIT")
        return outcomes
    except Exception as e:
        _rollback(conn)
        if _gone(conn):
            raise
        raise _ReplayError from e
    except BaseException:
        _rollback(conn)
        raise


def _attempt_careful(conn: Conn, ops: list[tuple[_Work, bool]], lock: bool) -> list[_Outcome]:
    """Run the batch with each call in a savepoint: a failing call (a duplicate id, a
    deadlock) is rolled back alone, as with SQLite."""
    conn.execute(b"BEGIN")
    try:
        if lock:
            conn.execute(_LOCK, (_LOCK_CLAIM,))
        outcomes: list[_Outcome] = []
        for work, _lock in ops:
            conn.execute(b"SAVEPOINT op")
            try:
                result = work(conn)
                value, delta = result.finish() if isinstance(result, _Later) else result
            except Exception as e:
                if _gone(conn):
                    raise  # the whole batch fails
                conn.execute(b"ROLLBACK TO SAVEPOINT op")
                conn.execute(b"RELEASE SAVEPOINT op")
                outcomes.append(_Outcome(ok=False, value=e, queued_delta=_NONE))
            else:
                conn.execute(b"RELEASE SAVEPOINT op")
                outcomes.append(_Outcome(ok=True, value=value, queued_delta=delta))
        conn.execute(b"COMMIT")
        return outcomes
    except BaseException:
        _rollback(conn)
        raise


def _gone(conn: Conn) -> bool:
    return conn.broken or conn.closed


def _rollback(conn: Conn) -> None:
    """After a failure: end the transaction, if the connection still has one."""
    if _gone(conn):
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.execute(b"ROLLBACK")


def _scalar(conn: Conn, query: str, params: Sequence[object] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _ensure_schema(conn: Conn) -> str:
    """The schema the store lives in: the first of ``search_path``, created if missing
    (under an advisory lock: instances starting together would race on CREATE)."""
    current = _scalar(conn, "SELECT current_schema()")
    if current is not None:
        return str(current)
    path = str(_scalar(conn, "SHOW search_path"))
    first = path.split(",", maxsplit=1)[0].strip()
    if first.startswith('"') and first.endswith('"'):
        first = first[1:-1].replace('""', '"')
    if not first or first == "$user":
        raise RuntimeError(f"no schema to use in search_path {path!r}")
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_MIGRATE, first))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(first)))
    return first


def _notify(conn: Conn, channel: str, schema: str, sender: str) -> None:
    """Delivered at commit; identical notifications of one transaction are sent once."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, _dumps({"schema": schema, "from": sender})))


def _columns(rows: list[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to one list per column, for ``unnest``: one statement for any number of rows."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _save_row(job: Job) -> tuple[object, ...]:
    return (
        job.id,
        job.state.value,
        job.attempts,
        job.not_before,
        job.started_at,
        job.finished_at,
        None if job.result is None else _dumps(job.result.to_json()),
        None if job.error is None else _dumps(job.error.to_json()),
    )
