"""treq as a benchmark client: one ``HTTPClient`` on a persistent pool of C connections,
on the epoll reactor.

    python bench/client_treq.py many|big|slow --url URL -n N -c C [...]
"""

from __future__ import annotations

from typing import IO, Any

from bench.common import (
    ClientArgs,
    Meter,
    Result,
    emit,
    latency_summary,
    log_twisted_warnings,
    parse_args,
    raise_nofile_limit,
)
from bench.twisted_window import Window


async def run(reactor: Any, args: ClientArgs) -> None:
    import treq
    from treq.client import HTTPClient
    from twisted.internet.defer import Deferred
    from twisted.web.client import Agent, HTTPConnectionPool

    result = Result("treq", args.workload, args.n, args.concurrency)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.concurrency
    http = HTTPClient(Agent(reactor, pool=pool))

    def to_file(response: Any, index: int) -> Deferred[tuple[int, int]]:
        f: IO[bytes] = open(args.out_path(index), "wb")  # noqa: SIM115 - closed below
        size = 0

        def write(data: bytes) -> None:
            nonlocal size
            size += len(data)
            f.write(data)

        def done(value: object) -> object:
            f.close()
            return value

        d: Deferred[None] = treq.collect(response, write)
        d.addBoth(done)
        return d.addCallback(lambda _: (response.code, size))

    def in_memory(response: Any) -> Deferred[tuple[int, int]]:
        d: Deferred[bytes] = response.content()
        return d.addCallback(lambda body: (response.code, len(body)))

    def start(index: int) -> Deferred[tuple[int, int]]:
        if args.workload == "big":
            d = http.get(args.url, unbuffered=True, timeout=args.timeout)
            return d.addCallback(to_file, index)
        return http.get(args.url, timeout=args.timeout).addCallback(in_memory)

    def check(index: int, value: tuple[int, int]) -> str | None:
        status, size = value
        result.bytes += size
        if status != 200:
            return f"#{index}: HTTP {status}"
        if args.expect_size >= 0 and size != args.expect_size:
            return f"#{index}: {size} bytes, expected {args.expect_size}"
        return None

    meter = Meter()
    meter.start()
    window = Window(reactor, result, start, check, track_latency=args.workload == "slow")
    await window.run()
    meter.stop(result)
    result.extra["latency"] = latency_summary(window.latencies)
    await pool.closeCachedConnections()
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
