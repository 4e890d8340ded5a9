"""HTTP/3 and HTTP/2 end to end through the scheduler, against real local servers: an
aioquic HTTP/3 server (``h3server.py``, a subprocess) and a Twisted HTTPS site with HTTP/2
via ALPN (``tests/engine/tls.py``). Only 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme

from tests.engine.tls import TLSSite

from .apiserver import Service, ServiceFactory, services
from .conftest import reactor, within

__all__ = ["services"]  # fixtures

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 5.0
"""The HTTP/3 server must print its port within this long, or the test fails."""


class H3Server:
    """``h3server.py`` running in a subprocess; ``lines()`` reads what it logged."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1")
        self.ca_path = str(tmp_path / "h3-ca.pem")
        cert_path = str(tmp_path / "h3-cert.pem")
        key_path = str(tmp_path / "h3-key.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        for i, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(cert_path, append=i > 0)
        cert.private_key_pem.write_to_path(key_path)
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.service.h3server"),
                *("--cert", cert_path, "--key", key_path, "--port", "0"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._pending = b""
        try:
            first = self.lines(START_SECONDS, want=1)
            assert first, f"h3server printed no port within {START_SECONDS} s"
            assert first[0].startswith("port "), f"h3server said {first!r}"
        except BaseException:
            self.stop()
            raise
        self.port = int(first[0].split()[1])
        self.log: list[str] = []

    def lines(self, seconds: float, want: int = 0) -> list[str]:
        """The complete lines logged so far: waits up to ``seconds`` for ``want`` of
        them (fails if the server exits first), then returns what arrived."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + seconds
        while True:
            enough = self._pending.count(b"\n") >= want
            left = 0.0 if enough else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            assert chunk, f"h3server exited with {self.process.wait()}"
            self._pending += chunk
        done, _, self._pending = self._pending.rpartition(b"\n")
        return done.decode().splitlines() if done else []

    def requests(self) -> list[str]:
        """Every request it has served, as ``METHOD PATH``."""
        self.log += [line.split(" ", 2)[2] for line in self.lines(0) if line.startswith("request ")]
        return self.log

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(START_SECONDS)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def h3(tmp_path: Path) -> Iterator[H3Server]:
    """The aioquic HTTP/3 server; killed after the test whatever happened."""
    server = H3Server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest_twisted.async_yield_fixture
async def tls(tmp_path: Path) -> AsyncIterator[TLSSite]:
    """An HTTPS site (HTTP/2 or 1.1 by ALPN) over TCP only, with its trustme CA."""
    site = TLSSite(reactor(), str(tmp_path))
    try:
        yield site
    finally:
        await within(site.stop())


async def fetched(svc: Service, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit one job and wait for its outcome."""
    reply = await svc.submit(spec)
    assert reply.status == 201, reply
    job = await svc.wait_job(reply.json()["id"])
    assert job["state"] in ("succeeded", "failed"), job
    return job


@pytest_twisted.ensureDeferred
async def test_http3_job_is_fetched_over_quic(services: ServiceFactory, h3: H3Server) -> None:
    """A job with ``http_version: "3"`` to the aioquic server (UDP only: nothing listens on
    TCP) succeeds over HTTP/3: its view reports ``http_version`` "3", the body API serves
    the server's bytes, and the server saw exactly that one request. ``ca_bundle`` is
    what QUIC's TLS verifies against as well."""
    svc = await services(scheduler_config={"ca_bundle": h3.ca_path})
    job = await fetched(svc, {"url": h3.url("/hello"), "http_version": "3", "timeout": 5})
    assert job["state"] == "succeeded", job
    assert job["result"]["status"] == 200
    assert job["result"]["http_version"] == "3"
    body = await svc.call("GET", job["result"]["body"]["url"])
    assert body.status == 200
    assert body.body == b"hello over h3\n"
    assert h3.requests() == ["GET /hello"]


@pytest.mark.parametrize(("http2", "expected"), [(True, "2"), (False, "1.1")])
@pytest_twisted.ensureDeferred
async def test_http3_without_quic_falls_back_to_tcp(
    services: ServiceFactory, tmp_path: Path, http2: bool, expected: str
) -> None:
    """``http_version: "3"`` (CURL_HTTP_VERSION_3) to an HTTPS server that listens on TCP
    only (nothing on that UDP port): libcurl falls back to TCP at once, and the job
    succeeds on its first attempt over what ALPN picks there, HTTP/2 (or HTTP/1.1 from a
    server without h2), which its view reports; it is not failed nor retried."""
    site = TLSSite(reactor(), str(tmp_path), http2=http2)
    try:
        svc = await services(scheduler_config={"ca_bundle": site.ca_path})
        job = await fetched(svc, {"url": site.url("/bytes?n=10"), "http_version": "3"})
    finally:
        await within(site.stop())
    assert (job["state"], job["attempts"], job["error"]) == ("succeeded", 1, None)
    result = job["result"]
    assert (result["status"], result["http_version"]) == (200, expected)
    assert result["body"]["size"] == 10
    assert result["timings"]["total"] < 2.0  # no wait for a QUIC timeout


JOBS = 50


@pytest.mark.parametrize(("max_per_host", "seconds"), [(JOBS, 0.5), (4, 0.1)])
@pytest_twisted.ensureDeferred
async def test_http2_jobs_to_one_origin_share_one_connection(
    services: ServiceFactory, tls: TLSSite, max_per_host: int, seconds: float
) -> None:
    """50 jobs with ``http_version: "2"`` to one HTTPS origin, submitted as one batch,
    with ``max_concurrency`` 64: all succeed over HTTP/2, as many at once as
    ``max_per_host`` allows (the server's peak of requests in progress), and the server
    accepted exactly one TCP connection: libcurl multiplexes them as streams of the
    first connection (PIPEWAIT) rather than opening one per job."""
    connections: list[Any] = []
    build = tls.site.buildProtocol

    def counting(address: Any) -> Any:
        connections.append(address)
        return build(address)

    tls.site.buildProtocol = counting  # type: ignore[method-assign]
    svc = await services(
        max_concurrency=64,
        scheduler_config={"ca_bundle": tls.ca_path, "max_per_host": max_per_host},
    )
    specs = [
        {"url": tls.url(f"/concurrent?s={seconds}&id={i}"), "http_version": "2"}
        for i in range(JOBS)
    ]
    reply = await svc.call("POST", "/v1/batches", json_body={"jobs": specs})
    assert reply.status == 201, reply
    batch = (await svc.call("GET", f"/v1/batches/{reply.json()['id']}?wait=8")).json()
    assert batch["state"] == "completed", batch
    assert batch["counts"]["succeeded"] == JOBS, batch
    jobs = (await svc.call("GET", batch["jobs_url"] + "?limit=100")).json()["jobs"]
    assert len(jobs) == JOBS
    assert {j["result"]["http_version"] for j in jobs} == {"2"}
    assert sorted(tls.root.concurrency.starts, key=int) == [str(i) for i in range(JOBS)]
    assert tls.root.concurrency.peak == max_per_host
    assert len(connections) == 1
    assert len(set(tls.root.concurrency.ports)) == 1  # every request from one client port
