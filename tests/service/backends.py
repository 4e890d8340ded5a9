"""The two store backends for tests that run against both: SQLite in ``tmp_path``, and
PostgreSQL in a throwaway schema of the local server (dropped after the test).

PostgreSQL is ``CURLFETCH_TEST_DATABASE_URL`` (default: 127.0.0.1:5432, database
``test``, trust auth). Where it does not answer, its tests skip with the reason; with
``CURLFETCH_REQUIRE_POSTGRES=1`` (CI sets it) they fail instead, so a CI machine without
PostgreSQL cannot pass by skipping.
"""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from curlfetch.store.postgres import PostgresJobStore
from curlfetch.store.sqlite import SQLiteJobStore

POSTGRES_URL = os.environ.get("CURLFETCH_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("CURLFETCH_REQUIRE_POSTGRES", "") == "1"
SCHEMA_PREFIX = "curlfetch_test_"

AnyStore = SQLiteJobStore | PostgresJobStore


@functools.cache
def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None (asked once per test run)."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable: {str(e).strip()}"
    return None


def require_postgres() -> None:
    """Skip (or, with CURLFETCH_REQUIRE_POSTGRES=1, fail) without PostgreSQL."""
    reason = postgres_unavailable()
    if reason is None:
        return
    if REQUIRE_POSTGRES:
        pytest.fail(f"{reason} (CURLFETCH_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(reason)


class PostgresSchema:
    """A schema of its own on the test server: ``dsn`` for the store, ``url`` for
    ``twistd --database``; ``drop()`` removes it and everything in it."""

    def __init__(self) -> None:
        self.name = SCHEMA_PREFIX + uuid.uuid4().hex[:12]
        self.dsn = make_conninfo(POSTGRES_URL, options=f"-c search_path={self.name}")
        sep = "&" if "?" in POSTGRES_URL else "?"
        self.url = f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={self.name}')}"

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own autocommitted connection; the rows it returned."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description is not None else []

    def drop(self) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name))
            )


class Backend:
    """Makes stores of one backend on one database; ``new()`` again reopens the same
    database (for PostgreSQL: under the same instance id, as a restarted process with a
    fixed ``--instance-id`` would)."""

    def __init__(self, name: str, tmp_path: Path, pg: PostgresSchema | None = None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.pg = pg

    @property
    def db_path(self) -> str:
        return os.path.join(self.tmp_path, "data", "jobs.sqlite3")

    def new(self, instance_id: str = "test-instance", **kwargs: Any) -> AnyStore:
        from twisted.internet import reactor

        if self.pg is None:
            return SQLiteJobStore(reactor, self.db_path)
        return PostgresJobStore(reactor, self.pg.dsn, instance_id, **kwargs)

    @property
    def integrity_error(self) -> type[Exception]:
        return psycopg.IntegrityError if self.pg is not None else _sqlite_integrity_error()

    def schema_versions(self) -> list[int]:
        query = "SELECT version FROM schema_version ORDER BY 1"
        if self.pg is not None:
            return [row[0] for row in self.pg.execute(query)]
        import sqlite3

        with sqlite3.connect(self.db_path) as conn:
            versions = [row[0] for row in conn.execute(query)]
        conn.close()
        return versions

    def add_schema_version(self, version: int) -> None:
        """Pretend a newer curlfetch migrated the database."""
        if self.pg is not None:
            self.pg.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))
            return
        import sqlite3

        with sqlite3.connect(self.db_path) as conn:
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        conn.close()


def _sqlite_integrity_error() -> type[Exception]:
    import sqlite3

    return sqlite3.IntegrityError
