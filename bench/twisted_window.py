"""Keeps C requests in flight on a Twisted reactor until N have finished.

Shared by the engine and treq clients so both are driven exactly alike: C requests are
started at once, and each completion starts the next one, from its own callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from bench.common import Result

StartFn = Callable[[int], "Deferred[Any]"]
CheckFn = Callable[[int, Any], "str | None"]
"""Returns None when the value is what the workload expects, else what is wrong."""


class Window:
    def __init__(
        self,
        reactor: Any,
        result: Result,
        start: StartFn,
        check: CheckFn,
        *,
        progress_every: int = 0,
        on_progress: Callable[[int], None] | None = None,
        track_latency: bool = False,
    ) -> None:
        self._reactor = reactor
        self._result = result
        self._start = start
        self._check = check
        self._n = result.n
        self._progress_every = progress_every
        self._on_progress = on_progress
        self._issued = 0
        self._done = 0
        self._finished: Deferred[None] = Deferred()
        self._started: dict[int, float] | None = {} if track_latency else None
        self.latencies: list[float] = []

    def run(self) -> Deferred[None]:
        if self._n <= 0:
            self._finished.callback(None)
        for _ in range(min(self._result.concurrency, self._n)):
            self._issue()
        return self._finished

    def _issue(self) -> None:
        index = self._issued
        self._issued += 1
        if self._started is not None:
            self._started[index] = time.perf_counter()
        try:
            d = self._start(index)
        except Exception:
            d = fail(Failure())
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(index,), errbackArgs=(index,))

    def _succeeded(self, value: Any, index: int) -> None:
        self._took(index)
        problem = self._check(index, value)
        if problem is None:
            self._result.ok += 1
        else:
            self._result.error(problem)
        self._completed(failed=False)

    def _failed(self, failure: Failure, index: int) -> None:
        self._took(index)
        kind = failure.type.__name__ if failure.type is not None else "Failure"
        self._result.error(f"#{index}: {kind}: {failure.getErrorMessage()}")
        self._completed(failed=True)

    def _took(self, index: int) -> None:
        if self._started is not None:
            self.latencies.append(time.perf_counter() - self._started.pop(index))

    def _completed(self, *, failed: bool) -> None:
        self._done += 1
        if self._on_progress is not None and self._done % self._progress_every == 0:
            self._on_progress(self._done)
        if self._done == self._n:
            self._finished.callback(None)
        elif self._issued < self._n:
            if failed:
                # A start that fails at once must not recurse once per remaining request.
                self._reactor.callLater(0, self._issue)
            else:
                self._issue()
