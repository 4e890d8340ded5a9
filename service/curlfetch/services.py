"""The service tree's parts: the root that starts and stops its children in order, the
children made of two callables (the stores, the engine, metrics), and retention.

Order of start-up and shutdown (``CurlfetchService``):

- twistd does not wait for a Deferred returned by ``startService``, so the root starts its
  children one after another itself, each once the previous one is up: the store opens
  (putting jobs a killed process left ``running`` back to ``queued``) before the scheduler
  claims anything, and the HTTP port opens last. A listening port means a ready service;
  before that, connections are refused. If start-up fails, the process exits with 1.
- SIGTERM: twistd's handler calls ``reactor.stop()``, which fires the "before shutdown"
  triggers and waits for their Deferreds; twistd registered the application's
  ``stopService`` as one of them. The root's ``stopService`` drains first, with the port
  still open: ``/readyz`` and new submissions answer 503 at once, transfers in flight get
  ``--drain-timeout`` seconds, and the rest go back to ``queued``. Then the children stop
  in reverse order, one at a time: the port closes, the scheduler stops, the engine and
  the store close (flushing every write), and twistd exits 0.

Nothing here imports the global reactor: each part is given the one to use.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .api import JobAPI
from .scheduler import Scheduler
from .segments import SegmentBodyStore
from .store import JobStore, SchemaVersionError, StoreClosedError

log = Logger()

STALE_SHARED_TEMP = 24 * 3600.0
"""With a shared body directory (--database), a partial body older than this (seconds)
is a crashed writer's."""


class LifecycleService(Service):
    """A named child made of two callables; either may return a Deferred, which the root
    waits for before it moves on to the next child."""

    def __init__(
        self,
        name: str,
        start: Callable[[], object] | None = None,
        stop: Callable[[], object] | None = None,
    ) -> None:
        self.setName(name)
        self._on_start = start
        self._on_stop = stop

    def startService(self) -> Deferred[object]:
        super().startService()
        return maybeDeferred(self._on_start) if self._on_start is not None else succeed(None)

    def stopService(self) -> Deferred[object]:
        super().stopService()
        return maybeDeferred(self._on_stop) if self._on_stop is not None else succeed(None)


def store_service(
    reactor: Any, *, store: JobStore, bodies: SegmentBodyStore, shared: bool
) -> LifecycleService:
    """The "store" child: opens the job store (requeueing what a killed process left
    running) and the body store; after the drain, closes both. ``shared``: other
    instances write to the same body directory."""

    async def open_stores() -> None:
        recovered = await store.open()
        if recovered:
            log.info("requeued {count} jobs a previous process left running", count=recovered)
        # A body directory shared with other instances holds their writes in progress:
        # only files far older than any transfer are a crashed writer's.
        older_than = STALE_SHARED_TEMP if shared else 0.0
        pool = reactor.getThreadPool()
        if bodies.legacy is not None:
            stale = await threads.deferToThreadPool(
                reactor, pool, bodies.legacy.remove_stale_temp_files, older_than
            )
            if stale:
                log.info("removed {count} partial bodies", count=stale)
        # Segments a killed process left open: cut to their last whole record, sealed.
        repaired, cut, spilled = await threads.deferToThreadPool(
            reactor, pool, bodies.recover, older_than if shared else None
        )
        if repaired or spilled:
            log.info(
                "recovered {segments} open segments ({cut} bytes of torn tail cut), "
                "removed {spilled} spill files",
                segments=repaired,
                cut=cut,
                spilled=spilled,
            )
        bodies.start()

    async def close_stores() -> None:
        # After the scheduler's drain, which waited for every commit it started.
        try:
            await bodies.close()
        finally:
            await store.close()

    return LifecycleService(
        "store",
        lambda: Deferred.fromCoroutine(open_stores()),
        lambda: Deferred.fromCoroutine(close_stores()),
    )


class StartupError(Exception):
    """Start-up cannot go on for a reason an operator can fix (a full or read-only disk,
    a damaged database, a database that does not answer): logged as one line, no
    traceback, and the process exits with 1."""


def check_data_dir(path: str) -> None:
    """Create the data directory if needed and prove it writable with a real file: a
    read-only mount or the wrong owner is said plainly before anything else is built."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise StartupError(f"the data directory {path} is not usable: {e.strerror}") from e


OPERATIONAL_ERRORS: tuple[type[BaseException], ...] = (
    StartupError,
    StoreClosedError,
    SchemaVersionError,
    OSError,
    sqlite3.DatabaseError,
    psycopg.Error,
)
"""What fails start-up without being a bug: said in one line (``_start_children``)."""


class StartupAbandonedError(Exception):
    """A stop arrived while a child was still starting and it did not finish within
    ``STARTUP_WAIT_ON_STOP``: start-up was given up (``CurlfetchService``)."""


STARTUP_WAIT_ON_STOP = 1.0
"""Seconds a stop waits for a start-up still in progress (a store opening) before it
gives that start-up up: a database that accepts connections and never answers would
otherwise hold SIGTERM for the whole connect timeout."""


class CurlfetchService(MultiService):
    """The root: starts its children in order, each once the previous one is up; on stop,
    drains, then stops the children that started, in reverse order, one at a time."""

    def __init__(
        self, reactor: Any, *, api: JobAPI, scheduler: Scheduler, drain_timeout: float
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.api = api
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout
        self._started: list[Service] = []
        self.stopped_cleanly = False
        """True once a stop has drained and closed everything without an error."""
        self._starting: Deferred[None] | None = None
        self._startup_failure: Failure | None = None
        self._start_waiters: list[Deferred[None]] = []
        self._starting_child: Service | None = None
        self.startup_abandoned = False
        """True once a stop gave up waiting for start-up (``STARTUP_WAIT_ON_STOP``): what
        was still starting is stopped if it ever finishes; the process may exit without
        waiting for it (``curlfetch.process``)."""

    def privilegedStartService(self) -> None:
        # Not passed on: the HTTP child would bind here, before the store is open.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start_children())

    async def _start_children(self) -> None:
        try:
            for child in self:
                if not self.running:
                    return  # stopped while starting
                self._starting_child = child
                await maybeDeferred(child.startService)
                self._starting_child = None
                if self.startup_abandoned:
                    # The stop went on without it: undo what finished too late.
                    await maybeDeferred(child.stopService)
                    return
                self._started.append(child)
        except Exception as e:
            self._starting_child = None
            if self.startup_abandoned:
                return  # given up already, and said so
            self._startup_failure = Failure()
            if isinstance(e, OPERATIONAL_ERRORS):
                log.critical("curlfetch could not start: {why}", why=_reason(e))
            else:  # a bug: the traceback is what helps
                log.failure("curlfetch could not start", self._startup_failure)
        finally:
            waiters, self._start_waiters = self._start_waiters, []
            for waiter in waiters:
                self._fire_started(waiter)

    def _fire_started(self, waiter: Deferred[None]) -> None:
        if self._startup_failure is not None:
            waiter.errback(self._startup_failure)
        else:
            waiter.callback(None)

    def when_started(self) -> Deferred[None]:
        """Fires once every child is up; fails with what stopped start-up."""
        waiter: Deferred[None] = Deferred()
        if self.startup_abandoned or (self._starting is not None and self._starting.called):
            self._fire_started(waiter)
        else:
            self._start_waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        starting = self._starting
        if starting is not None and not starting.called:
            # Waited for, but not for ever: a child may hang (a database that never
            # answers) for longer than any stop should take.
            waited: Deferred[None] = Deferred()

            def done() -> None:
                if not waited.called:
                    waited.callback(None)

            def relay(result: None) -> None:
                done()
                return result

            starting.addBoth(relay)
            timer = self._reactor.callLater(STARTUP_WAIT_ON_STOP, done)
            await waited
            if timer.active():
                timer.cancel()
            if not starting.called:
                self._abandon_startup()
        clean = self._startup_failure is None
        try:
            await self.drain()
        except Exception:
            clean = False
            log.failure("draining failed")
        for child in reversed(self._started):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                clean = False
                log.failure("stopping {service} failed", service=child.name)
        self._started.clear()
        self.stopped_cleanly = clean
        log.info("curlfetch stopped")

    def _abandon_startup(self) -> None:
        """Give start-up up: the stop goes on with the children that started; the one
        still starting is stopped if it ever finishes; ``when_started`` fails with
        ``StartupAbandonedError``. One log line."""
        self.startup_abandoned = True
        child = self._starting_child
        name = child.name if child is not None else "start-up"
        log.warn(
            "stop requested during start-up: not waiting for {child} any longer "
            "(still starting after {seconds:g}s)",
            child=name,
            seconds=STARTUP_WAIT_ON_STOP,
        )
        self._startup_failure = Failure(StartupAbandonedError(f"{name} was still starting"))
        waiters, self._start_waiters = self._start_waiters, []
        for waiter in waiters:
            self._fire_started(waiter)

    async def drain(self) -> None:
        """Readiness and new submissions fail at once; running transfers get
        ``drain_timeout`` seconds to finish, then go back to ``queued``."""
        self.api.start_draining()
        if not self.scheduler.running:
            return
        started = self._reactor.seconds()
        log.info(
            "draining: {in_flight} transfers running, {timeout}s to finish",
            in_flight=self.scheduler.in_flight,
            timeout=self.drain_timeout,
        )
        await self.scheduler.drain(self.drain_timeout)
        log.info("drained in {seconds:.2f}s", seconds=self._reactor.seconds() - started)

    def force_stop(self) -> None:
        """A second stop signal: the drain's transfers stop now and their jobs go back to
        the queue (their saves are still handed to the store, which the stop flushes)."""
        log.warn("stop requested again: cutting the drain short")
        self.api.start_draining()
        self.scheduler.cut_short()


SEGMENT_MARGIN = 60.0
"""Seconds a segment outlives the retention: a job's ``finished_at`` is stamped just
after its group's sync, and a shared volume's file times come from its server's clock."""


class RetentionService(TimerService):
    """Deletes finished jobs older than the retention, and their bodies, and events older
    than the event retention (with the batches and webhook deliveries that finished
    before the job retention), periodically (every tenth of the shorter retention,
    between 1 s and 1 h)."""

    def __init__(
        self,
        reactor: Any,
        *,
        store: JobStore,
        bodies: SegmentBodyStore,
        retention: float,
        event_retention: float | None = None,
    ) -> None:
        shorter = min(retention, event_retention or retention)
        super().__init__(min(max(shorter / 10, 1.0), 3600.0), self.purge)
        self.clock = reactor
        self.setName("retention")
        self.retention = retention
        self.event_retention = event_retention or retention
        self._reactor = reactor
        self._store = store
        self._bodies = bodies

    def purge(self) -> Deferred[None]:
        """One pass; a failure is logged, and the next pass tries again."""
        return Deferred.fromCoroutine(self._purge())

    async def _purge(self) -> None:
        try:
            now = self._reactor.seconds()
            cutoff = now - self.retention
            # Batches and deliveries first: a batch's jobs go with it (store.purge).
            events = await self._store.purge_loop(now - self.event_retention, cutoff)
            ids = await self._store.purge(cutoff)
            # The rows go first: a crash in between leaves unreferenced bodies, never a
            # job whose body is missing. Unlinking files is for a thread.
            pool = self._reactor.getThreadPool()
            removed = await threads.deferToThreadPool(self._reactor, pool, self._bodies.delete, ids)
            # A segment goes once its last record is older than the retention (and a
            # margin for the clock of a shared volume's server): its jobs are gone.
            segments = await threads.deferToThreadPool(
                self._reactor, pool, self._bodies.delete_expired, cutoff - SEGMENT_MARGIN
            )
            if ids or segments or events:
                log.info(
                    "retention: purged {jobs} jobs, {bodies} body files, {segments} "
                    "segments, {events} events",
                    jobs=len(ids),
                    bodies=removed,
                    segments=segments,
                    events=events,
                )
        except Exception:
            log.failure("retention purge failed")


def _reason(error: BaseException) -> str:
    """One line: the error, and what caused it where that adds anything."""
    text = " ".join(str(error).split()) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({' '.join(str(cause).split())})"
    return text
