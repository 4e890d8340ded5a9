"""``StoreCore``: what the SQLite and PostgreSQL stores share above their connections.

A backend (``sqlite``, ``postgres``) subclasses it and brings only its connection
handling and the SQL that differs; everything else is written here once:

- **One transaction per reactor turn.** Every write becomes an operation (``Op``) on a
  queue; ``reactor.callLater(0)`` flushes the queue as one batch, in call order, which the
  backend runs as one transaction in its thread (``_run``). While a batch is in the
  thread, new operations pile up for the next one (group commit): the commit (an fsync)
  is paid per batch, not per job. A Deferred fires only after its batch has committed.
- **Each operation fails alone.** A failing operation (a duplicate id) is rolled back to
  its savepoint and errbacks alone (``run_with_savepoints``); the others commit. A backend
  whose savepoints cost round trips runs a batch without them first, and again with them
  only if something failed (PostgreSQL's pipeline mode).
- **Results read late.** An operation returns ``(value, queued_delta)`` or a ``Later``:
  how to read its result once the batch's statements have been sent (in PostgreSQL's
  pipeline mode such an operation costs no round trip of its own).
- **Reads** go through ``_read``: on SQLite, an operation of the batch like any other; on
  PostgreSQL, a reader connection once the writes submitted before it have committed.
- **Counters.** ``queued()``/``queued_for()`` follow the committed writes: every operation
  reports the change it made per client (``queued_delta``), applied once its batch has
  committed. ``transactions`` counts committed batches, ``skipped_saves`` saved jobs that
  were no longer ``running`` (cancelled while they ran, or, on PostgreSQL, reaped).
- **Close.** Stop taking calls, let the backend stop its own timers (``_quiesce``), flush
  what is queued, wait until nothing is in flight, then let the backend finish
  (``_finish``: a checkpoint, a disconnect) and release its threads (``_release``).
- **A batch's fate.** ``_flushed`` is the one place that learns how a batch ended: its
  outcomes after the commit, or a failure of the batch as a whole (BEGIN, the claim lock,
  COMMIT, the connection). A backend reports a failure that is the database's, not the
  operation's, as ``StoreUnavailableError``, after finding out whether the batch
  committed where it can (PostgreSQL asks ``txid_status`` after a lost COMMIT; a batch
  known to have committed is delivered as a success). Operations marked ``retry`` (the
  scheduler's saves: losing one would leave its job ``running`` with nobody running it)
  are run again, with backoff, until they commit; they are idempotent (a save touches
  only rows still ``running`` for this store), so a batch whose fate is unknown is safe
  to repeat. The others fail with ``StoreUnavailableError`` (503 at the API). What a lost
  claim took is handed back by ``requeue_orphans``, the scheduler's self-check.

The ``JobStore`` methods below use the portable SQL (``PortableSQL``, one placeholder
style per backend) and a few hooks for what differs: inserting and saving jobs (SQLite
``executemany``, PostgreSQL ``unnest``), claiming (rooms, leases, locks), and what a
cancel tells another instance.

A little over 600 lines, on purpose: the queue, the batch's fate and the ``JobStore``
methods are written once here so that neither backend repeats them; the claim helpers
are in ``claims``, the row codec in ``rows``, the shared SQL in ``portable``.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..jobs import Job, JobState
from . import (
    IDEMPOTENCY_TTL,
    IdempotencyInProgressError,
    IdempotencyRecord,
    JobFilter,
    StoreClosedError,
    StoredResponse,
    StoreUnavailableError,
)
from .claims import Caps
from .events import BatchRecord, Recorder, batch_created
from .hosts import HostMethods
from .loop import LoopMethods
from .portable import Connection, PortableSQL
from .rows import QueuedCounts, dumps, job_from_row, judge_key

log = Logger()

RETRY_FIRST = 0.05
RETRY_MAX = 2.0
"""Seconds between runs of retried operations while the database fails: doubling from
the first to the max, so an outage of minutes costs a few statements a second."""
RETRIES_WHILE_CLOSING = 3
"""Runs a retried operation still gets once the store is closing: a drain must end. One
still not committed then leaves its job ``running``, requeued by the next start (same
instance id) or by another instance once its lease expires."""

Delta = Mapping[str, int]
"""An operation's change to the queued count of each client it touched."""
NONE: Delta = {}


@attrs.frozen
class Later:
    """What an operation whose statements cannot fail in Python returns instead of its
    result: how to read the result once the batch's statements have been synced."""

    finish: Callable[[], tuple[Any, Delta]]


Result = tuple[Any, Delta] | Later
Work = Callable[[Any], Result]
"""Runs in the database thread with the backend's connection."""


@attrs.define
class Op:
    work: Work
    deferred: Deferred[Any]
    write: bool = True
    """SQLite: the batch takes the write lock at BEGIN."""
    lock: bool = False
    """PostgreSQL: take the claim lock at the start of the batch (a per-host cap)."""
    recount: bool = False
    """The value is ``(value, counts)``: ``counts`` replaces the queued counters."""
    retry: bool = False
    """Run again (with backoff) until committed when the database fails under it."""
    events: bool = False
    """It may write events: tell the event listeners once its batch has committed."""
    tries: int = 0


@attrs.frozen
class Outcome:
    ok: bool
    value: Any
    queued_delta: Delta


def _tell(listeners: list[Callable[[], None]]) -> None:
    for listener in list(listeners):
        try:
            listener()
        except Exception:
            log.failure("a store listener failed")


def resolve(result: Result) -> tuple[Any, Delta]:
    return result.finish() if isinstance(result, Later) else result


def run_with_savepoints(
    conn: Connection, ops: Sequence[Op], gone: Callable[[], bool] = lambda: False
) -> list[Outcome]:
    """Each operation in its own savepoint, inside a transaction the caller began (and
    commits): a failing one is rolled back alone. If the connection is ``gone``, the
    whole batch fails."""
    outcomes: list[Outcome] = []
    for op in ops:
        conn.execute("SAVEPOINT op")
        try:
            value, delta = resolve(op.work(conn))
        except Exception as e:
            if gone():
                raise
            conn.execute("ROLLBACK TO SAVEPOINT op")
            conn.execute("RELEASE SAVEPOINT op")
            outcomes.append(Outcome(ok=False, value=e, queued_delta=NONE))
        else:
            conn.execute("RELEASE SAVEPOINT op")
            outcomes.append(Outcome(ok=True, value=value, queued_delta=delta))
    return outcomes


class Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...
    def seconds(self) -> float: ...


class StoreCore(LoopMethods, HostMethods):
    """The ``JobStore`` (see ``curlfetch.store``) over a backend's connection.

    ``transactions`` counts committed batches; ``skipped_saves`` counts saved jobs that
    ``save`` left alone (no longer ``running`` for this store). ``owner`` names this
    store object's Idempotency-Key reservations: unique per object, so a restarted
    process abandons its predecessor's (see ``IDEMPOTENCY_ABANDONED_AFTER``).
    """

    sql: PortableSQL

    def __init__(self, reactor: Clock, owner: str, label: str) -> None:
        self.transactions = 0
        self.skipped_saves = 0
        self.owner = owner
        self._reactor = reactor
        self._label = label
        self._opened = False
        self._closing = False
        self._counts = QueuedCounts()
        self._pending: list[Op] = []
        self._flush_call: IDelayedCall | None = None
        self._in_flight = False
        self._idle_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._retrying: list[Op] = []  # waiting out the backoff
        self._retry_call: IDelayedCall | None = None
        self._failed_batches = 0  # in a row: the backoff's exponent
        self.retried_ops = 0
        """Operations run again after the database failed under them."""
        self.event_listeners: list[Callable[[], None]] = []
        """Called on the reactor after a batch that may have written events committed
        here (and, on PostgreSQL, when another instance says it wrote some)."""
        self.delivery_listeners: list[Callable[[], None]] = []
        """Called on the reactor after a batch that wrote webhook deliveries committed
        here (and, on PostgreSQL, when another instance wrote events)."""
        self._new_deliveries = False  # set in the database thread

    # -- what a backend brings ---------------------------------------------------------------

    @abc.abstractmethod
    def _start(self) -> None:
        """Start the backend's threads (``open``, before ``_setup``)."""

    @abc.abstractmethod
    async def _setup(self) -> tuple[int, Mapping[str, int]]:
        """Connect, migrate, and requeue what was left running: (how many, the queued
        count per client). On failure, the backend has disconnected."""

    def _started(self) -> None:
        """The store is open: start timers and listeners."""

    async def _quiesce(self) -> None:
        """Closing: stop what submits work of its own (timers, listeners)."""

    @abc.abstractmethod
    async def _finish(self) -> None:
        """Closing, once nothing is in flight: the last words with the database."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Stop the backend's threads (after ``_finish``, or after a failed open)."""

    @abc.abstractmethod
    def _run(self, ops: list[Op]) -> Deferred[list[Outcome]]:
        """Run a batch as one transaction in the backend's thread; fires after COMMIT."""

    @abc.abstractmethod
    def _read(self, work: Work) -> Deferred[Any]:
        """A read that sees every write submitted before it."""

    def _busy(self) -> bool:
        """Anything queued, in flight or waiting to be retried (close waits for it)."""
        return self._in_flight or bool(self._pending) or bool(self._retrying)

    @abc.abstractmethod
    def _owned_running(self) -> tuple[str, tuple[object, ...]]:
        """The query (and its parameters) of the ``(id, client)`` of every job this
        store holds as ``running``: all of them on SQLite, this instance's on PostgreSQL."""

    def _submitted(self) -> None:
        """An operation was queued (PostgreSQL orders its reads after it)."""

    def _settled(self, count: int) -> None:
        """A batch of ``count`` operations has committed or failed."""

    @abc.abstractmethod
    def _inserter(self, jobs: Sequence[Job]) -> Callable[[Any], None]:
        """What inserts the jobs, in the database thread (within ``add``'s operation)."""

    @abc.abstractmethod
    def _updater(self, jobs: Sequence[Job]) -> Callable[[Any], tuple[set[str], Delta]]:
        """What updates the saved jobs' rows, in the database thread: the ids it updated
        (the others were no longer ``running`` for this store) and the queued delta."""

    def _tell_events(self, conn: Any) -> None:
        """In the database thread: this transaction wrote events (other instances may be
        streaming them)."""

    @abc.abstractmethod
    def _claim(
        self, limit: int, now: float, skip_hosts: Collection[str], caps: Caps | None
    ) -> Deferred[list[Job]]:
        """Claim with the backend's SQL; ``caps`` when the caller gave a per-host or
        per-client cap."""

    def _cancelled_running(self, conn: Any, job_id: str, owner: str | None) -> None:
        """In the database thread: a running job of ``owner`` was just cancelled."""

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> Deferred[int]:
        if self._opened:
            return fail(RuntimeError("the store is already open"))
        self._start()
        self._opened = True
        self._closing = False
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> int:
        try:
            recovered, queued = await self._setup()
        except BaseException:
            self._opened = False
            self._release()
            raise
        self._counts.reset(queued)
        self._started()
        return recovered

    def close(self) -> Deferred[None]:
        if not self._opened:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        if not self._closing:
            self._closing = True
            Deferred.fromCoroutine(self._close())
        return d

    async def _close(self) -> None:
        failure: Failure | None = None
        try:
            await self._quiesce()
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
                self._flush_call = None
                self._flush()
            if self._retry_call is not None and self._retry_call.active():
                self._retry_call.cancel()
                self._resume()
            while self._busy():
                waiter: Deferred[None] = Deferred()
                self._idle_waiters.append(waiter)
                await waiter
            await self._finish()
        except Exception:
            failure = Failure()
        finally:
            self._release()
            self._opened = False
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                if failure is None:
                    w.callback(None)
                else:
                    w.errback(failure)

    def _closed(self) -> Deferred[Any]:
        return fail(StoreClosedError(f"{self._label}: the job store is not open"))

    # -- the queue -------------------------------------------------------------------------------

    def _submit(
        self,
        work: Work,
        *,
        write: bool = True,
        lock: bool = False,
        recount: bool = False,
        retry: bool = False,
        events: bool = False,
    ) -> Deferred[Any]:
        """An operation for the next batch."""
        if not self._opened or self._closing:
            return self._closed()
        self._submitted()
        d: Deferred[Any] = Deferred()
        self._pending.append(Op(work, d, write, lock, recount, retry, events))
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
        self._run(ops).addBoth(self._flushed, ops)

    def _flushed(self, result: list[Outcome] | Failure, ops: list[Op]) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            # The batch as a whole failed (BEGIN, the claim lock, COMMIT, the connection):
            # it was rolled back, or its fate is unknown. Either way the queued counters
            # are left as they were: what did commit is counted in by the next recount.
            retried = self._batch_failed(result, ops)
            self._settled(len(ops) - retried)
            self._schedule()
            self._check_idle()
            return
        self._failed_batches = 0
        self.transactions += 1
        if any(op.events for op in ops):
            self.events_committed()
        if self._new_deliveries:
            self._new_deliveries = False
            self.deliveries_committed()
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
        self._settled(len(ops))
        self._schedule()
        self._check_idle()

    def events_committed(self) -> None:
        """Wake whoever waits for events (streams, batch long-polls)."""
        _tell(self.event_listeners)

    def deliveries_committed(self) -> None:
        """Wake the webhook sender."""
        _tell(self.delivery_listeners)

    def _deliveries_due(self) -> None:
        self.deliveries_committed()

    def _mark_deliveries(self) -> None:
        """In the database thread: this batch wrote deliveries (read once it committed;
        a batch that rolls back only makes a needless wake-up)."""
        self._new_deliveries = True

    def _batch_failed(self, failure: Failure, ops: list[Op]) -> int:
        """Hold the batch's retried operations for another run after a backoff; fail the
        others. Returns how many are held."""
        unavailable = failure.check(StoreUnavailableError) is not None
        if unavailable:
            self._failed_batches += 1
        held = 0
        for op in ops:
            if op.deferred.called:
                continue
            if unavailable and op.retry and (not self._closing or op.tries < RETRIES_WHILE_CLOSING):
                op.tries += 1
                self._retrying.append(op)
                held += 1
            else:
                op.deferred.errback(failure)
        if unavailable:
            log.warn(
                "{label}: the database failed under a batch of {count} operations "
                "({error}); {held} to be run again",
                label=self._label,
                count=len(ops),
                error=failure.getErrorMessage(),
                held=held,
            )
        if held and self._retry_call is None:
            exponent = min(self._failed_batches - 1, 10)
            delay = min(RETRY_FIRST * 2**exponent, RETRY_MAX)
            self._retry_call = self._reactor.callLater(delay, self._resume)
        return held

    def _resume(self) -> None:
        """The backoff is over: the held operations go first into the next batch."""
        self._retry_call = None
        ops, self._retrying = self._retrying, []
        if ops:
            self.retried_ops += len(ops)
            self._pending[:0] = ops
            self._schedule()

    def _check_idle(self) -> None:
        if self._busy():
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)

    # -- the JobStore interface -------------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        def ping(conn: Connection) -> tuple[None, Delta]:
            conn.execute("SELECT 1").fetchone()
            return None, NONE

        return self._read(ping)

    def reserve_key(
        self, client: str, key: str, fingerprint: str, now: float
    ) -> Deferred[StoredResponse | None]:
        """In the write transaction: the row is read (``FOR UPDATE`` on PostgreSQL), then
        judged (``judge_key``); a new key is inserted with ``ON CONFLICT DO NOTHING``, so
        two instances reserving one key at once are serialized: the second sees the
        first's reservation (and gets 409), never overwrites it. An expired or abandoned
        key is taken over."""
        sql, owner = self.sql, self.owner

        def reserve(conn: Connection) -> tuple[StoredResponse | None, Delta]:
            for _ in range(3):
                row = conn.execute(sql.key_get, (client, key)).fetchone()
                if row is None:
                    inserted = conn.execute(
                        sql.key_insert, (client, key, fingerprint, owner, now)
                    ).fetchone()
                    if inserted is not None:
                        return None, NONE
                    continue  # another instance inserted it just now: read it
                stored = judge_key(row, key, fingerprint, owner, now)
                if stored is not None:
                    return stored, NONE
                conn.execute(sql.key_take_over, (fingerprint, owner, now, client, key))
                return None, NONE
            raise IdempotencyInProgressError(
                f"the request with Idempotency-Key {key!r} is still in progress"
            )

        return self._submit(reserve)

    def release_key(self, client: str, key: str) -> Deferred[None]:
        sql, owner = self.sql, self.owner

        def release(conn: Connection) -> tuple[None, Delta]:
            conn.execute(sql.key_release, (client, key, owner))
            return None, NONE

        return self._submit(release)

    def add(
        self,
        jobs: Sequence[Job],
        idempotency: IdempotencyRecord | None = None,
        batch: BatchRecord | None = None,
    ) -> Deferred[None]:
        for job in jobs:
            if job.state is not JobState.QUEUED:
                return fail(ValueError(f"job {job.id} is {job.state}, not queued"))
        if not jobs and idempotency is None:
            return succeed(None)
        chunk = list(jobs)
        return self._add(
            lambda: iter([chunk] if chunk else []),
            Counter(job.client for job in jobs),
            idempotency,
            batch,
            len(chunk),
        )

    def add_stream(
        self,
        client: str,
        chunks: Callable[[], Iterator[Sequence[Job]]],
        total: int,
        batch: BatchRecord,
        idempotency: IdempotencyRecord | None = None,
    ) -> Deferred[None]:
        """``add`` for a batch too large to hold: ``chunks`` yields its jobs a few at a
        time, in the database thread, inside the one transaction (all or nothing)."""
        return self._add(chunks, {client: total}, idempotency, batch, total)

    def _add(
        self,
        chunks: Callable[[], Iterator[Sequence[Job]]],
        clients: Mapping[str, int],
        record: IdempotencyRecord | None,
        batch: BatchRecord | None,
        total: int,
    ) -> Deferred[None]:
        sql, owner, loop, inserter, tell, mark = (
            self.sql,
            self.owner,
            self.loop,
            self._inserter,
            self._tell_events,
            self._mark_deliveries,
        )
        delta = dict(clients)

        def add(conn: Connection) -> Result:
            if record is not None:
                # First: if the reservation is lost, the savepoint drops nothing but this.
                response = record.response
                headers = dumps([list(pair) for pair in response.headers])
                params = (response.status, headers, response.body, record.client, record.key)
                if conn.execute(sql.key_record, (*params, owner)).fetchone() is None:
                    raise IdempotencyInProgressError(
                        f"Idempotency-Key {record.key!r} is no longer reserved by this store"
                    )
            if batch is not None:
                batch_created(Recorder(conn, loop, batch.created_at, mark), batch, total)
                tell(conn)
            for jobs in chunks():
                inserter(jobs)(conn)
            # The insert fails only as a statement (a duplicate id), which the batch
            # reports: nothing to wait for here.
            return Later(lambda: (None, delta))

        return self._submit(add, events=batch is not None)

    def get(self, client: str, job_id: str) -> Deferred[Job | None]:
        query = self.sql.get

        def get(conn: Connection) -> tuple[Job | None, Delta]:
            row = conn.execute(query, (job_id, client)).fetchone()
            return (None if row is None else job_from_row(row)), NONE

        return self._read(get)

    def list_jobs(
        self, client: str, where: JobFilter | None, limit: int, before_id: str | None
    ) -> Deferred[list[Job]]:
        p = self.sql.p
        conditions = [f"client = {p}"]
        params: list[object] = [client]
        where = where or JobFilter()
        if where.state is not None:
            conditions.append(f"state = {p}")
            params.append(where.state.value)
        if where.created_since is not None:
            conditions.append(f"created_at >= {p}")
            params.append(where.created_since)
        if where.created_until is not None:
            conditions.append(f"created_at < {p}")
            params.append(where.created_until)
        for column, wanted in (
            ("batch", where.batch),
            ("host", where.host),
            ("error_code", where.error),
        ):
            if wanted is not None:
                conditions.append(f"{column} = {p}")
                params.append(wanted)
        if where.metadata_key is not None:
            condition, values = self.sql.metadata_match(where.metadata_key, where.metadata_value)
            conditions.append(condition)
            params.extend(values)
        if before_id is not None:
            conditions.append(f"id < {p}")
            params.append(before_id)
        query = f"{self.sql.select} WHERE {' AND '.join(conditions)} ORDER BY id DESC LIMIT {p}"
        params.append(max(0, limit))

        def list_jobs(conn: Connection) -> tuple[list[Job], Delta]:
            return [job_from_row(row) for row in conn.execute(query, params)], NONE

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
        """Claims go to the backend (``_claim``): with a cap, as ``Caps``, the skipped
        hosts having no room."""
        if limit <= 0:
            return succeed([])
        caps = None
        if per_host is not None or per_client is not None:
            caps = Caps(
                limit=limit,
                per_host=per_host,
                host_room={**(host_room or {}), **dict.fromkeys(skip_hosts, 0)},
                per_client=per_client,
                client_room=dict(client_room or {}) if per_client is not None else {},
            )
        return self._claim(limit, now, skip_hosts, caps)

    def save(self, jobs: Sequence[Job]) -> Deferred[None]:
        """Only jobs still ``running`` (on PostgreSQL: and owned by this instance) are
        updated: a job cancelled while it ran stays cancelled, and an instance whose lease
        expired cannot overwrite the next run. Both are counted in ``skipped_saves``.
        The events of the saved jobs, their webhooks and the ends of their batches are
        written in the same transaction (a save run again after a lost COMMIT finds its
        rows saved already, and writes none twice)."""
        if not jobs:
            return succeed(None)
        update = self._updater(jobs)
        batch, loop, tell, now = list(jobs), self.loop, self._tell_events, self._reactor.seconds()
        mark = self._mark_deliveries

        def save(conn: Connection) -> tuple[int, Delta]:
            saved, delta = update(conn)
            recorder = Recorder(conn, loop, now, mark)
            recorder.finish_batches(recorder.jobs(j for j in batch if j.id in saved))
            recorder.flush()
            if recorder.events:
                tell(conn)
            return len(batch) - len(saved), delta

        def skipped(count: int) -> None:
            self.skipped_saves += count

        return self._submit(save, retry=True, events=True).addCallback(skipped)

    def cancel(self, client: str, job_id: str, now: float) -> Deferred[Job | None]:
        """A running job owned by another instance is cancelled here, and its owner told
        (``_cancelled_running``), so that it stops the transfer."""
        sql, told, loop, tell = self.sql, self._cancelled_running, self.loop, self._tell_events
        mark = self._mark_deliveries

        def cancel(conn: Connection) -> tuple[Job | None, Delta]:
            row = conn.execute(sql.get_for_cancel, (job_id, client)).fetchone()
            if row is None:
                return None, NONE
            job, owner = job_from_row(row[:-1]), row[-1]
            if job.state.terminal:
                return job, NONE
            after = conn.execute(sql.cancel, (now, row[0])).fetchone()
            assert after is not None
            if job.state is JobState.RUNNING:
                told(conn, job_id, owner)
            cancelled = job_from_row(after)
            recorder = Recorder(conn, loop, now, mark)
            recorder.finish_batches(recorder.jobs([cancelled]))
            recorder.flush()
            tell(conn)
            return cancelled, ({client: -1} if job.state is JobState.QUEUED else NONE)

        return self._submit(cancel, events=True)

    def counts(self) -> Deferred[dict[JobState, int]]:
        def counts(conn: Connection) -> tuple[dict[JobState, int], Delta]:
            out = dict.fromkeys(JobState, 0)
            for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                out[JobState(state)] = n
            return out, NONE

        return self._read(counts)

    def client_counts(self, client: str) -> Deferred[dict[JobState, int]]:
        """The client's jobs by state (the dashboard's tiles)."""
        query = f"SELECT state, count(*) FROM jobs WHERE client = {self.sql.p} GROUP BY state"  # noqa: S608

        def counts(conn: Connection) -> tuple[dict[JobState, int], Delta]:
            out = dict.fromkeys(JobState, 0)
            for state, n in conn.execute(query, (client,)):
                out[JobState(state)] = n
            return out, NONE

        return self._read(counts)

    def client_hosts(
        self, client: str, errors_since: float, limit: int, host: str | None = None
    ) -> Deferred[list[tuple[str, int, int, dict[str, int]]]]:
        """The client's hosts (or ``host`` alone) with queued or running jobs or recent
        failures: (host, queued, running, failures since ``errors_since`` by error code),
        busiest first."""
        p = self.sql.p
        one = "" if host is None else f"AND host = {p} "
        only = () if host is None else (host,)
        active = (
            f"SELECT host, state, count(*) FROM jobs WHERE client = {p} {one}"  # noqa: S608
            "AND state IN ('queued', 'running') GROUP BY host, state"
        )
        failed = (
            f"SELECT host, error_code, count(*) FROM jobs WHERE client = {p} {one}"  # noqa: S608
            f"AND state = 'failed' AND finished_at >= {p} GROUP BY host, error_code"
        )

        def hosts(conn: Connection) -> tuple[list[tuple[str, int, int, dict[str, int]]], Delta]:
            rows: dict[str, list[Any]] = {}
            for name, state, n in conn.execute(active, (client, *only)):
                row = rows.setdefault(name, [name, 0, 0, {}])
                row[1 if state == "queued" else 2] += n
            for name, code, n in conn.execute(failed, (client, *only, errors_since)):
                rows.setdefault(name, [name, 0, 0, {}])[3][str(code)] = n
            busiest = sorted(rows.values(), key=lambda r: -(r[1] + r[2] + sum(r[3].values())))
            return [(r[0], r[1], r[2], r[3]) for r in busiest[:limit]], NONE

        return self._read(hosts)

    def queued(self) -> int:
        return self._counts.total

    def queued_for(self, client: str) -> int:
        return self._counts.for_client(client)

    def requeue_orphans(self, alive: Collection[str]) -> Deferred[list[str]]:
        """The self-check behind the retries (see ``JobStore.requeue_orphans``): the
        running rows are few (at most the scheduler's concurrency), so they are read and
        compared here rather than by shipping ``alive`` to the database."""
        query, params = self._owned_running()
        keep = frozenset(alive)
        requeue = self.sql.requeue_running

        def requeue_orphans(conn: Connection) -> tuple[list[str], Delta]:
            orphans = [(i, c) for i, c in conn.execute(query, params).fetchall() if i not in keep]
            back: Counter[str] = Counter()
            for job_id, client in orphans:
                if conn.execute(requeue, (job_id,)).fetchone() is not None:
                    back[client] += 1
            return [job_id for job_id, _ in orphans], back

        return self._submit(requeue_orphans)

    def purge(self, finished_before: float) -> Deferred[list[str]]:
        """Also drops Idempotency-Keys older than ``IDEMPOTENCY_TTL`` by the reactor's
        clock (the argument is about jobs; keys expire on their own schedule)."""
        expired_before = self._reactor.seconds() - IDEMPOTENCY_TTL
        sql = self.sql

        def purge(conn: Connection) -> tuple[list[str], Delta]:
            conn.execute(sql.key_purge, (expired_before,))
            rows = conn.execute(sql.purge, (finished_before, finished_before))
            return [row[0] for row in rows], NONE

        return self._submit(purge)
