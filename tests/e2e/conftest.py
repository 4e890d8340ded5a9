"""End-to-end fixtures: real ``twistd -n --pidfile= curlfetch`` processes on 127.0.0.1,
a loopback target ``Site`` in the test process, and an HTTP client (the engine's own)
to talk to the daemons.

Every daemon listens on ``tcp:0``; its port is read from its log (Twisted's "Site
starting on N"). A test talks to it without blocking the reactor, which also serves the
target the daemon fetches from. Every wait is bounded; on teardown a daemon still running
gets SIGTERM, then SIGKILL after ``KILL_AFTER`` seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import deferLater

from curlfetch.engine import CurlClient, FetchError

from ..engine.servers import LoopbackSite
from ..service.backends import PostgresSchema, require_postgres

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).with_name("twistd")
KILL_AFTER = 10.0
START_TIMEOUT = 15.0
_PORT = re.compile(r"Site starting on (\d+)")
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_US = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
"""If pytest-timeout ends this process (os._exit), its daemons die too (setpriv execs
twistd in place: the pid, the signals and the exit status are twistd's own)."""
LOOPBACK_EGRESS = ["--allow-cidr=127.0.0.0/8", "--allow-cidr=::1/128", "--allow-port=1024-65535"]
"""The targets are loopback servers on random ports, which the default egress policy
denies: every daemon opens exactly that, unless a test sets ``daemon.egress``."""


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def sleep(seconds: float) -> Any:
    return deferLater(reactor(), seconds, lambda: None)


@attrs.frozen
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Daemon:
    """One ``twistd curlfetch`` process; ``start()`` again restarts it on the same data
    directory (the log file keeps growing)."""

    def __init__(self, client: CurlClient, data_dir: Path, log_path: Path, args: list[str]):
        self.client = client
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args
        self.egress = list(LOOPBACK_EGRESS)
        self.token: str | None = None
        """Sent as ``Authorization: Bearer`` on every request that has none of its own."""
        self.env: dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith("CURLFETCH_")
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_offset = 0

    # -- process ---------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process (without waiting for it)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.port = 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *_DIE_WITH_US,
                    str(TWISTD),
                    "-n",
                    "--pidfile=",
                    "curlfetch",
                    "--listen=tcp:0:interface=127.0.0.1",
                    f"--data-dir={self.data_dir}",
                    *self.egress,
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.data_dir.parent,
            )

    async def start(self, seconds: float = START_TIMEOUT) -> Daemon:
        """Start and wait (at most ``seconds``) until ``/readyz`` answers 200."""
        self.spawn()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited with {self.proc.returncode}:\n{self.log()}")
            if not self.port:
                match = _PORT.search(self._new_log())
                self.port = int(match[1]) if match else 0
            if self.port:
                try:
                    if (await self.get("/readyz", seconds=1)).status == 200:
                        return self
                except FetchError:
                    pass
            await sleep(0.05)
        raise AssertionError(f"twistd not ready after {seconds}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, seconds: float) -> int:
        """The exit code, waiting at most ``seconds``."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"twistd still running after {seconds}s:\n{self.log()}")
            await sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        """``kill -9``, and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop_blocking(self) -> None:
        """Teardown: SIGTERM, then SIGKILL after KILL_AFTER seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(KILL_AFTER)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _new_log(self) -> str:
        """What this run of the process has logged."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    # -- HTTP ------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        seconds: float = 10,
    ) -> Reply:
        sent = list(headers or [])
        if self.token and not any(name.lower() == "authorization" for name, _ in sent):
            sent.append(("Authorization", f"Bearer {self.token}"))
        response = await self.client.fetch(
            self.url(path),
            method=method,
            body=body,
            headers=sent,
            timeout=seconds,
        )
        return Reply(response.status, response.headers, response.body or b"")

    async def get(self, path: str, seconds: float = 10) -> Reply:
        return await self.request("GET", path, seconds=seconds)

    async def post_json(self, path: str, payload: Any) -> Reply:
        return await self.request(
            "POST",
            path,
            json.dumps(payload).encode(),
            [("Content-Type", "application/json")],
        )

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST one job spec; its view (asserting 201)."""
        reply = await self.post_json("/v1/jobs", spec)
        assert reply.status == 201, reply
        view: dict[str, Any] = reply.json()
        return view

    async def submit_batch(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reply = await self.post_json("/v1/jobs", {"jobs": specs})
        assert reply.status == 201, reply
        views: list[dict[str, Any]] = reply.json()["jobs"]
        return views

    async def job(self, job_id: str) -> dict[str, Any]:
        reply = await self.get(f"/v1/jobs/{job_id}")
        assert reply.status == 200, reply
        view: dict[str, Any] = reply.json()
        return view

    async def wait_state(
        self, job_id: str, states: set[str], seconds: float = 15
    ) -> dict[str, Any]:
        """Poll (long-polls for terminal states) until the job is in one of ``states``,
        for at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            wait = min(2.0, max(0.0, remaining)) if states <= TERMINAL else 0
            reply = await self.get(f"/v1/jobs/{job_id}?wait={wait:.2f}", seconds=wait + 5)
            assert reply.status == 200, reply
            view: dict[str, Any] = reply.json()
            if view["state"] in states:
                return view
            if remaining <= 0:
                raise AssertionError(f"job {job_id} is {view['state']}, not {states}: {view}")
            if not wait:
                await sleep(0.05)

    async def all_jobs(self) -> list[dict[str, Any]]:
        """Every job, following the cursor."""
        jobs: list[dict[str, Any]] = []
        cursor = ""
        while True:
            reply = await self.get(f"/v1/jobs?limit=1000{cursor}")
            assert reply.status == 200, reply
            page = reply.json()
            jobs.extend(page["jobs"])
            if not page["next_cursor"]:
                return jobs
            cursor = f"&cursor={page['next_cursor']}"

    # -- the database, while no process runs -------------------------------------------------

    def states(self) -> dict[str, tuple[str, int]]:
        """job id -> (state, attempts), read straight from SQLite."""
        assert self.proc is None or self.proc.poll() is not None, "read it while stopped"
        with sqlite3.connect(self.data_dir / "jobs.sqlite3") as conn:
            rows = conn.execute("SELECT id, state, attempts FROM jobs").fetchall()
        conn.close()
        return {job_id: (state, attempts) for job_id, state, attempts in rows}


TERMINAL = {"succeeded", "failed", "cancelled"}


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def segment_file(data_dir: Path, name: str) -> Path:
    """Segment ``name`` of a daemon's data directory, sealed or still ``.open``."""
    root = data_dir / "segments"
    for path in (root / name, root / (name + ".open")):
        if path.is_file():
            return path
    raise AssertionError(f"no segment {name} in {sorted(p.name for p in root.iterdir())}")


def append_half_record(path: Path, warc: dict[str, Any]) -> int:
    """Append the first half of the record at ``warc`` (a job view's ``result.body.warc``)
    to ``path``: the torn write a kill between two writes of a group leaves. The bytes
    appended."""
    with open(path, "rb") as f:
        f.seek(warc["offset"])
        half = f.read(warc["length"] // 2)
    with open(path, "ab") as f:
        f.write(half)
    return len(half)


class Daemons:
    """Makes daemons for one test; stops whatever is still running afterwards."""

    def __init__(self, tmp_path: Path, client: CurlClient) -> None:
        self.tmp_path = tmp_path
        self.client = client
        self.made: list[Daemon] = []

    def make(self, *args: str, name: str = "d", env: dict[str, str] | None = None) -> Daemon:
        data_dir = self.tmp_path / f"{name}-data"
        daemon = Daemon(self.client, data_dir, self.tmp_path / f"{name}.log", list(args))
        daemon.env.update(env or {})
        self.made.append(daemon)
        return daemon

    async def start(self, *args: str, **kwargs: Any) -> Daemon:
        return await self.make(*args, **kwargs).start()

    def stop_all(self) -> None:
        for daemon in self.made:
            daemon.stop_blocking()


@pytest.fixture
def client() -> Iterator[CurlClient]:
    """The tests' HTTP client: the engine itself, on the test reactor."""
    c = CurlClient(reactor())
    yield c
    c.close()


@pytest.fixture
def daemons(tmp_path: Path, client: CurlClient) -> Iterator[Daemons]:
    made = Daemons(tmp_path, client)
    yield made
    made.stop_all()


@pytest.fixture
def schema(daemons: Daemons) -> Iterator[PostgresSchema]:
    """A throwaway schema on the shared test server (dropped after the daemons stop)."""
    require_postgres()
    pg = PostgresSchema()
    try:
        yield pg
    finally:
        daemons.stop_all()
        pg.drop()


@pytest.fixture
def target() -> Iterator[LoopbackSite]:
    """A loopback target in this process, fresh for each test."""
    site = LoopbackSite(reactor())
    yield site
    site.stop()
