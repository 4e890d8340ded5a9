"""Scale-out: the job service end to end with K instances on one PostgreSQL, or one on
SQLite: ``bench/service_bench.py``'s driver and job mix (N jobs of one URL in batches
through ``POST /v1/jobs`` to the first instance, waited for until terminal, then every
job checked). Started by the harness (workload p: SQLite x1 and PostgreSQL x1, x2, x3,
interleaved, in one run) or by hand against any loopback URL:

    .venv/bin/python -m bench.scale_bench --url http://127.0.0.1:PORT/1k.bin -n 20000
        --backend postgres --instances 3 [--database URL] [-c 100] [--work DIR]

Each instance runs ``--max-concurrency C``; the per-host cap, shared by the instances on
PostgreSQL, is ``C x K`` so that it does not bind. All instances share one data
directory (the bodies). PostgreSQL: a fresh schema in ``--database`` (default
``CURLFETCH_TEST_DATABASE_URL`` or 127.0.0.1:5432/test), dropped afterwards.

Measured as in service_bench (wall from the first POST to the last ``finished_at``), with
the CPU of all instances together, and beside it the CPU of the PostgreSQL server's
processes over the same span (on this shared machine that includes whatever else uses
that server). One ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import psutil
import psycopg
from psycopg import sql

from bench.common import Result, emit, raise_nofile_limit
from bench.service_bench import (
    _DIE_WITH_US,
    TWISTD,
    Args,
    Service,
    add_service_arg,
    drive,
    free_port,
    log,
    wait_ready,
)

DEFAULT_DATABASE = os.environ.get("CURLFETCH_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test")


@dataclass(frozen=True)
class ScaleArgs:
    run: Args
    backend: str
    instances: int
    database: str


def parse_args(argv: list[str] | None = None) -> ScaleArgs:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="what every job fetches (plus ?i=N)")
    parser.add_argument("-n", type=int, default=20_000, help="jobs in all")
    parser.add_argument("--batch", type=int, default=500, help="jobs per POST")
    parser.add_argument("--posts", type=int, default=4, help="POSTs in flight at once")
    parser.add_argument("-c", "--concurrency", type=int, default=100, help="per instance")
    parser.add_argument("--expect-size", type=int, default=-1, help="check each body's size")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument("--instances", type=int, default=1, help="PostgreSQL: how many")
    parser.add_argument("--database", default=DEFAULT_DATABASE, help="a postgresql:// URL")
    parser.add_argument("--work", help="directory for the services' data (default: /tmp)")
    parser.add_argument("--timeout", type=float, default=600.0, help="whole run, seconds")
    add_service_arg(parser)
    ns = parser.parse_args(argv)
    if ns.n < 1 or ns.batch < 1 or ns.posts < 1 or ns.concurrency < 1 or ns.instances < 1:
        parser.error("-n, --batch, --posts, -c and --instances must be >= 1")
    if ns.backend == "sqlite" and ns.instances != 1:
        parser.error("SQLite runs one instance")
    run = Args(
        url=ns.url,
        n=ns.n,
        batch=ns.batch,
        posts=ns.posts,
        concurrency=ns.concurrency,
        expect_size=ns.expect_size,
        work=ns.work,
        timeout=ns.timeout,
        profile=None,
        top=0,
        service_args=tuple(ns.service_arg),
    )
    return ScaleArgs(run, ns.backend, ns.instances, ns.database)


class Instance(Service):
    """One ``twistd curlfetch`` of the group: service_bench's Service, with the options
    of a scaled-out deployment."""

    def __init__(self, work: Path, name: str, argv: list[str]) -> None:
        self.work = work
        self.log_path = work / f"{name}.log"
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CURLFETCH_")}
        env.pop("PYTHONASYNCIODEBUG", None)
        env.pop("PYTHONDEVMODE", None)
        command = [
            *_DIE_WITH_US, str(TWISTD), "-n", "--pidfile=", "curlfetch",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--data-dir", str(work / "data"), "--max-queued", "100000",
            "--drain-timeout", "2s", "--allow-cidr", "127.0.0.0/8",
            "--allow-port", "1024-65535", *argv,
        ]  # fmt: skip
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=work,
            )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)


class Group(Service):
    """The instances as one service for the driver: it talks to the first; CPU and peak
    RSS are the sums over all of them."""

    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances
        first = instances[0]
        self.work, self.log_path, self.port = first.work, first.log_path, first.port
        self.proc, self.ps = first.proc, first.ps

    def cpu(self) -> tuple[float, float]:
        times = [i.cpu() for i in self.instances]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def peak_rss_kb(self) -> int:
        return sum(i.peak_rss_kb() for i in self.instances)

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(f"[{i.log_path.name}]\n{i.log_tail(lines)}" for i in self.instances)

    def stop(self) -> None:
        for instance in self.instances:  # SIGTERM to all first: they drain in parallel
            if instance.proc.poll() is None:
                instance.proc.send_signal(signal.SIGTERM)
        for instance in self.instances:
            instance.stop()


def postgres_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every PostgreSQL server process, by pid."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres":
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


async def drive_group(args: ScaleArgs, group: Group, result: Result) -> None:
    async with aiohttp.ClientSession() as session:
        for instance in group.instances:
            await wait_ready(session, instance)
    before = postgres_cpu()
    await drive(args.run, group, result)
    after = postgres_cpu()
    result.extra["postgres_cpu"] = sum(t - before.get(pid, 0.0) for pid, t in after.items())


def run(args: ScaleArgs) -> int:
    raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=args.run.work))
    name = f"{args.backend}-x{args.instances}"
    c = args.run.concurrency
    result = Result(name, "service", args.run.n, c * args.instances)
    schema = f"curlfetch_bench_{uuid.uuid4().hex[:10]}"
    group: Group | None = None

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        per_host = [
            "--max-concurrency", str(c), "--max-per-host", str(c * args.instances),
            *args.run.service_args,
        ]  # fmt: skip
        if args.backend == "sqlite":
            instances = [Instance(work, "i1", per_host)]
        else:
            sep = "&" if "?" in args.database else "?"
            url = f"{args.database}{sep}options={quote(f'-csearch_path={schema}')}"
            instances = [
                Instance(work, f"i{i}", [*per_host, "--database", url, f"--instance-id=i{i}"])
                for i in range(1, args.instances + 1)
            ]
        group = Group(instances)
        try:
            asyncio.run(asyncio.wait_for(drive_group(args, group, result), args.run.timeout + 60))
        except Exception as e:
            log(f"failed: {type(e).__name__}: {e}")
            log("service log tail:\n" + group.log_tail())
            return 1
        for instance in instances:
            if instance.proc.poll() is not None:
                result.error(f"{instance.log_path.name}: exited with {instance.proc.returncode}")
        if result.errors:
            log("service log tail:\n" + group.log_tail())
        result.extra.update(backend=args.backend, instances=args.instances)
    finally:
        if group is not None:
            group.stop()
        shutil.rmtree(work, ignore_errors=True)
        if args.backend == "postgres":
            with psycopg.connect(args.database, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
    emit(result)
    return 0


def main() -> None:
    sys.exit(run(parse_args()))


if __name__ == "__main__":
    main()
