"""A running job service for API tests: the real ``JobAPI`` site on 127.0.0.1 port 0, a
real SQLite store and body directory in ``tmp_path``, a real ``CurlClient`` and
``Scheduler``, and a loopback target (``tests/engine/servers.py``) to fetch from.

Tests talk to it over real HTTP with the engine's own ``CurlClient``. With ``tokens``
(client id -> token), every call carries the first client's token unless it names
another (``token=``) or none (``anonymous=True``). ``stop()`` drains the
scheduler, closes both clients, stops both listeners, closes the store, and checks that no
``CurlSocket`` is left registered with the reactor.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from curlfetch.api import JobAPI
from curlfetch.auth import TokenSet
from curlfetch.bodies import DirectoryBodyStore
from curlfetch.egress import EgressPolicy
from curlfetch.engine import CurlClient, CurlSocket, Headers
from curlfetch.jobs import Limits
from curlfetch.metrics import Metrics
from curlfetch.quotas import ClientQuotas
from curlfetch.robots import RobotsCache, RobotsConfig
from curlfetch.scheduler import Scheduler, SchedulerConfig
from curlfetch.segments import SegmentBodyStore
from curlfetch.store.sqlite import SQLiteJobStore
from curlfetch.webhooks import SenderConfig, WebhookSender
from tests.engine.servers import LoopbackSite

from .conftest import reactor

CALL_TIMEOUT = 10.0
"""Seconds any single HTTP exchange with the API may take."""


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type") or ""

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of an error reply."""
        body = self.json()
        assert set(body) >= {"error"}, body
        error: dict[str, Any] = body["error"]
        return error


class Service:
    def __init__(
        self,
        root: Path,
        *,
        max_queued: int = 1000,
        max_concurrency: int = 4,
        max_request_bytes: int = 16 * 1024 * 1024,
        max_batch: int = 1000,
        poll_interval: float = 10.0,  # long: a missed wake-up shows as a failed wait
        limits: Limits | None = None,
        tokens: Mapping[str, str] | None = None,
        metrics_auth: bool = True,
        quotas: ClientQuotas | None = None,
        body_store: str = "segments",
        compression: str = "none",
        webhook_secrets: Mapping[str, str] | None = None,
        webhook_egress: EgressPolicy | None = None,
        webhook_backoff: float = 0.2,
        webhook_horizon: float = 3600.0,
        events_heartbeat: float = 15.0,
        events_stall_timeout: float = 30.0,
        max_batch_bytes: int = 64 * 1024 * 1024,
        scheduler_config: Mapping[str, Any] | None = None,
        robots: RobotsConfig | None = None,
    ) -> None:
        self.reactor = reactor()
        self.root = root
        self.store = SQLiteJobStore(self.reactor, root / "jobs.sqlite3")
        files = DirectoryBodyStore(self.reactor, root / "bodies")
        self.bodies = SegmentBodyStore(
            self.reactor,
            root / "segments",
            compression=compression,
            legacy=files,
            write_files=body_store == "files",
        )
        self.engine = CurlClient(self.reactor)
        self.metrics = Metrics(self.reactor, lag_interval=0.1)
        self.scheduler = Scheduler(
            self.reactor,
            store=self.store,
            client=self.engine,
            bodies=self.bodies,
            config=SchedulerConfig(
                max_concurrency=max_concurrency,
                poll_interval=0.2,
                max_per_client=quotas.max_in_flight if quotas else 0,
                **(scheduler_config or {}),
            ),
            observer=self.metrics,
            robots=None
            if robots is None
            else RobotsCache(self.reactor, self.engine, self.store, robots),
        )
        self.tokens = dict(tokens or {})
        self.token: str | None = next(iter(self.tokens.values()), None)
        """What every call sends unless told otherwise: the first client's token."""
        self.api = JobAPI(
            self.reactor,
            store=self.store,
            scheduler=self.scheduler,
            bodies=self.bodies,
            limits=limits or Limits(),
            metrics=self.metrics,
            max_queued=max_queued,
            max_request_bytes=max_request_bytes,
            max_batch=max_batch,
            retry_after=3,
            poll_interval=poll_interval,
            tokens=TokenSet.parse((c, f"{c}:{t}") for c, t in self.tokens.items()),
            metrics_auth=metrics_auth,
            quotas=quotas,
            webhook_secrets=webhook_secrets,
            events_heartbeat=events_heartbeat,
            events_stall_timeout=events_stall_timeout,
            max_batch_bytes=max_batch_bytes,
        )
        self.sender = WebhookSender(
            self.reactor,
            self.store,
            self.engine,
            egress=webhook_egress,
            metrics=self.metrics,
            config=SenderConfig(
                first_backoff=webhook_backoff,
                max_backoff=60.0,
                horizon=webhook_horizon,
                timeout=5.0,
                poll_interval=0.2,
                secrets=dict(webhook_secrets or {}),
            ),
        )
        self.http = CurlClient(self.reactor)
        self.target = LoopbackSite(self.reactor)
        self.port: IListeningPort | None = None
        self.base = ""

    async def start(self) -> None:
        await self.store.open().addTimeout(CALL_TIMEOUT, self.reactor)
        self.port = self.reactor.listenTCP(0, self.api.site(), interface="127.0.0.1")
        address: Any = self.port.getHost()
        self.port_number: int = address.port
        self.base = f"http://127.0.0.1:{self.port_number}"
        self.scheduler.startService()
        self.sender.startService()
        self.metrics.start()

    async def stop(self) -> None:
        try:
            if self.sender.running:
                await self.sender.stopService().addTimeout(CALL_TIMEOUT, self.reactor)
            if self.scheduler.running:
                await self.scheduler.stopService().addTimeout(CALL_TIMEOUT, self.reactor)
            self.metrics.stop()
            self.http.close()
            self.engine.close()
            if self.port is not None:
                stopped = self.port.stopListening()
                if stopped is not None:
                    await stopped
            await self.target.stop()
            await self.bodies.close().addTimeout(CALL_TIMEOUT, self.reactor)
            await self.store.close().addTimeout(CALL_TIMEOUT, self.reactor)
        finally:
            left = [
                d
                for d in (*self.reactor.getReaders(), *self.reactor.getWriters())
                if isinstance(d, CurlSocket)
            ]
            assert not left, f"curl descriptors left registered with the reactor: {left}"

    # -- talking to it ---------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        seconds: float = CALL_TIMEOUT,
        token: str | None = None,
        anonymous: bool = False,
    ) -> Reply:
        """One request to the API; ``json_body`` is sent as application/json. It carries
        ``token`` (by default the service's first token) unless ``anonymous``."""
        sent_headers = list(headers or [])
        bearer = None if anonymous else (token or self.token)
        if bearer is not None:
            sent_headers.append(("Authorization", f"Bearer {bearer}"))
        if json_body is not None:
            body = json.dumps(json_body).encode()
            if not any(name.lower() == "content-type" for name, _ in sent_headers):
                sent_headers.append(("Content-Type", "application/json"))
        d = self.http.fetch(
            self.base + path,
            method=method,
            headers=sent_headers,
            body=body,
            timeout=seconds,
        )
        response = await d.addTimeout(seconds + 1, self.reactor)
        return Reply(response.status, response.headers, response.body or b"")

    async def submit(self, spec: object, token: str | None = None) -> Reply:
        return await self.call("POST", "/v1/jobs", json_body=spec, token=token)

    async def wait_job(
        self, job_id: str, seconds: float = 5, token: str | None = None
    ) -> dict[str, Any]:
        reply = await self.call("GET", f"/v1/jobs/{job_id}?wait={seconds:g}", token=token)
        assert reply.status == 200, reply
        job: dict[str, Any] = reply.json()
        return job

    async def until(
        self, check: Callable[[], Awaitable[bool]] | Callable[[], bool], seconds: float = 5.0
    ) -> None:
        """Poll ``check`` every 20 ms until it holds; fail after ``seconds``."""
        deadline = self.reactor.seconds() + seconds
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            assert self.reactor.seconds() < deadline, "condition not met in time"
            await sleep(0.02)

    def url(self, path: str) -> str:
        """A target URL (what jobs fetch)."""
        return self.target.url(path)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor(), seconds, lambda: None)


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest_twisted.async_yield_fixture
async def services(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Starts services with the given options; stops them all after the test."""
    made: list[Service] = []

    async def make(**options: Any) -> Service:
        root = tmp_path / f"service{len(made)}"
        root.mkdir()
        svc = Service(root, **options)
        made.append(svc)
        await svc.start()
        return svc

    yield make
    for svc in made:
        await svc.stop()


@pytest_twisted.async_yield_fixture
async def svc(services: ServiceFactory) -> AsyncIterator[Service]:
    """A service with the default options."""
    yield await services()
