"""HTTPS through the engine against the loopback TLS target."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from curlfetch.engine import TLSError

from .conftest import Engine, _reactor
from .tls import TLSSite


@pytest.fixture
def tls_site(tmp_path: Path) -> Iterator[TLSSite]:
    site = TLSSite(_reactor(), str(tmp_path))
    yield site
    site.stop()


@pytest_twisted.ensureDeferred
async def test_https_h2_with_ca_bundle(tls_site: TLSSite, engine: Engine) -> None:
    """With the test CA as ca_bundle, HTTPS verifies and negotiates HTTP/2 by ALPN."""
    client = engine.client()
    response = await engine.fetch(client, tls_site.url("/bytes?n=100"), ca_bundle=tls_site.ca_path)
    assert response.status == 200
    assert response.http_version == "2"
    assert response.tls_verify_result == 0
    assert len(response.body) == 100


@pytest_twisted.ensureDeferred
async def test_self_signed_fails_verification(tls_site: TLSSite, engine: Engine) -> None:
    """Without the CA, verification fails with PEER_FAILED_VERIFICATION (60), a TLSError."""
    client = engine.client()
    with pytest.raises(TLSError) as info:
        await engine.fetch(client, tls_site.url("/bytes?n=100"))
    assert info.value.code == 60
    assert info.value.name == "PEER_FAILED_VERIFICATION"
