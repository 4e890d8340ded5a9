"""The three checks every engine test carries (curl-reactor-pitfalls.md):

- a watchdog, so a hang fails the test instead of stalling CI;
- no ``CurlSocket`` left registered with the reactor, and no file descriptor leaked;
- a cap on ``socket_action`` calls, so busy loops fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import deferLater

from curlfetch.engine import CurlClient, CurlSocket
from curlfetch.engine.request import RequestOptions

from .servers import LoopbackSite

T = TypeVar("T")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def curl_registrations(reactor: Any) -> list[Any]:
    return [d for d in (*reactor.getReaders(), *reactor.getWriters()) if isinstance(d, CurlSocket)]


class Engine:
    """Builds clients for one test and checks what they leave behind."""

    def __init__(self, reactor: Any, watchdog: float, max_socket_actions: int) -> None:
        self.reactor = reactor
        self.clients: list[CurlClient] = []
        self.max_socket_actions = max_socket_actions
        self.watchdog_seconds = watchdog
        self.watchdog_fired = False
        self._dog = reactor.callLater(watchdog, self._bark)

    def client(self, **kwargs: Any) -> CurlClient:
        client = CurlClient(self.reactor, **kwargs)
        self.clients.append(client)
        return client

    def _bark(self) -> None:
        # Cancel everything so the awaiting test body unwinds and fails.
        self.watchdog_fired = True
        for client in self.clients:
            client.close()

    @property
    def socket_actions(self) -> int:
        return sum(c.driver.stats.socket_actions for c in self.clients)

    def within(self, d: defer.Deferred[T], seconds: float | None = None) -> defer.Deferred[T]:
        """``d``, failing with ``defer.TimeoutError`` if it takes longer than ``seconds``."""
        return d.addTimeout(seconds or self.watchdog_seconds, self.reactor)

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return deferLater(self.reactor, seconds, lambda: None)

    async def fetch(self, client: CurlClient, url: str, **options: Any) -> Any:
        opts: RequestOptions = options  # type: ignore[assignment]
        return await self.within(client.fetch(url, **opts))

    async def finish(self, baseline: set[str]) -> None:
        if self._dog.active():
            self._dog.cancel()
        for client in self.clients:
            client.close()
        # Server-side halves of closed connections close on the next reactor turns.
        for _ in range(100):
            if not (open_fds() - baseline):
                break
            await self.sleep(0.02)


@pytest.fixture(scope="module")
def target() -> Iterator[LoopbackSite]:
    """A loopback HTTP target shared by a module's tests."""
    site = LoopbackSite(_reactor())
    yield site
    site.stop()


@pytest_twisted.async_yield_fixture
async def engine(request: pytest.FixtureRequest, target: LoopbackSite) -> AsyncIterator[Engine]:
    marker = request.node.get_closest_marker("engine")
    options = dict(marker.kwargs) if marker else {}
    reactor = _reactor()
    # Let connections of earlier tests finish closing before taking the baseline.
    await deferLater(reactor, 0.01, lambda: None)
    baseline = open_fds()
    eng = Engine(
        reactor,
        watchdog=options.get("watchdog", 5.0),
        max_socket_actions=options.get("max_socket_actions", 300),
    )
    yield eng
    await eng.finish(baseline)
    assert not eng.watchdog_fired, f"watchdog: the test ran past {eng.watchdog_seconds}s"
    left = curl_registrations(reactor)
    assert not left, f"curl descriptors left registered with the reactor: {left}"
    for client in eng.clients:
        assert not client.driver.sockets, f"driver still tracks {client.driver.sockets}"
    leaked = open_fds() - baseline
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"
    assert eng.socket_actions <= eng.max_socket_actions, (
        f"{eng.socket_actions} socket_action calls (cap {eng.max_socket_actions}): busy loop?"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "engine(watchdog=5.0, max_socket_actions=300): engine fixture limits"
    )
