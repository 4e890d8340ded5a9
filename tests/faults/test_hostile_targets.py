"""Fault family 6: hostile targets (issue 13).

An endless body without Content-Length against ``max_body_bytes``; 1 MB of response
headers; a target that accepts the connection and never sends, against the timeout.
Each job fails precisely, within its limit; the service's RSS stays bounded (the peak is
printed); a normal job running alongside is not delayed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from ..e2e.conftest import reactor
from ..engine.servers import LoopbackSite
from .conftest import Daemons, rss_kib

pytestmark = pytest.mark.timeout(60)

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n"


@implementer(IPullProducer)
class _Endless(protocol.Protocol):
    """A 200 without Content-Length whose body never ends (written as fast as the
    reader drains it: the test process's buffer stays small)."""

    sent = 0
    chunk = b"x" * 65536

    def connectionMade(self) -> None:
        self.transport.write(HEAD + b"\r\n")  # type: ignore[union-attr]
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.write(self.chunk)  # type: ignore[union-attr]
        type(self).sent += len(self.chunk)

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass


class _HugeHeaders(protocol.Protocol):
    """About 1 MB of response headers (1,000 of 1 kB each), then a small body."""

    def connectionMade(self) -> None:
        pad = b"a" * 1000
        lines = b"".join(b"X-Pad-%d: %s\r\n" % (i, pad) for i in range(1000))
        self.transport.write(HEAD + lines + b"Content-Length: 2\r\n\r\nok")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        pass


class _Silent(protocol.Protocol):
    """Accepts the connection, reads the request, never answers."""

    def dataReceived(self, data: bytes) -> None:
        pass


def _listen(proto: type[protocol.Protocol]) -> Any:
    return reactor().listenTCP(0, protocol.Factory.forProtocol(proto), interface="127.0.0.1")


def _seconds(view: dict[str, Any]) -> float:
    from datetime import datetime

    def parse(s: str) -> float:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    return parse(view["finished_at"]) - parse(view["started_at"])


@pytest_twisted.ensureDeferred
async def test_hostile_targets_fail_precisely_with_bounded_memory(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Three hostile targets at once, one job each (no retries), plus normal jobs:
    the endless body (max_body_bytes 1 MB) fails with curl code 63 (body too large) in
    under 3 s; 1 MB of headers fails with code 100 (headers too large) in under 3 s; the
    silent target fails with code 28 (timed out) after its 2 s timeout (between 1.9 and
    4 s). A normal job submitted alongside each of them succeeds within 1 s. The
    daemon's RSS never grows more than 64 MB over its baseline."""
    ports = [_listen(p) for p in (_Endless, _HugeHeaders, _Silent)]
    try:
        d = await daemons.start("--drain-timeout=1")
        assert d.proc is not None
        pid = d.proc.pid
        baseline = rss_kib(pid)
        peak = baseline
        samples = 0

        def sample() -> None:
            nonlocal peak, samples
            peak = max(peak, rss_kib(pid))
            samples += 1

        sampler = LoopingCall(sample)
        sampler.start(0.02)
        url = [f"http://127.0.0.1:{p.getHost().port}/x" for p in ports]
        once = {"max_attempts": 1}
        hostile = [
            await d.submit({"url": url[0], "max_body_bytes": 1_000_000, "retry": once}),
            await d.submit({"url": url[1], "retry": once}),
            await d.submit({"url": url[2], "timeout": 2, "retry": once}),
        ]
        normal_started = time.monotonic()
        normal = [await d.submit({"url": target.url(f"/bytes?n={1000 + i}")}) for i in range(3)]
        normal_done = [await d.wait_state(v["id"], {"succeeded", "failed"}, 10) for v in normal]
        normal_took = time.monotonic() - normal_started
        ended = [await d.wait_state(v["id"], {"succeeded", "failed"}, 15) for v in hostile]
        sampler.stop()
        errors = [(v["state"], v["error"], round(_seconds(v), 2)) for v in ended]
        print(
            f"\nhostile targets: endless body (sent {_Endless.sent} bytes) -> {errors[0]}; "
            f"1 MB headers -> {errors[1]}; silent -> {errors[2]}; normal jobs "
            f"{[v['state'] for v in normal_done]} in {normal_took:.2f}s; RSS baseline "
            f"{baseline / 1024:.1f} MB, peak {peak / 1024:.1f} MB ({samples} samples)"
        )
        assert [v["state"] for v in normal_done] == ["succeeded"] * 3
        assert normal_took < 1.0
        codes = [(v["error"] or {}).get("curl_code") for v in ended]
        assert codes == [63, 100, 28], errors
        assert [v["state"] for v in ended] == ["failed"] * 3
        assert _seconds(ended[0]) < 3
        assert _seconds(ended[1]) < 3
        assert 1.9 <= _seconds(ended[2]) < 4
        assert peak - baseline < 64 * 1024
    finally:
        for p in ports:
            await p.stopListening()
