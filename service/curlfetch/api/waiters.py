"""Long-poll bookkeeping for ``GET /v1/jobs/{id}?wait=N``: a per-job waiter that the
scheduler's finished attempts (through ``Metrics``) and cancellations wake.

A woken long-poll re-reads the job on the next reactor turn, when the scheduler's save
is already queued ahead of that read; a slow timer (``poll_interval``) covers changes
nobody announces (another instance). A client that disconnects cancels its waiter, and
draining releases them all.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ..engine import Response
from ..jobs import Job, JobError


@attrs.define(eq=False)
class _Waiter:
    deferred: Deferred[None]
    timer: IDelayedCall | None = None


class JobWaiters:
    """Long-poll bookkeeping: which jobs are watched, a change count per watched job, and
    Deferreds that fire when a watched job may have changed (or after a timeout).

    It is a ``SchedulerObserver``: a finished attempt of a watched job counts as a change
    on the next reactor turn, by which time the scheduler has queued its save, so a read
    issued after that is ordered after the save in the store. A long-poll notes the count
    before each read and, if it moved meanwhile, reads again instead of sleeping: a change
    that lands while a read is in flight is never missed.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._watchers: dict[str, int] = {}
        self._changes: dict[str, int] = {}
        self._by_job: dict[str, list[_Waiter]] = {}

    def __len__(self) -> int:
        """Long-polls in progress."""
        return sum(self._watchers.values())

    @property
    def sleeping(self) -> int:
        """Long-polls blocked on a Deferred right now."""
        return sum(len(ws) for ws in self._by_job.values())

    def watch(self, job_id: str) -> None:
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        left = self._watchers.get(job_id, 0) - 1
        if left > 0:
            self._watchers[job_id] = left
        else:
            self._watchers.pop(job_id, None)
            self._changes.pop(job_id, None)

    def version(self, job_id: str) -> int:
        return self._changes.get(job_id, 0)

    def wait(self, job_id: str, timeout: float, seen: int) -> Deferred[None]:
        """Fires with None once ``job_id`` changed after version ``seen`` (at once if it
        already has), or after ``timeout``; cancellable."""
        if self.version(job_id) != seen:
            return succeed(None)
        waiter = _Waiter(Deferred(lambda _: self._forget(job_id, waiter)))
        waiter.timer = self._reactor.callLater(max(0.0, timeout), self._fire, job_id, waiter)
        self._by_job.setdefault(job_id, []).append(waiter)
        return waiter.deferred

    def notify(self, job_id: str) -> None:
        """``job_id`` changed (a read issued from now on sees it)."""
        if job_id in self._watchers:
            self._changes[job_id] = self._changes.get(job_id, 0) + 1
        for waiter in self._by_job.pop(job_id, []):
            self._release(waiter)

    def release_all(self) -> None:
        by_job, self._by_job = self._by_job, {}
        for waiters in by_job.values():
            for waiter in waiters:
                self._release(waiter)

    def attempt_finished(
        self, job: Job, seconds: float, response: Response | None, error: JobError | None
    ) -> None:
        if job.id in self._watchers:
            self._reactor.callLater(0, self.notify, job.id)

    def _fire(self, job_id: str, waiter: _Waiter) -> None:
        waiter.timer = None
        self._forget(job_id, waiter)
        waiter.deferred.callback(None)

    def _release(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        if not waiter.deferred.called:
            waiter.deferred.callback(None)

    def _forget(self, job_id: str, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        waiters = self._by_job.get(job_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._by_job[job_id]
