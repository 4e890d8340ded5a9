"""The body store in a real ``twistd curlfetch``: a 200 MiB body streams to disk with
the process's memory bounded (RSS sampled while it transfers), and a data directory
written by the file-per-body store keeps working when the service starts on segments."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import LoopingCall
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ..engine.servers import LoopbackSite, pattern_bytes
from .conftest import Daemon, Daemons, reactor

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
BIG_CHUNKS = 200


def _chunk(i: int) -> bytes:
    """1 MiB of content that differs per chunk (cheap: a digest repeated)."""
    return hashlib.sha256(b"%d" % i).digest() * (MIB // 32)


@implementer(IPullProducer)
class _Chunks:
    def __init__(self, request: Request, count: int) -> None:
        self.request = request
        self.left = count
        self.i = 0

    def resumeProducing(self) -> None:
        if self.left == 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.left -= 1
        self.i += 1
        self.request.write(_chunk(self.i - 1))

    def stopProducing(self) -> None:
        self.left = 0


class Big(resource.Resource):
    """``/big``: BIG_CHUNKS MiB generated as it is sent, never whole in memory."""

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", b"%d" % (BIG_CHUNKS * MIB))
        request.registerProducer(_Chunks(request, BIG_CHUNKS), False)
        return NOT_DONE_YET


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _segment_payload_sha256(d: Daemon, warc: dict[str, Any], size: int) -> str:
    """The payload's sha256, read from the segment file itself."""
    root = d.data_dir / "segments"
    path = root / warc["segment"]
    if not path.exists():
        path = root / (warc["segment"] + ".open")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(warc["offset"] + warc["payload_at"])
        left = size
        while left:
            data = f.read(min(left, 4 * MIB))
            assert data, "the record ends early"
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_200_mib_body_streams_to_disk_with_memory_bounded(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """A 200 MiB body is fetched by a real daemon while its RSS is sampled every 20 ms:
    the peak stays within 64 MiB of the RSS before the transfer (the body streams to a
    spill file and is copied into the segment in the kernel); the stored record has the
    body's sha256, and a range from its middle is served exactly."""
    target.root.putChild(b"big", Big())
    expected = hashlib.sha256()
    for i in range(BIG_CHUNKS):
        expected.update(_chunk(i))
    d = await daemons.start("--max-body-size=256MiB", "--drain-timeout=1")
    assert d.proc is not None
    pid = d.proc.pid
    warm = await d.submit({"url": target.url("/bytes?n=300000")})
    await d.wait_state(warm["id"], {"succeeded"})
    baseline = _rss_kib(pid)
    samples: list[int] = []
    sampler = LoopingCall(lambda: samples.append(_rss_kib(pid)))
    sampler.clock = reactor()
    sampler.start(0.02)
    try:
        view = await d.submit({"url": target.url("/big"), "timeout": 100})
        done = await d.wait_state(view["id"], {"succeeded", "failed"}, seconds=100)
    finally:
        sampler.stop()
    peak = max(samples)
    print(
        f"\n200 MiB body: RSS {baseline / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB "
        f"(+{(peak - baseline) / 1024:.0f} MiB), {len(samples)} samples, "
        f"fetch {done['result']['timings']['total']:.2f} s"
    )
    assert done["state"] == "succeeded", done
    body = done["result"]["body"]
    assert body["size"] == BIG_CHUNKS * MIB
    assert body["sha256"] == expected.hexdigest()
    assert len(samples) > 10
    assert peak - baseline < 64 * 1024, (baseline, peak)
    stored = _segment_payload_sha256(d, body["warc"], body["size"])
    assert stored == expected.hexdigest()
    first = 123 * MIB + 4567
    reply = await d.request(
        "GET", f"/v1/jobs/{view['id']}/body", headers=[("Range", f"bytes={first}-{first + 999}")]
    )
    assert reply.status == 206
    chunk = _chunk(first // MIB) + _chunk(first // MIB + 1)
    assert reply.body == chunk[first % MIB : first % MIB + 1000]
    assert _rss_kib(pid) - baseline < 64 * 1024


@pytest_twisted.ensureDeferred
async def test_a_file_store_data_dir_keeps_working_on_segments(
    daemons: Daemons, target: LoopbackSite, tmp_path: Path
) -> None:
    """Bodies written by ``--body-store files`` (one file each, the store of earlier
    versions) are served byte for byte, with ranges, after the service restarts on the
    default segment store on the same data directory; new bodies go to segments; a WARC
    export holds both (the old ones in records built around them)."""
    d = await daemons.start("--body-store=files", "--drain-timeout=1")
    sizes = (10, 5000, 300_000, 1_000_000)
    old = []
    for n in sizes:
        view = await d.submit({"url": target.url(f"/bytes?n={n}")})
        done = await d.wait_state(view["id"], {"succeeded"})
        assert done["result"]["body"]["warc"] is None
        old.append((done["id"], n))
    d.stop_blocking()
    files = [p for p in (d.data_dir / "bodies").rglob("*") if p.is_file()]
    assert len(files) == len(sizes)
    assert not any((d.data_dir / "segments").glob("curlfetch-*"))

    d.args = ["--drain-timeout=1"]
    await d.start()
    for job_id, n in old:
        reply = await d.get(f"/v1/jobs/{job_id}/body")
        assert reply.status == 200, (job_id, reply.status)
        assert reply.body == pattern_bytes(n)
        ranged = await d.request(
            "GET", f"/v1/jobs/{job_id}/body", headers=[("Range", f"bytes={n // 2}-")]
        )
        assert ranged.status == 206
        assert ranged.body == pattern_bytes(n)[n // 2 :]
    view = await d.submit({"url": target.url("/bytes?n=777")})
    new = await d.wait_state(view["id"], {"succeeded"})
    assert new["result"]["body"]["warc"]["segment"].startswith("curlfetch-")
    assert (await d.get(f"/v1/jobs/{view['id']}/body")).body == pattern_bytes(777)

    export = await d.get("/v1/jobs/export.warc", seconds=30)
    assert export.status == 200
    assert export.body.count(b"WARC-Type: response") == len(sizes) + 1
    assert b"export-responses: 1\r\n" in export.body
    assert b"export-responses-built: 4\r\n" in export.body
    assert b"export-complete: true\r\n" in export.body
