"""The SQL both backends share: the ``jobs`` and ``idempotency_keys`` tables with each
backend's types (``Types``), the statements they run as they are (``PortableSQL``, in the
backend's placeholder style), and the migration runner. What only one backend runs stays
in its module (``sqlite``, ``postgres``).

Migrations are append-only: a backend's ``MIGRATIONS`` builds its tables from the
templates here, so a change to a template would change a migration already applied
somewhere. Add a new migration instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs

from . import SchemaVersionError
from .rows import COLUMNS


class Cursor(Protocol):
    """What the shared operations use of a DB-API cursor (sqlite3 and psycopg alike)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, query: str, params: Any = ..., /) -> Cursor: ...
    def cursor(self) -> Any: ...


@attrs.frozen
class Types:
    """The column types that differ between the backends."""

    seq: str
    """The FIFO order (a job id is time-sortable only to the millisecond, and a batch of
    500 shares one). SQLite: ``INTEGER PRIMARY KEY`` aliases the rowid, so it costs
    nothing and VACUUM keeps it. PostgreSQL: an identity column."""
    time: str
    blob: str


def jobs_table(t: Types) -> str:
    """``owner`` and ``lease_until`` are for PostgreSQL's leases; SQLite leaves them NULL."""
    return f"""
        CREATE TABLE jobs (
            seq {t.seq},
            id TEXT NOT NULL UNIQUE,
            client TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            priority INTEGER NOT NULL,
            host TEXT NOT NULL,
            created_at {t.time} NOT NULL,
            not_before {t.time} NOT NULL,
            started_at {t.time},
            finished_at {t.time},
            attempts INTEGER NOT NULL,
            spec TEXT NOT NULL,
            metadata TEXT,
            result TEXT,
            error TEXT,
            owner TEXT,
            lease_until {t.time}
        )
        """


def idempotency_keys_table(t: Types) -> str:
    """One row per (client, key). ``reserved`` while the first submission is being
    accepted (``owner`` is the store instance holding it), ``done`` with the response once
    its jobs are committed (same transaction). ``created_at`` is the reservation time: the
    TTL and the abandonment bound count from it. ``headers`` is JSON
    ``[[name, value], ...]``."""
    return f"""
        CREATE TABLE idempotency_keys (
            client TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('reserved', 'done')),
            owner TEXT,
            created_at {t.time} NOT NULL,
            status INTEGER,
            headers TEXT,
            body {t.blob},
            PRIMARY KEY (client, key),
            CHECK (state = 'reserved' OR (status IS NOT NULL AND headers IS NOT NULL
                AND body IS NOT NULL))
        )
        """


def cancel_jobs(p: str) -> str:
    """The start of an UPDATE that cancels the jobs its WHERE (to be appended) selects."""
    return (
        f"UPDATE jobs SET state = 'cancelled', finished_at = {p}, owner = NULL, "  # noqa: S608
        "lease_until = NULL WHERE"
    )


class PortableSQL:
    """The statements both backends run as they are, in the backend's placeholder style
    (``p``); ``for_update`` locks the rows read before a change (PostgreSQL: other
    instances write too; SQLite: the write transaction already excludes them).

    Built from constant fragments only; every value is a parameter."""

    def __init__(
        self,
        p: str,
        for_update: str,
        types: Types,
        metadata_match: Callable[[str, str | None], tuple[str, list[object]]],
    ) -> None:
        self.p = p
        self.types = types
        self.metadata_match = metadata_match
        """(condition, parameters) selecting jobs whose metadata has a key (with a
        value: that string value): JSON functions differ between the backends."""
        self.select = f"SELECT {COLUMNS} FROM jobs"  # noqa: S608
        self.get = f"{self.select} WHERE id = {p} AND client = {p}"
        self.get_for_cancel = (
            f"SELECT {COLUMNS}, owner FROM jobs WHERE id = {p} AND client = {p}{for_update}"  # noqa: S608
        )
        self.cancel = f"{cancel_jobs(p)} seq = {p} RETURNING {COLUMNS}"
        self.requeue_running = (
            "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "  # noqa: S608
            f"WHERE id = {p} AND state = 'running' RETURNING client"
        )
        # A batch's jobs stay while their batch runs or finished since the cutoff (its
        # counts stay whole), and go once it is older or gone.
        self.purge = (
            "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "  # noqa: S608
            f"AND finished_at < {p} AND NOT EXISTS (SELECT 1 FROM batches AS b "
            f"WHERE b.id = jobs.batch AND (b.finished_at IS NULL OR b.finished_at >= {p})) "
            "RETURNING id"
        )
        self.key_get = (
            "SELECT fingerprint, state, owner, created_at, status, headers, body "  # noqa: S608
            f"FROM idempotency_keys WHERE client = {p} AND key = {p}{for_update}"
        )
        self.key_insert = (
            "INSERT INTO idempotency_keys "  # noqa: S608
            "(client, key, fingerprint, state, owner, created_at) "
            f"VALUES ({p}, {p}, {p}, 'reserved', {p}, {p}) "
            "ON CONFLICT (client, key) DO NOTHING RETURNING 1"
        )
        self.key_take_over = (
            f"UPDATE idempotency_keys SET fingerprint = {p}, state = 'reserved', owner = {p}, "  # noqa: S608
            f"created_at = {p}, status = NULL, headers = NULL, body = NULL "
            f"WHERE client = {p} AND key = {p}"
        )
        self.key_record = (
            f"UPDATE idempotency_keys SET state = 'done', owner = NULL, status = {p}, "  # noqa: S608
            f"headers = {p}, body = {p} WHERE client = {p} AND key = {p} "
            f"AND state = 'reserved' AND owner = {p} RETURNING 1"
        )
        self.key_release = (
            "DELETE FROM idempotency_keys "  # noqa: S608
            f"WHERE client = {p} AND key = {p} AND state = 'reserved' AND owner = {p}"
        )
        self.queued_counts = (
            "SELECT client, count(*) FROM jobs WHERE state = 'queued' GROUP BY client"
        )
        self.key_purge = f"DELETE FROM idempotency_keys WHERE created_at <= {p}"  # noqa: S608


def migrate(conn: Connection, sql: PortableSQL, migrations: Sequence[Sequence[str]]) -> None:
    """Bring the schema to the newest version, in the caller's transaction: migration N
    (1-based) brings it from version N-1 to N. Refuses a newer schema."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        f"(version INTEGER PRIMARY KEY, applied_at {sql.types.time} NOT NULL)"
    )
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    current = row[0]
    if current > len(migrations):
        raise SchemaVersionError(
            f"database schema version {current} is newer than this curlfetch "
            f"(knows up to {len(migrations)})"
        )
    for version in range(current + 1, len(migrations) + 1):
        for statement in migrations[version - 1]:
            conn.execute(statement)
        insert = f"INSERT INTO schema_version VALUES ({sql.p}, {sql.p})"  # noqa: S608
        conn.execute(insert, (version, time.time()))
