"""A minimal HTTP/3 server on aioquic for the protocol tests.

It runs as a subprocess because aioquic is built on asyncio while the tests run inside a
Twisted reactor (one event loop per thread, and the reactor owns the test's thread).

    python -m tests.service.h3server --cert CERT.pem --key KEY.pem [--port 0]

It binds UDP on 127.0.0.1 and prints ``port N`` (the bound port) as its first stdout
line. ``GET /hello`` answers 200 with ``BODY``; any other path answers 404. Every request
is logged on stdout as ``request N METHOD PATH`` (N counts from 1), so the test can count
what the server saw. It serves until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

BODY = b"hello over h3\n"

served = itertools.count(1)


class H3Protocol(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._h3: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        if self._h3 is None:
            return
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self._answer(h3_event)

    def _answer(self, event: HeadersReceived) -> None:
        assert self._h3 is not None
        fields = dict(event.headers)
        method = fields.get(b":method", b"").decode()
        path = fields.get(b":path", b"").decode()
        print(f"request {next(served)} {method} {path}", flush=True)
        found = method == "GET" and path == "/hello"
        body = BODY if found else b"not found\n"
        self._h3.send_headers(
            event.stream_id,
            [
                (b":status", b"200" if found else b"404"),
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        self._h3.send_data(event.stream_id, body, end_stream=True)
        self.transmit()


async def main(cert: str, key: str, port: int) -> None:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    configuration.load_cert_chain(cert, key)
    server = await serve("127.0.0.1", port, configuration=configuration, create_protocol=H3Protocol)
    assert server._transport is not None
    bound = server._transport.get_extra_info("sockname")[1]
    print(f"port {bound}", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--port", type=int, default=0, help="UDP port (0: any free one)")
    options = parser.parse_args()
    asyncio.run(main(options.cert, options.key, options.port))
