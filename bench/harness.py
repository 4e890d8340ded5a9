"""Runs the benchmark workloads side by side against one loopback nginx and prints a table
of absolute figures and ratios against the peers. Started by ``bench/run``.

    python -m bench.harness [--quick] [--only a,b,c,d,s,p,rv] [--rounds N] [--no-profile]

Every client run is its own process; rounds are interleaved (each round runs every
client once, in a rotated order) and the tables show medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import RESULT_PREFIX, raise_nofile_limit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
KIB = 1024
MIB = 1024 * KIB
SMALL_FILE = "1k.bin"
BIG_FILE = "100m.bin"
BIG_SIZE = 100 * MIB
SBIG_FILE = "10m.bin"
SBIG_SIZE = 10 * MIB
CURL_PARALLEL_MAX = 300
PAGES_DIR = "pages"
PAGE_SIZE = 20 * KIB


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    small_n: int
    small_concurrency: tuple[int, ...]
    big_n: int
    big_concurrency: int
    big_buffer: int
    slow_n: int
    slow_delay: float
    soak_n: int
    soak_concurrency: int
    soak_every: int
    soak_warmup: int
    service_n: int
    service_batch: int
    service_posts: int
    service_concurrency: int
    sbig_n: int
    sbig_concurrency: int
    reval_n: int


FULL = Plan(
    rounds=3,
    small_n=20_000,
    small_concurrency=(50, 200),
    big_n=20,
    big_concurrency=4,
    big_buffer=512 * KIB,
    slow_n=10_000,
    slow_delay=5.0,
    soak_n=200_000,
    soak_concurrency=200,
    soak_every=10_000,
    soak_warmup=50_000,
    service_n=20_000,
    service_batch=500,
    service_posts=4,
    service_concurrency=200,
    sbig_n=200,
    sbig_concurrency=8,
    reval_n=1_000,
)
QUICK = Plan(
    rounds=1,
    small_n=2_000,
    small_concurrency=(50, 200),
    big_n=4,
    big_concurrency=4,
    big_buffer=512 * KIB,
    slow_n=1_000,
    slow_delay=1.0,
    soak_n=20_000,
    soak_concurrency=200,
    soak_every=2_000,
    soak_warmup=6_000,
    service_n=2_000,
    service_batch=500,
    service_posts=4,
    service_concurrency=200,
    sbig_n=50,
    sbig_concurrency=8,
    reval_n=200,
)


# -- processes ------------------------------------------------------------------------------


@dataclass
class Run:
    """One client run. CPU and wall are the client's own measurement around its
    workload (Python clients) or the whole process (curl CLI)."""

    client: str
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    n: int = 0
    bytes: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    maxrss_kb: int = 0
    process_wall: float = 0.0
    process_cpu: float = 0.0
    failed: str | None = None
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    wall: float
    cpu: float
    timed_out: bool


def run_process(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> Finished:
    """Run ``argv`` to completion (killed after ``timeout``) and return its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Finished(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall=wall,
            cpu=ru.ru_utime + ru.ru_stime,
            timed_out=timed_out.is_set(),
        )


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env.pop("PYTHONASYNCIODEBUG", None)
    env.pop("PYTHONDEVMODE", None)
    return env


def run_python_client(
    client: str, argv: Sequence[str], timeout: float, script: Path | None = None
) -> Run:
    script = script or BENCH / f"client_{client}.py"
    finished = run_process([PYTHON, str(script), *argv], timeout, client_env())
    run = Run(client=client, process_wall=finished.wall, process_cpu=finished.cpu)
    run.stderr_tail = "\n".join(finished.stderr.strip().splitlines()[-5:])
    line = next(
        (ln for ln in reversed(finished.stdout.splitlines()) if ln.startswith(RESULT_PREFIX)),
        None,
    )
    if finished.timed_out:
        run.failed = f"killed after {timeout:.0f} s"
    elif line is None:
        tail = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        run.failed = f"exit {finished.returncode}: {tail[:200]}"
    if line is None:
        return run
    data = json.loads(line[len(RESULT_PREFIX) :])
    for name in ("ok", "errors", "first_error", "n", "bytes", "wall", "cpu_user", "cpu_sys"):
        setattr(run, name, data[name])
    run.maxrss_kb = data["maxrss_kb"]
    run.cpu = run.cpu_user + run.cpu_sys
    run.extra = data["extra"]
    return run


def run_curl_cli(
    urls: Sequence[tuple[str, str]], parallel: int, config: Path, timeout: float
) -> Run:
    """``curl -s -Z --parallel-max C --config urls.cfg`` with url/output pairs."""
    with config.open("w") as f:
        for url, output in urls:
            f.write(f'url = "{url}"\noutput = "{output}"\n')
    argv = ["curl", "-s", "-Z", "--parallel-max", str(min(parallel, CURL_PARALLEL_MAX))]
    finished = run_process([*argv, "--config", str(config)], timeout)
    run = Run(
        client="curl",
        n=len(urls),
        wall=finished.wall,
        cpu=finished.cpu,
        process_wall=finished.wall,
        process_cpu=finished.cpu,
    )
    if finished.timed_out:
        run.failed = f"killed after {timeout:.0f} s"
    elif finished.returncode != 0:
        run.errors = len(urls)
        run.first_error = f"curl exit {finished.returncode}"
    else:
        run.ok = len(urls)
    return run


def body_sizes(out_dir: Path, n: int) -> list[int]:
    """The sizes of ``body-00000`` .. in ``out_dir`` (-1: missing)."""
    return [
        path.stat().st_size if path.exists() else -1
        for path in (out_dir / f"body-{i:05d}" for i in range(n))
    ]


def judge_bodies(run: Run, sizes: Sequence[int], expected: int, *, counted_here: bool) -> None:
    """Count a wrong-sized body file as an error; ``counted_here`` (the curl CLI, which
    reports no bodies of its own): also set ``bytes`` and ``ok`` from the files."""
    wrong = [(i, size) for i, size in enumerate(sizes) if size != expected]
    if counted_here:
        run.bytes = sum(max(size, 0) for size in sizes)
        run.ok = run.n - len(wrong) if not run.failed else 0
    if wrong and not run.failed:
        run.errors = max(run.errors, len(wrong))
        i, size = wrong[0]
        run.first_error = run.first_error or f"body-{i:05d}: {size} bytes on disk"


# -- servers --------------------------------------------------------------------------------


def write_pages(directory: Path, n: int) -> None:
    """(rv)'s pages: ``0`` .. ``n-1``, 20 KiB of random bytes each, for nginx to serve
    with its own validators (``ETag: "<mtime>-<size>"``, ``Last-Modified``) and to answer
    304 when both validators match. Each page gets its own mtime, so that no two pages
    share an ETag: a validator sent for the wrong page gets a 200, not a 304."""
    directory.mkdir()
    base = int(time.time()) - 86_400
    for i in range(n):
        path = directory / str(i)
        path.write_bytes(os.urandom(PAGE_SIZE))
        os.utime(path, (base - i, base - i))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {seconds} s")


NGINX_CONF = """\
{user}
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    default_type application/octet-stream;
    access_log off;
    log_format pages '$status $body_bytes_sent $bytes_sent';
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        # (rv) counts what the target sent: status and bytes, one line per page request.
        location /pages/ {{ access_log {prefix}/pages.log pages; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(
    prefix: Path, *, big: bool, sbig: bool = False, pages: int = 0
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A one-worker nginx on a free loopback port serving 1k.bin (and 100m.bin, and
    10m.bin, and ``pages`` pages for (rv): ``write_pages``)."""
    www = prefix / "www"
    www.mkdir(parents=True)
    (prefix / "tmp").mkdir()
    (www / SMALL_FILE).write_bytes(os.urandom(KIB))
    if pages:
        write_pages(www / PAGES_DIR, pages)
    if sbig:
        (www / SBIG_FILE).write_bytes(os.urandom(SBIG_SIZE))
    if big:
        block = os.urandom(MIB)
        with (www / BIG_FILE).open("wb") as f:
            for _ in range(BIG_SIZE // MIB):
                f.write(block)
        os.sync()  # Its write-back must not land on the first client measured.
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port))
    argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def slow_server(delay: float) -> Iterator[int]:
    """bench/slow_server.py in its own process on a port it picks; yields the port."""
    argv = [PYTHON, str(BENCH / "slow_server.py"), "--port", "0", "--delay", str(delay)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=client_env())
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15.0)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            raise RuntimeError(f"slow server did not start (said {line!r})")
        yield int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- load on the machine --------------------------------------------------------------------


def _proc_stat_cpu() -> tuple[float, float]:
    """(user+nice+system, steal) seconds, all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1] + fields[2]) / tick, (fields[7] if len(fields) > 7 else 0) / tick


def _pid_cpu(pids: Sequence[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / tick
    return total


class LoadProbe:
    """CPU that processes outside this benchmark used while a workload ran: a sign of
    disturbance by concurrent load (the figures assume a quiet machine)."""

    def __init__(self, extra_pids: Sequence[int]) -> None:
        self._pids = list(extra_pids)
        self._t0 = time.monotonic()
        self._sys0, self._steal0 = _proc_stat_cpu()
        self._ours0 = self._ours()

    def _ours(self) -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return own + _pid_cpu(self._pids)

    def summary(self) -> str:
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy, steal = _proc_stat_cpu()
        others = max(0.0, (busy - self._sys0) - (self._ours() - self._ours0))
        return (
            f"other processes used {others / wall:.2f} of {os.cpu_count()} cores on average "
            f"(steal {(steal - self._steal0) / wall:.2f}) over {wall:.0f} s"
        )


def nginx_pids(master: int) -> list[int]:
    pids = [master]
    with contextlib.suppress(OSError), open(f"/proc/{master}/task/{master}/children") as f:
        pids += [int(p) for p in f.read().split()]
    return pids


# -- formatting -----------------------------------------------------------------------------


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out("  " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    out("  " + "-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out("  " + " | ".join(cells))


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def verdict(ok: bool) -> str:
    """For a performance target."""
    return "PASS" if ok else "MISS"


def pass_fail(ok: bool) -> str:
    """For a correctness criterion."""
    return "PASS" if ok else "FAIL"


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    mid = statistics.median(values)
    return f" ±{(max(values) - min(values)) / 2 / mid * 100:.0f}%" if mid else ""


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def describe_failure(run: Run) -> str:
    if run.failed:
        text = f"FAILED ({run.failed})"
    elif run.errors:
        text = f"{run.errors} errors, first: {run.first_error}"
    else:
        return ""
    if run.stderr_tail:
        text += "\n    stderr: " + run.stderr_tail.replace("\n", "\n    stderr: ")
    return text


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


# -- workloads ------------------------------------------------------------------------------


SMALL_CLIENTS = ("engine", "curl", "aiohttp", "treq")
BIG_CLIENTS = ("engine", "curl", "aiohttp", "treq")
SLOW_CLIENTS = ("engine", "aiohttp", "treq")
SERVICE_CLIENTS = ("service", "service-files", "curl")
"""The service on its default store (WARC segments), on the file-per-body store of the
previous release (this issue's starting point), and the curl CLI."""
SBIG_CLIENTS = ("service", "curl")
SCALE_CONFIGS = {
    "sqlite x1": ("sqlite", 1),
    "postgres x1": ("postgres", 1),
    "postgres x2": ("postgres", 2),
    "postgres x3": ("postgres", 3),
}
SCALE_CONCURRENCY = 100
"""(p): --max-concurrency of each instance; the shared per-host cap is this times K."""
LABELS = {"curl": "curl CLI", "service-files": "service (files)"}
FILES_STORE = ("--service-arg=--body-store=files",)


def req_per_s(run: Run) -> float:
    return run.ok / run.wall


def cpu_us_per_req(run: Run) -> float:
    return run.cpu / run.n * 1e6


def mb_per_s(run: Run) -> float:
    return run.bytes / 1e6 / run.wall


def cpu_s_per_gb(run: Run) -> float:
    return run.cpu / (run.bytes / 1e9)


def clean(runs: Sequence[Run]) -> list[Run]:
    """Runs that finished with every request correct: the only ones that count."""
    return [r for r in runs if not r.failed and not r.errors and r.wall > 0 and r.n > 0]


def values(runs: Sequence[Run], metric: Callable[[Run], float]) -> list[float]:
    return [metric(r) for r in clean(runs)]


def med(runs: Sequence[Run], metric: Callable[[Run], float]) -> float | None:
    return median(values(runs, metric))


class Bench:
    def __init__(
        self,
        plan: Plan,
        port: int,
        work: Path,
        nginx_pid: int,
        profile_to: Path | None = None,
        service_args: Sequence[str] = (),
    ) -> None:
        self.plan = plan
        self.service_args = [f"--service-arg={a}" for a in service_args]
        self.port = port
        self.work = work
        self.nginx_pid = nginx_pid
        self.profile_to = profile_to
        self.record: dict[str, Any] = {"plan": asdict(plan)}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def probe(self) -> LoadProbe:
        return LoadProbe(nginx_pids(self.nginx_pid))

    # (a) ----------------------------------------------------------------------------------

    def small(self) -> None:
        p = self.plan
        out(f"(a) {p.small_n:,} GETs of 1 KiB, bodies in memory, C in flight; {p.rounds} rounds")
        probe = self.probe()
        runs: dict[tuple[str, int], list[Run]] = {}
        url = self.url(SMALL_FILE)
        for r in range(p.rounds):
            for c in p.small_concurrency:
                for client in rotated(SMALL_CLIENTS, r):
                    if client == "curl":
                        pairs = [(url, "/dev/null")] * p.small_n
                        run = run_curl_cli(pairs, c, self.work / "urls.cfg", 600)
                    else:
                        argv = ["many", "--url", url, "-n", str(p.small_n), "-c", str(c)]
                        run = run_python_client(client, [*argv, "--expect-size", str(KIB)], 600)
                    runs.setdefault((client, c), []).append(run)
                    got = req_per_s(run) if run.wall else 0.0
                    out(
                        f"  round {r + 1} C={c:<3} {client:<8} {got:>9,.0f} req/s "
                        f"{cpu_us_per_req(run):>7.1f} CPU µs/req  {describe_failure(run)}"
                    )

        out()
        headers = ["client"]
        for c in p.small_concurrency:
            headers += [f"C={c} req/s", "CPU µs/req", "vs curl", "vs aiohttp", "CPU vs curl"]
        rows = []
        summary: dict[str, Any] = {}
        for client in SMALL_CLIENTS:
            row = [LABELS.get(client, client)]
            for c in p.small_concurrency:
                mine = runs[(client, c)]
                rate, cpu = med(mine, req_per_s), med(mine, cpu_us_per_req)
                row += [
                    fmt(rate, ",.0f") + spread(values(mine, req_per_s)),
                    fmt(cpu, ".1f"),
                    ratio(rate, med(runs[("curl", c)], req_per_s)),
                    ratio(rate, med(runs[("aiohttp", c)], req_per_s)),
                    ratio(cpu, med(runs[("curl", c)], cpu_us_per_req)),
                ]
                summary[f"{client}/C={c}"] = {"req_s": rate, "cpu_us_per_req": cpu}
            rows.append(row)
        out(f"  medians over {p.rounds} round(s); ± is half the range; 'vs' compares req/s")
        table(headers, rows)
        out()
        for c in p.small_concurrency:
            for peer, factor in (("curl", 1.0), ("aiohttp", 3.0)):
                engine, other = runs[("engine", c)], runs[(peer, c)]
                e_rate, p_rate = med(engine, req_per_s), med(other, req_per_s)
                e_cpu, p_cpu = med(engine, cpu_us_per_req), med(other, cpu_us_per_req)
                name = f"{factor:.1f}x {LABELS.get(peer, peer)}"
                if e_rate is None or p_rate is None or e_cpu is None or p_cpu is None:
                    out(f"  target C={c}: engine >= {name} req/s: cannot judge, a run failed")
                    continue
                out(
                    f"  target C={c}: engine >= {name + ' req/s:':<19} {e_rate / p_rate:5.2f}x "
                    f"{verdict(e_rate >= factor * p_rate)}   (per request the peer spends "
                    f"{p_cpu / e_cpu:.2f}x the engine's CPU)"
                )
        out(f"  {probe.summary()}")
        self.record["a"] = {
            "summary": summary,
            "runs": {f"{k}/C={c}": [asdict(x) for x in v] for (k, c), v in runs.items()},
        }

    # (b) ----------------------------------------------------------------------------------

    def big(self) -> None:
        p = self.plan
        out(
            f"(b) {p.big_n} GETs of 100 MiB at C={p.big_concurrency}, bodies written to files "
            f"(engine: sink=path, buffer_size={p.big_buffer // KIB} KiB); {p.rounds} rounds"
        )
        probe = self.probe()
        runs: dict[str, list[Run]] = {}
        url = self.url(BIG_FILE)
        for r in range(p.rounds):
            for client in rotated(BIG_CLIENTS, r):
                run = self._big_run(client, url, self.work / f"b-{client}-{r}")
                runs.setdefault(client, []).append(run)
                got = mb_per_s(run) if run.wall else 0.0
                cost = cpu_s_per_gb(run) if run.bytes else 0.0
                out(
                    f"  round {r + 1} {client:<8} {got:>7,.0f} MB/s {cost:>6.2f} CPU s/GB  "
                    f"{describe_failure(run)}"
                )

        out()
        rows = []
        summary: dict[str, Any] = {}
        for client in BIG_CLIENTS:
            rate, per_gb = med(runs[client], mb_per_s), med(runs[client], cpu_s_per_gb)
            rows.append(
                [
                    LABELS.get(client, client),
                    fmt(rate, ",.0f") + spread(values(runs[client], mb_per_s)),
                    fmt(per_gb, ".2f"),
                    ratio(rate, med(runs["curl"], mb_per_s)),
                    ratio(per_gb, med(runs["curl"], cpu_s_per_gb)),
                ]
            )
            summary[client] = {"mb_s": rate, "cpu_s_per_gb": per_gb}
        out(f"  medians over {p.rounds} round(s); MB = 10^6 bytes, GB = 10^9 bytes")
        table(["client", "MB/s", "CPU s/GB", "MB/s vs curl", "CPU/GB vs curl"], rows)
        out()
        e_rate, c_rate = med(runs["engine"], mb_per_s), med(runs["curl"], mb_per_s)
        if e_rate is None or c_rate is None:
            out("  target: engine >= 0.9x curl CLI MB/s: cannot judge, a run failed")
        else:
            out(
                f"  target: engine >= 0.9x curl CLI MB/s: {e_rate / c_rate:.2f}x "
                f"{verdict(e_rate >= 0.9 * c_rate)}"
            )
        out(f"  {probe.summary()}")
        self.record["b"] = {
            "summary": summary,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }

    def _big_run(self, client: str, url: str, out_dir: Path) -> Run:
        """One client's run of (b) into ``out_dir``, which is checked, then deleted."""
        p = self.plan
        out_dir.mkdir()
        try:
            if client == "curl":
                pairs = [(url, str(out_dir / f"body-{i:05d}")) for i in range(p.big_n)]
                run = run_curl_cli(pairs, p.big_concurrency, self.work / "big.cfg", 600)
            else:
                argv = [
                    "big", "--url", url, "-n", str(p.big_n), "-c", str(p.big_concurrency),
                    "--out-dir", str(out_dir), "--buffer-size", str(p.big_buffer),
                    "--expect-size", str(BIG_SIZE),
                ]  # fmt: skip
                run = run_python_client(client, argv, 600)
            sizes = body_sizes(out_dir, p.big_n)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
            # Write back what the deletion left, so it does not land on the next client.
            os.sync()
        judge_bodies(run, sizes, BIG_SIZE, counted_here=client == "curl")
        return run

    # (c) ----------------------------------------------------------------------------------

    def slow(self) -> None:
        p = self.plan
        out(
            f"(c) {p.slow_n:,} concurrent GETs, each held {p.slow_delay:g} s by a slow loopback "
            f"server (bench/slow_server.py); {p.rounds} rounds"
        )
        probe = self.probe()
        runs: dict[str, list[Run]] = {client: [] for client in SLOW_CLIENTS}
        skipped: dict[str, str] = {}
        limit = p.slow_delay * 3 + 30
        for r in range(p.rounds):
            for client in rotated(SLOW_CLIENTS, r):
                if client in skipped:
                    continue
                with slow_server(p.slow_delay) as port:
                    argv = [
                        "slow", "--url", f"http://127.0.0.1:{port}/", "-n", str(p.slow_n),
                        "-c", str(p.slow_n), "--expect-size", "2", "--timeout", str(limit),
                    ]  # fmt: skip
                    run = run_python_client(client, argv, limit + 30)
                runs[client].append(run)
                lat = run.extra.get("latency") or {}
                lat_text = " ".join(f"{k} {v:.1f}" for k, v in lat.items())
                out(
                    f"  round {r + 1} {client:<8} {run.ok:>6,}/{p.slow_n:,} in {run.wall:5.1f} s "
                    f"{run.cpu:6.2f} CPU s {run.maxrss_kb / 1024:6.0f} MB peak RSS "
                    f"(latency s: {lat_text or '-'})  {describe_failure(run)}"
                )
                if run.errors and "driver" in run.extra:
                    out(f"    engine driver counters: {run.extra['driver']}")
                if client == "treq" and (run.failed or run.ok < p.slow_n):
                    skipped[client] = describe_failure(run) or f"only {run.ok} completed"

        def cpu(run: Run) -> float:
            return run.cpu

        out()
        rows = []
        summary: dict[str, Any] = {}
        aio_cpu = med(runs["aiohttp"], cpu)
        for client in SLOW_CLIENTS:
            done = median([float(x.ok) for x in runs[client] if not x.failed])
            mine = med(runs[client], cpu)
            rss = med(runs[client], lambda x: x.maxrss_kb / 1024)
            wall = med(runs[client], lambda x: x.wall)
            rows.append(
                [
                    client,
                    f"{fmt(done, ',.0f')}/{p.slow_n:,}",
                    fmt(wall, ".1f"),
                    fmt(mine, ".2f") + spread(values(runs[client], cpu)),
                    fmt(rss, ",.0f"),
                    ratio(mine, aio_cpu),
                ]
            )
            summary[client] = {"completed": done, "cpu_s": mine, "peak_rss_mb": rss, "wall": wall}
        out(f"  medians over {p.rounds} round(s) of the runs that completed every transfer")
        table(["client", "completed", "wall s", "CPU s", "peak RSS MB", "CPU vs aiohttp"], rows)
        for client, reason in skipped.items():
            out(f"  {client} did not cope and was skipped after its first failure: {reason}")
        out()
        e_cpu = med(runs["engine"], cpu)
        if e_cpu is None or aio_cpu is None:
            out("  target: engine CPU <= 0.5x aiohttp's: cannot judge, a run failed")
        else:
            out(
                f"  target: engine CPU <= 0.5x aiohttp's: {e_cpu / aio_cpu:.2f}x "
                f"{verdict(e_cpu <= 0.5 * aio_cpu)}"
            )
        out(f"  {probe.summary()}")
        self.record["c"] = {
            "summary": summary,
            "skipped": skipped,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }

    # (d) ----------------------------------------------------------------------------------

    def soak(self) -> None:
        p = self.plan
        out(
            f"(d) soak: {p.soak_n:,} GETs of 1 KiB at C={p.soak_concurrency} with the engine; "
            f"RSS and open fds every {p.soak_every:,}, warm-up {p.soak_warmup:,}"
        )
        probe = self.probe()
        argv = [
            "soak", "--url", self.url(SMALL_FILE), "-n", str(p.soak_n),
            "-c", str(p.soak_concurrency), "--expect-size", str(KIB),
            "--sample-every", str(p.soak_every),
        ]  # fmt: skip
        run = run_python_client("engine", argv, 1200)
        self.record["d"] = asdict(run)
        if run.failed:
            out(f"  FAIL: the soak run failed: {run.failed}")
            return
        samples = [(int(d), int(rss), int(fds)) for d, rss, fds in run.extra["samples"]]
        out(
            f"  {run.ok:,} ok, {run.errors} errors; {req_per_s(run):,.0f} req/s, "
            f"{cpu_us_per_req(run):.1f} CPU µs/req"
        )
        table(
            ["done", "RSS MB", "open fds"],
            [[f"{done:,}", f"{rss / 1024:.1f}", str(fds)] for done, rss, fds in samples],
        )
        out()
        first = f", first: {run.first_error}" if run.first_error else ""
        out(
            f"  {pass_fail(run.ok == p.soak_n)}: all {p.soak_n:,} requests succeeded "
            f"({run.errors} errors{first})"
        )
        warm = [s for s in samples if s[0] >= p.soak_warmup]
        if len(warm) < 2:
            out("  FAIL: too few samples after the warm-up to judge RSS growth")
        else:
            base, peak, last = warm[0][1], max(s[1] for s in warm), warm[-1][1]
            growth = (peak - base) / base * 100
            out(
                f"  {pass_fail(growth < 5)}: RSS growth after the warm-up < 5%: {growth:+.1f}% "
                f"(peak {peak / 1024:.1f} MB vs {base / 1024:.1f} MB at {warm[0][0]:,}; "
                f"end {last / 1024:.1f} MB)"
            )
        before, after = run.extra["fds_before"], run.extra["fds_after_close"]
        in_run = [s[2] for s in warm] or [0]
        out(
            f"  {pass_fail(after <= before)}: open fds back to baseline at the end: "
            f"{before} before the client, {min(in_run)}-{max(in_run)} while running, "
            f"{run.extra['fds_open']} after the last response, {after} after client.close()"
        )
        out(f"  {probe.summary()}")

    # (s) ----------------------------------------------------------------------------------

    def service(self) -> None:
        p = self.plan
        c = min(p.service_concurrency, CURL_PARALLEL_MAX)
        out(
            f"(s) the job service end to end: {p.service_n:,} jobs of 1 KiB through "
            f"POST /v1/jobs, {p.service_batch} per POST, {p.service_posts} POSTs in flight, "
            f"until all are terminal (twistd curlfetch --max-concurrency {c}, a fresh one per "
            f"run); curl CLI --parallel-max {c} on the same URLs; {p.rounds} rounds"
        )
        probe = self.probe()
        runs: dict[str, list[Run]] = {client: [] for client in SERVICE_CLIENTS}
        url = self.url(SMALL_FILE)
        for r in range(p.rounds):
            for client in rotated(SERVICE_CLIENTS, r):
                if client == "curl":
                    pairs = [(f"{url}?i={i}", "/dev/null") for i in range(p.service_n)]
                    run = run_curl_cli(pairs, c, self.work / "service-urls.cfg", 600)
                    got = req_per_s(run) if run.wall else 0.0
                    out(
                        f"  round {r + 1} {'curl CLI':<8} {got:>7,.0f} req/s  "
                        f"wall {run.wall:5.1f} s  CPU {run.cpu:5.2f} s "
                        f"({cpu_us_per_req(run):.0f} µs/req)  {describe_failure(run)}"
                    )
                else:
                    extra = FILES_STORE if client == "service-files" else ()
                    run = self._service_run(c, None, extra)
                    out(f"  round {r + 1} {LABELS.get(client, client):<15} {_service_line(run)}")
                runs[client].append(run)

        out()
        rows = []
        summary: dict[str, Any] = {}
        curl_rate, curl_cpu = med(runs["curl"], req_per_s), med(runs["curl"], cpu_us_per_req)
        for client in SERVICE_CLIENTS:
            mine = runs[client]
            rate, cpu = med(mine, req_per_s), med(mine, cpu_us_per_req)
            wall = med(mine, lambda x: x.wall)
            rows.append(
                [
                    LABELS.get(client, client),
                    fmt(rate, ",.0f") + spread(values(mine, req_per_s)),
                    fmt(wall, ".2f"),
                    fmt(cpu, ",.0f"),
                    ratio(rate, curl_rate),
                    ratio(cpu, curl_cpu),
                ]
            )
            summary[client] = {"per_s": rate, "wall": wall, "cpu_us_per_job": cpu}
        out(
            f"  medians over {p.rounds} round(s); service: first POST to the last job's "
            f"finished_at, CPU of the twistd process"
        )
        table(["client", "jobs/s", "wall s", "CPU µs/job", "vs curl", "CPU vs curl"], rows)

        service_runs = clean(runs["service"])
        if service_runs:
            out()
            lat_rows = []
            for key, name in (
                ("submit_latency", "submission (per POST of the batch)"),
                ("to_terminal_latency", "submission until terminal (per job)"),
                ("in_service_latency", "created_at to finished_at (per job)"),
            ):
                cells = [
                    fmt(median([x.extra[key][q] * 1000 for x in service_runs]), ",.0f")
                    for q in ("p50", "p99", "max")
                ]
                lat_rows.append([name, *cells])
                summary["service"][key] = {
                    q: median([x.extra[key][q] for x in service_runs])
                    for q in ("p50", "p99", "max")
                }
            out("  service latency, ms (medians over rounds)")
            table(["", "p50", "p99", "max"], lat_rows)
            accept = median([x.extra["submit_jobs_s"] for x in service_runs])
            submit_wall = median([x.extra["submit_wall"] for x in service_runs])
            driver = median([x.extra["driver_cpu"] for x in service_runs])
            out(
                f"  the API accepted {fmt(accept, ',.0f')} jobs/s (all {p.service_n:,} in "
                f"{fmt(submit_wall, '.2f')} s, while fetching); the bench driver used "
                f"{fmt(driver, '.2f')} CPU s"
            )
            summary["service"]["accepted_jobs_s"] = accept
        out()
        s_rate = summary["service"]["per_s"]
        files_rate = summary["service-files"]["per_s"]
        missed = False
        if s_rate is None or files_rate is None:
            out("  floor: segments >= 3x the file store (the starting point): cannot judge")
        else:
            out(
                f"  floor: segments >= 3x the file store (the starting point): "
                f"{s_rate / files_rate:.2f}x {verdict(s_rate >= 3 * files_rate)}"
            )
        if s_rate is None or curl_rate is None:
            out("  goal: service >= 0.5x curl CLI's rate end to end: cannot judge, a run failed")
        else:
            missed = s_rate < 0.5 * curl_rate
            out(
                f"  goal: service >= 0.5x curl CLI's rate end to end: {s_rate / curl_rate:.2f}x "
                f"{verdict(not missed)}"
            )
        out(f"  {probe.summary()}")
        self.record["s"] = {
            "summary": summary,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }
        if missed and self.profile_to is not None:
            self._service_profile(c)

    # (s-hook) ------------------------------------------------------------------------------

    def service_hooks(self) -> None:
        """(s) with a webhook per job: what webhooks cost in jobs/s, and how soon a
        delivery follows its job's end."""
        p = self.plan
        c = min(p.service_concurrency, CURL_PARALLEL_MAX)
        out(
            f"(s-hook) the (s) workload with a webhook per job: {p.service_n:,} jobs of 1 KiB, "
            f"each notifying a loopback receiver (aiohttp, in the driver) of job.succeeded, "
            f"signed per Standard Webhooks; against the same without webhooks; {p.rounds} rounds"
        )
        probe = self.probe()
        runs: dict[str, list[Run]] = {"service": [], "service+webhooks": []}
        for r in range(p.rounds):
            for client in rotated(list(runs), r):
                hooks = ("--webhook",) if client == "service+webhooks" else ()
                run = self._service_run(c, None, driver_args=hooks)
                line = _service_line(run)
                if hooks and run.extra.get("webhooks"):
                    hook = run.extra["webhooks"]
                    lat = hook["latency"]
                    line += (
                        f"  webhooks {hook['delivered']:,} (p50 {lat['p50'] * 1000:,.0f} ms, "
                        f"p99 {lat['p99'] * 1000:,.0f} ms after finished_at)"
                    )
                out(f"  round {r + 1} {client:<17} {line}")
                runs[client].append(run)
        out()
        base = med(runs["service"], req_per_s)
        hooked = clean(runs["service+webhooks"])
        rate = med(runs["service+webhooks"], req_per_s)
        rows = [
            [
                name,
                fmt(med(mine, req_per_s), ",.0f") + spread(values(mine, req_per_s)),
                fmt(med(mine, cpu_us_per_req), ",.0f"),
                ratio(med(mine, req_per_s), base),
            ]
            for name, mine in runs.items()
        ]
        table(["", "jobs/s", "CPU µs/job", "vs no webhooks"], rows)
        summary: dict[str, Any] = {"service": base, "service+webhooks": rate}
        if hooked:
            cells = []
            for q in ("p50", "p99", "max"):
                value = median([x.extra["webhooks"]["latency"][q] for x in hooked])
                summary[f"delivery_{q}"] = value
                cells.append(fmt(None if value is None else value * 1000, ",.0f"))
            out("  delivery latency, ms from the job's finished_at to the receiver (medians)")
            table(["", "p50", "p99", "max"], [["webhook", *cells]])
        out(f"  {probe.summary()}")
        self.record["shook"] = {
            "summary": summary,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }

    def _service_run(
        self,
        concurrency: int,
        profile: Path | None,
        extra: Sequence[str] = (),
        driver_args: Sequence[str] = (),
    ) -> Run:
        p = self.plan
        argv = [
            "--url", self.url(SMALL_FILE), "-n", str(p.service_n),
            "--batch", str(p.service_batch), "--posts", str(p.service_posts),
            "-c", str(concurrency), "--expect-size", str(KIB), "--work", str(self.work),
            "--timeout", "500", *self.service_args, *extra, *driver_args,
        ]  # fmt: skip
        if profile is not None:
            argv += ["--profile", str(profile), "--top", "15"]
        return run_python_client("service", argv, 600, script=BENCH / "service_bench.py")

    def _service_profile(self, concurrency: int) -> None:
        """One more run under py-spy (not counted: sampling slows it) and its hotspots."""
        assert self.profile_to is not None
        out()
        out("  the target was missed: one more run under py-spy (not counted; it slows the")
        out("  service) to show where the service spends its time")
        run = self._service_run(concurrency, self.profile_to)
        out(f"  profiled run: {_service_line(run)}")
        profile = run.extra.get("profile")
        if not profile:
            out("  no profile was recorded")
            return
        self.record["s"]["profile"] = profile
        from bench.service_bench import profile_lines

        out(
            f"  py-spy: {profile['samples']:,} samples at 100/s of the twistd process's busy "
            f"threads (a thread in a blocking syscall such as fsync counts as busy); stacks in "
            f"{self.profile_to.relative_to(ROOT)} (speedscope reads them)"
        )
        for line in profile_lines(profile):
            out(f"  {line}")

    # (s-big) ------------------------------------------------------------------------------

    def service_big(self) -> None:
        p = self.plan
        n, c = p.sbig_n, p.sbig_concurrency
        out(
            f"(s-big) the job service with large bodies: {n} jobs of 10 MiB through POST "
            f"/v1/jobs (twistd curlfetch --max-concurrency {c}, bodies durable in the store), "
            f"against the curl CLI writing the same bodies to files (--parallel-max {c}); "
            f"{p.rounds} rounds"
        )
        disk = self._disk_synced_mb_s()
        out(f"  this disk's synced write speed: {disk:,.0f} MB/s (dd 512 MiB, conv=fdatasync)")
        probe = self.probe()
        runs: dict[str, list[Run]] = {"service": [], "curl": [], "curl+sync": []}
        url = self.url(SBIG_FILE)
        for r in range(p.rounds):
            for client in rotated(SBIG_CLIENTS, r):
                if client == "curl":
                    run, synced = self._sbig_curl(url, n, c, self.work / f"sbig-{r}")
                    runs["curl+sync"].append(synced)
                    line = (
                        f"{mb_per_s(run):>7,.0f} MB/s ({mb_per_s(synced):,.0f} with sync)  "
                        f"{cpu_s_per_gb(run):.2f} CPU s/GB"
                        if run.wall and run.bytes
                        else ""
                    )
                else:
                    argv = [
                        "--url", url, "-n", str(n), "--batch", str(n), "--posts", "1",
                        "-c", str(c), "--expect-size", str(SBIG_SIZE), "--work", str(self.work),
                        "--timeout", "500", *self.service_args,
                    ]  # fmt: skip
                    run = run_python_client("service", argv, 600, script=BENCH / "service_bench.py")
                    os.sync()  # its deleted data's write-back must not land on the next run
                    line = (
                        f"{mb_per_s(run):>7,.0f} MB/s  {cpu_s_per_gb(run):.2f} CPU s/GB  "
                        f"peak RSS {run.maxrss_kb / 1024:,.0f} MB"
                        if run.wall and run.bytes
                        else ""
                    )
                out(
                    f"  round {r + 1} {LABELS.get(client, client):<9} {line}  "
                    f"{describe_failure(run)}".rstrip()
                )
                runs[client].append(run)

        out()
        curl_rate = med(runs["curl"], mb_per_s)
        rows = []
        summary: dict[str, Any] = {"disk_synced_mb_s": disk}
        for name, label in (
            ("service", "service"),
            ("curl", "curl CLI -o"),
            ("curl+sync", "curl CLI -o, then sync"),
        ):
            mine = runs[name]
            rate, per_gb = med(mine, mb_per_s), med(mine, cpu_s_per_gb)
            rss = med(mine, lambda x: x.maxrss_kb / 1024) if name == "service" else None
            rows.append(
                [
                    label,
                    fmt(rate, ",.0f") + spread(values(mine, mb_per_s)),
                    fmt(per_gb, ".2f"),
                    fmt(rss, ",.0f") if rss is not None else "-",
                    ratio(rate, curl_rate),
                ]
            )
            summary[name] = {"mb_s": rate, "cpu_s_per_gb": per_gb, "peak_rss_mb": rss}
        out(
            f"  medians over {p.rounds} round(s); MB = 10^6 bytes; service: first POST to the "
            "last job's finished_at, CPU and peak RSS (VmHWM) of the twistd process"
        )
        table(["", "MB/s", "CPU s/GB", "peak RSS MB", "vs curl"], rows)
        out()
        s_rate = summary["service"]["mb_s"]
        if s_rate is None or curl_rate is None:
            out("  goal: service >= 0.8x curl CLI MB/s: cannot judge, a run failed")
        else:
            out(
                f"  goal: service >= 0.8x curl CLI MB/s: {s_rate / curl_rate:.2f}x "
                f"{verdict(s_rate >= 0.8 * curl_rate)}; against curl then sync "
                f"{ratio(s_rate, summary['curl+sync']['mb_s'])}, against the disk's synced "
                f"speed {ratio(s_rate, disk)}"
            )
        out(f"  {probe.summary()}")
        self.record["sbig"] = {
            "summary": summary,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }

    def _sbig_curl(self, url: str, n: int, c: int, out_dir: Path) -> tuple[Run, Run]:
        """curl -o into files, checked; and the same with the time of a ``sync`` after it
        (what durability costs curl)."""
        out_dir.mkdir()
        try:
            pairs = [(f"{url}?i={i}", str(out_dir / f"body-{i:05d}")) for i in range(n)]
            run = run_curl_cli(pairs, c, self.work / "sbig.cfg", 600)
            started = time.monotonic()
            os.sync()
            sync_wall = time.monotonic() - started
            sizes = body_sizes(out_dir, n)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
            os.sync()
        judge_bodies(run, sizes, SBIG_SIZE, counted_here=True)
        synced = Run(**{**asdict(run), "client": "curl+sync", "wall": run.wall + sync_wall})
        return run, synced

    def _disk_synced_mb_s(self) -> float:
        """dd of 512 MiB with fdatasync: what this disk takes durably, for scale."""
        path = self.work / "dd.bin"
        started = time.monotonic()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=512", "conv=fdatasync"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        wall = time.monotonic() - started
        path.unlink()
        os.sync()
        return 512 * MIB / 1e6 / wall

    # (p) ----------------------------------------------------------------------------------

    def scale(self) -> None:
        p = self.plan
        c = SCALE_CONCURRENCY
        out(
            f"(p) scale-out: (s)'s job mix, {p.service_n:,} jobs of 1 KiB submitted to the "
            f"first instance; SQLite with one instance against 1, 2 and 3 instances on one "
            f"PostgreSQL (--max-concurrency {c} each, per-host cap {c} x instances, shared "
            f"bodies directory); {p.rounds} rounds"
        )
        database = os.environ.get("CURLFETCH_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
        try:
            import psycopg

            psycopg.connect(database, connect_timeout=3).close()
        except Exception as e:
            out(f"  skipped: PostgreSQL at {database} does not answer ({e})")
            return
        probe = self.probe()
        runs: dict[str, list[Run]] = {name: [] for name in SCALE_CONFIGS}
        for r in range(p.rounds):
            for name in rotated(list(SCALE_CONFIGS), r):
                backend, instances = SCALE_CONFIGS[name]
                argv = [
                    "--url", self.url(SMALL_FILE), "-n", str(p.service_n),
                    "--batch", str(p.service_batch), "--posts", str(p.service_posts),
                    "-c", str(c), "--expect-size", str(KIB), "--work", str(self.work),
                    "--timeout", "500", "--backend", backend, "--instances", str(instances),
                    "--database", database, *self.service_args,
                ]  # fmt: skip
                run = run_python_client("scale", argv, 600, script=BENCH / "scale_bench.py")
                pg = run.extra.get("postgres_cpu")
                pg_text = (
                    f"  postgres CPU {pg:5.2f} s" if pg is not None and backend != "sqlite" else ""
                )
                out(f"  round {r + 1} {name:<12} {_service_line(run)}{pg_text}")
                runs[name].append(run)

        out()

        def pg_us_per_job(run: Run) -> float:
            return float(run.extra.get("postgres_cpu", 0.0)) / run.n * 1e6

        base = med(runs["sqlite x1"], req_per_s)
        rows = []
        summary: dict[str, Any] = {}
        for name, mine in runs.items():
            rate, cpu = med(mine, req_per_s), med(mine, cpu_us_per_req)
            pg = med(mine, pg_us_per_job) if name != "sqlite x1" else None
            rows.append(
                [
                    name,
                    fmt(rate, ",.0f") + spread(values(mine, req_per_s)),
                    fmt(med(mine, lambda x: x.wall), ".2f"),
                    fmt(cpu, ",.0f"),
                    fmt(pg, ",.0f") if pg is not None else "-",
                    ratio(rate, base),
                ]
            )
            summary[name] = {"per_s": rate, "cpu_us_per_job": cpu, "postgres_cpu_us_per_job": pg}
        out(
            f"  medians over {p.rounds} round(s): first POST to the last job's finished_at; "
            "CPU of all instances together; postgres: its server processes' CPU meanwhile"
        )
        table(["store", "jobs/s", "wall s", "CPU µs/job", "postgres µs/job", "vs SQLite x1"], rows)
        out(f"  {probe.summary()}")
        self.record["p"] = {
            "summary": summary,
            "runs": {k: [asdict(x) for x in v] for k, v in runs.items()},
        }

    # (rv) ---------------------------------------------------------------------------------

    def revalidate(self) -> None:
        """What conditional revalidation saves a monitor: pages that did not change,
        revalidated (304s, nothing stored) against the same pages fetched again."""
        p = self.plan
        n, c = p.reval_n, min(p.service_concurrency, CURL_PARALLEL_MAX)
        out(
            f"(rv) conditional revalidation: {n:,} pages of {PAGE_SIZE // KIB} KiB on nginx "
            f"(its ETag and Last-Modified, unchanged), one batch of {n:,} jobs (POST "
            f"/v1/batches) per phase: full (unconditional, cold), revalidate (each job "
            f"`revalidate`s the full job of its page), full again (warm), revalidate again "
            f"(of the revalidations); twistd curlfetch --max-concurrency {c}, a fresh one per "
            f"round; {p.rounds} rounds"
        )
        probe = self.probe()
        runs: list[Run] = []
        for r in range(p.rounds):
            argv = [
                "--url", self.url(f"{PAGES_DIR}/"), "-n", str(n), "-c", str(c),
                "--expect-size", str(PAGE_SIZE), "--access-log", str(self.pages_log),
                "--work", str(self.work), "--timeout", "180", *self.service_args,
            ]  # fmt: skip
            run = run_python_client("revalidate", argv, 300, script=BENCH / "revalidate_bench.py")
            runs.append(run)
            phases = run.extra.get("phases") or []
            for phase in phases:
                out(f"  round {r + 1} {phase['name']:<16} {_phase_line(phase)}")
            if not phases or run.errors or run.failed:
                out(f"  round {r + 1} {describe_failure(run) or 'no result'}")

        out()
        good = clean(runs)
        names = [phase["name"] for phase in (good[0].extra["phases"] if good else [])]

        def phase_median(name: str, metric: Callable[[dict[str, Any]], float]) -> float | None:
            return median(
                [metric(ph) for run in good for ph in run.extra["phases"] if ph["name"] == name]
            )

        def target(key: str) -> Callable[[dict[str, Any]], float]:
            return lambda ph: float((ph["target"] or {}).get(key, 0))

        def status(code: str) -> Callable[[dict[str, Any]], float]:
            return lambda ph: float((ph["target"] or {}).get("statuses", {}).get(code, 0))

        metrics: dict[str, Callable[[dict[str, Any]], float]] = {
            "jobs_s": lambda ph: float(ph["jobs_s"]),
            "wall": lambda ph: float(ph["wall"]),
            "submit_wall": lambda ph: float(ph["submit_wall"]),
            "cpu_us_per_job": lambda ph: ph["cpu"] / ph["jobs"] * 1e6,
            "target_200": status("200"),
            "target_304": status("304"),
            "target_body_bytes": target("body_bytes"),
            "target_bytes": target("bytes"),
            "downloaded": lambda ph: float(ph["downloaded"]),
            "stored": lambda ph: float(ph["stored"]),
            "stored_by_jobs": lambda ph: float(ph["stored_by_jobs"]),
        }
        summary: dict[str, dict[str, float | None]] = {
            name: {key: phase_median(name, metric) for key, metric in metrics.items()}
            for name in names
        }
        rows = []
        for name in names:
            m = summary[name]
            rates = [
                float(ph["jobs_s"]) for x in good for ph in x.extra["phases"] if ph["name"] == name
            ]
            rows.append(
                [
                    name,
                    f"{n:,}",
                    fmt(m["wall"], ".2f"),
                    fmt(m["submit_wall"], ".2f"),
                    fmt(m["jobs_s"], ",.0f") + spread(rates),
                    fmt(m["cpu_us_per_job"], ",.0f"),
                    f"{fmt(m['target_200'], ',.0f')} / {fmt(m['target_304'], ',.0f')}",
                    fmt(m["target_body_bytes"], ",.0f"),
                    fmt(m["target_bytes"], ",.0f"),
                    fmt(m["downloaded"], ",.0f"),
                    fmt(m["stored"], ",.0f"),
                ]
            )
        out(
            f"  medians over {len(good)} clean round(s) of {p.rounds}; wall: POST to the last "
            "job's finished_at; POST: sent to 201 read (revalidations look the earlier jobs "
            "up there); CPU: the twistd process's; sent: nginx's access log "
            "($body_bytes_sent, $bytes_sent); downloaded: curlfetch_downloaded_bytes_total's "
            "growth; stored: the body store's growth on disk (segments)"
        )
        table(
            [
                "phase", "jobs", "wall s", "POST s", "jobs/s", "CPU µs/job", "target 200/304",
                "body bytes sent", "bytes sent", "downloaded", "bytes stored",
            ],
            rows,
        )  # fmt: skip
        out()
        base = summary.get("full again")
        for name in ("revalidate", "revalidate again"):
            mine = summary.get(name)
            if base is None or mine is None:
                out(f"  {name} vs full again: cannot judge, a run failed")
                continue
            out(
                f"  {name} vs full again: jobs/s {ratio(mine['jobs_s'], base['jobs_s'])}, "
                f"CPU per job {ratio(mine['cpu_us_per_job'], base['cpu_us_per_job'])}, "
                f"bytes sent by the target {_share(mine['target_bytes'], base['target_bytes'])} "
                f"(body bytes {_share(mine['target_body_bytes'], base['target_body_bytes'])}), "
                f"bytes stored {_share(mine['stored'], base['stored'])}"
            )
        cold, first = summary.get("full"), summary.get("revalidate")
        if cold is not None and first is not None:
            out(
                f"  (revalidate vs the cold first full phase: jobs/s "
                f"{ratio(first['jobs_s'], cold['jobs_s'])})"
            )
        lags = [ph["observed_wall"] - ph["wall"] for x in good for ph in x.extra["phases"]]
        if lags:
            late = sum(1 for lag in lags if lag > 0.5)
            out(
                f"  the batch long-poll (GET /v1/batches/{{id}}?wait=) answered {min(lags):.2f}-"
                f"{max(lags):.2f} s after the last job's finished_at (median "
                f"{fmt(median(lags), '.2f')} s); over 0.5 s late in {late} of {len(lags)} phases"
            )
        out()
        self._revalidate_checks(runs, n)
        out(f"  {probe.summary()}")
        self.record["rv"] = {"summary": summary, "runs": [asdict(x) for x in runs]}

    @property
    def pages_log(self) -> Path:
        """(rv): nginx's access log of the pages (``NGINX_CONF``)."""
        return self.work / "nginx" / "pages.log"

    def _revalidate_checks(self, runs: Sequence[Run], n: int) -> None:
        """The verdicts on correctness, over every round (a failed one included)."""
        finished = [x for x in runs if not x.failed and x.extra.get("phases")]
        phases = [ph for x in finished for ph in x.extra["phases"]]
        reval = [ph for ph in phases if ph["name"].startswith("revalidate")]
        full = [ph for ph in phases if not ph["name"].startswith("revalidate")]
        every = len(finished) == len(runs) and bool(reval) and bool(full)
        reval_ok = sum(ph["ok"] for ph in reval)
        out(
            f"  {pass_fail(every and reval_ok == n * len(reval))}: every revalidation job "
            f"succeeded with HTTP 304, not_modified true, body_of = the full job of its page, "
            f"that job's body (size, sha256) and ETag: {reval_ok:,}/{n * len(reval):,}"
        )
        full_ok = sum(ph["ok"] for ph in full)
        out(
            f"  {pass_fail(every and full_ok == n * len(full))}: every unconditional job "
            f"succeeded with HTTP 200, {PAGE_SIZE:,} body bytes, ETag and Last-Modified: "
            f"{full_ok:,}/{n * len(full):,}"
        )
        quiet = all(
            (ph["target"] or {}).get("statuses") == {"304": n}
            and ph["target"]["body_bytes"] == 0
            and ph["downloaded"] == 0
            and ph["stored"] == 0
            for ph in reval
        )
        out(
            f"  {pass_fail(every and quiet)}: for revalidations the target answered only "
            f"304s and sent no body bytes, the service downloaded and stored none"
        )
        compared = sum(x.extra.get("bodies_compared", 0) for x in finished)
        problems = [p for x in finished for p in x.extra.get("body_problems", [])]
        out(
            f"  {pass_fail(every and compared > 0 and not problems)}: revalidation jobs' "
            f"bodies read through GET /v1/jobs/{{id}}/body are the full job's bytes "
            f"({compared} compared{', first problem: ' + problems[0] if problems else ''})"
        )


def _service_line(run: Run) -> str:
    if run.failed or not run.wall:
        return describe_failure(run) or "no result"
    e = run.extra
    sub, term = e.get("submit_latency") or {}, e.get("to_terminal_latency") or {}

    def ms(d: dict[str, float], q: str) -> str:
        return f"{d[q] * 1000:.0f}" if q in d else "-"

    def sec(d: dict[str, float], q: str) -> str:
        return f"{d[q]:.1f}" if q in d else "-"

    return (
        f"{req_per_s(run):>7,.0f} jobs/s  wall {run.wall:5.1f} s  service CPU {run.cpu:5.2f} s "
        f"({cpu_us_per_req(run):.0f} µs/job)  submit p50/p99 {ms(sub, 'p50')}/{ms(sub, 'p99')} ms"
        f"  to terminal p50/p99 {sec(term, 'p50')}/{sec(term, 'p99')} s  {describe_failure(run)}"
    ).rstrip()


def _phase_line(phase: dict[str, Any]) -> str:
    """One phase of (rv) in one round."""
    sent = phase.get("target") or {}
    statuses = ", ".join(f"{k} x{v:,}" for k, v in sorted(sent.get("statuses", {}).items()))
    return (
        f"{phase['jobs_s']:>7,.0f} jobs/s  wall {phase['wall']:5.2f} s  "
        f"CPU {phase['cpu'] / phase['jobs'] * 1e6:5,.0f} µs/job  target: {statuses or '-'}, "
        f"{sent.get('bytes', 0):>10,} bytes sent  downloaded {phase['downloaded']:>10,}  "
        f"stored {phase['stored']:>10,}  {phase['ok']:,}/{phase['jobs']:,} ok"
    )


def _share(part: float | None, whole: float | None) -> str:
    """``part`` as a percentage of ``whole``, with both: bytes are easier read so."""
    if part is None or whole is None:
        return "-"
    share = f"{part / whole * 100:.2f}%" if whole else "-"
    return f"{share} ({part:,.0f} vs {whole:,.0f})"


# -- main -----------------------------------------------------------------------------------


def versions() -> str:
    import pycurl

    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, check=False, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().split("\n")[0]

    curl = " ".join(first_line(["curl", "--version"]).split()[:2])
    packages = ", ".join(f"{name} {version(name)}" for name in ("Twisted", "aiohttp", "treq"))
    return (
        f"python {platform.python_version()}, {pycurl.version}\n"
        f"  {packages}; {first_line(['nginx', '-v']).replace('nginx version: ', '')}; "
        f"curl CLI: {curl}"
    )


WORKLOADS = ("a", "b", "c", "d", "s", "shook", "sbig", "p", "rv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one round: a smoke check")
    parser.add_argument(
        "--only",
        default="a,b,c,d,s,shook,sbig",
        help="workloads to run, e.g. a,b or s,sbig; p (scale-out) and rv (revalidation) "
        "only if named",
    )
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="(s, s-big, p, rv) one more twistd curlfetch option for every service run, "
        "repeatable: --service-arg=--body-compression=gzip",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="(s) no extra py-spy run of the service when its target is missed",
    )
    args = parser.parse_args(argv)
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    if not only or not only <= set(WORKLOADS):
        parser.error(f"--only takes a comma-separated subset of {','.join(WORKLOADS)}")
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    raise_nofile_limit()

    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out(
        f"curlfetch bench {'--quick ' if args.quick else ''}{time.strftime('%Y-%m-%d %H:%M:%S')} "
        f"on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    out(f"  {versions()}")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"tmp-{stamp}-", dir=results))
    record: dict[str, Any] = {}
    try:
        pages = plan.reval_n if "rv" in only else 0
        server = nginx(work / "nginx", big="b" in only, sbig="sbig" in only, pages=pages)
        with server as (port, proc):
            out(f"  nginx: 1 worker on 127.0.0.1:{port}, keep-alive, access log off")
            out(f"  work dir {work}")
            profile_to = None if args.no_profile else results / f"{stamp}-service-profile.txt"
            bench = Bench(plan, port, work, proc.pid, profile_to, args.service_arg)
            steps = {
                "a": bench.small,
                "b": bench.big,
                "c": bench.slow,
                "d": bench.soak,
                "s": bench.service,
                "shook": bench.service_hooks,
                "sbig": bench.service_big,
                "p": bench.scale,
                "rv": bench.revalidate,
            }
            for key in WORKLOADS:
                if key in only:
                    out()
                    steps[key]()
            record = bench.record
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (results / f"{stamp}.json").write_text(json.dumps(record, indent=1))
    out()
    out(
        f"done in {time.monotonic() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}; "
        f"raw results in bench/results/{stamp}.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
