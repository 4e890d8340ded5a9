"""Basic fetches through the whole engine against the loopback target."""

from __future__ import annotations

import hashlib

import pytest_twisted

from .conftest import Engine
from .servers import LoopbackSite, pattern_bytes


@pytest_twisted.ensureDeferred
async def test_get_returns_full_response(engine: Engine, target: LoopbackSite) -> None:
    """A GET fires with status, body, headers, addresses, sizes and timings filled in."""
    client = engine.client()
    response = await engine.fetch(client, target.url("/bytes?n=1000"))
    assert response.status == 200
    assert response.body == pattern_bytes(1000)
    assert response.headers.get("content-length") == "1000"
    assert response.http_version == "1.1"
    assert response.primary_ip == "127.0.0.1"
    assert response.primary_port == target.port_number
    assert response.size_download == 1000
    assert response.new_connections == 1
    t = response.timings
    assert 0 <= t.namelookup <= t.connect <= t.pretransfer <= t.starttransfer <= t.total
    assert hashlib.sha256(response.body).hexdigest()
