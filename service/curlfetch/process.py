"""How the twistd process ends, and its garbage collector.

twistd exits 0 after any stop and re-raises a stop signal as its exit status; neither
says whether curlfetch drained cleanly or failed to start, so these set the status
themselves. Wired by the composition root (``curlfetch.tap``), which passes the reactor.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python.failure import Failure

from .services import CurlfetchService, StartupAbandonedError

log = Logger()

GC_THRESHOLDS = (20_000, 10, 10)


def tune_gc() -> None:
    """Collect young objects less often. Each job allocates many short-lived containers
    (Deferreds, dicts, attrs instances) that reference counting frees at once; with the
    default threshold (700) the cyclic collector still ran every few jobs and took about
    a fifth of the service's CPU. Older generations are collected proportionally less
    often too. ``ready`` calls ``gc.freeze()`` once start-up is done, so that
    the objects every process keeps for good (modules, Twisted, the services) are never
    scanned again."""
    gc.set_threshold(*GC_THRESHOLDS)


def ready(_: None, listen: str) -> None:
    """Every child is up: freeze what start-up allocated (see ``tune_gc``) and say so."""
    gc.freeze()
    log.info("curlfetch ready on {listen}", listen=listen)


def exit_0_if_clean(root: CurlfetchService, reactor: Any) -> None:
    """After SIGTERM or SIGINT, twistd kills itself with that signal once the reactor has
    stopped, so that the exit status says "killed by SIGTERM". A drained, clean stop is
    the normal way to end: forget the signal (the reactor's ``_exitSignal``, which twistd
    reads after ``reactor.run()`` returns) and exit 0."""
    if root.stopped_cleanly and getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


FORCED_EXIT_AFTER = 2.0
"""Seconds a stop may still take after a second SIGTERM or SIGINT before the process
exits there and then (status 1). Whatever it held then is still ``running`` in the store,
and goes back to the queue when the next process starts (SQLite; PostgreSQL with the
same ``--instance-id``) or when its lease expires: late, never lost."""


def second_signal_forces_stop(root: CurlfetchService, reactor: Any) -> None:
    """The first SIGTERM or SIGINT drains (twistd's handler stops the reactor, which
    stops ``root``); once that stop has begun, the next one cuts the drain short
    (``force_stop``) and bounds what is left of the stop by ``FORCED_EXIT_AFTER``."""

    def forced() -> None:
        root.force_stop()
        reactor.callLater(FORCED_EXIT_AFTER, exit_forced)

    def exit_forced() -> None:
        log.warn(
            "the stop took over {seconds}s after the second signal: exiting now",
            seconds=FORCED_EXIT_AFTER,
        )
        exit_now(1)

    def on_signal(signum: int, frame: object) -> None:
        # A signal handler runs between two bytecodes of the reactor thread: hand over.
        reactor.callFromThread(forced)

    def arm() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests)
                signal.signal(signum, on_signal)

    reactor.addSystemEventTrigger("before", "shutdown", arm)


def stop_on_early_signal(reactor: Any) -> None:
    """SIGTERM or SIGINT before the reactor runs (twistd installs its handlers only in
    ``reactor.run()``, after it logs "reactor class:"): without a handler of ours the
    process would die of the signal there and then. This one asks the reactor to stop as
    soon as it runs, which stops what started, as for a signal a moment later (exit 0).
    ``reactor.run()`` replaces it with twistd's own."""

    if getattr(reactor, "running", False):
        return  # its handlers are in place already (or not ours to replace: tests)

    def on_signal(signum: int, frame: object) -> None:
        reactor.callFromThread(_stop_if_running, reactor)

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            signal.signal(signum, on_signal)


def _stop_if_running(reactor: Any) -> None:
    log.info("stop requested during start-up")
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def exit_now(status: int) -> None:
    """Flush what was logged, then exit at once: no more waiting on anything."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(status)


def exit_now_if_start_up_abandoned(root: CurlfetchService) -> None:
    """After a stop that gave up a start-up still in progress (``StartupAbandonedError``: a
    store open stuck in a connect in one of its threads), exit 0 at once: the interpreter
    would otherwise wait for that thread, which a stop cannot interrupt, before exiting.
    Nothing is lost: whatever it was doing is rolled back by the database."""
    if root.startup_abandoned:
        exit_now(0)


def exit_1_after_shutdown(failure: Failure, reactor: Any) -> None:
    """Start-up failed (already logged): stop, let the stop sequence close what opened,
    then exit with 1, which twistd cannot do by itself (it exits 0 after a stop). Not
    for a start-up a stop gave up (``StartupAbandonedError``): that stop is under way."""
    if failure.check(StartupAbandonedError):
        return

    reactor.addSystemEventTrigger("after", "shutdown", exit_now, 1)

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    reactor.callWhenRunning(stop)
