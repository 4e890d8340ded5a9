"""``twistd curlfetch``: the composition root (the options are in ``curlfetch.options``,
the JSON log observer in ``curlfetch.logs``).

This is the one module that imports the global reactor, inside ``makeService``: by then
twistd has installed the reactor it was asked for (``-r``). Everything it builds takes
the reactor as an argument.

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
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python.failure import Failure

from .api import JobAPI
from .bodies import DirectoryBodyStore
from .engine import CurlClient
from .jobs import Limits
from .logs import json_log_observer, log_settings
from .metrics import Metrics
from .options import Config, Options
from .scheduler import Scheduler, SchedulerConfig
from .store import JobStore
from .store_pg import PostgresJobStore, default_instance_id
from .store_sqlite import SQLiteJobStore

__all__ = ["Options", "build_service", "json_log_observer", "makeService"]
"""``json_log_observer`` too: ``--logger=curlfetch.tap.json_log_observer`` is documented."""

log = Logger()

STALE_SHARED_TEMP = 24 * 3600.0
"""With --database, a partial body older than this (seconds) is a crashed writer's."""


# -- services ----------------------------------------------------------------------------


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
                await maybeDeferred(child.startService)
                self._started.append(child)
        except Exception:
            self._startup_failure = Failure()
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
        if self._starting is not None and self._starting.called:
            self._fire_started(waiter)
        else:
            self._start_waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        if self._starting is not None:
            await self._starting
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


class RetentionService(TimerService):
    """Deletes finished jobs older than the retention, and their bodies, periodically
    (every tenth of the retention, between 1 s and 1 h)."""

    def __init__(
        self,
        reactor: Any,
        *,
        store: JobStore,
        bodies: DirectoryBodyStore,
        retention: float,
    ) -> None:
        super().__init__(min(max(retention / 10, 1.0), 3600.0), self.purge)
        self.clock = reactor
        self.setName("retention")
        self.retention = retention
        self._reactor = reactor
        self._store = store
        self._bodies = bodies

    def purge(self) -> Deferred[None]:
        """One pass; a failure is logged, and the next pass tries again."""
        return Deferred.fromCoroutine(self._purge())

    async def _purge(self) -> None:
        try:
            ids = await self._store.purge(self._reactor.seconds() - self.retention)
            if not ids:
                return
            # The rows go first: a crash in between leaves unreferenced files, never a
            # job whose body is missing. Unlinking many files is for a thread.
            removed = await threads.deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), self._bodies.delete, ids
            )
            log.info(
                "retention: purged {jobs} jobs, {bodies} bodies", jobs=len(ids), bodies=removed
            )
        except Exception:
            log.failure("retention purge failed")


# -- composition -------------------------------------------------------------------------


def build_service(reactor: Any, config: Config) -> CurlfetchService:
    """Everything, wired; nothing started. Children, in start order: store, engine,
    metrics, scheduler, retention, http."""
    os.makedirs(config.data_dir, exist_ok=True)
    store: SQLiteJobStore | PostgresJobStore
    if config.database:
        store = PostgresJobStore(
            reactor,
            config.database,
            config.instance_id or default_instance_id(),
            lease_seconds=config.lease,
            max_per_host=config.max_per_host,  # shared by every instance
        )
    else:
        store = SQLiteJobStore(reactor, config.db_path)
    bodies = DirectoryBodyStore(reactor, config.bodies_dir)
    client = CurlClient(
        reactor,
        max_concurrent=config.max_concurrency,
        max_host_connections=config.max_per_host,
        close_on_shutdown=False,  # closed by the "engine" child, after the drain
    )
    metrics = Metrics(reactor)
    scheduler = Scheduler(
        reactor,
        store=store,
        client=client,
        bodies=bodies,
        config=SchedulerConfig(
            max_concurrency=config.max_concurrency,
            max_per_host=config.max_per_host,
            per_host_interval=config.per_host_interval,
            max_per_client=config.client_max_in_flight,
            egress=config.egress,
            max_response_header_bytes=config.max_response_header_bytes,
        ),
        observer=metrics,
    )
    scheduler.setName("scheduler")
    if isinstance(store, PostgresJobStore):
        # Other instances' submissions and requeues, and cancels of our running jobs.
        store.on_wakeup = scheduler.wake
        store.on_cancelled = scheduler.abort
    api = JobAPI(
        reactor,
        store=store,
        scheduler=scheduler,
        bodies=bodies,
        limits=Limits(),
        metrics=metrics,
        max_queued=config.max_queued,
        tokens=config.tokens,
        metrics_auth=config.metrics_auth == "token",
        quotas=config.quotas,
    )
    # api.site(): a Site whose requests refuse a too-large body before reading it.
    http = strports.service(config.listen, api.site(), reactor=reactor)
    http.setName("http")

    async def open_stores() -> None:
        recovered = await store.open()
        if recovered:
            log.info("requeued {count} jobs a previous process left running", count=recovered)
        # A body directory shared with other instances holds their writes in progress:
        # only files far older than any transfer are a crashed writer's.
        older_than = STALE_SHARED_TEMP if config.database else 0.0
        stale = await threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), bodies.remove_stale_temp_files, older_than
        )
        if stale:
            log.info("removed {count} partial bodies", count=stale)
        bodies.start()

    async def close_stores() -> None:
        # After the scheduler's drain, which waited for every commit it started.
        try:
            await bodies.close()
        finally:
            await store.close()

    root = CurlfetchService(
        reactor, api=api, scheduler=scheduler, drain_timeout=config.drain_timeout
    )
    for child in (
        LifecycleService(
            "store",
            lambda: Deferred.fromCoroutine(open_stores()),
            lambda: Deferred.fromCoroutine(close_stores()),
        ),
        LifecycleService("engine", stop=client.close),
        LifecycleService("metrics", metrics.start, metrics.stop),
        scheduler,
        RetentionService(reactor, store=store, bodies=bodies, retention=config.retention),
        http,
    ):
        child.setServiceParent(root)
    return root


def makeService(options: Options) -> CurlfetchService:
    """twistd's entry point (through ``twisted/plugins/curlfetch_plugin.py``)."""
    from twisted.internet import reactor

    config = options.config
    log_settings(config)
    root = build_service(reactor, config)
    tune_gc()
    root.when_started().addCallbacks(
        _ready,
        _exit_after_shutdown,
        callbackArgs=(config.listen,),
        errbackArgs=(reactor,),
    )
    reactor.addSystemEventTrigger("after", "shutdown", _exit_0_if_clean, root, reactor)
    return root


def _ready(_: None, listen: str) -> None:
    gc.freeze()  # see tune_gc
    log.info("curlfetch ready on {listen}", listen=listen)


GC_THRESHOLDS = (20_000, 10, 10)


def tune_gc() -> None:
    """Collect young objects less often. Each job allocates many short-lived containers
    (Deferreds, dicts, attrs instances) that reference counting frees at once; with the
    default threshold (700) the cyclic collector still ran every few jobs and took about
    a fifth of the service's CPU. Older generations are collected proportionally less
    often too. ``makeService`` also calls ``gc.freeze()`` once start-up is done, so that
    the objects every process keeps for good (modules, Twisted, the services) are never
    scanned again."""
    gc.set_threshold(*GC_THRESHOLDS)


def _exit_0_if_clean(root: CurlfetchService, reactor: Any) -> None:
    """After SIGTERM or SIGINT, twistd kills itself with that signal once the reactor has
    stopped, so that the exit status says "killed by SIGTERM". A drained, clean stop is
    the normal way to end: forget the signal (the reactor's ``_exitSignal``, which twistd
    reads after ``reactor.run()`` returns) and exit 0."""
    if root.stopped_cleanly and getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def _exit_after_shutdown(failure: Failure, reactor: Any) -> None:
    """Start-up failed (already logged): stop, let the stop sequence close what opened,
    then exit with 1, which twistd cannot do by itself (it exits 0 after a stop)."""

    def exit_1() -> None:
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", exit_1)

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    reactor.callWhenRunning(stop)
