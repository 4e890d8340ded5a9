"""The store's methods for batches, the event log, the webhook outbox and webhook secrets,
written once for both backends over ``LoopSQL`` (``events``). ``StoreCore`` inherits
them; its batching writer runs them (``_submit`` for writes, ``_read`` for reads)."""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred

from .events import (
    Batch,
    Delivery,
    Event,
    EventsExpiredError,
    LoopSQL,
    Recorder,
    cursor_of,
    delivery_from_row,
    read_batch,
)
from .portable import Connection
from .rows import dumps, job_from_row

Work = Callable[[Any], Any]


class StoreOps(abc.ABC):
    """What the store's method mixins run their work through (``StoreCore`` has it)."""

    @abc.abstractmethod
    def _submit(
        self,
        work: Work,
        *,
        write: bool = True,
        lock: bool = False,
        recount: bool = False,
        retry: bool = False,
        events: bool = False,
    ) -> Deferred[Any]: ...

    @abc.abstractmethod
    def _read(self, work: Work) -> Deferred[Any]: ...


class LoopMethods(StoreOps):
    """Batches, events, deliveries and secrets; see ``curlfetch.store.events``."""

    @property
    @abc.abstractmethod
    def loop(self) -> LoopSQL: ...

    @property
    @abc.abstractmethod
    def delivery_owner(self) -> str: ...

    @abc.abstractmethod
    def _cancelled_running(self, conn: Any, job_id: str, owner: str | None) -> None: ...

    @abc.abstractmethod
    def _tell_events(self, conn: Any) -> None: ...

    @abc.abstractmethod
    def _mark_deliveries(self) -> None: ...

    @abc.abstractmethod
    def _events_start(self, conn: Any) -> tuple[int, int]:
        """Where a stream that resumes nothing starts: after every event that can no
        longer change."""

    # -- batches -------------------------------------------------------------------------------

    def get_batch(self, client: str, batch_id: str) -> Deferred[Batch | None]:
        """The batch with its jobs counted now, or None (unknown, or another client's)."""
        sql = self.loop

        def get(conn: Connection) -> tuple[Batch | None, Any]:
            row = conn.execute(sql.batch_get, (batch_id, client)).fetchone()
            return (None if row is None else read_batch(conn, sql, row)), {}

        return self._read(get)

    def batch_finished(self, client: str, batch_id: str) -> Deferred[bool | None]:
        """Whether the batch is finished (None: no such batch): one row, for long-polls
        that would otherwise count 100,000 jobs at every commit."""
        sql = self.loop

        def finished(conn: Connection) -> tuple[bool | None, Any]:
            row = conn.execute(sql.batch_get, (batch_id, client)).fetchone()
            return (None if row is None else row[4] is not None), {}

        return self._read(finished)

    def list_batches(self, client: str, limit: int, before_id: str | None) -> Deferred[list[Batch]]:
        """The client's batches, newest first, with ids below ``before_id``."""
        sql = self.loop
        before = f"AND id < {sql.p} " if before_id is not None else ""
        query = sql.batch_list.format(before=before)
        params: tuple[object, ...] = (
            (client, before_id, limit) if before_id is not None else (client, limit)
        )

        def list_batches(conn: Connection) -> tuple[list[Batch], Any]:
            rows = conn.execute(query, params).fetchall()
            return [read_batch(conn, sql, row) for row in rows], {}

        return self._read(list_batches)

    def cancel_batch(
        self, client: str, batch_id: str, now: float
    ) -> Deferred[tuple[Batch, list[str]] | None]:
        """Cancel every job of the batch that is queued or running, in one transaction,
        with their events; fires with the batch after, and the ids of the jobs that were
        running (their transfers must stop: other instances are told here), or None if
        there is no such batch."""
        loop, told, tell = self.loop, self._cancelled_running, self._tell_events
        mark = self._mark_deliveries

        def cancel(conn: Connection) -> tuple[tuple[Batch, list[str]] | None, Any]:
            if conn.execute(loop.batch_get, (batch_id, client)).fetchone() is None:
                return None, {}
            conn.execute(loop.batch_cancel_mark, (now, batch_id))
            # Lock what is open first (on PostgreSQL a claim may not slip in between),
            # then cancel it in one statement: a 100,000-job batch is two statements.
            was = {
                row[0]: (row[1], row[2]) for row in conn.execute(loop.batch_open_jobs, (batch_id,))
            }
            cancelled = [
                job_from_row(row)
                for row in conn.execute(loop.batch_cancel_jobs, (now, batch_id)).fetchall()
            ]
            running: list[str] = []
            queued = 0
            for job in cancelled:
                state, owner = was.get(job.id, ("queued", None))
                if state == "running":
                    running.append(job.id)
                    told(conn, job.id, owner)
                else:
                    queued += 1
            recorder = Recorder(conn, loop, now, mark)
            recorder.jobs(cancelled)
            recorder.finish_batches([batch_id])
            recorder.flush()
            tell(conn)
            row = conn.execute(loop.batch_row, (batch_id,)).fetchone()
            return (read_batch(conn, loop, row), running), ({client: -queued} if queued else {})

        return self._submit(cancel, events=True)

    # -- events --------------------------------------------------------------------------------

    def events_start(self) -> Deferred[tuple[int, int]]:
        start = self._events_start
        return self._read(lambda conn: (start(conn), {}))

    def events_after(
        self,
        client: str,
        after: tuple[int, int],
        limit: int,
        batch: str | None = None,
        types: Collection[str] | None = None,
    ) -> Deferred[list[Event]]:
        """The client's events after the id ``after``, oldest first. Fails with
        ``EventsExpiredError`` if retention deleted events after it."""
        sql = self.loop
        filters = ""
        params: list[object] = [client, after[0], after[1]]
        if batch is not None:
            filters += f"AND batch = {sql.p} "
            params.append(batch)
        if types:
            filters += f"AND type IN ({', '.join([sql.p] * len(types))}) "
            params.extend(sorted(types))
        params.append(limit)
        query = sql.events_after.format(filters=filters)

        def read(conn: Connection) -> tuple[list[Event], Any]:
            horizon = cursor_of(conn.execute(sql.horizon_get).fetchone())
            if after < horizon:
                raise EventsExpiredError(
                    f"events after {after[0]}-{after[1]} were deleted by retention "
                    f"(kept from {horizon[0]}-{horizon[1]} on)"
                )
            return [
                Event(f"{txid}-{seq}", kind, created_at, data)
                for txid, seq, kind, _batch, created_at, data in conn.execute(query, params)
            ], {}

        return self._read(read)

    # -- the outbox ------------------------------------------------------------------------------

    def claim_deliveries(self, limit: int, now: float, lease: float) -> Deferred[list[Delivery]]:
        """Up to ``limit`` due deliveries, marked ``sending`` for this store until
        ``now + lease``; on PostgreSQL no two instances claim one row."""
        sql, owner = self.loop, self.delivery_owner
        if limit <= 0:
            return self._read(lambda conn: ([], {}))

        def claim(conn: Connection) -> tuple[list[Delivery], Any]:
            rows = conn.execute(sql.delivery_claim, (owner, now + lease, now, limit)).fetchall()
            out = [delivery_from_row(r) for r in rows]
            out.sort(key=lambda d: d.next_at)
            return out, {}

        return self._submit(claim)

    def finish_delivery(
        self,
        delivery_id: str,
        *,
        state: str,
        next_at: float,
        finished_at: float | None,
        error: str | None,
        attempt: dict[str, Any],
        keep: int = 50,
    ) -> Deferred[bool]:
        """Record an attempt and the delivery's next state (``pending`` again at
        ``next_at``, ``succeeded`` or ``failed``); False if it was no longer ours (its
        lease expired and another sender took it). The log keeps the last ``keep``."""
        sql, owner = self.loop, self.delivery_owner

        def finish(conn: Connection) -> tuple[bool, Any]:
            row = conn.execute(sql.delivery_log, (delivery_id,)).fetchone()
            if row is None:
                return False, {}
            log = [*json.loads(row[0]), attempt][-keep:]
            done = conn.execute(
                sql.delivery_done,
                (state, next_at, finished_at, error, dumps(log), delivery_id, owner),
            ).fetchone()
            return done is not None, {}

        return self._submit(finish)

    def reap_deliveries(self, now: float, *, own: bool = False) -> Deferred[int]:
        """Put back to ``pending`` the deliveries whose lease expired, and with ``own``
        this store's (at start: a predecessor with the same id died sending them)."""
        sql = self.loop
        owner = self.delivery_owner if own else ""  # no owner is empty

        def reap(conn: Connection) -> tuple[int, Any]:
            return len(conn.execute(sql.delivery_reap, (now, owner)).fetchall()), {}

        return self._submit(reap)

    def get_delivery(self, client: str, delivery_id: str) -> Deferred[Delivery | None]:
        sql = self.loop

        def get(conn: Connection) -> tuple[Delivery | None, Any]:
            row = conn.execute(sql.delivery_get, (delivery_id, client)).fetchone()
            return (None if row is None else delivery_from_row(row)), {}

        return self._read(get)

    def list_deliveries(
        self, client: str, state: str | None, limit: int, before_id: str | None
    ) -> Deferred[list[Delivery]]:
        """The client's deliveries, newest first; ``before_id`` is the cursor."""
        sql = self.loop
        filters = ""
        params: list[object] = [client]
        if state is not None:
            filters += f"AND state = {sql.p} "
            params.append(state)
        if before_id is not None:
            filters += f"AND seq < coalesce((SELECT seq FROM deliveries WHERE id = {sql.p}), 0) "  # noqa: S608
            params.append(before_id)
        params.append(limit)
        query = sql.delivery_list.format(filters=filters)

        def list_deliveries(conn: Connection) -> tuple[list[Delivery], Any]:
            return [delivery_from_row(r) for r in conn.execute(query, params)], {}

        return self._read(list_deliveries)

    def retry_delivery(
        self, client: str, delivery_id: str, now: float
    ) -> Deferred[tuple[Delivery | None, bool]]:
        """A failed delivery back to ``pending`` now: (the delivery, whether it was put
        back); (None, False) if unknown."""
        sql = self.loop

        def retry(conn: Connection) -> tuple[tuple[Delivery | None, bool], Any]:
            row = conn.execute(sql.delivery_retry, (now, now, delivery_id, client)).fetchone()
            if row is not None:
                return (delivery_from_row(row), True), {}
            row = conn.execute(sql.delivery_get, (delivery_id, client)).fetchone()
            return ((None if row is None else delivery_from_row(row)), False), {}

        def retried(outcome: tuple[Delivery | None, bool]) -> tuple[Delivery | None, bool]:
            if outcome[1]:
                self._deliveries_due()
            return outcome

        return self._submit(retry).addCallback(retried)

    @abc.abstractmethod
    def _deliveries_due(self) -> None:
        """On the reactor: deliveries became due (wake the sender)."""

    def delivery_stats(self) -> Deferred[tuple[int, float | None]]:
        """(deliveries pending or being sent, the oldest one's creation time)."""
        sql = self.loop

        def stats(conn: Connection) -> tuple[tuple[int, float | None], Any]:
            row = conn.execute(sql.delivery_stats).fetchone()
            return (int(row[0]), row[1]), {}

        return self._read(stats)

    # -- webhook secrets ----------------------------------------------------------------------

    def webhook_secret(self, client: str) -> Deferred[str | None]:
        sql = self.loop

        def get(conn: Connection) -> tuple[str | None, Any]:
            row = conn.execute(sql.secret_get, (client,)).fetchone()
            return (None if row is None else str(row[0])), {}

        return self._read(get)

    def set_webhook_secret(self, client: str, secret: str, now: float) -> Deferred[None]:
        sql = self.loop

        def put(conn: Connection) -> tuple[None, Any]:
            conn.execute(sql.secret_set, (client, secret, now))
            return None, {}

        return self._submit(put)

    # -- retention -------------------------------------------------------------------------------

    def purge_loop(self, events_before: float, finished_before: float) -> Deferred[int]:
        """Delete events older than ``events_before`` (remembering the newest deleted:
        a resume from before it is told events were lost), and deliveries and batches
        finished before ``finished_before``. Fires with the events deleted."""
        sql = self.loop

        def purge(conn: Connection) -> tuple[int, Any]:
            newest = conn.execute(sql.events_purge_newest, (events_before,)).fetchone()
            deleted = 0
            if newest is not None:
                conn.execute(sql.horizon_set, (int(newest[0]), int(newest[1])))
                deleted = int(conn.execute(sql.events_count_before, (events_before,)).fetchone()[0])
                conn.execute(sql.events_purge, (events_before,))
            conn.execute(sql.delivery_purge, (finished_before,))
            conn.execute(sql.batch_purge, (finished_before,))
            return deleted, {}

        return self._submit(purge)
