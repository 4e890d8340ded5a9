"""PostgreSQL's SQL, and what runs it in the writer thread: the migrations, the statements
only PostgreSQL runs (``unnest`` inserts and saves, claims with ``SKIP LOCKED`` and
leases, the rooms of a capped claim), a batch in pipeline mode (``attempt``) and its
replay with savepoints (``attempt_careful``). ``PostgresJobStore`` (``postgres``) owns
the connections and threads that run them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .claims import Caps, Picker
from .core import Op, Outcome, resolve, run_with_savepoints
from .events import LoopSQL, batches_table, deliveries_table, events_tables, jobs_columns
from .hosts import COOLING_PG, hosts_tables
from .portable import PortableSQL, Types, idempotency_keys_table, jobs_table
from .rows import COLUMNS, dumps

Conn = psycopg.Connection[TupleRow]

WAKE_CHANNEL = "curlfetch_wake"
EVENTS_CHANNEL = "curlfetch_events"
CANCEL_CHANNEL = "curlfetch_cancel"
LOCK_MIGRATE = 0x43460001
"""Advisory lock keys (the second key is ``hashtext`` of the schema name)."""
LOCK_CLAIM = 0x43460002

TYPES = Types(
    seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", time="DOUBLE PRECISION", blob="BYTEA"
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: jobs and Idempotency-Keys: SQLite's migrations 1 and 2 in PostgreSQL's types.
    # Partial indexes serve the hot paths: the claim walks queued rows in claim order,
    # the per-host count reads running rows by host, the reaper running rows by lease,
    # the heartbeat running rows by owner, the counters queued rows by client.
    (
        jobs_table(TYPES),
        "CREATE INDEX jobs_claim ON jobs (priority DESC, seq) WHERE state = 'queued'",
        "CREATE INDEX jobs_queued_client ON jobs (client) WHERE state = 'queued'",
        "CREATE INDEX jobs_running_host ON jobs (host) WHERE state = 'running'",
        "CREATE INDEX jobs_running_lease ON jobs (lease_until) WHERE state = 'running'",
        "CREATE INDEX jobs_running_owner ON jobs (owner) WHERE state = 'running'",
        "CREATE INDEX jobs_client ON jobs (client, id DESC)",
        "CREATE INDEX jobs_finished ON jobs (finished_at) "
        "WHERE state IN ('succeeded', 'failed', 'cancelled')",
        idempotency_keys_table(TYPES),
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)",
    ),
    # 2: batches, the event log and the webhook outbox (see ``events``): an event
    # carries its transaction's id, so that readers can wait for older transactions.
    (
        *jobs_columns(),
        *batches_table(TYPES),
        *events_tables(
            "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            "BIGINT NOT NULL DEFAULT txid_current()",
            TYPES,
        ),
        *deliveries_table(TYPES),
    ),
    # 3: host cooldowns and the robots.txt cache (see ``hosts``).
    hosts_tables(TYPES),
)
"""Migration N (1-based) brings the schema from version N-1 to N. Append; never edit."""


def _metadata_match(key: str, value: str | None) -> tuple[str, list[object]]:
    """The metadata column is JSON text: cast per row (a filter, not a hot path); only
    a JSON string matches a value (``->>`` would turn 5 into '5')."""
    if value is None:
        return "(metadata::jsonb -> %s) IS NOT NULL", [key]
    return "(jsonb_typeof(metadata::jsonb -> %s) = 'string' AND metadata::jsonb ->> %s = %s)", [
        key,
        key,
        value,
    ]


SQL = PortableSQL("%s", for_update=" FOR UPDATE", types=TYPES, metadata_match=_metadata_match)
LOOP = LoopSQL(
    "%s",
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    # Only transactions older than every one still running: nothing can join them.
    horizon=" AND txid < txid_snapshot_xmin(txid_current_snapshot())",
    after="(txid, seq) > (%s, %s)",
)
EVENTS_START = "SELECT txid_snapshot_xmin(txid_current_snapshot()) - 1, 9223372036854775807"
"""A new stream starts after the transactions that are over; a running one's events
may still come."""

_DB_NOW = "extract(epoch FROM clock_timestamp())"
"""Leases use the database's clock, shared by every instance (theirs may drift)."""

_J_COLUMNS = ", ".join(f"j.{c.strip()}" for c in COLUMNS.split(","))

# The SQL is built from these constant fragments only; every value is a parameter.
INSERT = (
    "INSERT INTO jobs (id, client, state, priority, host, created_at, not_before, "
    "started_at, finished_at, attempts, spec, metadata, result, error, batch) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::text[], "
    "%s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::int[], %s::text[], "
    "%s::text[], %s::text[], %s::text[], %s::text[])"
)

# The columns of ``rows.save_row``, the id last.
SAVE = (
    "UPDATE jobs AS j SET state = v.state, attempts = v.attempts, not_before = v.not_before, "
    "started_at = v.started_at, finished_at = v.finished_at, result = v.result, "
    "error = v.error, bytes = v.bytes, error_code = v.error_code, owner = NULL, "
    "lease_until = NULL "
    "FROM unnest(%s::text[], %s::int[], %s::float8[], %s::float8[], %s::float8[], "
    "%s::text[], %s::text[], %s::int8[], %s::text[], %s::text[]) "
    "AS v(state, attempts, not_before, started_at, finished_at, result, error, bytes, "
    "error_code, id) "
    "WHERE j.id = v.id AND j.state = 'running' AND j.owner = %s "
    "RETURNING j.id, j.client, j.state"
)

_CLAIM_SET = (
    "SET state = 'running', attempts = j.attempts + 1, started_at = %(now)s, "
    f"owner = %(me)s, lease_until = {_DB_NOW} + %(lease)s "
)
# Without a per-host cap: the claim index in order, skipping hosts and locked rows.
CLAIM_SIMPLE = (
    f"UPDATE jobs AS j {_CLAIM_SET}"  # noqa: S608 - constant fragments
    "WHERE j.seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND not_before <= %(now)s "
    f"{COOLING_PG}"
    "AND NOT (host = ANY(%(skip)s::text[])) ORDER BY priority DESC, seq LIMIT %(limit)s "
    "FOR UPDATE SKIP LOCKED) "
    f"RETURNING {_J_COLUMNS}"
)
# With rooms: the claim index walked in claim order (in chunks, until ``limit`` jobs are
# picked), skipping hosts and clients without room in SQL and counting
# the others' picks in Python; then the picked rows are locked (SKIP LOCKED) and marked.
# A host's room: this instance's (``host_room``, else the default) less the other
# instances' running jobs when ``host_room`` is this instance's view, and at most the
# shared cap less every running job of the host. For the hosts given or running; any
# other host has the default (at most the shared cap).
_ROOMS_CTE = (
    "WITH hroom AS (SELECT * FROM unnest(%(hosts)s::text[], %(hrooms)s::int[]) AS h(host, room)), "
    "busy AS (SELECT host, count(*) FILTER (WHERE owner <> %(me)s)::int AS others, "
    "count(*)::int AS total FROM jobs WHERE state = 'running' GROUP BY host), "
    "room AS (SELECT host, LEAST(COALESCE(hroom.room, %(default)s) "
    "- CASE WHEN %(count_others)s THEN COALESCE(busy.others, 0) ELSE 0 END, "
    "%(shared)s - COALESCE(busy.total, 0)) AS room FROM hroom FULL JOIN busy USING (host)) "
)
_ROOMS = _ROOMS_CTE + "SELECT host, room FROM room"  # noqa: S608 - constant fragments
_WALK = (
    "SELECT seq, priority, host, client FROM jobs WHERE state = 'queued' "  # noqa: S608
    "AND not_before <= %(now)s AND NOT (client = ANY(%(full_clients)s::text[])) "
    f"{COOLING_PG}"
)
_ORDER = "ORDER BY priority DESC, seq LIMIT %(chunk)s"
# The first chunk leaves out the hosts without room in the same statement as _ROOMS
# (both go out together: one round trip).
_WALK_FIRST = (
    _ROOMS_CTE  # noqa: S608 - constant fragments
    + _WALK
    + "AND NOT (host = ANY(ARRAY(SELECT host FROM room WHERE room <= 0))) "
    + _ORDER
)
# The next chunk, after the last row read (keyset pagination in claim order).
_WALK_NEXT = (
    _WALK
    + "AND NOT (host = ANY(%(full_hosts)s::text[])) "
    + "AND (priority < %(priority)s OR (priority = %(priority)s AND seq > %(seq)s)) "
    + _ORDER
)
CLAIM_PICKED = (
    f"UPDATE jobs AS j {_CLAIM_SET}"  # noqa: S608 - constant fragments
    "FROM (SELECT seq FROM jobs WHERE seq = ANY(%(picked)s::bigint[]) AND state = 'queued' "
    "FOR UPDATE SKIP LOCKED) AS p WHERE j.seq = p.seq "
    f"RETURNING {_J_COLUMNS}"
)

RENEW = f"UPDATE jobs SET lease_until = {_DB_NOW} + %s WHERE state = 'running' AND owner = %s"  # noqa: S608
REAP = (
    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "  # noqa: S608
    f"WHERE state = 'running' AND lease_until < {_DB_NOW} RETURNING client"
)
RELEASE_OWN_KEYS = (
    "DELETE FROM idempotency_keys WHERE state = 'reserved' AND starts_with(owner, %s)"
)
"""A store's ``owner`` is ``<instance id>/<random>``: the prefix is ``<instance id>/``."""
OWNED_RUNNING = "SELECT id, client FROM jobs WHERE state = 'running' AND owner = %s"
RECOVER_OWN = (
    "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL "
    "WHERE state = 'running' AND (owner = %s OR owner IS NULL) RETURNING client"
)


# -- in the writer thread --------------------------------------------------------------


_WALK_CHUNK = 64
_NO_CAP = 2**31 - 1


@attrs.frozen
class Rooms:
    """A claim's rooms; ``pick`` runs in the database thread, under the claim lock."""

    me: str
    caps: Caps
    shared: int | None

    def pick(self, conn: Conn, now: float) -> list[int]:
        """The seqs to claim: the claim index in order, each host and client up to its
        room, ``limit`` in all."""
        caps, shared = self.caps, self.shared
        default = caps.per_host if caps.per_host is not None else (shared or caps.limit)
        chunk = max(4 * caps.limit, _WALK_CHUNK)
        params: dict[str, object] = {
            "hosts": list(caps.host_room),
            "hrooms": list(caps.host_room.values()),
            "me": self.me,
            "default": default,
            "count_others": caps.per_host is not None,  # host_room: this instance's jobs
            "shared": _NO_CAP if shared is None else shared,
            "now": now,
            "full_clients": [c for c, n in caps.client_room.items() if n <= 0],
            "chunk": chunk,
        }
        with conn.pipeline():
            rooms_cur = conn.execute(_ROOMS, params)
            rows_cur = conn.execute(_WALK_FIRST, params)
        picker = Picker(
            caps.limit,
            dict(rooms_cur.fetchall()),
            default if shared is None else min(default, shared),
            dict(caps.client_room),
            caps.per_client,
        )
        rows = rows_cur.fetchall()
        while True:
            for seq, _priority, host, client in rows:
                if picker.offer(seq, host, client) and picker.done:
                    return picker.picked
            if len(rows) < chunk:
                return picker.picked
            # Rare: a chunk's rows were mostly of hosts or clients that ran out of room.
            last = rows[-1]
            params.update(
                priority=last[1],
                seq=last[0],
                full_hosts=picker.full_hosts(),
                full_clients=picker.full_clients(),
            )
            rows = conn.execute(_WALK_NEXT, params).fetchall()


class ReplayError(Exception):
    """A call failed in a batch run without savepoints: run it again with them."""


@attrs.define
class BatchTrace:
    """What a batch's run has learnt so far, kept when its connection dies under it: the
    transaction's id, and every operation's outcome once all were read (COMMIT goes out
    only after that). With both, ``txid_status`` on a new connection tells whether the
    batch committed, and if it did, its outcomes are good."""

    xid: int | None = None
    outcomes: list[Outcome] | None = None


_XID = b"SELECT txid_current()"
"""Sent right after BEGIN, in the pipeline: no round trip of its own. (``txid_current``
rather than PostgreSQL 13's ``pg_current_xact_id``: ``txid_status`` takes its type.)"""
XID_STATUS = "SELECT txid_status(%s)"


_LOCK = b"SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))"


def attempt(conn: Conn, ops: list[Op], lock: bool, trace: BatchTrace) -> list[Outcome]:
    """Run the batch in one transaction, in pipeline mode: statements go out without
    waiting for each other; a call's own fetches sync, and ``Later`` results are read
    after one sync for all. COMMIT goes out only once every result has been read. If
    anything fails while the connection lives, the transaction is rolled back and
    ``ReplayError`` raised (run it again with ``attempt_careful``)."""
    try:
        with conn.pipeline() as pipeline:
            conn.execute(b"BEGIN")
            xid = conn.execute(_XID)
            if lock:
                # Before any row lock: a claim waits here holding nothing. The
                # statements after it start (and take their snapshots) once it is held.
                conn.execute(_LOCK, (LOCK_CLAIM,))
            results = [op.work(conn) for op in ops]
            pipeline.sync()
            trace.xid = _first(xid.fetchone())
            outcomes = []
            for result in results:
                value, delta = resolve(result)
                outcomes.append(Outcome(ok=True, value=value, queued_delta=delta))
            trace.outcomes = outcomes
            conn.execute(b"COMMIT")
        return outcomes
    except Exception as e:
        _rollback(conn)
        if gone(conn):
            raise
        raise ReplayError from e
    except BaseException:
        _rollback(conn)
        raise


def attempt_careful(conn: Conn, ops: list[Op], lock: bool, trace: BatchTrace) -> list[Outcome]:
    """Run the batch with each call in a savepoint: a failing call (a duplicate id, a
    deadlock) is rolled back alone, as with SQLite. A lost connection fails it all."""
    trace.xid = trace.outcomes = None
    conn.execute(b"BEGIN")
    try:
        trace.xid = _first(conn.execute(_XID).fetchone())
        if lock:
            conn.execute(_LOCK, (LOCK_CLAIM,))
        outcomes = run_with_savepoints(conn, ops, gone=lambda: gone(conn))
        trace.outcomes = outcomes
        conn.execute(b"COMMIT")
        return outcomes
    except BaseException:
        _rollback(conn)
        raise


def _first(row: tuple[Any, ...] | None) -> int | None:
    return None if row is None else int(row[0])


def gone(conn: Conn) -> bool:
    return conn.broken or conn.closed


def _rollback(conn: Conn) -> None:
    """After a failure: end the transaction, if the connection still has one."""
    if gone(conn):
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.execute(b"ROLLBACK")


def _scalar(conn: Conn, query: str, params: Sequence[object] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def ensure_schema(conn: Conn) -> str:
    """The schema the store lives in: the first of ``search_path``, created if missing
    (under an advisory lock: instances starting together would race on CREATE)."""
    current = _scalar(conn, "SELECT current_schema()")
    if current is not None:
        return str(current)
    path = str(_scalar(conn, "SHOW search_path"))
    first = path.split(",", maxsplit=1)[0].strip()
    if first.startswith('"') and first.endswith('"'):
        first = first[1:-1].replace('""', '"')
    if not first or first == "$user":
        raise RuntimeError(f"no schema to use in search_path {path!r}")
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_MIGRATE, first))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(first)))
    return first


def notify(conn: Conn, channel: str, schema: str, sender: str) -> None:
    """Delivered at commit; identical notifications of one transaction are sent once."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, dumps({"schema": schema, "from": sender})))


def unnest_columns(rows: list[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows to one list per column, for ``unnest``: one statement for any number of rows."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width
