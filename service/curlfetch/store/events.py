"""Batches, the event log and the webhook outbox: their tables, their SQL (in the
backend's placeholder style, ``LoopSQL``) and what runs in the database thread, inside
the transaction of the state change that causes them.

- **Batches.** A row per submission (``batches``); its jobs carry its id. Counts, bytes
  and errors are read from the jobs (``GROUP BY``) when asked: exact by construction,
  under retries, crashes and several instances. A batch is finished once none of its
  jobs is queued or running: the save or cancel that finishes its last job marks it,
  under the batch row's lock (``FOR UPDATE`` on PostgreSQL, where two instances may
  finish its last two jobs at once), and records ``batch.completed`` exactly once.
- **Events.** Every state change worth telling (``EVENT_TYPES``) is a row of ``events``,
  written in the transaction that makes the change. An event's id is ``<txid>-<seq>``:
  on SQLite ``txid`` is 0 and ``seq`` (AUTOINCREMENT: never reused) is the commit order;
  on PostgreSQL, where transactions of several instances commit out of ``seq`` order, a
  reader only sees events of transactions older than every transaction still running
  (``txid < txid_snapshot_xmin(txid_current_snapshot())``) and reads in ``(txid, seq)``
  order: a prefix nothing can be added to, so resuming after an id never skips one.
  ``event_horizon`` remembers the newest id retention deleted: a resume from before it
  has lost events, and is told so.
- **Outbox.** A webhook delivery is a row of ``deliveries``, inserted with its event.
  Senders claim due rows (``state`` pending → sending, with an owner and a lease; SKIP
  LOCKED on PostgreSQL, so no row is sent by two instances at once) and record each
  attempt; an expired lease puts the row back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..jobs import Job, JobState, Notify, rfc3339
from .portable import Connection, Types, cancel_jobs
from .rows import COLUMNS, dumps


def batches_table(t: Types) -> tuple[str, ...]:
    return (
        f"""
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            client TEXT NOT NULL,
            total INTEGER NOT NULL,
            created_at {t.time} NOT NULL,
            finished_at {t.time},
            cancelled_at {t.time},
            metadata TEXT,
            notify TEXT
        )
        """,
        "CREATE INDEX batches_client ON batches (client, id)",
        "CREATE INDEX batches_finished ON batches (finished_at)",
    )


def events_tables(seq: str, txid: str, t: Types) -> tuple[str, ...]:
    return (
        f"""
        CREATE TABLE events (
            seq {seq},
            txid {txid},
            client TEXT NOT NULL,
            type TEXT NOT NULL,
            batch TEXT,
            job TEXT,
            created_at {t.time} NOT NULL,
            data TEXT NOT NULL
        )
        """,
        "CREATE INDEX events_client ON events (client, txid, seq)",
        "CREATE INDEX events_created ON events (created_at)",
        """
        CREATE TABLE event_horizon (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            txid BIGINT NOT NULL,
            seq BIGINT NOT NULL
        )
        """,
    )


def deliveries_table(t: Types) -> tuple[str, ...]:
    return (
        f"""
        CREATE TABLE deliveries (
            seq {t.seq},
            id TEXT NOT NULL UNIQUE,
            client TEXT NOT NULL,
            url TEXT NOT NULL,
            type TEXT NOT NULL,
            batch TEXT,
            job TEXT,
            payload TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'sending', 'succeeded', 'failed')),
            created_at {t.time} NOT NULL,
            next_at {t.time} NOT NULL,
            finished_at {t.time},
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            log TEXT NOT NULL DEFAULT '[]',
            owner TEXT,
            lease_until {t.time}
        )
        """,
        "CREATE INDEX deliveries_due ON deliveries (state, next_at)",
        "CREATE INDEX deliveries_client ON deliveries (client, seq)",
        "CREATE INDEX deliveries_finished ON deliveries (finished_at)",
        f"""
        CREATE TABLE webhook_secrets (
            client TEXT PRIMARY KEY,
            secret TEXT NOT NULL,
            created_at {t.time} NOT NULL
        )
        """,
    )


def jobs_columns() -> tuple[str, ...]:
    """The jobs columns batches need: the batch, the body's size and the error's code
    (counted without parsing JSON)."""
    return (
        "ALTER TABLE jobs ADD COLUMN batch TEXT",
        "ALTER TABLE jobs ADD COLUMN bytes BIGINT",
        "ALTER TABLE jobs ADD COLUMN error_code TEXT",
        # One index serves the counts and the end check (batch, state), and a batch's
        # jobs listed by state in id order; a second (batch, id) would cost every insert.
        "CREATE INDEX jobs_batch ON jobs (batch, state, id) WHERE batch IS NOT NULL",
    )


# -- value types ---------------------------------------------------------------------------


@attrs.frozen
class BatchRecord:
    """A new batch, stored by ``add`` with its jobs."""

    id: str
    client: str
    created_at: float
    metadata: dict[str, Any] | None = None
    notify: Notify | None = None


@attrs.frozen
class Batch:
    """A batch as read: its row, and its jobs counted by state now."""

    id: str
    client: str
    total: int
    created_at: float
    finished_at: float | None
    cancelled_at: float | None
    metadata: dict[str, Any] | None
    notify: Notify | None
    counts: Mapping[str, int]
    bytes: int
    errors: tuple[tuple[str, int, tuple[str, ...]], ...]
    """(code, how many, a few job ids), most frequent first."""

    @property
    def done(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in JobState if s.terminal)


@attrs.frozen
class Event:
    id: str
    type: str
    created_at: float
    data: str
    """JSON."""


class EventsExpiredError(Exception):
    """A resume from before what retention deleted: events were lost to it."""


@attrs.frozen
class Delivery:
    """One webhook delivery, as claimed or listed. ``log`` holds every attempt."""

    id: str
    client: str
    url: str
    type: str
    batch: str | None
    job: str | None
    payload: str
    state: str
    created_at: float
    next_at: float
    finished_at: float | None
    attempts: int
    last_error: str | None
    log: tuple[dict[str, Any], ...]


BATCH_COLUMNS = "id, client, total, created_at, finished_at, cancelled_at, metadata, notify"
"""What ``read_batch`` reads, in its order."""

DELIVERY_COLUMNS = (
    "id, client, url, type, batch, job, payload, state, created_at, next_at, finished_at, "
    "attempts, last_error, log"
)


def delivery_from_row(row: Sequence[Any]) -> Delivery:
    values = list(row)
    values[-1] = tuple(json.loads(values[-1]))
    return Delivery(*values)


def parse_event_id(raw: str) -> tuple[int, int] | None:
    """``<txid>-<seq>``, or None if it is not one of ours."""
    txid, sep, seq = raw.partition("-")
    if not sep or not txid.isdigit() or not seq.isdigit() or len(raw) > 40:
        return None
    parsed = int(txid), int(seq)
    if max(parsed) >= 2**63:  # both are BIGINT in the store
        return None
    return parsed


def new_message_id() -> str:
    """A delivery's ``webhook-id``: time-sortable and unguessable, as a job id."""
    return f"msg_{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


# -- the SQL ---------------------------------------------------------------------------------


class LoopSQL:
    """The statements of this module in a backend's placeholder style ``p``.
    ``for_update`` locks a batch row; ``skip_locked`` lets claims pass rows others hold;
    ``horizon`` limits event reads to what can no longer change; ``after`` selects the
    events after a ``(txid, seq)`` (two parameters) so that the ``events_client`` index
    serves it (an ``OR`` of the two would scan the client's whole log)."""

    def __init__(self, p: str, for_update: str, skip_locked: str, horizon: str, after: str) -> None:
        self.p = p
        self.batch_insert = (
            "INSERT INTO batches (id, client, total, created_at, metadata, notify) "  # noqa: S608
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
        )
        self.batch_row = f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = {p}"  # noqa: S608
        self.batch_get = f"{self.batch_row} AND client = {p}"
        self.batch_lock = f"{self.batch_row}{for_update}"
        self.batch_counts = (
            f"SELECT state, count(*), coalesce(sum(bytes), 0) FROM jobs WHERE batch = {p} "  # noqa: S608
            "GROUP BY state"
        )
        self.batch_errors = (
            f"SELECT error_code, count(*) FROM jobs WHERE batch = {p} AND state = 'failed' "  # noqa: S608
            "GROUP BY error_code ORDER BY count(*) DESC, error_code LIMIT 10"
        )
        self.batch_error_jobs = (
            f"SELECT id FROM jobs WHERE batch = {p} AND state = 'failed' "  # noqa: S608
            f"AND error_code = {p} ORDER BY id LIMIT 3"
        )
        self.batch_unfinished = (
            f"SELECT 1 FROM jobs WHERE batch = {p} "  # noqa: S608
            "AND state IN ('queued', 'running') LIMIT 1"
        )
        self.batch_finish = (
            f"UPDATE batches SET finished_at = {p} WHERE id = {p} AND finished_at IS NULL"  # noqa: S608
        )
        self.batch_list = (
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE client = {p} "  # noqa: S608
            f"{{before}}ORDER BY id DESC LIMIT {p}"
        )
        self.batch_cancel_mark = (
            f"UPDATE batches SET cancelled_at = {p} WHERE id = {p} AND cancelled_at IS NULL"  # noqa: S608
        )
        self.batch_open_jobs = (
            f"SELECT id, state, owner FROM jobs WHERE batch = {p} "  # noqa: S608
            f"AND state IN ('queued', 'running') ORDER BY seq{for_update}"
        )
        self.batch_cancel_jobs = (
            f"{cancel_jobs(p)} batch = {p} AND state IN ('queued', 'running') RETURNING {COLUMNS}"
        )
        self.batch_purge = f"DELETE FROM batches WHERE finished_at < {p}"  # noqa: S608
        self.event_insert = (
            "INSERT INTO events (client, type, batch, job, created_at, data) "  # noqa: S608
            f"VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
        )
        after = f"client = {p} AND {after}{horizon}"
        self.events_after = (
            f"SELECT txid, seq, type, batch, created_at, data FROM events WHERE {after} "  # noqa: S608
            "{filters}ORDER BY txid, seq LIMIT " + p
        )
        self.events_newest = "SELECT txid, seq FROM events ORDER BY txid DESC, seq DESC LIMIT 1"
        self.horizon_get = "SELECT txid, seq FROM event_horizon"
        self.events_purge_newest = (
            f"SELECT txid, seq FROM events WHERE created_at < {p} "  # noqa: S608
            "ORDER BY txid DESC, seq DESC LIMIT 1"
        )
        self.events_count_before = f"SELECT count(*) FROM events WHERE created_at < {p}"  # noqa: S608
        self.events_purge = f"DELETE FROM events WHERE created_at < {p}"  # noqa: S608
        self.horizon_set = (
            f"INSERT INTO event_horizon (one, txid, seq) VALUES (1, {p}, {p}) "  # noqa: S608
            "ON CONFLICT (one) DO UPDATE SET txid = excluded.txid, seq = excluded.seq"
        )
        self.delivery_insert = (
            "INSERT INTO deliveries (id, client, url, type, batch, job, payload, state, "  # noqa: S608
            f"created_at, next_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, 'pending', {p}, {p})"
        )
        self.delivery_claim = (
            f"UPDATE deliveries SET state = 'sending', owner = {p}, lease_until = {p} "  # noqa: S608
            "WHERE seq IN (SELECT seq FROM deliveries WHERE state = 'pending' "
            f"AND next_at <= {p} ORDER BY next_at LIMIT {p}{skip_locked}) "
            f"RETURNING {DELIVERY_COLUMNS}"
        )
        self.delivery_done = (
            f"UPDATE deliveries SET state = {p}, attempts = attempts + 1, next_at = {p}, "  # noqa: S608
            f"finished_at = {p}, last_error = {p}, log = {p}, owner = NULL, lease_until = NULL "
            f"WHERE id = {p} AND state = 'sending' AND owner = {p} RETURNING 1"
        )
        self.delivery_log = f"SELECT log FROM deliveries WHERE id = {p}"  # noqa: S608
        self.delivery_reap = (
            "UPDATE deliveries SET state = 'pending', owner = NULL, lease_until = NULL "  # noqa: S608
            f"WHERE state = 'sending' AND (lease_until < {p} OR owner = {p}) RETURNING 1"
        )
        self.delivery_retry = (
            f"UPDATE deliveries SET state = 'pending', next_at = {p}, created_at = {p}, "  # noqa: S608
            "finished_at = NULL "
            f"WHERE id = {p} AND client = {p} AND state = 'failed' "
            f"RETURNING {DELIVERY_COLUMNS}"
        )
        self.delivery_get = (
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = {p} AND client = {p}"  # noqa: S608
        )
        self.delivery_list = (
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE client = {p} "  # noqa: S608
            "{filters}ORDER BY seq DESC LIMIT " + p
        )
        self.delivery_seq = f"SELECT seq FROM deliveries WHERE id = {p} AND client = {p}"  # noqa: S608
        self.delivery_stats = (
            "SELECT count(*), min(created_at) FROM deliveries WHERE state IN ('pending', 'sending')"
        )
        self.delivery_purge = (
            "DELETE FROM deliveries WHERE state IN ('succeeded', 'failed') "  # noqa: S608
            f"AND finished_at < {p}"
        )
        self.secret_get = f"SELECT secret FROM webhook_secrets WHERE client = {p}"  # noqa: S608
        self.secret_set = (
            f"INSERT INTO webhook_secrets (client, secret, created_at) VALUES ({p}, {p}, {p}) "  # noqa: S608
            "ON CONFLICT (client) DO UPDATE SET secret = excluded.secret, "
            "created_at = excluded.created_at"
        )


# -- in the database thread --------------------------------------------------------------


def envelope(head: dict[str, Any], data: str) -> str:
    """``head`` as a JSON object with ``"data"`` added: the event's JSON as stored, not
    decoded and encoded again (a webhook's body, an SSE event's data)."""
    return f'{dumps(head)[:-1]},"data":{data}}}'


def job_summary(job: Job) -> dict[str, Any]:
    """What an event (and a webhook) says of a job: enough to act on without a GET."""
    out: dict[str, Any] = {
        "id": job.id,
        "batch": job.batch,
        "state": job.state.value,
        "url": job.spec.url,
        "attempts": job.attempts,
        "metadata": job.spec.metadata,
    }
    if job.state is JobState.QUEUED:
        out["retry_at"] = rfc3339(job.not_before)
    if job.finished_at is not None:
        out["finished_at"] = rfc3339(job.finished_at)
    if job.result is not None:
        out["status"] = job.result.status
        body = job.result.body
        if body is not None:
            out["body"] = {"size": body.size, "sha256": body.sha256}
    if job.error is not None:
        out["error"] = job.error.to_json()
    return out


def job_event_type(job: Job) -> str | None:
    """The event a saved or cancelled job makes; None for a requeue without an attempt
    (a drain hands the job back: nothing happened to it)."""
    if job.state is JobState.SUCCEEDED:
        return "job.succeeded"
    if job.state is JobState.FAILED:
        return "job.failed"
    if job.state is JobState.CANCELLED:
        return "job.cancelled"
    if job.state is JobState.QUEUED and job.started_at is not None:
        return "job.retrying"
    return None


class Recorder:
    """Collects events and their deliveries for the caller's transaction, and writes them
    in one ``executemany`` each (``flush``); reads each batch's notify at most once.
    ``on_deliveries`` is called (in the database thread) when a flush wrote deliveries."""

    def __init__(
        self,
        conn: Connection,
        sql: LoopSQL,
        now: float,
        on_deliveries: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.sql = sql
        self.now = now
        self.on_deliveries = on_deliveries
        self._batches: dict[str, tuple[Any, ...] | None] = {}
        self._events: list[tuple[object, ...]] = []
        self._deliveries: list[tuple[object, ...]] = []
        self.events = 0

    def batch_row(self, batch_id: str, lock: bool = False) -> tuple[Any, ...] | None:
        if lock or batch_id not in self._batches:
            query = self.sql.batch_lock if lock else self.sql.batch_row
            row = self.conn.execute(query, (batch_id,)).fetchone()
            self._batches[batch_id] = None if row is None else tuple(row)
        return self._batches[batch_id]

    def event(  # noqa: PLR0917 - one event's columns
        self,
        client: str,
        kind: str,
        batch: str | None,
        job: str | None,
        data: dict[str, Any],
        notifies: Iterable[Notify | None],
    ) -> None:
        payload = dumps(data)
        self._events.append((client, kind, batch, job, self.now, payload))
        self.events += 1
        body = None
        for notify in notifies:
            if notify is not None and kind in notify.events:
                if body is None:
                    body = envelope({"type": kind, "timestamp": rfc3339(self.now)}, payload)
                self._deliveries.append(
                    (
                        new_message_id(),
                        client,
                        notify.url,
                        kind,
                        batch,
                        job,
                        body,
                        self.now,
                        self.now,
                    )
                )

    def flush(self) -> None:
        """Write what was collected, in order."""
        events, self._events = self._events, []
        deliveries, self._deliveries = self._deliveries, []
        if events:
            self.conn.cursor().executemany(self.sql.event_insert, events)
        if deliveries:
            self.conn.cursor().executemany(self.sql.delivery_insert, deliveries)
            if self.on_deliveries is not None:
                self.on_deliveries()

    def jobs(self, jobs: Iterable[Job]) -> set[str]:
        """The events of saved or cancelled jobs; returns the batches where one finished."""
        finished: set[str] = set()
        for job in jobs:
            kind = job_event_type(job)
            if kind is None:
                continue
            notifies: list[Notify | None] = [job.spec.notify]
            if job.batch is not None:
                row = self.batch_row(job.batch)
                if row is not None and row[7] is not None:
                    notifies.append(Notify.from_json(json.loads(row[7])))
                if job.state.terminal:
                    finished.add(job.batch)
            self.event(job.client, kind, job.batch, job.id, {"job": job_summary(job)}, notifies)
        return finished

    def finish_batches(self, batch_ids: Iterable[str]) -> None:
        """Mark each batch finished if none of its jobs is left to run, and record
        ``batch.completed`` once: under the batch row's lock, so that two transactions
        finishing its last jobs at once cannot both miss (or both see) the end."""
        for batch_id in sorted(batch_ids):
            row = self.batch_row(batch_id, lock=True)
            if row is None or row[4] is not None:
                continue
            if self.conn.execute(self.sql.batch_unfinished, (batch_id,)).fetchone() is not None:
                continue
            self.conn.execute(self.sql.batch_finish, (self.now, batch_id))
            batch = read_batch(self.conn, self.sql, row, finished_at=self.now)
            notify = None if row[7] is None else Notify.from_json(json.loads(row[7]))
            self.event(
                batch.client,
                "batch.completed",
                batch.id,
                None,
                {"batch": batch_summary(batch)},
                [notify],
            )


def batch_created(rec: Recorder, batch: BatchRecord, total: int) -> None:
    rec.conn.execute(
        rec.sql.batch_insert,
        (
            batch.id,
            batch.client,
            total,
            batch.created_at,
            None if batch.metadata is None else dumps(batch.metadata),
            None if batch.notify is None else dumps(batch.notify.to_json()),
        ),
    )
    data = {"batch": {"id": batch.id, "total": total, "metadata": batch.metadata}}
    rec.event(batch.client, "batch.created", batch.id, None, data, [batch.notify])
    rec.flush()


def read_batch(
    conn: Connection, sql: LoopSQL, row: Sequence[Any], finished_at: float | None = None
) -> Batch:
    batch_id = row[0]
    counts: dict[str, int] = {}
    total_bytes = 0
    for state, n, size in conn.execute(sql.batch_counts, (batch_id,)).fetchall():
        counts[state] = int(n)
        total_bytes += int(size)
    errors = []
    for code, n in conn.execute(sql.batch_errors, (batch_id,)).fetchall():
        ids = [r[0] for r in conn.execute(sql.batch_error_jobs, (batch_id, code)).fetchall()]
        errors.append((str(code), int(n), tuple(ids)))
    return Batch(
        id=batch_id,
        client=row[1],
        total=int(row[2]),
        created_at=row[3],
        finished_at=row[4] if finished_at is None else finished_at,
        cancelled_at=row[5],
        metadata=None if row[6] is None else json.loads(row[6]),
        notify=None if row[7] is None else Notify.from_json(json.loads(row[7])),
        counts={s.value: counts.get(s.value, 0) for s in JobState},
        bytes=total_bytes,
        errors=tuple(errors),
    )


def batch_summary(batch: Batch) -> dict[str, Any]:
    """A batch in events and webhooks (the API's view adds its links)."""
    return {
        "id": batch.id,
        "state": batch_state(batch),
        "total": batch.total,
        "done": batch.done,
        "counts": dict(batch.counts),
        "bytes": batch.bytes,
        "created_at": rfc3339(batch.created_at),
        "finished_at": rfc3339(batch.finished_at),
        "cancelled_at": rfc3339(batch.cancelled_at),
        "metadata": batch.metadata,
    }


def batch_state(batch: Batch) -> str:
    if batch.finished_at is None:
        return "cancelling" if batch.cancelled_at is not None else "running"
    return "cancelled" if batch.cancelled_at is not None else "completed"


def cursor_of(row: Sequence[Any] | None) -> tuple[int, int]:
    return (0, 0) if row is None else (int(row[0]), int(row[1]))
