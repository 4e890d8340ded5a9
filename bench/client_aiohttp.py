"""aiohttp as a benchmark client: one ``ClientSession`` on ``TCPConnector(limit=C)``, C
worker tasks, on asyncio's default event loop.

    python bench/client_aiohttp.py many|big|slow --url URL -n N -c C [...]
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench.common import (
    ClientArgs,
    Meter,
    Result,
    emit,
    latency_summary,
    parse_args,
    raise_nofile_limit,
)


async def run(args: ClientArgs) -> None:
    result = Result("aiohttp", args.workload, args.n, args.concurrency)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    next_index = 0
    track = args.workload == "slow"
    latencies: list[float] = []

    async def fetch(session: aiohttp.ClientSession, index: int) -> tuple[int, int]:
        async with session.get(args.url) as response:
            if args.workload != "big":
                return response.status, len(await response.read())
            size = 0
            # Blocking writes, as every client here does: they land in the page cache.
            with open(args.out_path(index), "wb") as f:  # noqa: ASYNC230
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    f.write(chunk)
            return response.status, size

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < args.n:
            index = next_index
            next_index += 1
            t0 = time.perf_counter() if track else 0.0
            try:
                status, size = await fetch(session, index)
            except Exception as e:
                result.error(f"#{index}: {type(e).__name__}: {e}")
                continue
            finally:
                if track:
                    latencies.append(time.perf_counter() - t0)
            result.bytes += size
            if status != 200:
                result.error(f"#{index}: HTTP {status}")
            elif args.expect_size >= 0 and size != args.expect_size:
                result.error(f"#{index}: {size} bytes, expected {args.expect_size}")
            else:
                result.ok += 1

    meter = Meter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        meter.start()
        workers = min(args.concurrency, args.n)
        await asyncio.gather(*(worker(session) for _ in range(workers)))
        meter.stop(result)
    result.extra["latency"] = latency_summary(latencies)
    emit(result)


def main() -> None:
    args = parse_args()
    raise_nofile_limit()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
