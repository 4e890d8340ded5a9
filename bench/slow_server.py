"""A loopback HTTP server that answers every request after a fixed delay, for workload (c).

    python bench/slow_server.py --port P --delay 5

Prints ``READY <port>`` once listening. Every response is ``200`` with a 2-byte body and
``Connection: close``. Stops on SIGTERM or SIGINT, or by itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from bench.common import raise_nofile_limit

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class SlowProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._buffer = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        if b"\r\n\r\n" in self._buffer:
            self._answered = True
            self._buffer = b""
            self._timer = self._loop.call_later(self._delay, self._answer)

    def _answer(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(RESPONSE)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def serve(port: int, delay: float, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _set_done, stop)
    server = await loop.create_server(
        lambda: SlowProtocol(loop, delay), "127.0.0.1", port, backlog=16384, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop, max_seconds)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    raise_nofile_limit()
    asyncio.run(serve(args.port, args.delay, args.max_seconds))


if __name__ == "__main__":
    main()
