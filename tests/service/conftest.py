"""Fixtures for the job-service tests: a real SQLite store in ``tmp_path`` on the real
reactor, job builders, and a time bound on every wait."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest_twisted
from twisted.internet.defer import Deferred

from service.jobs import Job, JobSpec, JobState, Limits, new_job_id
from service.store_sqlite import SQLiteJobStore

T = TypeVar("T")

WAIT = 5.0
"""Seconds any single store operation may take before the test fails."""

LIMITS = Limits()


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def within(d: Deferred[T], seconds: float = WAIT) -> T:
    """``await d``, failing with ``defer.TimeoutError`` after ``seconds``: no test hangs."""
    return await d.addTimeout(seconds, reactor())


def make_job(
    client: str = "alice",
    *,
    url: str = "http://example.test/",
    priority: int = 0,
    created_at: float = 1_700_000_000.0,
    not_before: float = 0.0,
    metadata: dict[str, Any] | None = None,
    **spec: Any,
) -> Job:
    raw: dict[str, Any] = {"url": url, "priority": priority, **spec}
    if metadata is not None:
        raw["metadata"] = metadata
    return Job(
        id=new_job_id(created_at),
        client=client,
        state=JobState.QUEUED,
        spec=JobSpec.from_json(raw, LIMITS),
        created_at=created_at,
        not_before=not_before,
    )


def db_path(tmp_path: Path) -> str:
    return os.path.join(tmp_path, "data", "jobs.sqlite3")


async def open_store(path: str) -> SQLiteJobStore:
    store = SQLiteJobStore(reactor(), path)
    await within(store.open())
    return store


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    """An open store on a fresh file; closed (threads stopped) after the test."""
    s = await open_store(db_path(tmp_path))
    yield s
    await within(s.close())
