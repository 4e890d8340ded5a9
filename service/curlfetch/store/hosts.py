"""Politeness state the instances share: host cooldowns and the robots.txt cache.

Both are small tables keyed by host or origin. A cooldown is written by the instance
that saw the host answer 429/503 with ``Retry-After`` (or fail to connect, again and
again), and every claim, on every instance, leaves the host's queued jobs alone until it
ends (``COOLING``, a clause of each claim statement): exact across instances, and it
survives a restart. The robots cache lets one instance's fetch of an origin's
robots.txt serve the others.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ..jobs import rfc3339
from .loop import StoreOps
from .portable import Types

COOLING_SQLITE = "AND host NOT IN (SELECT host FROM host_cooldowns WHERE until > ?) "
COOLING_PG = "AND NOT (host = ANY(ARRAY(SELECT host FROM host_cooldowns WHERE until > %(now)s))) "
"""The claim clause: no job of a cooling host is claimed (one tiny-table lookup per
claim; the table holds only hosts that cooled down within the last hour)."""

_FORGET_COOLDOWNS_AFTER = 3600.0
_FORGET_ROBOTS_AFTER = 24 * 3600.0


def hosts_tables(t: Types) -> tuple[str, ...]:
    return (
        "CREATE TABLE host_cooldowns (host TEXT PRIMARY KEY, "
        f"until {t.time} NOT NULL, reason TEXT NOT NULL, set_at {t.time} NOT NULL)",
        "CREATE TABLE robots (origin TEXT PRIMARY KEY, state TEXT NOT NULL, status INTEGER, "
        f"fetched_at {t.time} NOT NULL, expires_at {t.time} NOT NULL, "
        f"truncated INTEGER NOT NULL, message TEXT NOT NULL, body {t.blob} NOT NULL)",
    )


@attrs.frozen
class Cooldown:
    """A host paused until ``until`` (Unix seconds), and why."""

    until: float
    reason: str
    set_at: float

    def to_json(self) -> dict[str, Any]:
        return {"until": rfc3339(self.until), "reason": self.reason, "since": rfc3339(self.set_at)}


@attrs.frozen
class RobotsRow:
    """A robots.txt as fetched (see ``curlfetch.robots``), as the store keeps it."""

    origin: str
    state: str
    status: int | None
    fetched_at: float
    expires_at: float
    truncated: bool
    message: str
    body: bytes


class HostMethods(StoreOps):
    """The store's politeness methods (mixed into ``StoreCore``)."""

    sql: Any

    def set_cooldown(self, host: str, until: float, reason: str, now: float) -> Deferred[None]:
        """Pause ``host`` until ``until``, unless a later pause is already set (by any
        instance); drops pauses that ended over an hour ago."""
        p = self.sql.p
        upsert = (
            f"INSERT INTO host_cooldowns (host, until, reason, set_at) VALUES ({p}, {p}, {p}, {p}) "  # noqa: S608
            "ON CONFLICT (host) DO UPDATE SET until = excluded.until, "
            "reason = excluded.reason, set_at = excluded.set_at "
            "WHERE excluded.until > host_cooldowns.until"
        )
        forget = f"DELETE FROM host_cooldowns WHERE until < {p}"  # noqa: S608

        def set_cooldown(conn: Any) -> tuple[None, dict[str, int]]:
            conn.execute(upsert, (host, until, reason, now))
            conn.execute(forget, (now - _FORGET_COOLDOWNS_AFTER,))
            return None, {}

        return self._submit(set_cooldown, retry=True)

    def cooldowns(
        self, now: float, hosts: Collection[str] | None = None
    ) -> Deferred[dict[str, Cooldown]]:
        """The hosts paused at ``now`` (of ``hosts``, or all)."""
        p = self.sql.p
        query = f"SELECT host, until, reason, set_at FROM host_cooldowns WHERE until > {p}"  # noqa: S608
        wanted = None if hosts is None else frozenset(hosts)

        def cooldowns(conn: Any) -> tuple[dict[str, Cooldown], dict[str, int]]:
            return {
                host: Cooldown(until, reason, set_at)
                for host, until, reason, set_at in conn.execute(query, (now,))
                if wanted is None or host in wanted
            }, {}

        return self._read(cooldowns)

    def robots_get(self, origins: Collection[str]) -> Deferred[dict[str, RobotsRow]]:
        """The stored robots.txt of each of ``origins`` that has one (fresh or not)."""
        p = self.sql.p
        query = (
            "SELECT origin, state, status, fetched_at, expires_at, truncated, message, body "  # noqa: S608
            f"FROM robots WHERE origin = {p}"
        )
        wanted = list(dict.fromkeys(origins))

        def robots_get(conn: Any) -> tuple[dict[str, RobotsRow], dict[str, int]]:
            out = {}
            for origin in wanted:
                row = conn.execute(query, (origin,)).fetchone()
                if row is not None:
                    o, state, status, fetched, expires, truncated, message, body = row
                    out[o] = RobotsRow(
                        o, state, status, fetched, expires, bool(truncated), message, bytes(body)
                    )
            return out, {}

        return self._read(robots_get)

    def robots_put(self, row: RobotsRow) -> Deferred[None]:
        """Keep ``row`` (replacing the origin's older one); drops rows a day past expiry."""
        p = self.sql.p
        upsert = (
            "INSERT INTO robots (origin, state, status, fetched_at, expires_at, truncated, "  # noqa: S608
            f"message, body) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) "
            "ON CONFLICT (origin) DO UPDATE SET state = excluded.state, "
            "status = excluded.status, fetched_at = excluded.fetched_at, "
            "expires_at = excluded.expires_at, truncated = excluded.truncated, "
            "message = excluded.message, body = excluded.body "
            "WHERE excluded.fetched_at >= robots.fetched_at"
        )
        forget = f"DELETE FROM robots WHERE expires_at < {p}"  # noqa: S608
        params = (
            row.origin,
            row.state,
            row.status,
            row.fetched_at,
            row.expires_at,
            int(row.truncated),
            row.message,
            row.body,
        )

        def robots_put(conn: Any) -> tuple[None, dict[str, int]]:
            conn.execute(upsert, params)
            conn.execute(forget, (row.fetched_at - _FORGET_ROBOTS_AFTER,))
            return None, {}

        return self._submit(robots_put, retry=True)
