"""The job service end to end: N fetch jobs submitted through the REST API in batches,
waited for until every one is terminal, then checked. Started by the harness (workload s)
or by hand, against any loopback URL (a fresh service per run):

    .venv/bin/python -m bench.service_bench --url http://127.0.0.1:PORT/1k.bin -n 20000
        [--batch 500] [--posts 4] [--concurrency 200] [--expect-size 1024]
        [--work DIR] [--timeout 600] [--profile PATH]

It starts its own ``twistd -n --pidfile= curlfetch`` (``--max-concurrency C
--max-per-host C --max-queued 100000``, a fresh data directory under ``--work``) and waits
for ``/readyz``. Job i fetches ``URL?i=i``. ``--posts`` POSTs of ``--batch`` jobs are in
flight at once (aiohttp, one keep-alive connection each), then ``/metrics`` is polled
every 0.2 s until no job is queued or running, then ``GET /v1/jobs`` pages through every
job to check it (succeeded, HTTP 200, body size) and to read its timestamps.

Measured: wall from the first POST to the last job's ``finished_at`` (the service stamps
it with the same wall clock as this process), the service process's CPU (user + system,
all its threads, psutil) over the same span, submission latency per batch (POST sent to
201 read), and per job: POST sent to ``finished_at`` (submission until terminal) and
``created_at`` to ``finished_at`` (in the service). Service timestamps have millisecond
resolution. ``--profile PATH`` also samples the service with py-spy (collapsed stacks
to PATH, readable by speedscope) and summarizes the hotspots; it slows the service.

One ``RESULT {json}`` line (``bench.common``): ``cpu_user``/``cpu_sys``/``maxrss_kb``
are the service process's, the driver's own CPU is in ``extra``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import psutil

from bench.common import Result, emit, latency_summary, raise_nofile_limit

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")
PY_SPY = Path(sys.executable).with_name("py-spy")
READY_TIMEOUT = 20.0
POLL_INTERVAL = 0.2
PAGE = 1000
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_US = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []
"""If the harness kills this driver (its watchdog sends SIGKILL), the service dies too."""
_JOBS_METRIC = re.compile(r'^curlfetch_jobs\{state="(\w+)"\}\s+([0-9.e+]+)$', re.MULTILINE)


@dataclass(frozen=True)
class Args:
    url: str
    n: int
    batch: int
    posts: int
    concurrency: int
    expect_size: int
    work: str | None
    timeout: float
    profile: str | None
    top: int
    service_args: tuple[str, ...] = ()
    """More ``twistd curlfetch`` options for the service under test."""
    webhook: bool = False
    """Every job notifies a loopback receiver (aiohttp, in this driver) of its end."""


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="what every job fetches (plus ?i=N)")
    parser.add_argument("-n", type=int, default=20_000, help="jobs in all")
    parser.add_argument("--batch", type=int, default=500, help="jobs per POST")
    parser.add_argument("--posts", type=int, default=4, help="POSTs in flight at once")
    parser.add_argument(
        "-c", "--concurrency", type=int, default=200, help="service --max-concurrency"
    )
    parser.add_argument("--expect-size", type=int, default=-1, help="check each body's size")
    parser.add_argument("--work", help="directory for the service's data (default: /tmp)")
    parser.add_argument("--timeout", type=float, default=600.0, help="whole run, seconds")
    parser.add_argument("--profile", help="py-spy the service into this file (collapsed)")
    parser.add_argument("--top", type=int, default=15, help="--profile: hotspots shown")
    parser.add_argument(
        "--webhook",
        action="store_true",
        help="each job notifies a loopback receiver run by this driver (job.succeeded, "
        "job.failed); reports the delivery latency from finished_at",
    )
    add_service_arg(parser)
    ns = parser.parse_args(argv)
    if ns.n < 1 or ns.batch < 1 or ns.posts < 1 or ns.concurrency < 1:
        parser.error("-n, --batch, --posts and --concurrency must be >= 1")
    return Args(
        url=ns.url,
        n=ns.n,
        batch=ns.batch,
        posts=ns.posts,
        concurrency=ns.concurrency,
        expect_size=ns.expect_size,
        work=ns.work,
        timeout=ns.timeout,
        profile=ns.profile,
        top=ns.top,
        service_args=tuple(ns.service_arg),
        webhook=ns.webhook,
    )


def add_service_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more twistd curlfetch option (repeatable): --service-arg=--body-store=files",
    )


def log(message: str) -> None:
    sys.stderr.write(f"service_bench: {message}\n")
    sys.stderr.flush()


# -- the service process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """One ``twistd curlfetch`` process on a fresh data directory; ``stop()`` always
    leaves it dead (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Path, concurrency: int, extra: Sequence[str] = ()) -> None:
        self.work = work
        self.log_path = work / "twistd.log"
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CURLFETCH_")}
        env.pop("PYTHONASYNCIODEBUG", None)
        env.pop("PYTHONDEVMODE", None)
        argv = [
            *_DIE_WITH_US, str(TWISTD), "-n", "--pidfile=", "curlfetch",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--data-dir", str(work / "data"),
            "--max-concurrency", str(concurrency), "--max-per-host", str(concurrency),
            "--max-queued", "100000", "--drain-timeout", "2s",
            # The targets are loopback servers, which the default egress policy denies.
            "--allow-cidr", "127.0.0.0/8", "--allow-port", "1024-65535", *extra,
        ]  # fmt: skip
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=work,
            )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> tuple[float, float]:
        times = self.ps.cpu_times()
        return times.user, times.system

    def peak_rss_kb(self) -> int:
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def log_tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def profiler(pid: int, path: str | None) -> Iterator[None]:
    """py-spy on ``pid`` while the block runs (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    argv = [str(PY_SPY), "record", "-p", str(pid), "-o", path, "--format", "raw",
            "--threads", "--rate", "100", "--nonblocking"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached before the load starts
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the load ---------------------------------------------------------------------------


@dataclass
class Submitted:
    """What the driver saw of its POSTs."""

    sent_at: dict[str, float] = field(default_factory=dict)  # job id -> POST sent (wall)
    latencies: list[float] = field(default_factory=list)  # per batch, seconds
    errors: list[str] = field(default_factory=list)
    last_reply: float = 0.0  # wall clock of the last 201


def parse_time(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


async def wait_ready(session: aiohttp.ClientSession, service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(
                f"twistd exited with {service.proc.returncode}:\n{service.log_tail()}"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with session.get(f"{service.base}/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"/readyz not 200 after {READY_TIMEOUT} s:\n{service.log_tail()}")


async def submit_all(
    session: aiohttp.ClientSession, base: str, bodies: list[bytes], posts: int
) -> Submitted:
    done = Submitted()
    next_batch = 0
    headers = {"Content-Type": "application/json"}
    url = f"{base}/v1/jobs"

    async def worker() -> None:
        nonlocal next_batch
        while next_batch < len(bodies):
            index = next_batch
            next_batch += 1
            sent = time.time()
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=bodies[index], headers=headers) as r:
                    raw = await r.read()
                    status = r.status
            except Exception as e:
                done.errors.append(f"batch {index}: {type(e).__name__}: {e}")
                continue
            done.latencies.append(time.perf_counter() - t0)
            if status != 201:
                done.errors.append(f"batch {index}: HTTP {status}: {raw[:200]!r}")
                continue
            done.last_reply = max(done.last_reply, time.time())
            for view in json.loads(raw)["jobs"]:
                done.sent_at[view["id"]] = sent

    await asyncio.gather(*(worker() for _ in range(min(posts, len(bodies)))))
    return done


async def job_counts(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    return {state: int(float(n)) for state, n in _JOBS_METRIC.findall(text)}


async def wait_terminal(
    session: aiohttp.ClientSession, base: str, expected: int, deadline: float
) -> tuple[dict[str, int], int]:
    """Poll until nothing is queued or running; (last counts, polls)."""
    polls = 0
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        polls += 1
        counts = await job_counts(session, base)
        if (
            sum(counts.values()) >= expected
            and not counts.get("queued")
            and not counts.get("running")
        ):
            return counts, polls
        await asyncio.sleep(POLL_INTERVAL)
    raise TimeoutError(f"jobs not all terminal before the deadline; last counts {counts}")


async def list_all(session: aiohttp.ClientSession, base: str, n: int) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(n // PAGE + 5):  # bounded: a page more than needed ends it
        params = {"limit": str(PAGE), **({"cursor": cursor} if cursor else {})}
        async with session.get(f"{base}/v1/jobs", params=params) as response:
            if response.status != 200:
                raise RuntimeError(f"GET /v1/jobs: HTTP {response.status}")
            page = await response.json()
        views += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return views
    raise RuntimeError("GET /v1/jobs did not end")


def check(view: dict[str, Any], expect_size: int) -> str | None:
    """Why a job view is not a success, or None."""
    state = view["state"]
    if state != "succeeded":
        error = view.get("error") or {}
        return f"{state}: {error.get('curl_name') or error.get('code')}: {error.get('message')}"
    result = view["result"] or {}
    if result.get("status") != 200:
        return f"HTTP {result.get('status')}"
    size = (result.get("body") or {}).get("size")
    if expect_size >= 0 and size != expect_size:
        return f"{size} bytes, expected {expect_size}"
    return None


class Receiver:
    """The webhook receiver: when each job's delivery arrived (the first, by job id)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.posts = 0
        self.runner: aiohttp.web.AppRunner | None = None
        self.port = free_port()

    async def start(self) -> str:
        app = aiohttp.web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = aiohttp.web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await aiohttp.web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}/hook"

    async def hook(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.read()
        self.posts += 1
        job = json.loads(body)["data"]["job"]["id"]
        self.arrived.setdefault(job, time.time())
        return aiohttp.web.Response(status=204)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def wait(self, count: int, deadline: float) -> None:
        while len(self.arrived) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.arrived)} of {count} webhooks arrived in time")
            await asyncio.sleep(POLL_INTERVAL)


async def drive(args: Args, service: Service, result: Result) -> None:
    receiver = Receiver() if args.webhook else None
    try:
        await _drive(args, service, result, receiver)
    finally:
        if receiver is not None:
            await receiver.stop()


async def _drive(args: Args, service: Service, result: Result, receiver: Receiver | None) -> None:
    sep = "&" if "?" in args.url else "?"
    extra: dict[str, Any] = {}
    if receiver is not None:
        hook = await receiver.start()
        extra = {"notify": {"url": hook, "events": ["job.succeeded", "job.failed"]}}
    bodies = [
        json.dumps(
            {
                "jobs": [
                    {"url": f"{args.url}{sep}i={i}", "retry": {"max_attempts": 1}, **extra}
                    for i in range(start, min(start + args.batch, args.n))
                ]
            }
        ).encode()
        for start in range(0, args.n, args.batch)
    ]
    deadline = time.monotonic() + args.timeout
    connector = aiohttp.TCPConnector(limit=args.posts + 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(session, service)
        if receiver is not None:
            async with session.post(f"{service.base}/v1/webhooks/secret") as response:
                if response.status != 201:
                    raise RuntimeError(f"POST /v1/webhooks/secret: HTTP {response.status}")
        with profiler(service.proc.pid, args.profile):
            cpu0 = service.cpu()
            me0 = resource.getrusage(resource.RUSAGE_SELF)
            first_post = time.time()
            t0 = time.monotonic()
            submitted = await submit_all(session, service.base, bodies, args.posts)
            submit_wall = time.monotonic() - t0
            counts, polls = await wait_terminal(
                session, service.base, len(submitted.sent_at), deadline
            )
            if receiver is not None:
                await receiver.wait(len(submitted.sent_at), deadline)
            observed_wall = time.monotonic() - t0
            cpu1 = service.cpu()
            me1 = resource.getrusage(resource.RUSAGE_SELF)
        views = await list_all(session, service.base, args.n)

    for error in submitted.errors:
        result.error(error)
    reasons: Counter[str] = Counter()
    to_terminal: list[float] = []
    in_service: list[float] = []
    last_finished = first_post
    seen = 0
    for view in views:
        sent = submitted.sent_at.get(view["id"])
        if sent is None:
            continue
        seen += 1
        finished = parse_time(view["finished_at"])
        created = parse_time(view["created_at"])
        if finished is not None:
            last_finished = max(last_finished, finished)
            to_terminal.append(finished - sent)
            if created is not None:
                in_service.append(finished - created)
        problem = check(view, args.expect_size)
        if problem is None:
            result.ok += 1
            result.bytes += (view["result"]["body"] or {}).get("size", 0)
        else:
            reasons[problem[:120]] += 1
            result.error(f"job {view['id']}: {problem}")
    missing = len(submitted.sent_at) - seen
    if missing:
        result.error(f"{missing} accepted jobs missing from GET /v1/jobs")
    not_accepted = args.n - len(submitted.sent_at)
    if not_accepted and not submitted.errors:
        result.error(f"{not_accepted} jobs not accepted")

    result.wall = max(last_finished - first_post, 1e-9)
    result.cpu_user = cpu1[0] - cpu0[0]
    result.cpu_sys = cpu1[1] - cpu0[1]
    result.maxrss_kb = service.peak_rss_kb()
    result.extra = {
        "accepted": len(submitted.sent_at),
        "batches": len(bodies),
        "batch": args.batch,
        "posts": args.posts,
        "submit_wall": submit_wall,
        "submit_jobs_s": len(submitted.sent_at) / submit_wall if submit_wall else 0.0,
        "last_201_after": submitted.last_reply - first_post if submitted.last_reply else None,
        "observed_wall": observed_wall,
        "polls": polls,
        "counts": counts,
        "submit_latency": latency_summary(submitted.latencies),
        "to_terminal_latency": latency_summary(to_terminal),
        "in_service_latency": latency_summary(in_service),
        "failures": dict(reasons.most_common(5)),
        "driver_cpu": (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime),
    }
    if receiver is not None:
        delivery = [
            receiver.arrived[v["id"]] - finished
            for v in views
            if v["id"] in receiver.arrived and (finished := parse_time(v["finished_at"]))
        ]
        result.extra["webhooks"] = {
            "delivered": len(receiver.arrived),
            "posts": receiver.posts,
            "latency": latency_summary(delivery),
            "last_delivery_after": max(receiver.arrived.values(), default=first_post) - first_post,
        }
        if len(receiver.arrived) != seen:
            result.error(f"{seen - len(receiver.arrived)} jobs' webhooks never arrived")


# -- the profile ------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*?)(?:-\d+-\d+)?$")
_CONVERSIONS = frozenset(
    {"to_json", "from_json", "spec_from_stored", "insert_row", "save_row", "job_from_row"}
)
_STORE = ("curlfetch/store/core.py", "curlfetch/store/sqlite.py", "curlfetch/store/postgres.py")


def _area(file: str, func: str) -> str | None:
    """The area a frame belongs to, or None for frames that say nothing by themselves
    (the standard library, attrs-generated code): the caller decides then. Files are as
    py-spy names them: ``curlfetch/...`` (an editable install's ``service/`` is cut)."""
    file = file.removeprefix("service/")
    name = func.rsplit(".", 1)[-1]
    if file in ("curlfetch/segments.py", "curlfetch/bodies.py", "curlfetch/warc.py"):
        return "body store: WARC records, group commit, fdatasync (segments.py, bodies.py)"
    if file.startswith("json/"):
        return "JSON encode/decode (json.dumps/loads)"
    if file in ("curlfetch/jobs.py", "curlfetch/store/rows.py") and name in _CONVERSIONS:
        return "Job <-> dict/row conversion (jobs.py to_json/from_json, store/rows.py)"
    if file in _STORE and (
        "<locals>" in func or name in ("_run_batch", "run_with_savepoints", "resolve")
    ):
        return "SQLite statements (store closures, in the pool thread)"
    if file in _STORE:
        return "store queue, reactor side (store/core.py _submit/_flush/_flushed)"
    if file in ("curlfetch/jobs.py", "curlfetch/fields.py"):
        return "job specs: validation, JobSpec.host (curlfetch/jobs.py, fields.py)"
    if file.startswith("curlfetch/api/"):
        return "API routes and job views (curlfetch/api/)"
    if file == "curlfetch/scheduler.py":
        return "scheduler (curlfetch/scheduler.py)"
    if file.startswith("curlfetch/engine/"):
        return "engine: libcurl calls and responses (curlfetch/engine)"
    if file.startswith(("curlfetch/metrics.py", "prometheus_client/")):
        return "metrics (curlfetch/metrics.py, prometheus_client)"
    if file.startswith(("twisted/web/", "klein/", "werkzeug/")):
        return "HTTP server: twisted.web, Klein, werkzeug"
    if file.startswith(("twisted/enterprise/", "twisted/_threads/", "twisted/python/thread")):
        return "adbapi and its thread pool"
    if file.startswith("twisted/"):
        return "Twisted reactor and Deferreds"
    return None


def _frame(frame: str) -> tuple[str, str]:
    """``func (path/file.py:123)`` -> (file, func)."""
    match = _FRAME.match(frame)
    return ("?", frame) if match is None else (match["file"], match["func"])


def summarize_profile(path: str, top: int) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``thread (N): name;frame;...;frame count``): the
    share of samples per thread, per area (the area of the frame nearest the top of the
    stack that has one), per function on top of the stack (self), and per function of
    the service's own code anywhere on the stack (inclusive)."""
    threads: Counter[str] = Counter()
    areas: Counter[tuple[str, str]] = Counter()
    own: Counter[tuple[str, str]] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            head, *rest = stack.split(";")
            match = _THREAD.match(head)
            thread = match["name"] if match else head
            frames = [_frame(fr) for fr in rest]
            total += count
            threads[thread] += count
            area = next(
                (a for a in (_area(*fr) for fr in reversed(frames)) if a is not None), "other"
            )
            areas[(area, thread)] += count
            if frames:
                file, func = frames[-1]
                own[(f"{file} {func}", thread)] += count
            ours = {
                f"{file.removeprefix('service/')} {func}"
                for file, func in frames
                if file.startswith(("curlfetch/", "service/curlfetch/"))
            }
            for name in ours:
                inclusive[name] += count
    if not total:
        return {"samples": 0, "threads": [], "areas": [], "self": [], "inclusive": []}

    def pct(n: int) -> float:
        return round(n / total * 100, 1)

    by_area: dict[str, dict[str, float]] = {}
    for (area, thread), n in areas.items():
        by_area.setdefault(area, {})[thread] = pct(n)
    area_rows = sorted(by_area.items(), key=lambda item: -sum(item[1].values()))
    return {
        "samples": total,
        "threads": [[name, pct(n)] for name, n in threads.most_common()],
        "areas": [[area, round(sum(shares.values()), 1), shares] for area, shares in area_rows],
        "self": [[name, pct(n), thread] for (name, thread), n in own.most_common(top)],
        "inclusive": [[name, pct(n)] for name, n in inclusive.most_common(top)],
    }


def profile_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as text, for the harness and for a run by hand."""
    if not summary["samples"]:
        return ["py-spy recorded no samples"]
    names = [name for name, _ in summary["threads"]]
    shown = ", ".join(f"{name} {share:.0f}%" for name, share in summary["threads"])
    lines = [f"by thread: {shown}", "by area (% of all samples; per thread):"]
    width = max(len(area) for area, _, _ in summary["areas"])
    for area, share, shares in summary["areas"]:
        split = "  ".join(f"{name} {shares.get(name, 0.0):4.1f}" for name in names)
        lines.append(f"  {area:<{width}}  {share:5.1f}%   {split}")
    lines.append("top functions by self time (on top of the stack):")
    lines += [f"  {share:5.1f}%  {name}  [{thread}]" for name, share, thread in summary["self"]]
    lines.append("service code by inclusive time (anywhere on the stack):")
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["inclusive"]]
    return lines


# -- main -------------------------------------------------------------------------------


def with_service(
    prefix: str,
    work_dir: str | None,
    concurrency: int,
    service_args: tuple[str, ...],
    timeout: float,
    result: Result,
    drive_it: Callable[[Service], Coroutine[Any, Any, None]],
    say: Callable[[str], None] = log,
) -> bool:
    """Start the service in a fresh directory, run ``drive_it`` against it (within
    ``timeout``), stop it and remove the directory; False if the drive failed (the
    service's log tail is shown then, and when the result has errors)."""
    raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
    service: Service | None = None

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        service = Service(work, concurrency, service_args)
        try:
            asyncio.run(asyncio.wait_for(drive_it(service), timeout))
        except Exception as e:
            say(f"failed: {type(e).__name__}: {e}")
            say("service log tail:\n" + service.log_tail())
            return False
        if service.proc.poll() is not None:
            result.error(f"the service exited with {service.proc.returncode}")
        if result.errors:
            say("service log tail:\n" + service.log_tail())
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(work, ignore_errors=True)
    return True


def run(args: Args) -> int:
    result = Result("service", "service", args.n, args.concurrency)
    ok = with_service(
        "service-",
        args.work,
        args.concurrency,
        args.service_args,
        args.timeout + 60,
        result,
        lambda service: drive(args, service, result),
    )
    if not ok:
        return 1
    if args.profile:
        summary = summarize_profile(args.profile, args.top)
        result.extra["profile"] = summary
        print(f"py-spy: {summary['samples']} samples at 100/s of busy threads in {args.profile}")
        print("\n".join(profile_lines(summary)), flush=True)
    emit(result)
    return 0


def main() -> None:
    sys.exit(run(parse_args()))


if __name__ == "__main__":
    main()
