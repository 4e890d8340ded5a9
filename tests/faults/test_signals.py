"""Fault family 4: signals at awkward moments (issue 13).

A second SIGTERM during a drain forces a prompt exit and still loses nothing: the jobs
go back to the queue on the next start. SIGTERM during start-up exits cleanly.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import protocol

from ..e2e.conftest import reactor
from ..engine.servers import LoopbackSite
from .conftest import Daemons, Gate, sleep, until

pytestmark = pytest.mark.timeout(60)


@pytest_twisted.ensureDeferred
async def test_second_sigterm_during_drain_exits_promptly_losing_nothing(
    daemons: Daemons, gate: Gate, target: LoopbackSite
) -> None:
    """20 transfers held by the target, --drain-timeout=30: the first SIGTERM starts the
    drain (the process keeps running, /readyz 503); a second SIGTERM 0.5 s later makes it
    exit within 3 s. No job is lost or failed: every one is queued or running in the
    database, and after a restart each ends succeeded, run at most twice."""
    d = await daemons.start("--max-concurrency=50", "--max-per-host=50", "--drain-timeout=30")
    views = await d.submit_batch([{"url": target.url(f"/gate?id={i}")} for i in range(20)])
    await until(lambda: gate.held == 20, 10, "20 transfers held by the target")
    d.signal(signal.SIGTERM)
    await sleep(0.5)
    assert d.proc is not None
    assert d.proc.poll() is None, "exited on the first SIGTERM despite --drain-timeout=30"
    draining = (await d.get("/readyz", seconds=2)).status
    d.signal(signal.SIGTERM)
    second = time.monotonic()
    try:
        code = await d.wait_exit(10)
    finally:
        took = time.monotonic() - second
        print(f"\nsecond SIGTERM: exited {took:.2f}s after it (readyz while draining {draining})")
    states = d.states()
    at_exit = Counter(states[v["id"]][0] for v in views)
    gate.open()
    await d.start()
    ended = [await d.wait_state(v["id"], {"succeeded", "failed"}, 15) for v in views]
    print(f"second SIGTERM: exit {code}; states at exit {dict(at_exit)}; hits {gate.hits}")
    assert draining == 503
    assert took < 3
    assert set(at_exit) <= {"queued", "running"}, at_exit
    assert {v["state"] for v in ended} == {"succeeded"}
    assert max(gate.hits.values()) <= 2


def _bad_lines(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "Traceback" in line or "#critical]" in line or "#error]" in line
    ]


@pytest_twisted.ensureDeferred
async def test_sigterm_during_start_up_exits_cleanly(daemons: Daemons) -> None:
    """SIGTERM at three points of start-up (as soon as twistd logs its reactor, when the
    HTTP port opens, and at the first /readyz 200): each time the process exits 0 within
    5 s with no traceback or error line, and the next start on the same data directory
    is ready."""
    d = daemons.make("--drain-timeout=1")
    results = []
    for marker in ("reactor class:", "Site starting on", "curlfetch ready on"):
        d.spawn()
        await until(lambda m=marker: m in d._new_log(), 15, marker)  # type: ignore[misc]
        d.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await d.wait_exit(10)
        results.append((marker, code, round(time.monotonic() - signalled, 2)))
        assert not _bad_lines(d._new_log()), (marker, _bad_lines(d._new_log()))
    print(f"\nSIGTERM during start-up: {results}")
    for marker, code, took in results:
        assert code == 0, (marker, code)
        assert took < 5, (marker, took)
    await d.start()


class _Silent(protocol.Protocol):
    """Accepts a connection and never says anything (a database that hangs)."""


@pytest_twisted.ensureDeferred
async def test_sigterm_while_the_database_hangs_at_start_up(daemons: Daemons) -> None:
    """--database points at a server that accepts TCP and never answers, so start-up
    waits in the store's connect (10 s connect timeout); SIGTERM 1 s in: the process
    exits within 3 s, without a traceback."""
    factory = protocol.Factory.forProtocol(_Silent)
    port = reactor().listenTCP(0, factory, interface="127.0.0.1")
    try:
        url = f"postgresql://nobody@127.0.0.1:{port.getHost().port}/none"
        d = daemons.make(f"--database={url}", "--instance-id=faults-hang", "--drain-timeout=1")
        d.spawn()
        await until(lambda: "reactor class:" in d._new_log(), 15, "the reactor")
        await sleep(1)
        d.signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code = await d.wait_exit(15)
        finally:
            took = time.monotonic() - signalled
        log = d._new_log()
        print(f"\nSIGTERM while the database hangs: exit {code} after {took:.2f}s")
        assert took < 3
        assert "Traceback" not in log, log[-2000:]
    finally:
        await port.stopListening()
