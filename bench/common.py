"""What every benchmark client process shares: its command line, its measurements, and the
one JSON line it prints for the harness.

A client process runs one workload and measures it from the inside, around the workload
only (not the interpreter's start-up or imports): wall time, user and system CPU, and
its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

WORKLOADS = ("many", "big", "slow", "soak")
"""many: small GETs (a); big: large GETs to files (b); slow: held transfers (c); soak (d)."""

RESULT_PREFIX = "RESULT "


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (20,000 on these machines)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


@dataclass
class ClientArgs:
    workload: str
    url: str
    n: int
    concurrency: int
    out_dir: str | None
    buffer_size: int
    expect_size: int
    timeout: float
    sample_every: int

    def out_path(self, index: int) -> str:
        assert self.out_dir is not None
        return os.path.join(self.out_dir, f"body-{index:05d}")


def parse_args(argv: list[str] | None = None) -> ClientArgs:
    parser = argparse.ArgumentParser(description="one benchmark client run")
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, required=True, help="requests in all")
    parser.add_argument("-c", "--concurrency", type=int, required=True, help="in flight")
    parser.add_argument("--out-dir", help="big: write body i to OUT_DIR/body-i")
    parser.add_argument("--buffer-size", type=int, default=512 * 1024)
    parser.add_argument("--expect-size", type=int, default=-1, help="check each body's size")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--sample-every", type=int, default=10_000, help="soak: sample period")
    ns = parser.parse_args(argv)
    if ns.workload == "big" and not ns.out_dir:
        parser.error("big needs --out-dir")
    return ClientArgs(
        workload=ns.workload,
        url=ns.url,
        n=ns.n,
        concurrency=ns.concurrency,
        out_dir=ns.out_dir,
        buffer_size=ns.buffer_size,
        expect_size=ns.expect_size,
        timeout=ns.timeout,
        sample_every=ns.sample_every,
    )


def log_twisted_warnings() -> None:
    """Send Twisted log events at warn level and above to stderr (the engine logs its
    internal failures there); the harness shows the tail when a run has errors."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def rss_kb() -> int:
    """Current resident set size of this process, in KiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Result:
    """What a client reports; ``ok`` counts responses that passed the workload's check."""

    client: str
    workload: str
    n: int
    concurrency: int
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    bytes: int = 0
    wall: float = 0.0
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    maxrss_kb: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self, what: object) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = str(what)[:300]


class Meter:
    """Wall clock and this process's CPU, from ``start()`` to ``stop()``."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._ru0: resource.struct_rusage | None = None

    def start(self) -> None:
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()

    def stop(self, result: Result) -> None:
        wall = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        assert self._ru0 is not None
        result.wall = wall
        result.cpu_user = ru.ru_utime - self._ru0.ru_utime
        result.cpu_sys = ru.ru_stime - self._ru0.ru_stime
        result.maxrss_kb = ru.ru_maxrss


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """Percentiles of per-request latency (seconds), for the held-transfer workload."""
    if not latencies:
        return {}
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pct(0.5), "p99": pct(0.99), "max": ordered[-1]}


def emit(result: Result) -> None:
    """Print the result as the one line the harness reads."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(asdict(result)) + "\n")
    sys.stdout.flush()
