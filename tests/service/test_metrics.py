"""``Metrics`` on a fake clock: reactor lag from the LoopingCall, and the scheduler
observer's counters and fan-out."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock

from curlfetch.jobs import JobError
from curlfetch.metrics import Metrics

from .conftest import make_job


def sample(metrics: Metrics, metric: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(metric, labels or None)


def test_reactor_lag_is_how_late_the_probe_fired() -> None:
    """On time, the lag is 0; a probe that fires 0.8 s late reads 0.8; ``stop()`` ends the
    LoopingCall (nothing left scheduled)."""
    clock = Clock()
    metrics = Metrics(clock, lag_interval=0.5)
    metrics.start()
    clock.advance(0.5)
    assert sample(metrics, "curlfetch_reactor_lag_seconds") == pytest.approx(0.0, abs=1e-9)
    clock.advance(1.3)  # the 1.0 s tick runs at 1.8 s
    assert sample(metrics, "curlfetch_reactor_lag_seconds") == pytest.approx(0.8)
    clock.advance(0.2)  # the next tick is due at 2.0 s and fires on time
    assert sample(metrics, "curlfetch_reactor_lag_seconds") == pytest.approx(0.0, abs=1e-9)
    metrics.stop()
    assert clock.getDelayedCalls() == []


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def attempt_finished(self, *args: Any) -> None:
        self.calls.append(args)


def test_attempts_count_curl_and_service_errors_and_fan_out() -> None:
    """A failed attempt counts under its curl name (or service code), observes the
    duration, and is passed on to every subscribed observer; without a store the gauges
    read 0."""
    metrics = Metrics(Clock())
    recorder = _Recorder()
    metrics.subscribe(recorder)
    job = make_job()
    metrics.attempt_finished(job, 0.2, None, JobError("OPERATION_TIMEDOUT", "slow", 28))
    metrics.attempt_finished(job, 0.1, None, JobError("deadline_exceeded", "late"))
    assert sample(metrics, "curlfetch_curl_errors_total", name="OPERATION_TIMEDOUT") == 1
    assert sample(metrics, "curlfetch_service_errors_total", code="deadline_exceeded") == 1
    assert sample(metrics, "curlfetch_fetch_duration_seconds_count", outcome="error") == 2
    assert sample(metrics, "curlfetch_attempts_total", outcome="error") == 2
    assert len(recorder.calls) == 2
    assert sample(metrics, "curlfetch_queue_depth") == 0
    assert sample(metrics, "curlfetch_transfers_in_flight") == 0
    assert b"curlfetch_jobs{" in generate_latest(metrics.registry)
