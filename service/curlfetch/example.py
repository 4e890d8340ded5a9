"""A small example fetch, run by ``scripts/run`` until the job service exists.

    python -m curlfetch.example [URL ...]

With no URL it starts a loopback server and fetches from it, so it works offline.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from curlfetch.engine import CurlClient, FetchError, require_async_dns


async def main(reactor: Any, urls: list[str]) -> None:
    port = None
    if not urls:
        root = Resource()
        root.putChild(b"hello", Data(b"hello from curlfetch\n", "text/plain"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        urls = [f"http://127.0.0.1:{port.getHost().port}/hello"]
    client = CurlClient(reactor)
    try:
        results = await defer.DeferredList(
            [client.fetch(url, timeout=30) for url in urls], consumeErrors=True
        )
        for url, (ok, result) in zip(urls, results, strict=True):
            if ok:
                t = result.timings
                print(
                    f"{result.status} {url} {len(result.body or b'')} bytes "
                    f"HTTP/{result.http_version} from {result.primary_ip}:{result.primary_port} "
                    f"in {t.total * 1000:.1f} ms (connect {t.connect * 1000:.1f} ms)"
                )
            else:
                err = cast(Failure, result).value
                detail = str(err) if isinstance(err, FetchError) else repr(err)
                print(f"FAILED {url}: {detail}")
    finally:
        client.close()
        if port is not None:
            await port.stopListening()


def run() -> None:
    require_async_dns()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))


if __name__ == "__main__":
    run()
