"""Fixtures for the job-service tests: a real store on the real reactor (the ``store``
and ``backend`` fixtures run each test against SQLite in ``tmp_path`` and PostgreSQL in a
throwaway schema), job builders, and a time bound on every wait."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from curlfetch.jobs import Job, JobSpec, JobState, Limits, new_job_id
from curlfetch.store.sqlite import SQLiteJobStore

from .backends import AnyStore, Backend, PostgresSchema, require_postgres

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


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store backend on a fresh database: a file in ``tmp_path``, or a schema of its
    own on the local PostgreSQL (skipped, with the reason, where there is none)."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    require_postgres()
    schema = PostgresSchema()
    try:
        yield Backend("postgres", tmp_path, schema)
    finally:
        schema.drop()


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Backend]:
    """PostgreSQL alone: a throwaway schema (for the tests that are about it only)."""
    require_postgres()
    schema = PostgresSchema()
    try:
        yield Backend("postgres", tmp_path, schema)
    finally:
        schema.drop()


async def sleep(seconds: float) -> None:
    await deferLater(reactor(), seconds, lambda: None)


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``check`` on the reactor until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)


async def open_backend(backend: Backend, **kwargs: Any) -> AnyStore:
    store = backend.new(**kwargs)
    await within(store.open())
    return store


@pytest_twisted.async_yield_fixture
async def store(backend: Backend) -> AsyncIterator[AnyStore]:
    """An open store on a fresh database; closed (threads stopped) after the test."""
    s = await open_backend(backend)
    yield s
    await within(s.close())
