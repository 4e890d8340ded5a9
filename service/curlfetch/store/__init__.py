"""The durable job store: the interface every backend implements, so the scheduler and
the API never see SQL.

Every method returns a Deferred and never blocks the reactor. A Deferred from ``add``
fires only once the jobs are committed: the API answers 201 after that, never before.

The package:

- this module: the ``JobStore`` interface, its value types and errors;
- ``core``: ``StoreCore``, what both backends share: the batching writer (one
  transaction per reactor turn), the close protocol, the counters, and the ``JobStore``
  methods written once against the backend's connection;
- ``rows``: how a ``Job`` becomes a row and back, and how a stored Idempotency-Key is
  judged;
- ``sqlite``: ``SQLiteJobStore``, one file behind one connection, and its SQL;
- ``postgres``: ``PostgresJobStore``, several instances on one PostgreSQL: threads,
  pipeline mode, leases, NOTIFY, and its SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from ..jobs import Job, JobState

__all__ = [
    "IDEMPOTENCY_ABANDONED_AFTER",
    "IDEMPOTENCY_TTL",
    "Batch",
    "BatchRecord",
    "Cooldown",
    "Delivery",
    "Event",
    "EventsExpiredError",
    "IdempotencyInProgressError",
    "IdempotencyMismatchError",
    "IdempotencyRecord",
    "JobFilter",
    "JobStore",
    "RobotsRow",
    "SchemaVersionError",
    "StoreClosedError",
    "StoreUnavailableError",
    "StoredResponse",
]

if TYPE_CHECKING:
    from .events import Batch, BatchRecord, Delivery, Event
    from .hosts import Cooldown, RobotsRow

IDEMPOTENCY_TTL = 24 * 3600.0
"""Seconds an Idempotency-Key is remembered (the IETF draft and Stripe: at least 24 h)."""

IDEMPOTENCY_ABANDONED_AFTER = 60.0
"""Seconds after which a reservation made by *another* store instance counts as abandoned
(its process died between ``reserve_key`` and ``add``) and may be taken over. A store
never abandons its own reservations: its API records or releases every one of them.
An instance is one store object in one process: a restarted process is another instance
(even with the same configured instance id), so its predecessor's reservations are
abandoned after this bound rather than held until the TTL."""


@attrs.frozen
class JobFilter:
    """Which of a client's jobs a listing or an export selects; every condition given
    must hold. ``created_since`` is inclusive and ``created_until`` exclusive (Unix
    seconds); ``metadata_key`` alone selects jobs whose metadata has that key, with
    ``metadata_value`` those where it is that string."""

    state: JobState | None = None
    created_since: float | None = None
    created_until: float | None = None
    metadata_key: str | None = None
    metadata_value: str | None = None
    batch: str | None = None
    host: str | None = None
    """``host:port`` as the scheduler keys it (lower-cased)."""
    error: str | None = None
    """The error's code or curl name (``COULDNT_CONNECT``, ``egress_denied``)."""


@attrs.frozen
class StoredResponse:
    """The response first given for an Idempotency-Key, replayed for a repeat."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@attrs.frozen
class IdempotencyRecord:
    """Stored with the jobs it created, in the same transaction (``add``)."""

    client: str
    key: str
    response: StoredResponse


class IdempotencyMismatchError(Exception):
    """The key was used before with a different request body (422)."""


class IdempotencyInProgressError(Exception):
    """The first request with this key is still being accepted (409)."""


class StoreClosedError(RuntimeError):
    """The store is not open (never opened, closing, or closed). One type for every
    backend: the API maps it to 503."""


class StoreUnavailableError(StoreClosedError):
    """The database could not be reached, or failed under a batch (a lost connection, a
    restart, ``database is locked``, an I/O error, a full disk). A ``StoreClosedError``,
    so that every caller that answers "try again later" (the API's 503) does so here too.

    ``committed`` says what the store knows of the batch: False, rolled back; None, its
    fate unknown (the connection died during COMMIT and the database did not answer).
    A batch known to have committed is not a failure: its results are delivered."""

    def __init__(self, message: str, committed: bool | None = False) -> None:
        super().__init__(message)
        self.committed = committed


class SchemaVersionError(RuntimeError):
    """The database was written by a newer curlfetch: refuse rather than corrupt it."""


class JobStore(Protocol):
    @property
    def retried_ops(self) -> int:
        """Operations run again after the database failed under them (a metric)."""

    def open(self) -> Deferred[int]:
        """Create or migrate the schema, then put jobs left ``running`` by a previous
        process back to ``queued`` (at-least-once execution). Fires with how many."""

    def close(self) -> Deferred[None]:
        """Flush pending writes and release the database."""

    def ping(self) -> Deferred[None]:
        """Fails if the database cannot be reached (readiness)."""

    def reserve_key(
        self, client: str, key: str, fingerprint: str, now: float
    ) -> Deferred[StoredResponse | None]:
        """Claim ``key`` for a new submission (fires None), or fire with the response
        recorded for an earlier one with the same ``fingerprint`` (a hash of the request
        body). Fails with ``IdempotencyMismatchError`` for another fingerprint and with
        ``IdempotencyInProgressError`` while the first is reserved but not recorded.
        Keys older than ``IDEMPOTENCY_TTL`` count as absent. Scoped to the client.

        In order: an expired key, or another instance's reservation older than
        ``IDEMPOTENCY_ABANDONED_AFTER``, is replaced by a new reservation (fires None);
        then another fingerprint is a mismatch (even while reserved); then a reservation
        is in progress; then the recorded response is replayed. A key's age counts from
        its reservation."""

    def release_key(self, client: str, key: str) -> Deferred[None]:
        """Forget a reservation whose submission was refused, so a retry can use it.
        Only this instance's own reservation is deleted: never a recorded response, nor a
        reservation another instance took over, so calling it after ``add`` is harmless."""

    def add(
        self,
        jobs: Sequence[Job],
        idempotency: IdempotencyRecord | None = None,
        batch: BatchRecord | None = None,
    ) -> Deferred[None]:
        """Insert ``jobs`` (all ``queued``) in one transaction; fires once committed.
        With ``idempotency``, the reserved key's response is recorded in the same
        transaction, so a key never points at jobs that were not stored. If this
        instance no longer holds the reservation (released, or taken over as abandoned),
        it fails with ``IdempotencyInProgressError`` and stores nothing. With ``batch``,
        its row and its ``batch.created`` event go in the same transaction."""

    def add_stream(
        self,
        client: str,
        chunks: Callable[[], Iterator[Sequence[Job]]],
        total: int,
        batch: BatchRecord,
        idempotency: IdempotencyRecord | None = None,
    ) -> Deferred[None]:
        """``add`` for a batch too large to hold in memory: ``chunks`` is called in the
        database thread and yields the jobs a few at a time, in one transaction."""

    def get(self, client: str, job_id: str) -> Deferred[Job | None]:
        """The job, or None if it does not exist or belongs to another client."""

    def list_jobs(
        self, client: str, where: JobFilter | None, limit: int, before_id: str | None
    ) -> Deferred[list[Job]]:
        """A client's jobs that ``where`` selects, newest first, with ids below
        ``before_id`` (the cursor)."""

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
        """Mark up to ``limit`` runnable jobs ``running`` and return them: ``queued``,
        ``not_before <= now``, host not in ``skip_hosts``; highest priority first, FIFO
        within a priority. ``attempts`` is incremented and ``started_at`` set.

        With ``per_host``, at most that many jobs of one host are claimed (at most
        ``host_room[host]`` for hosts listed there), so one host's backlog cannot hold
        the slots other hosts could use. ``per_client`` and ``client_room`` do the same
        per client (its in-flight quota): a claim never gives a client more than its room,
        and a client (or host) without room does not hold back the others' jobs."""

    def save(self, jobs: Sequence[Job]) -> Deferred[None]:
        """Persist new states of claimed jobs (finished, or requeued for a retry).

        Only jobs still ``running`` are updated (a job cancelled while it ran stays
        cancelled; a multi-instance backend also checks the lease owner). Writes are
        batched: one transaction per reactor turn."""

    def cancel(self, client: str, job_id: str, now: float) -> Deferred[Job | None]:
        """Cancel a non-terminal job and return it as stored afterwards; return the
        unchanged job if it was already terminal, None if unknown."""

    def counts(self) -> Deferred[dict[JobState, int]]:
        """How many jobs are in each state."""

    def queued(self) -> int:
        """Jobs waiting to run, as of the last write (cheap: for backpressure)."""

    def queued_for(self, client: str) -> int:
        """The client's jobs waiting to run, as of the last write (cheap: its quota)."""

    def purge(self, finished_before: float) -> Deferred[list[str]]:
        """Delete terminal jobs finished before the time; fires with their ids. Also drops
        Idempotency-Keys older than ``IDEMPOTENCY_TTL``."""

    # -- batches, events, the webhook outbox (``curlfetch.store.loop``) --------------------

    event_listeners: list[Callable[[], None]]
    delivery_listeners: list[Callable[[], None]]

    def client_counts(self, client: str) -> Deferred[dict[JobState, int]]: ...
    def client_hosts(
        self, client: str, errors_since: float, limit: int, host: str | None = None
    ) -> Deferred[list[tuple[str, int, int, dict[str, int]]]]: ...
    def get_batch(self, client: str, batch_id: str) -> Deferred[Batch | None]: ...
    def batch_finished(self, client: str, batch_id: str) -> Deferred[bool | None]: ...
    def list_batches(
        self, client: str, limit: int, before_id: str | None
    ) -> Deferred[list[Batch]]: ...
    def cancel_batch(
        self, client: str, batch_id: str, now: float
    ) -> Deferred[tuple[Batch, list[str]] | None]: ...
    def events_start(self) -> Deferred[tuple[int, int]]: ...
    def events_after(
        self,
        client: str,
        after: tuple[int, int],
        limit: int,
        batch: str | None = None,
        types: Collection[str] | None = None,
    ) -> Deferred[list[Event]]: ...
    def claim_deliveries(
        self, limit: int, now: float, lease: float
    ) -> Deferred[list[Delivery]]: ...
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
    ) -> Deferred[bool]: ...
    def reap_deliveries(self, now: float, *, own: bool = False) -> Deferred[int]: ...
    def get_delivery(self, client: str, delivery_id: str) -> Deferred[Delivery | None]: ...
    def list_deliveries(
        self, client: str, state: str | None, limit: int, before_id: str | None
    ) -> Deferred[list[Delivery]]: ...
    def retry_delivery(
        self, client: str, delivery_id: str, now: float
    ) -> Deferred[tuple[Delivery | None, bool]]: ...
    def delivery_stats(self) -> Deferred[tuple[int, float | None]]: ...
    def webhook_secret(self, client: str) -> Deferred[str | None]: ...
    def set_webhook_secret(self, client: str, secret: str, now: float) -> Deferred[None]: ...
    def purge_loop(self, events_before: float, finished_before: float) -> Deferred[int]: ...

    # -- politeness (``curlfetch.store.hosts``) ---------------------------------------------

    def set_cooldown(self, host: str, until: float, reason: str, now: float) -> Deferred[None]: ...
    def cooldowns(
        self, now: float, hosts: Collection[str] | None = None
    ) -> Deferred[dict[str, Cooldown]]: ...
    def robots_get(self, origins: Collection[str]) -> Deferred[dict[str, RobotsRow]]: ...
    def robots_put(self, row: RobotsRow) -> Deferred[None]: ...

    def requeue_orphans(self, alive: Collection[str]) -> Deferred[list[str]]:
        """Put back to ``queued`` the jobs this store's process holds as ``running``
        (on PostgreSQL: owned by this instance) whose ids are not in ``alive``: a claim
        whose answer was lost with its connection, or any other write that went astray.
        The caller passes every job it has claimed and not yet seen saved, and calls this
        only while no claim of its own is outstanding. Fires with the ids requeued
        (attempts kept: at-least-once)."""


# Last: ``events`` (through ``portable``) imports the errors above.
from .events import Batch, BatchRecord, Delivery, Event, EventsExpiredError  # noqa: E402
from .hosts import Cooldown, RobotsRow  # noqa: E402
