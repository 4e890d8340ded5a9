"""Conditional revalidation as a monitor uses it: N pages fetched unconditionally, then
revalidated (each job's ``revalidate`` names the earlier job of its page, whose ETag and
Last-Modified become If-None-Match and If-Modified-Since) while nothing changed, so that
every revalidation is a 304: what that saves in jobs/s, service CPU, bytes on the wire
and bytes stored. Started by the harness (workload rv, against its nginx) or by hand:

    .venv/bin/python -m bench.revalidate_bench --url http://127.0.0.1:PORT/pages/ -n 1000
        [-c 200] [--expect-size 20480] [--access-log PATH] [--work DIR] [--timeout 300]

Job i fetches ``URL`` + ``i``; the target must answer a matching conditional request
with 304 (nginx does for static files). One fresh service (service_bench's ``Service``)
runs four phases in this order, each one batch of N jobs (``POST /v1/batches``, NDJSON,
``max_attempts`` 1) waited for with ``GET /v1/batches/{id}?wait=`` and read back with
``GET /v1/batches/{id}/jobs``:

- ``full``: unconditional, on a cold service (first connections, an empty store);
- ``revalidate``: each job revalidates the ``full`` job of its page;
- ``full again``: unconditional again, on warm connections and a store that holds N
  jobs: the fair baseline for ``revalidate``;
- ``revalidate again``: each job revalidates the ``revalidate`` job of its page (a 304
  of a 304: ``body_of`` must still name the ``full`` job, whose body it is).

Measured per phase: wall from the POST sent to the last job's ``finished_at`` (the
service's wall clock, like this process's; millisecond resolution), jobs/s, the service
process's CPU (psutil, user + system, all threads, from before the POST until the batch
was seen finished), what the target sent (``--access-log``: an nginx access log of the
pages, one ``$status $body_bytes_sent $bytes_sent`` line per request), the growth of
``curlfetch_downloaded_bytes_total`` (``/metrics``), and what the service stored: the
growth of its body store on disk (``segments/``, ``bodies/``) and the body sizes of the
jobs that stored a body of their own (``body_of`` null).

Checked per job, so that a fast phase is also a correct one. Unconditional: succeeded,
HTTP 200, the body size, ETag and Last-Modified reported. Revalidation: succeeded, HTTP
304, ``not_modified`` true, ``body_of`` the ``full`` job of its page, ``body`` (size,
sha256) that job's body, If-None-Match sent that job's ETag. Afterwards (not timed) the
bodies of a sample of revalidation jobs are read through ``GET /v1/jobs/{id}/body`` and
compared byte for byte with the ``full`` job's.

One ``RESULT {json}`` line (``bench.common``): ``cpu_user``/``cpu_sys`` are the service
process's over all phases, the phases' figures are in ``extra["phases"]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Result, emit
from bench.service_bench import Service, add_service_arg, parse_time, wait_ready, with_service

NDJSON = "application/x-ndjson"
BATCH_WAIT = 30.0
"""Seconds per ``GET /v1/batches/{id}?wait=`` (the service caps it at 60)."""
PAGE = 1000
LOG_SETTLE = 5.0
"""How long the access log may lag behind the last job's end (nginx writes a line once
the response is sent, so it is already there in practice)."""
BODY_SAMPLE = 20
"""Revalidation jobs whose body is read back and compared with the earlier job's."""
STORE_DIRS = ("segments", "bodies")
"""Where the service keeps bodies in its data directory (WARC segments, or the file
store); the job database is left out: its growth is rows, not bodies."""
_DOWNLOADED = re.compile(r"^curlfetch_downloaded_bytes_total\s+([0-9.e+]+)$", re.MULTILINE)


@dataclass(frozen=True)
class Phase:
    name: str
    revalidates: str | None
    """The phase whose jobs this one's revalidate (page by page), or None: unconditional."""


PHASES = (
    Phase("full", None),
    Phase("revalidate", "full"),
    Phase("full again", None),
    Phase("revalidate again", "revalidate"),
)


@dataclass(frozen=True)
class Args:
    url: str
    n: int
    concurrency: int
    expect_size: int
    access_log: str | None
    work: str | None
    timeout: float
    service_args: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="page i is URL + i (ends with /)")
    parser.add_argument("-n", type=int, default=1000, help="pages, and jobs per phase")
    parser.add_argument(
        "-c", "--concurrency", type=int, default=200, help="service --max-concurrency"
    )
    parser.add_argument("--expect-size", type=int, default=-1, help="check each body's size")
    parser.add_argument(
        "--access-log",
        help="the target's access log of the pages, '$status $body_bytes_sent $bytes_sent' "
        "a line (nginx log_format): what the target sent per phase",
    )
    parser.add_argument("--work", help="directory for the service's data (default: /tmp)")
    parser.add_argument("--timeout", type=float, default=300.0, help="whole run, seconds")
    add_service_arg(parser)
    ns = parser.parse_args(argv)
    if ns.n < 1 or ns.concurrency < 1:
        parser.error("-n and --concurrency must be >= 1")
    return Args(
        url=ns.url,
        n=ns.n,
        concurrency=ns.concurrency,
        expect_size=ns.expect_size,
        access_log=ns.access_log,
        work=ns.work,
        timeout=ns.timeout,
        service_args=tuple(ns.service_arg),
    )


def log(message: str) -> None:
    sys.stderr.write(f"revalidate_bench: {message}\n")
    sys.stderr.flush()


# -- what the target sent, what the service downloaded and stored ------------------------


class AccessLog:
    """The lines nginx appended to its access log since the last ``mark()``."""

    def __init__(self, path: str | None) -> None:
        self.path = None if path is None else Path(path)
        self._offset = 0

    def mark(self) -> None:
        if self.path is not None:
            self._offset = self.path.stat().st_size if self.path.exists() else 0

    async def since_mark(self, expected: int) -> dict[str, Any] | None:
        """Requests by status, body bytes and bytes (headers included) sent since the
        mark; waits up to ``LOG_SETTLE`` s for ``expected`` lines."""
        if self.path is None:
            return None
        deadline = time.monotonic() + LOG_SETTLE
        while True:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                lines = f.read().decode(errors="replace").splitlines()
            if len(lines) >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        statuses: Counter[str] = Counter()
        body_bytes = sent = 0
        for line in lines:
            status, body, total = line.split()
            statuses[status] += 1
            body_bytes += int(body)
            sent += int(total)
        return {
            "requests": len(lines),
            "statuses": dict(statuses),
            "body_bytes": body_bytes,
            "bytes": sent,
        }


def store_size(data: Path) -> int:
    """Bytes in the service's body store on disk (apparent sizes)."""
    total = 0
    for name in STORE_DIRS:
        for root, _, files in os.walk(data / name):
            for file in files:
                try:
                    total += os.stat(os.path.join(root, file)).st_size
                except FileNotFoundError:  # a file the store just removed
                    continue
    return total


async def downloaded(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    match = _DOWNLOADED.search(text)
    return 0 if match is None else int(float(match.group(1)))


# -- one phase ----------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    jobs: int
    ok: int = 0
    wall: float = 0.0
    """POST sent to the last job's ``finished_at``."""
    observed_wall: float = 0.0
    """POST sent to the batch seen finished by this driver (its long-poll answered)."""
    submit_wall: float = 0.0
    """POST sent to its 201 read: revalidations look the earlier jobs up here."""
    batch_finished_after: float = 0.0
    """The batch's ``finished_at`` less its last job's."""
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    """The service's CPU seconds over the phase."""
    target: dict[str, Any] | None = None
    downloaded: int = 0
    """Growth of curlfetch_downloaded_bytes_total."""
    stored: int = 0
    """Growth of the body store on disk."""
    stored_by_jobs: int = 0
    """Body sizes of this phase's jobs that stored a body of their own."""
    not_modified: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    """Job id per page."""
    views: list[dict[str, Any]] = field(default_factory=list)
    """Job view per page (not reported: for the phases that come later)."""

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        del out["ids"], out["views"]
        out["jobs_s"] = self.jobs / self.wall if self.wall else 0.0
        out["cpu"] = self.cpu_user + self.cpu_sys
        return out


async def submit(session: aiohttp.ClientSession, base: str, specs: list[dict[str, Any]]) -> str:
    body = "".join(json.dumps(spec) + "\n" for spec in specs).encode()
    headers = {"Content-Type": NDJSON}
    async with session.post(f"{base}/v1/batches", data=body, headers=headers) as response:
        raw = await response.read()
        if response.status != 201:
            raise RuntimeError(f"POST /v1/batches: HTTP {response.status}: {raw[:300]!r}")
    batch_id: str = json.loads(raw)["id"]
    return batch_id


async def wait_batch(
    session: aiohttp.ClientSession, base: str, batch_id: str, deadline: float
) -> dict[str, Any]:
    """Long-poll the batch until it is finished; its last view."""
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        wait = max(0.0, min(BATCH_WAIT, deadline - time.monotonic()))
        url = f"{base}/v1/batches/{batch_id}"
        async with session.get(url, params={"wait": f"{wait:.1f}"}) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}: HTTP {response.status}")
            view = await response.json()
        if view.get("finished_at") is not None:
            return view
    raise TimeoutError(f"batch {batch_id} not finished before the deadline; last view {view}")


async def batch_jobs(
    session: aiohttp.ClientSession, base: str, batch_id: str, n: int
) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(n // PAGE + 5):  # bounded: a page more than needed ends it
        params = {"limit": str(PAGE), **({"cursor": cursor} if cursor else {})}
        url = f"{base}/v1/batches/{batch_id}/jobs"
        async with session.get(url, params=params) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}: HTTP {response.status}")
            page = await response.json()
        views += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return views
    raise RuntimeError(f"GET /v1/batches/{batch_id}/jobs did not end")


def check(
    view: dict[str, Any], expect_size: int, earlier: dict[str, Any] | None, first_id: str | None
) -> str | None:
    """Why a job view is not what its phase must produce, or None. ``earlier``: the view
    of the job it revalidated; ``first_id``: the unconditional job whose body it is."""
    state = view["state"]
    if state != "succeeded":
        error = view.get("error") or {}
        return f"{state}: {error.get('curl_name') or error.get('code')}: {error.get('message')}"
    result = view["result"] or {}
    body = result.get("body") or {}
    if expect_size >= 0 and body.get("size") != expect_size:
        return f"body of {body.get('size')} bytes, expected {expect_size}"
    if earlier is None:
        if result.get("status") != 200:
            return f"HTTP {result.get('status')}"
        if result.get("not_modified") or result.get("body_of") is not None:
            return "an unconditional job says not_modified"
        if not result.get("etag") or not result.get("last_modified"):
            return "no etag or last_modified in the result"
        return None
    before = earlier.get("result") or {}
    if result.get("status") != 304 or not result.get("not_modified"):
        return f"HTTP {result.get('status')}, not_modified {result.get('not_modified')}"
    if result.get("body_of") != first_id:
        return f"body_of {result.get('body_of')}, expected {first_id}"
    mine, theirs = body, before.get("body") or {}
    if (mine.get("size"), mine.get("sha256")) != (theirs.get("size"), theirs.get("sha256")):
        return "body (size, sha256) is not the revalidated job's"
    sent = view["request"].get("if_none_match")
    if sent != before.get("etag"):
        return f"If-None-Match sent {sent!r}, the revalidated job's ETag is {before.get('etag')!r}"
    if result.get("etag") != before.get("etag"):
        return f"etag {result.get('etag')!r}, expected {before.get('etag')!r}"
    return None


async def run_phase(
    session: aiohttp.ClientSession,
    args: Args,
    service: Service,
    phase: Phase,
    done: Mapping[str, PhaseResult],
    access_log: AccessLog,
    deadline: float,
) -> PhaseResult:
    base, n = service.base, args.n
    earlier = None if phase.revalidates is None else done[phase.revalidates]
    specs: list[dict[str, Any]] = []
    for i in range(n):
        spec: dict[str, Any] = {"url": f"{args.url}{i}", "retry": {"max_attempts": 1}}
        if earlier is not None:
            spec["revalidate"] = earlier.ids[i]
        specs.append(spec)
    data = Path(service.work) / "data"
    access_log.mark()
    stored0, downloaded0 = store_size(data), await downloaded(session, base)
    cpu0 = service.cpu()
    sent = time.time()
    t0 = time.monotonic()
    batch_id = await submit(session, base, specs)
    submitted = time.monotonic() - t0
    batch = await wait_batch(session, base, batch_id, deadline)
    observed = time.monotonic() - t0
    cpu1 = service.cpu()
    out = PhaseResult(phase.name, n, observed_wall=observed, submit_wall=submitted)
    out.cpu_user, out.cpu_sys = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    out.downloaded = await downloaded(session, base) - downloaded0
    out.stored = store_size(data) - stored0
    out.target = await access_log.since_mark(n)

    by_url = {v["request"]["url"]: v for v in await batch_jobs(session, base, batch_id, n)}
    first = done.get("full")
    reasons: Counter[str] = Counter()
    last_finished = sent
    for i in range(n):
        view = by_url.get(f"{args.url}{i}")
        if view is None:
            reasons["missing from the batch's jobs"] += 1
            out.ids.append("")
            out.views.append({})
            continue
        out.ids.append(view["id"])
        out.views.append(view)
        finished = parse_time(view["finished_at"])
        if finished is not None:
            last_finished = max(last_finished, finished)
        result = view["result"] or {}
        if result.get("not_modified"):
            out.not_modified += 1
        elif result.get("body"):
            out.stored_by_jobs += result["body"]["size"]
        problem = check(
            view,
            args.expect_size,
            None if earlier is None else earlier.views[i],
            None if earlier is None or first is None else first.ids[i],
        )
        if problem is None:
            out.ok += 1
        else:
            reasons[f"{phase.name}: {problem}"[:160]] += 1
    out.wall = max(last_finished - sent, 1e-9)
    out.batch_finished_after = (parse_time(batch["finished_at"]) or last_finished) - last_finished
    out.failures = dict(reasons.most_common(5))
    return out


async def compare_bodies(
    session: aiohttp.ClientSession, base: str, first: PhaseResult, later: PhaseResult
) -> tuple[int, list[str]]:
    """Read a sample of ``later``'s bodies and ``first``'s of the same pages through the
    API: they must be the same bytes. (Bodies compared, problems.)"""
    problems: list[str] = []
    step = max(1, len(later.ids) // BODY_SAMPLE)
    sample = range(0, len(later.ids), step)[:BODY_SAMPLE]
    for i in sample:
        bodies = []
        for job_id in (later.ids[i], first.ids[i]):
            async with session.get(f"{base}/v1/jobs/{job_id}/body") as response:
                bodies.append((response.status, await response.read()))
        (status, mine), (_, theirs) = bodies
        if status != 200 or mine != theirs or not mine:
            problems.append(
                f"{later.name} job {later.ids[i]}: GET body: HTTP {status}, {len(mine)} bytes "
                f"{'equal to' if mine == theirs else 'unlike'} the full job's {len(theirs)}"
            )
    return len(sample), problems


async def drive(args: Args, service: Service, result: Result) -> None:
    deadline = time.monotonic() + args.timeout
    access_log = AccessLog(args.access_log)
    connector = aiohttp.TCPConnector(limit=4)
    timeout = aiohttp.ClientTimeout(total=BATCH_WAIT + 60)
    done: dict[str, PhaseResult] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(session, service)
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        for phase in PHASES:
            done[phase.name] = await run_phase(
                session, args, service, phase, done, access_log, deadline
            )
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        compared = 0
        problems: list[str] = []
        for phase in PHASES:
            if phase.revalidates is not None:
                count, found = await compare_bodies(
                    session, service.base, done["full"], done[phase.name]
                )
                compared += count
                problems += found

    for phase_result in done.values():
        result.ok += phase_result.ok
        result.wall += phase_result.wall
        result.cpu_user += phase_result.cpu_user
        result.cpu_sys += phase_result.cpu_sys
        if phase_result.ok < phase_result.jobs:
            result.error(next(iter(phase_result.failures), "failed"))
            result.errors += phase_result.jobs - phase_result.ok - 1
    for problem in problems:
        result.error(problem)
    result.maxrss_kb = service.peak_rss_kb()
    result.bytes = sum((p.target or {}).get("body_bytes", 0) for p in done.values())
    result.extra = {
        "phases": [p.summary() for p in done.values()],
        "bodies_compared": compared,
        "body_problems": problems[:5],
        "driver_cpu": (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime),
    }


# -- main ---------------------------------------------------------------------------------


def run(args: Args) -> int:
    result = Result("revalidate", "service", args.n * len(PHASES), args.concurrency)
    ok = with_service(
        "revalidate-",
        args.work,
        args.concurrency,
        args.service_args,
        args.timeout + 60,
        result,
        lambda service: drive(args, service, result),
        log,
    )
    if not ok:
        return 1
    emit(result)
    return 0


def main() -> None:
    sys.exit(run(parse_args()))


if __name__ == "__main__":
    main()
