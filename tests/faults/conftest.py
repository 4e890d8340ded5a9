"""Fault-injection fixtures (issue 13): the e2e harness (``tests/e2e/conftest.py``:
real ``twistd -n curlfetch`` processes, the loopback target, the engine as client) plus
what the fault families need: a throwaway PostgreSQL cluster of our own, /proc readings
of a daemon (RSS, fds), tmpfs mounts, and a gate on the target that holds requests until
released.

Every wait is bounded; everything mounted or started here is undone in teardown.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request

from ..e2e.conftest import (
    TERMINAL,
    Daemon,
    Daemons,
    client,
    daemons,
    rss_kib,
    schema,
    sleep,
    target,
)
from ..engine.servers import LoopbackSite

__all__ = [
    "TERMINAL",
    "Daemon",
    "Daemons",
    "Gate",
    "PgCluster",
    "client",
    "daemons",
    "fd_count",
    "free_port",
    "gate",
    "rss_kib",
    "schema",
    "sleep",
    "target",
    "until",
]


async def until(predicate: Callable[[], bool], seconds: float, what: str) -> float:
    """Wait (without blocking the reactor) until ``predicate()``; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await sleep(0.02)
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- /proc ---------------------------------------------------------------------------------


def daemon_pid(daemon: Daemon) -> int:
    """The twistd process's pid (setpriv execs it in place)."""
    assert daemon.proc is not None
    return daemon.proc.pid


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the target's gate ---------------------------------------------------------------------


class Gate(resource.Resource):
    """``/gate?id=X``: answers X, but while ``closed`` the request waits until ``open()``
    (or the connection goes). ``hits`` counts requests per id."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.closed = True
        self.hits: dict[str, int] = {}
        self.waiting: list[tuple[Request, str]] = []

    def render_GET(self, request: Request) -> Any:
        ident = (request.args or {}).get(b"id", [b""])[0].decode()
        self.hits[ident] = self.hits.get(ident, 0) + 1
        if not self.closed:
            return ident.encode()
        self.waiting.append((request, ident))
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET

    @property
    def held(self) -> int:
        return sum(1 for r, _ in self.waiting if not r._disconnected and not r.finished)

    def open(self) -> None:
        self.closed = False
        waiting, self.waiting = self.waiting, []
        for request, ident in waiting:
            if not request._disconnected and not request.finished:
                request.write(ident.encode())
                request.finish()


@pytest.fixture
def gate(target: LoopbackSite) -> Gate:
    g = Gate()
    target.root.putChild(b"gate", g)
    return g


# -- tmpfs ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (``mount -t tmpfs -o options``), unmounted after."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root", pytrace=False)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- a PostgreSQL cluster of our own ---------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


class PgCluster:
    """A throwaway cluster (``initdb``, ``pg_ctl``) on 127.0.0.1:<free port>, run as the
    ``postgres`` user when we are root (as scripts/postgres does); trust auth, fsync off.
    ``stop()``/``start()``/``restart()`` for the faults; ``destroy()`` in teardown."""

    def __init__(self) -> None:
        bin_dir = _pg_bin()
        if bin_dir is None:
            pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql", pytrace=False)
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="curlfetch-faults-pg."))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/faults"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "faults")

    def _run(self, tool: str, *args: str, seconds: float = 60) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=seconds,
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.dir} -c fsync=off -c max_connections=100"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "30",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description is not None else []

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg_cluster(daemons: Daemons) -> Iterator[PgCluster]:
    """Requested after ``daemons``: its daemons are stopped before the cluster goes."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        daemons.stop_all()
        cluster.destroy()
