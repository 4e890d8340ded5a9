"""Idempotency-Key against a real ``twistd curlfetch``: the recorded response is durable
(committed with the jobs before the 201), so a replay after ``kill -9`` and a restart
still answers it. Only loopback traffic."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite
from .conftest import Daemons

pytestmark = pytest.mark.timeout(90)

JSON = ("Content-Type", "application/json")


@pytest_twisted.ensureDeferred
async def test_a_replay_after_kill_9_and_restart_answers_the_first_response(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """POST with an Idempotency-Key, ``kill -9`` as soon as the 201 arrives, restart:
    the same key and body answer the same 201 byte for byte (``Idempotent-Replayed``),
    another body is 422, and only the first job exists."""
    d = await daemons.start()
    body = json.dumps({"url": target.url("/bytes?n=10")}).encode()
    keyed = [JSON, ("Idempotency-Key", "e2e-key-1")]
    first = await d.request("POST", "/v1/jobs", body, keyed)
    assert first.status == 201, first
    d.kill()

    await d.start()
    again = await d.request("POST", "/v1/jobs", body, keyed)
    assert (again.status, again.body) == (201, first.body)
    assert again.headers.get("location") == first.headers.get("location")
    assert again.headers.get("idempotent-replayed") == "true"
    other = json.dumps({"url": target.url("/bytes?n=11")}).encode()
    reused = await d.request("POST", "/v1/jobs", other, keyed)
    assert reused.status == 422, reused
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert [job["id"] for job in await d.all_jobs()] == [first.json()["id"]]
