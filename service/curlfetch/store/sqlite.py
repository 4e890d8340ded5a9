"""``SQLiteJobStore``: the embedded ``JobStore``, one SQLite file in WAL mode behind adbapi.

The batching, the counters, the close protocol and the portable statements are
``StoreCore``'s (``curlfetch.store.core``); this module brings the connection and the SQL
only SQLite runs. How it stays off the reactor and out of the way:

- **One connection, one thread.** ``adbapi.ConnectionPool`` with ``cp_min=cp_max=1``: a
  single writer never sees "database is locked", and every statement runs in the pool's
  thread, never in the reactor's.
- **One transaction per reactor turn.** Every call (writes and reads alike) becomes an
  operation of the core's batch, and the batch one transaction, in call order, each
  operation inside its own SAVEPOINT so that one failing operation (a duplicate id)
  fails alone (``BEGIN IMMEDIATE`` when it writes). Savepoints cost no round trip here.
- **Durability.** ``journal_mode=WAL`` with ``synchronous=FULL``: every commit fsyncs the
  WAL, so a job the API acknowledged survives a power loss, not only a crash of the
  process. (``NORMAL`` would be faster per commit, but batching already amortizes the
  fsync, and ``NORMAL`` may lose the last commits on power loss.)
- **Idempotency-Keys.** Reserved, then recorded in the transaction that inserts the
  jobs (``reserve_key``, ``add``); a reservation names its store instance, so one left
  by a dead process is taken over after ``IDEMPOTENCY_ABANDONED_AFTER`` seconds.
- **SQL.** Plain SQL plus ``UPDATE ... RETURNING`` and ``ON CONFLICT`` (PostgreSQL has
  them too), a ``schema_version`` table and numbered migrations applied in ``open()``.
  The SQLite-only parts are here: ``json_each`` for lists, ``executemany``.

The reactor is injected and handed to adbapi as ``cp_reactor``; this module never imports
the global reactor.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..jobs import Job, JobState
from . import StoreUnavailableError
from .claims import Caps, Picker
from .core import (
    NONE,
    Clock,
    Delta,
    Op,
    Outcome,
    StoreCore,
    Work,
    run_with_savepoints,
)
from .events import (
    LoopSQL,
    batches_table,
    cursor_of,
    deliveries_table,
    events_tables,
    jobs_columns,
)
from .hosts import COOLING_SQLITE, hosts_tables
from .portable import PortableSQL, Types, idempotency_keys_table, jobs_table, migrate
from .rows import COLUMNS, claimed, insert_row, save_row

T = TypeVar("T")

_TYPES = Types(seq="INTEGER PRIMARY KEY", time="REAL", blob="BLOB")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: jobs (see ``portable.jobs_table``).
    (
        jobs_table(_TYPES),
        "CREATE INDEX jobs_claim ON jobs (state, priority DESC, seq)",
        "CREATE INDEX jobs_client ON jobs (client, id DESC)",
        "CREATE INDEX jobs_finished ON jobs (state, finished_at)",
    ),
    # 2: Idempotency-Keys (see ``portable.idempotency_keys_table``).
    (
        idempotency_keys_table(_TYPES),
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)",
    ),
    # 3: batches, the event log and the webhook outbox (see ``events``). Event ids are
    # never reused (AUTOINCREMENT): a resume after a purge of the newest must not match
    # a later event.
    (
        *jobs_columns(),
        *batches_table(_TYPES),
        *events_tables("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER NOT NULL DEFAULT 0", _TYPES),
        *deliveries_table(_TYPES),
    ),
    # 4: host cooldowns and the robots.txt cache (see ``hosts``).
    hosts_tables(_TYPES),
)
"""Migration N (1-based) brings the schema from version N-1 to N. Append; never edit."""


def _metadata_match(key: str, value: str | None) -> tuple[str, list[object]]:
    """SQLite's JSON1: a quoted path step takes a key with dots as one key (the API
    allows letters, digits, ``_``, ``-`` and ``.``); only a text value matches a string
    (json_extract gives numbers as numbers)."""
    path = '$."' + key.replace('"', '""') + '"'
    if value is None:
        return "json_type(metadata, ?) IS NOT NULL", [path]
    return "(json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?)", [
        path,
        path,
        value,
    ]


_SQL = PortableSQL("?", for_update="", types=_TYPES, metadata_match=_metadata_match)
# One writer: txid is always 0 and seq is the commit order.
_LOOP = LoopSQL("?", for_update="", skip_locked="", horizon="", after="txid = ? AND seq > ?")
# One process owns every running job of the file: they are all its.
_OWNED_RUNNING = "SELECT id, client FROM jobs WHERE state = 'running'"

_INSERT = (
    "INSERT INTO jobs (id, client, state, priority, host, created_at, not_before, "
    "started_at, finished_at, attempts, spec, metadata, result, error, batch) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_SAVE = (
    "UPDATE jobs SET state = ?, attempts = ?, not_before = ?, started_at = ?, "
    "finished_at = ?, result = ?, error = ?, bytes = ?, error_code = ?, owner = NULL, "
    "lease_until = NULL WHERE id = ? AND state = 'running'"
)

_STILL_RUNNING = (
    "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?)) AND state = 'running'"
)

_CLAIM = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608
    "WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND not_before <= ? "
    f"{COOLING_SQLITE}{{skip}}"
    "ORDER BY priority DESC, seq LIMIT ?) "
    f"RETURNING {COLUMNS}"
)
# The skip list as one JSON parameter keeps a single cached statement for any number of
# hosts. (PostgreSQL: ``AND host <> ALL(%s)`` with a list.)
_CLAIM_ALL = _CLAIM.format(skip="")
_CLAIM_SKIPPING = _CLAIM.format(skip="AND host NOT IN (SELECT value FROM json_each(?)) ")
# With a per-host (and per-client) cap: walk the runnable jobs in claim order (the
# ``jobs_claim`` index) and take each one whose host and client still have room, up to the
# limit (``Picker``), so one host's backlog cannot fill a claim and a host or client
# without room does not hold back the others' jobs. Hosts and clients without room are
# left out by the query; one that runs out during the walk is skipped in Python, until a
# long run of skips makes it cheaper to query again without it, from where the walk
# stopped. The cost follows the jobs looked at, not the queue: ranking every queued job
# with window functions took ~45 ms per claim with 20,000 queued.
_WALK = (
    "SELECT seq, priority, host, client FROM jobs "  # noqa: S608 - constant fragments
    "WHERE state = 'queued' AND not_before <= ? "
    f"{COOLING_SQLITE}"
    "AND host NOT IN (SELECT value FROM json_each(?)) "
    "AND client NOT IN (SELECT value FROM json_each(?)) "
    "{after}ORDER BY priority DESC, seq"
)
_WALK_FROM_START = _WALK.format(after="")
_WALK_AFTER = _WALK.format(after="AND (priority < ? OR (priority = ? AND seq > ?)) ")
_CLAIM_PICKED = (
    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? "  # noqa: S608
    f"WHERE seq IN (SELECT value FROM json_each(?)) RETURNING {COLUMNS}"
)
_SKIPS_BEFORE_REQUERY = 256

_RECOVER = (
    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL WHERE state = 'running'"
)


class _Pool(Protocol):
    """The typed surface of ``adbapi.ConnectionPool`` that the store uses."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def runWithConnection(
        self, func: Callable[..., T], *args: object, **kw: object
    ) -> Deferred[T]: ...


class StoreReactor(Clock, Protocol):
    """What the store needs from a reactor: a clock (the flush, key expiry), and the
    triggers adbapi registers. (adbapi also calls ``callFromThread``, which every reactor
    has, but whose argument name differs between them, so a Protocol cannot spell it.)"""

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


class SQLiteJobStore(StoreCore):
    """The embedded ``JobStore`` (see ``curlfetch.store``): one SQLite file, WAL mode."""

    sql = _SQL
    _reactor: StoreReactor

    def __init__(
        self, reactor: StoreReactor, path: str | os.PathLike[str], busy_timeout: float = 5.0
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(reactor, owner=uuid.uuid4().hex, label=self.path)
        self.busy_timeout = busy_timeout
        self._pool: _Pool | None = None

    # -- the connection --------------------------------------------------------------------

    def _start(self) -> None:
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

    def _configure(self, conn: sqlite3.Connection) -> None:
        """cp_openfun: per-connection settings, in the database thread."""
        # First, so that switching to WAL waits for another process instead of failing.
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")

    async def _setup(self) -> tuple[int, dict[str, int]]:
        assert self._pool is not None
        try:
            return await self._pool.runWithConnection(_open_database)
        except sqlite3.DatabaseError as e:  # not a database, damaged, read-only, full
            raise StoreUnavailableError(f"{self.path}: cannot open the job database: {e}") from e

    async def _finish(self) -> None:
        # Folds the WAL into the database file in the thread, so that closing the
        # connection in the reactor thread (adbapi does) has nothing left to write.
        assert self._pool is not None
        await self._pool.runWithConnection(_checkpoint)

    def _release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()  # joins the pool's thread and closes the connection

    def _run(self, ops: list[Op]) -> Deferred[list[Outcome]]:
        """A batch that fails as a whole in SQLite (``database is locked`` past the busy
        timeout, an I/O error, a full disk) was rolled back: adbapi rolls back on any
        exception, and SQLite's COMMIT is atomic. So its fate is known: not committed."""
        assert self._pool is not None
        return self._pool.runWithConnection(_run_batch, ops).addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(sqlite3.DatabaseError):
            error = StoreUnavailableError(f"{self.path}: {failure.getErrorMessage()}")
            error.__cause__ = failure.value
            return Failure(error)
        return failure

    def _owned_running(self) -> tuple[str, tuple[object, ...]]:
        return _OWNED_RUNNING, ()

    def _read(self, work: Work) -> Deferred[Any]:
        """Reads are operations of the batch too: one connection, no waiting on locks."""
        return self._submit(work, write=False)

    # -- the SQL that differs --------------------------------------------------------------

    def _inserter(self, jobs: Sequence[Job]) -> Callable[[Any], None]:
        batch = list(jobs)

        def insert(conn: sqlite3.Connection) -> None:
            # The rows are encoded here, in the database thread: off the reactor.
            conn.executemany(_INSERT, [insert_row(job) for job in batch])

        return insert

    def _updater(self, jobs: Sequence[Job]) -> Callable[[Any], tuple[set[str], Delta]]:
        """Which of the jobs are still running (one query: the events need to know), then
        one ``executemany`` for those."""
        batch = list(jobs)
        ids = json.dumps([job.id for job in batch])

        def update(conn: sqlite3.Connection) -> tuple[set[str], Delta]:
            saved = {row[0] for row in conn.execute(_STILL_RUNNING, (ids,))}
            rows = [save_row(job) for job in batch if job.id in saved]
            if rows:
                conn.executemany(_SAVE, rows)
            back = Counter(
                job.client for job in batch if job.id in saved and job.state is JobState.QUEUED
            )
            return saved, back

        return update

    @property
    def loop(self) -> LoopSQL:
        return _LOOP

    @property
    def delivery_owner(self) -> str:
        """One process owns the file: whatever it finds ``sending`` at start is its own."""
        return "local"

    def _events_start(self, conn: sqlite3.Connection) -> tuple[int, int]:
        return cursor_of(conn.execute(_LOOP.events_newest).fetchone())

    def _claim(
        self, limit: int, now: float, skip_hosts: Collection[str], caps: Caps | None
    ) -> Deferred[list[Job]]:
        """Without caps, one ``UPDATE ... WHERE seq IN (SELECT ... LIMIT ?) RETURNING``
        whose subquery walks ``jobs_claim`` in claim order; with caps, the walk picks
        (``_pick``), then one ``UPDATE`` claims the picked jobs."""
        if caps is not None:
            rooms = caps

            def pick_and_claim(conn: sqlite3.Connection) -> tuple[list[Job], Delta]:
                seqs = _pick(conn, now, rooms)
                if not seqs:
                    return [], NONE
                return claimed(conn.execute(_CLAIM_PICKED, (now, json.dumps(seqs))))

            return self._submit(pick_and_claim)
        if skip_hosts:
            query = _CLAIM_SKIPPING
            params: tuple[object, ...] = (now, now, now, json.dumps(list(skip_hosts)), limit)
        else:
            query = _CLAIM_ALL
            params = (now, now, now, limit)

        def claim(conn: sqlite3.Connection) -> tuple[list[Job], Delta]:
            return claimed(conn.execute(query, params))

        return self._submit(claim)


# -- in the database thread --------------------------------------------------------------


def _open_database(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
    """Migrate, then requeue what a previous process left running and release the
    Idempotency-Key reservations it left (it died between reserving and recording: none
    of their jobs exists, and one process owns the file, so every reservation found now
    is a dead one); one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    migrate(conn, _SQL, MIGRATIONS)
    recovered = conn.execute(_RECOVER).rowcount
    conn.execute("DELETE FROM idempotency_keys WHERE state = 'reserved'")
    queued = conn.execute(_SQL.queued_counts).fetchall()
    return recovered, dict(queued)


def _pick(conn: sqlite3.Connection, now: float, caps: Caps) -> list[int]:
    """The seqs a capped claim takes: greedy in claim order (see ``_WALK``)."""
    picker = Picker(
        caps.limit,
        dict(caps.host_room),
        caps.limit if caps.per_host is None else caps.per_host,
        dict(caps.client_room),
        caps.per_client,
    )
    after: tuple[int, int] | None = None
    while True:
        params = (now, now, json.dumps(picker.full_hosts()), json.dumps(picker.full_clients()))
        if after is None:
            cursor = conn.execute(_WALK_FROM_START, params)
        else:
            cursor = conn.execute(_WALK_AFTER, (*params, after[0], after[0], after[1]))
        after = None
        skips = 0
        try:
            for seq, priority, host, client in cursor:
                if not picker.offer(seq, host, client):
                    skips += 1
                    if skips >= _SKIPS_BEFORE_REQUERY:
                        after = (priority, seq)
                        break
                    continue
                if picker.done:
                    return picker.picked
                skips = 0
        finally:
            cursor.close()
        if after is None:
            return picker.picked


def _run_batch(conn: sqlite3.Connection, ops: list[Op]) -> list[Outcome]:
    """One transaction, each operation in a savepoint; adbapi commits when this returns."""
    conn.execute("BEGIN IMMEDIATE" if any(op.write for op in ops) else "BEGIN")
    return run_with_savepoints(conn, ops)


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
