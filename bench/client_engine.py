"""The curlfetch engine as a benchmark client, on the epoll reactor.

    python bench/client_engine.py many|big|slow|soak --url URL -n N -c C [...]

Every fetch builds the engine's full ``Response`` (status, headers, timings...); bodies
are kept in memory, or for ``big`` written to files with ``sink=path``.
"""

from __future__ import annotations

import gc
from typing import Any

from bench.common import (
    ClientArgs,
    Meter,
    Result,
    emit,
    fd_count,
    latency_summary,
    log_twisted_warnings,
    parse_args,
    raise_nofile_limit,
    rss_kb,
)
from bench.twisted_window import Window


async def run(reactor: Any, args: ClientArgs) -> None:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from curlfetch.engine import CurlClient, Response, require_async_dns

    require_async_dns()
    result = Result("engine", args.workload, args.n, args.concurrency)
    samples: list[tuple[int, int, int]] = []
    # Twisted opens its signal-handling pipe once the reactor runs: count after that.
    await task.deferLater(reactor, 0.05, lambda: None)
    gc.collect()
    fds_before = fd_count()
    client = CurlClient(reactor, max_concurrent=args.concurrency)

    def start(index: int) -> Deferred[Response]:
        if args.workload == "big":
            return client.fetch(
                args.url,
                sink=args.out_path(index),
                buffer_size=args.buffer_size,
                timeout=args.timeout,
            )
        return client.fetch(args.url, timeout=args.timeout)

    def check(index: int, response: Response) -> str | None:
        size = response.size_download if response.body is None else len(response.body)
        result.bytes += size
        if response.status != 200:
            return f"#{index}: HTTP {response.status}"
        if args.expect_size >= 0 and size != args.expect_size:
            return f"#{index}: {size} bytes, expected {args.expect_size}"
        return None

    def sample(done: int) -> None:
        samples.append((done, rss_kb(), fd_count()))

    soak = args.workload == "soak"
    window = Window(
        reactor,
        result,
        start,
        check,
        progress_every=args.sample_every if soak else 0,
        on_progress=sample if soak else None,
        track_latency=args.workload == "slow",
    )
    meter = Meter()
    if soak:
        sample(0)
    meter.start()
    await window.run()
    meter.stop(result)
    fds_open = fd_count()
    stats = client.driver.stats
    driver = {
        "socket_actions": stats.socket_actions,
        "timer_fires": stats.timer_fires,
        "callback_errors": stats.callback_errors,
        "multi_errors": stats.multi_errors,
    }
    client.close()
    # Let the reactor process the removals, then count what is left.
    await task.deferLater(reactor, 0.2, lambda: None)
    gc.collect()
    result.extra = {
        "fds_before": fds_before,
        "fds_open": fds_open,
        "fds_after_close": fd_count(),
        "samples": samples,
        "driver": driver,
        "latency": latency_summary(window.latencies),
    }
    emit(result)


def main() -> None:
    args = parse_args()
    raise_nofile_limit()
    log_twisted_warnings()
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
