"""robots.txt (RFC 9309): fetched through the engine under the egress policy, once per
origin however many jobs wait for it, cached, and shared through the store.

What a fetch means (RFC 9309 2.3.1):

- **2xx**: the rules, parsed by ``protego`` (Scrapy's parser) from at most the first
  500 KiB (2.5: a parser must read at least that much; the rest is not downloaded).
- **4xx** ("unavailable"), more than 5 redirects, or a redirect the egress policy
  refuses: no rules, everything allowed.
- **429, 5xx, or no answer** ("unreachable": refused, reset, timed out, a slow file):
  everything disallowed, for ``error_ttl`` seconds; a job waiting on it is retried per
  its retry policy, then fails ``robots_unavailable``. 429 is counted here, not as
  unavailable, because it asks the crawler to slow down, not to go ahead.

A result is kept for ``ttl`` seconds (at most 24 h, 2.4), in memory and in the store,
where the other instances find it. The rules are matched against the product token of
``--user-agent`` (``curlfetch`` in ``curlfetch/1.0 (+https://...)``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from protego import Protego
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .egress import EgressPolicy
from .engine import (
    ClientClosedError,
    CurlClient,
    CurlError,
    EgressDeniedError,
    TooManyRedirectsError,
)
from .jobs import rfc3339
from .store import JobStore, RobotsRow

log = Logger()

MAX_ROBOTS_BYTES = 500 * 1024
MAX_ROBOTS_REDIRECTS = 5
MAX_ROBOTS_TTL = 24 * 3600.0
_PRODUCT_TOKEN = re.compile(r"[^\s/;()]+")

ALLOW, DISALLOW, UNREACHABLE = "allow", "disallow", "unreachable"


def product_token(user_agent: str) -> str:
    """The token robots.txt groups name: the User-Agent up to its first ``/`` or space
    (``e2ebot`` in ``e2ebot/2.0 (+https://...)``; RFC 9309 2.2.1 asks for letters, ``_``
    and ``-`` only, but crawlers' names carry digits too)."""
    match = _PRODUCT_TOKEN.match(user_agent)
    return match.group(0).lower() if match else "curlfetch"


class RobotsClock(Protocol):
    def seconds(self) -> float: ...


@attrs.define
class Robots:
    """One origin's robots.txt as fetched: ``state`` is ``rules``, ``allow_all`` or
    ``unreachable``."""

    row: RobotsRow
    _parser: Protego | None = None

    @property
    def state(self) -> str:
        return self.row.state

    def fresh(self, now: float) -> bool:
        return now < self.row.expires_at

    def parser(self) -> Protego:
        if self._parser is None:
            self._parser = Protego.parse(self.row.body.decode("utf-8", "replace"))
        return self._parser

    def verdict(self, url: str, token: str) -> tuple[str, str]:
        """(``allow``, ""), (``disallow``, the rule), or (``unreachable``, why)."""
        if self.state == "allow_all":
            return ALLOW, ""
        if self.state == "unreachable":
            return UNREACHABLE, self.row.message
        parser = self.parser()
        if parser.can_fetch(url, token):
            return ALLOW, ""
        return DISALLOW, _matching_rule(parser, url, token)

    def crawl_delay(self, token: str) -> float | None:
        if self.state != "rules":
            return None
        delay = self.parser().crawl_delay(token)
        return None if delay is None else float(delay)

    def to_json(self, token: str) -> dict[str, Any]:
        row = self.row
        return {
            "origin": row.origin,
            "state": row.state,
            "status": row.status,
            "fetched_at": rfc3339(row.fetched_at),
            "expires_at": rfc3339(row.expires_at),
            "bytes": len(row.body),
            "truncated": row.truncated,
            "message": row.message,
            "crawl_delay": self.crawl_delay(token),
        }


def _matching_rule(parser: Protego, url: str, token: str) -> str:
    """The rule that disallowed ``url``, as written (``Disallow: /private``). protego
    answers only yes or no, so this reads its rule set (pinned: protego 0.x)."""
    try:
        from protego._utils import _quote_path

        rule_set = parser._get_matching_rule_set(token)
        if rule_set is not None:
            quoted = _quote_path(url)
            for rule in rule_set._rules:
                if rule.value.match(quoted):
                    pattern = rule.value._pattern
                    group = rule_set.user_agent or "*"
                    return f"{rule.field.capitalize()}: {pattern} (user-agent: {group})"
    except Exception:
        log.failure("naming the robots.txt rule failed")
    return "a Disallow rule"


@attrs.frozen
class RobotsConfig:
    user_agent: str = "curlfetch"
    ttl: float = MAX_ROBOTS_TTL
    error_ttl: float = 60.0
    """How long an unreachable robots.txt disallows everything before it is fetched again."""
    timeout: float = 10.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    """Bodies kept in memory at most (a robots.txt may be 500 KiB): the least recently
    used origins go first (the store still has them)."""
    egress: EgressPolicy | None = None
    ca_bundle: str | None = None


class RobotsCache:
    """Rules per origin: ``cached`` answers from memory, ``load`` fetches (or reads the
    store) once per origin however many callers wait."""

    def __init__(
        self,
        reactor: RobotsClock,
        client: CurlClient,
        store: JobStore | None,
        config: RobotsConfig,
        on_fetched: Callable[[str], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._client = client
        self._store = store
        self.config = config
        self.token = product_token(config.user_agent)
        self._on_fetched = on_fetched
        self._cache: OrderedDict[str, Robots] = OrderedDict()
        self._loading: dict[str, list[Deferred[Robots]]] = {}
        self._bytes = 0
        self.fetches = 0

    def cached(self, origin: str, now: float) -> Robots | None:
        """The origin's rules if fresh."""
        robots = self._cache.get(origin)
        if robots is None or not robots.fresh(now):
            return None
        self._cache.move_to_end(origin)
        return robots

    def known(self, origin: str) -> Robots | None:
        """The origin's rules as last seen, fresh or not (the hosts view)."""
        return self._cache.get(origin)

    def load(self, origin: str) -> Deferred[Robots]:
        """The origin's rules, fresh: from memory, the store, or one fetch shared by
        every caller. Never fails (a failure is an ``unreachable`` result)."""
        robots = self.cached(origin, self._reactor.seconds())
        if robots is not None:
            return succeed(robots)
        mine: Deferred[Robots] = Deferred()
        waiting = self._loading.get(origin)
        if waiting is not None:
            waiting.append(mine)
            return mine
        self._loading[origin] = [mine]
        ensureDeferred(self._load(origin)).addBoth(self._loaded, origin)
        return mine

    def _loaded(self, result: Robots | Failure, origin: str) -> None:
        if isinstance(result, Failure):
            now = self._reactor.seconds()
            row = RobotsRow(
                origin,
                "unreachable",
                None,
                now,
                now + self.config.error_ttl,
                False,
                f"not read: {result.getErrorMessage() or type(result.value).__name__}",
                b"",
            )
            if result.check(CancelledError, ClientClosedError):
                result = Robots(row)  # shutting down: an answer for the waiters only
            else:
                log.failure("loading the robots.txt of {origin} failed", result, origin=origin)
                result = self._remember(row)
        for waiter in self._loading.pop(origin, []):
            waiter.callback(result)

    def _remember(self, row: RobotsRow) -> Robots:
        robots = Robots(row)
        old = self._cache.pop(row.origin, None)
        if old is not None:
            self._bytes -= len(old.row.body)
        self._cache[row.origin] = robots
        self._bytes += len(row.body)
        config = self.config
        while len(self._cache) > 1 and (
            len(self._cache) > config.max_entries or self._bytes > config.max_bytes
        ):
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= len(dropped.row.body)
        return robots

    async def _load(self, origin: str) -> Robots:
        now = self._reactor.seconds()
        if self._store is not None:
            try:
                stored = (await self._store.robots_get([origin])).get(origin)
            except Exception:
                log.failure("reading the stored robots.txt of {origin} failed", origin=origin)
                stored = None
            if stored is not None and now < stored.expires_at:
                return self._remember(stored)
        row = await self._fetch(origin)
        robots = self._remember(row)
        if self._on_fetched is not None:
            self._on_fetched(row.state)
        if self._store is not None:
            try:
                await self._store.robots_put(row)
            except Exception:
                log.failure("storing the robots.txt of {origin} failed", origin=origin)
        return robots

    async def _fetch(self, origin: str) -> RobotsRow:  # noqa: PLR0911 - one per outcome
        config, egress = self.config, self.config.egress
        url = f"{origin}/robots.txt"
        started = self._reactor.seconds()
        self.fetches += 1
        ttl = min(config.ttl, MAX_ROBOTS_TTL)

        def row(state: str, status: int | None, message: str, body: bytes = b"") -> RobotsRow:
            keep = ttl if state != "unreachable" else min(config.error_ttl, ttl)
            return RobotsRow(
                origin, state, status, started, started + keep, truncated, message, body
            )

        truncated = False
        try:
            response = await self._client.fetch(
                url,
                user_agent=config.user_agent,
                timeout=config.timeout,
                connect_timeout=config.timeout,
                follow_redirects=True,
                max_redirects=MAX_ROBOTS_REDIRECTS,
                max_body_bytes=MAX_ROBOTS_BYTES,
                truncate_body=True,
                connect_check=None if egress is None else egress.connect_check,
                host_check=egress.host_check if egress and egress.checks_hosts else None,
                ca_bundle=config.ca_bundle,
            )
        except TooManyRedirectsError:
            return row("allow_all", None, f"more than {MAX_ROBOTS_REDIRECTS} redirects: allow all")
        except EgressDeniedError as e:
            return row("allow_all", None, f"refused by the egress policy ({e.message}): allow all")
        except CurlError as e:
            return row("unreachable", None, f"{e.name}: {e.message}")
        status = response.status
        truncated = response.truncated
        if 200 <= status < 300:
            body = response.body or b""
            return row("rules", status, f"HTTP {status}", body)
        if status == 429 or status >= 500:
            return row("unreachable", status, f"HTTP {status}")
        if 400 <= status < 500:
            return row("allow_all", status, f"HTTP {status}: allow all")
        return row("unreachable", status, f"HTTP {status}")
