"""``PostgresJobStore``: the ``JobStore`` for several curlfetch instances on one PostgreSQL.

Same semantics as ``SQLiteJobStore`` (``curlfetch.store.sqlite``): the batching, the
counters, the close protocol and the portable statements are ``StoreCore``'s
(``curlfetch.store.core``). This module brings the connections and threads (its SQL is in
``postgres_sql``), and what several instances need on top:

- **Off the reactor, batched.** psycopg 3 (sync) in threads, never the reactor's. The
  core's batch of writes runs as one transaction in the writer thread, in call order,
  and a Deferred fires after its transaction has committed. Each
  call fails alone, as with SQLite's savepoints, but savepoints cost round trips, and
  every round trip makes the thread wait for the GIL while the reactor is busy: a batch
  first runs in pipeline mode without them, and only if a call fails is it rolled back
  and run again with a savepoint per call. Reads (``get``, ``list_jobs``, ``counts``,
  ``ping``) run on reader connections of their own, once the writes submitted before
  them have committed: they see those, and never wait behind later batches (a long
  listing cannot delay a claim).
- **Lost connections.** Every batch records its transaction id (``txid_current()``,
  pipelined: no round trip). If the connection dies, the next batch reconnects; a batch
  that died before COMMIT went out is known not to have committed, and one that died
  during COMMIT is looked up with ``txid_status`` on a new connection: committed, its
  outcomes are delivered as a success; otherwise it is ``StoreUnavailableError``, and the
  core runs its saves again. A read whose idle connection was dead runs once more on a
  new one.
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

Its SQL, and the code that runs a batch in the writer thread, is in ``postgres_sql``.

Past 600 lines, on purpose: the connection handling of one backend (writer, readers,
listener, leases) is one unit that the core's docstring promises lives "in one place";
its SQL and batch runner are already apart in ``postgres_sql``.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

import attrs
import psycopg
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..jobs import Job, JobState
from . import SchemaVersionError, StoreClosedError, StoreUnavailableError
from .claims import Caps
from .core import NONE, Delta, Later, Op, Outcome, StoreCore, Work, resolve
from .events import LoopSQL, cursor_of
from .portable import migrate
from .postgres_sql import (
    CANCEL_CHANNEL,
    CLAIM_PICKED,
    CLAIM_SIMPLE,
    EVENTS_CHANNEL,
    EVENTS_START,
    INSERT,
    LOCK_MIGRATE,
    LOOP,
    MIGRATIONS,
    OWNED_RUNNING,
    REAP,
    RECOVER_OWN,
    RELEASE_OWN_KEYS,
    RENEW,
    SAVE,
    SQL,
    WAKE_CHANNEL,
    XID_STATUS,
    BatchTrace,
    Conn,
    ReplayError,
    Rooms,
    attempt,
    attempt_careful,
    ensure_schema,
    gone,
    notify,
    unnest_columns,
)
from .rows import claimed, dumps, insert_row, save_row

__all__ = [
    "DEFAULT_LEASE",
    "MIGRATIONS",
    "PostgresJobStore",
    "SchemaVersionError",
    "StoreClosedError",
    "default_instance_id",
    "is_postgres_url",
    "redact_dsn",
]

log = Logger()

DEFAULT_LEASE = 30.0
"""Seconds a claim stays leased without a heartbeat: how long a dead instance's jobs wait
before another instance runs them."""

_LISTEN_POLL = 0.25
"""Seconds the listener waits for a notification before it checks whether to stop."""
READERS = 2
"""Reader connections (threads): reads never wait behind the writer's batches."""


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


@attrs.frozen
class _Read:
    work: Work
    deferred: Deferred[Any]
    after: int
    """How many writes were submitted before it: it runs once they have settled."""


class PostgresJobStore(StoreCore):
    """The ``JobStore`` (see ``curlfetch.store``) for several instances on one PostgreSQL.

    ``dsn``: a libpq URL or conninfo string; the schema is its ``search_path`` (``public``
    by default). ``instance_id`` names this instance's claims (``jobs.owner``); it must be
    unique among live instances. ``on_wakeup``/``on_cancelled`` are called on the
    reactor when another instance makes jobs runnable or cancels one of ours.

    ``skipped_saves`` also counts saves of jobs reaped after a lost lease; ``reaped``
    counts the jobs of dead instances this one has put back to ``queued``.
    """

    sql = SQL
    _reactor: Any  # the whole reactor: threads, callFromThread, LoopingCall's clock

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
        # The owner of Idempotency-Key reservations: unique per store object, so a
        # restart under the same instance id still abandons its predecessor's.
        super().__init__(
            reactor, owner=f"{self.instance_id}/{uuid.uuid4().hex[:8]}", label=repr(self)
        )
        self.lease_seconds = lease_seconds
        self.refresh_interval = min(refresh_interval, lease_seconds / 2)
        self.connect_timeout = connect_timeout
        self.max_per_host = max_per_host
        """Running jobs per host over all instances, applied to every claim (also those
        that pass no ``per_host``: the scheduler omits it when its own room is ample)."""
        self.on_wakeup: Callable[[], object] | None = None
        self.on_cancelled: Callable[[str], object] | None = None
        self.reaped = 0
        self.schema = ""
        self._pool: ThreadPool | None = None
        self._conn: Conn | None = None  # used in the pool's thread only
        self._read_pool: ThreadPool | None = None
        self._idle_readers: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self._written = 0  # writes submitted
        self._settled_writes = 0  # writes whose batch has committed (or failed)
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

    def _start(self) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=1, name="curlfetch-postgres")
        pool.start()
        self._pool = pool
        readers = ThreadPool(minthreads=0, maxthreads=READERS, name="curlfetch-postgres-read")
        readers.start()
        self._read_pool = readers
        self._stop_listening.clear()

    async def _setup(self) -> tuple[int, dict[str, int]]:
        pool = self._pool
        assert pool is not None
        try:
            schema, recovered, queued = await threads.deferToThreadPool(
                self._reactor, pool, self._open_database
            )
        except BaseException:
            await threads.deferToThreadPool(self._reactor, pool, self._disconnect)
            raise
        self.schema = schema
        return recovered, queued

    def _open_database(self) -> tuple[str, int, dict[str, int]]:
        """Migrate under the migration lock, then requeue what a previous process with our
        instance id left running and whatever has an expired lease, and release the
        Idempotency-Key reservations a previous process with our instance id left (it
        died before recording them: none of their jobs exists); one transaction."""
        conn = self._connection()
        with conn.transaction():
            schema = ensure_schema(conn)
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_MIGRATE, schema))
            migrate(conn, SQL, MIGRATIONS)
            own = conn.execute(RECOVER_OWN, (self.instance_id,)).rowcount
            conn.execute(RELEASE_OWN_KEYS, (self.instance_id + "/",))
            expired = conn.execute(REAP).rowcount
            if own + expired:
                notify(conn, WAKE_CHANNEL, schema, self.instance_id)
            queued = {c: n for c, n in conn.execute(SQL.queued_counts)}
        return schema, own + expired, queued

    def _started(self) -> None:
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

    async def _quiesce(self) -> None:
        """Stop the timers and the listener (before the core flushes what is queued)."""
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        self._stop_listening.set()
        if self._listener is not None:
            await self._listener

    async def _finish(self) -> None:
        assert self._pool is not None
        await threads.deferToThreadPool(self._reactor, self._pool, self._disconnect)
        if self._read_pool is not None:
            await threads.deferToThreadPool(self._reactor, self._read_pool, self._close_readers)

    def _release(self) -> None:
        for pool in (self._pool, self._read_pool, self._listen_pool):
            if pool is not None:
                pool.stop()
        self._pool = self._read_pool = self._listen_pool = None
        self._listener = None
        self.listening = False

    # -- the writer's connection, in the pool's thread -------------------------------------

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

    def _run(self, ops: list[Op]) -> Deferred[list[Outcome]]:
        assert self._pool is not None
        return threads.deferToThreadPool(self._reactor, self._pool, self._run_batch, ops)

    def _run_batch(self, ops: list[Op]) -> list[Outcome]:
        """One transaction for the batch; commits when this returns.

        Each call in a batch must fail alone, as with SQLite's savepoints, but a
        savepoint costs two round trips per call, each of which waits for the GIL when
        the reactor is busy. So the batch first runs without them; if any call fails,
        the transaction is rolled back and the batch runs again, each call in its own
        savepoint. (Nothing was committed, and a call only touches the database.)"""
        lock = any(op.lock for op in ops)
        try:
            conn = self._connection()
        except psycopg.Error as e:
            raise StoreUnavailableError(f"{self!r}: cannot connect: {e}") from e
        trace = BatchTrace()
        try:
            try:
                return attempt(conn, ops, lock, trace)
            except ReplayError:
                return attempt_careful(conn, ops, lock, trace)
        except Exception as e:
            if not gone(conn) and not isinstance(e, psycopg.OperationalError):
                raise  # the batch failed as a whole while the connection lives
            self._disconnect()  # reconnect for the next batch
            if trace.outcomes is None:
                committed: bool | None = False  # COMMIT was never sent
            else:
                committed = self._committed(trace.xid)
                if committed:
                    log.info(
                        "{store}: the connection was lost after COMMIT, which committed",
                        store=repr(self),
                    )
                    return trace.outcomes
            raise StoreUnavailableError(f"{self!r}: {e}", committed) from e

    def _committed(self, xid: int | None) -> bool | None:
        """After a connection died during COMMIT: did that transaction commit? Asked on
        a new connection (None: the database does not answer, so nobody knows yet)."""
        if xid is None:
            return None
        try:
            conn = self._connection()
            row = conn.execute(XID_STATUS, (xid,)).fetchone()
        except psycopg.Error:
            self._disconnect()
            return None
        status = None if row is None else row[0]
        if status == "committed":
            return True
        if status == "aborted":
            return False
        return None  # "in progress" (it cannot be, once its session is gone) or unknown

    # -- reads, on reader connections ------------------------------------------------------

    def _read(self, work: Work) -> Deferred[Any]:
        """On a reader connection, as soon as every write submitted before it has
        committed (so it sees them), without waiting behind the writes after it."""
        if not self._opened or self._closing:
            return self._closed()
        read = _Read(work, Deferred(), self._written)
        if read.after <= self._settled_writes:
            self._dispatch(read)
        else:
            self._parked.append(read)
        return read.deferred

    def _submitted(self) -> None:
        self._written += 1  # for the reads after it (see _read)

    def _settled(self, count: int) -> None:
        """The reads that were waiting for these writes (committed or failed) can go."""
        self._settled_writes += count
        while self._parked and self._parked[0].after <= self._settled_writes:
            self._dispatch(self._parked.popleft())

    def _busy(self) -> bool:
        return super()._busy() or bool(self._parked) or self._reads_in_flight > 0

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

    def _run_read(self, work: Work) -> Any:
        """In a reader thread: one statement in autocommit, on an idle connection. A read
        changes nothing, so one that finds its idle connection dead (the server restarted,
        or a reaper ended it) is run once more on a new one before it fails."""
        for fresh in (False, True):
            conn = None if fresh else self._idle_reader()
            try:
                if conn is None:
                    conn = self._connect()
                    conn.execute("SET enable_sort = off")  # see _connection
                value, _delta = resolve(work(conn))
            except psycopg.OperationalError as e:
                if conn is not None:
                    conn.close()  # the next read connects anew
                if fresh:
                    raise StoreUnavailableError(f"{self!r}: {e}", committed=None) from e
                continue
            except BaseException:
                if conn is not None and gone(conn):
                    conn.close()
                elif conn is not None:
                    self._idle_readers.put(conn)
                raise
            self._idle_readers.put(conn)
            return value
        raise AssertionError("unreachable")

    def _owned_running(self) -> tuple[str, tuple[object, ...]]:
        return OWNED_RUNNING, (self.instance_id,)

    def _idle_reader(self) -> Conn | None:
        try:
            return self._idle_readers.get_nowait()
        except queue.Empty:
            return None

    def _close_readers(self) -> None:
        while True:
            try:
                self._idle_readers.get_nowait().close()
            except queue.Empty:
                return

    # -- heartbeat, reaper, counters -------------------------------------------------------

    def _heartbeat(self) -> Deferred[None]:
        """Renew the leases of every job this instance holds."""
        lease, me = self.lease_seconds, self.instance_id

        def renew(conn: Conn) -> Later:
            cursor = conn.execute(RENEW, (lease, me))
            return Later(lambda: (cursor.rowcount, NONE))

        def failed(failure: Failure) -> None:
            if not failure.check(StoreClosedError):
                log.failure("renewing the job leases failed", failure)

        return self._submit(renew).addCallbacks(lambda _: None, failed)

    def _maintain(self) -> Deferred[None]:
        """Requeue jobs whose lease expired (their instance is gone) and reset the queued
        counters from the database (other instances' writes)."""
        schema, me = self.schema, self.instance_id

        def maintain(conn: Conn) -> tuple[tuple[int, dict[str, int]], Delta]:
            # Fetched, not rowcount: in pipeline mode that is known only after a sync.
            reaped = len(conn.execute(REAP).fetchall())
            if reaped:
                notify(conn, WAKE_CHANNEL, schema, me)
            counts = {c: n for c, n in conn.execute(SQL.queued_counts)}
            return (reaped, counts), NONE

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
                    conn.execute(f"LISTEN {EVENTS_CHANNEL}")
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
            self.events_committed()
            self.deliveries_committed()

    def _notified(self, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("schema") != self.schema:
            return  # another deployment sharing the database
        if channel == WAKE_CHANNEL and message.get("from") != self.instance_id:
            self._wake()
        elif channel == EVENTS_CHANNEL and message.get("from") != self.instance_id:
            self.events_committed()
            self.deliveries_committed()  # any instance may deliver what another wrote
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

    # -- the SQL that differs --------------------------------------------------------------

    def _inserter(self, jobs: Sequence[Job]) -> Callable[[Any], None]:
        """One ``INSERT ... SELECT FROM unnest(...)`` for any number of jobs, and a wake-up
        for the other instances."""
        columns = unnest_columns([insert_row(job) for job in jobs], 15)
        schema, me = self.schema, self.instance_id

        def insert(conn: Conn) -> None:
            conn.execute(INSERT, columns)
            notify(conn, WAKE_CHANNEL, schema, me)

        return insert

    def _updater(self, jobs: Sequence[Job]) -> Callable[[Any], tuple[set[str], Delta]]:
        """One ``UPDATE ... FROM unnest(...)`` for any number of jobs; its RETURNING says
        which were still ours (a round trip: the events need it)."""
        columns = unnest_columns([save_row(job) for job in jobs], 10)
        me, schema = self.instance_id, self.schema
        requeues = any(job.state is JobState.QUEUED for job in jobs)

        def update(conn: Conn) -> tuple[set[str], Delta]:
            rows = conn.execute(SAVE, (*columns, me)).fetchall()
            if requeues:
                notify(conn, WAKE_CHANNEL, schema, me)  # e.g. a drain hands its jobs over
            back = Counter(c for _, c, state in rows if state == JobState.QUEUED.value)
            return {job_id for job_id, _, _ in rows}, back

        return update

    @property
    def loop(self) -> LoopSQL:
        return LOOP

    @property
    def delivery_owner(self) -> str:
        return self.instance_id

    def _events_start(self, conn: Conn) -> tuple[int, int]:
        return cursor_of(conn.execute(EVENTS_START).fetchone())

    def _tell_events(self, conn: Conn) -> None:
        notify(conn, EVENTS_CHANNEL, self.schema, self.instance_id)

    def _claim(
        self, limit: int, now: float, skip_hosts: Collection[str], caps: Caps | None
    ) -> Deferred[list[Job]]:
        """Rooms as in SQLite, plus the other instances' running jobs per host (see the
        module docstring: with a per-host cap, claims are serialized across instances).

        With rooms, the pick is greedy in claim order (``Picker``): a job is taken unless
        its host or its client has no room left."""
        params: dict[str, object] = {
            "now": now,
            "me": self.instance_id,
            "lease": self.lease_seconds,
            "limit": limit,
        }
        shared = self.max_per_host
        if caps is None and shared is None:
            params["skip"] = list(skip_hosts)

            def claim_plain(conn: Conn) -> Later:
                cursor = conn.execute(CLAIM_SIMPLE, params)
                return Later(lambda: claimed(cursor))

            return self._submit(claim_plain)

        if caps is None:
            caps = Caps(limit, None, dict.fromkeys(skip_hosts, 0), None, {})
        rooms = Rooms(self.instance_id, caps, shared)

        def claim(conn: Conn) -> tuple[list[Job], Delta] | Later:
            picked = rooms.pick(conn, now)
            if not picked:
                return [], NONE
            cursor = conn.execute(CLAIM_PICKED, {**params, "picked": picked})
            return Later(lambda: claimed(cursor))

        # Host caps are shared between instances: serialize the claims that apply one.
        return self._submit(claim, lock=caps.per_host is not None or shared is not None)

    def _cancelled_running(self, conn: Conn, job_id: str, owner: str | None) -> None:
        """Tell the owner of a running job cancelled here, so that it stops the transfer."""
        if owner is not None and owner != self.instance_id:
            payload = {"schema": self.schema, "job": job_id, "owner": owner}
            conn.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, dumps(payload)))
