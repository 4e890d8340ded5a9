"""Fault family 5: ``kill -9`` in the middle of a batch POST, before its 201 (issue 13).

After the restart the batch exists whole or not at all, and a retry with the same
``Idempotency-Key`` gets a consistent answer: the same jobs if they were stored, a new
whole batch if not; never a partial batch, never a second copy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from ..engine.servers import LoopbackSite
from .conftest import Daemon, Daemons, sleep

pytestmark = pytest.mark.timeout(120)

BATCH = 500


def _request(port: int, body: bytes, key: str) -> bytes:
    return (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (port, key.encode(), len(body))
    ) + body


def _post_then_kill(port: int, pid: int, request: bytes, delay: float) -> bytes:
    """Send the whole request, ``kill -9`` the daemon ``delay`` s after the last byte
    went out; whatever answer arrived before that (blocking: run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        sent = time.monotonic()
        s.settimeout(0.001)
        answer = b""
        while time.monotonic() - sent < delay:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
        os.kill(pid, signal.SIGKILL)
        return answer


def _specs(target: LoopbackSite, round_: int) -> list[dict[str, Any]]:
    return [
        {"url": target.url(f"/count/r{round_}-{i}"), "metadata": {"round": round_, "i": i}}
        for i in range(BATCH)
    ]


async def _retry(d: Daemon, body: bytes, key: str, seconds: float) -> tuple[int, Any, float]:
    """The same POST again, waiting out 409/503 (Retry-After) for at most ``seconds``."""
    started = time.monotonic()
    headers = [("Content-Type", "application/json"), ("Idempotency-Key", key)]
    while True:
        reply = await d.request("POST", "/v1/jobs", body, headers, seconds=15)
        if reply.status not in (409, 503) or time.monotonic() - started > seconds:
            return reply.status, reply.json(), time.monotonic() - started
        await sleep(min(float(reply.headers.get("retry-after") or 1), 1.0))


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_batch_post_leaves_all_or_nothing_and_retry_is_consistent(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Batches of 500 jobs, each POSTed with its own Idempotency-Key; the daemon is
    ``kill -9``-ed 0 to 1.2x the measured POST latency after the request's last byte
    (ten rounds), before the 201 arrives. After each restart: the round's jobs number 0
    or 500 (never a part); a retry with the same key and body answers 201 within 6 s
    (no 500, no 422), with exactly the stored job ids when the batch was stored, and
    afterwards the round has exactly 500 jobs."""
    d = await daemons.start("--drain-timeout=1", "--max-queued=100000")
    # The latency of one batch POST, to aim the kills inside it.
    probe = json.dumps({"jobs": _specs(target, -1)}).encode()
    began = time.monotonic()
    headers = [("Content-Type", "application/json"), ("Idempotency-Key", "probe")]
    first = await d.request("POST", "/v1/jobs", probe, headers)
    assert first.status == 201
    latency = time.monotonic() - began
    rounds = []
    for round_, fraction in enumerate((0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)):
        key = f"crash-{round_}"
        body = json.dumps({"jobs": _specs(target, round_)}).encode()
        assert d.proc is not None
        answer = await threads.deferToThread(
            _post_then_kill, d.port, d.proc.pid, _request(d.port, body, key), latency * fraction
        )
        d.proc.wait(5)
        await d.start()
        stored = [j for j in await d.all_jobs() if (j["metadata"] or {}).get("round") == round_]
        status, reply, waited = await _retry(d, body, key, 6)
        after = [j for j in await d.all_jobs() if (j["metadata"] or {}).get("round") == round_]
        replayed = [v["id"] for v in reply.get("jobs", [])] if status == 201 else []
        rounds.append(
            {
                "kill_after_s": round(latency * fraction, 3),
                "answered_before_kill": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
                "stored_after_restart": len(stored),
                "retry": status,
                "retry_waited_s": round(waited, 2),
                "same_ids": sorted(replayed) == sorted(j["id"] for j in stored),
                "after_retry": len(after),
            }
        )
    print(f"\nkill -9 mid-POST (POST latency {latency:.3f}s):")
    for r in rounds:
        print(f"  {r}")
    print(f"  outcomes: {Counter((r['stored_after_restart'], r['retry']) for r in rounds)}")
    for r in rounds:
        assert r["stored_after_restart"] in (0, BATCH), r
        assert r["retry"] == 201, r
        if r["stored_after_restart"]:
            assert r["same_ids"], r
        assert r["after_retry"] == BATCH, r
