"""The body store in a real ``twistd curlfetch``: a 200 MiB body streams to disk, and
back out, with the process's memory bounded (RSS sampled while it transfers); a data
directory written by the file-per-body store keeps working when the service starts on
segments; and two instances on one PostgreSQL and one data directory serve each other's
bodies from segments named for their writers."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.interfaces import IPullProducer
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ..engine.servers import LoopbackSite, pattern_bytes
from ..service.backends import PostgresSchema, require_postgres
from .conftest import Daemon, Daemons, sleep

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


class _RssSampler:
    """Samples a process's VmRSS every ``every`` seconds in a thread of its own (so a
    busy reactor, which also serves the target, does not thin the samples out)."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(_rss_kib(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.samples)


def _sha256_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while data := f.read(4 * MIB):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


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
    daemons: Daemons, target: LoopbackSite, tmp_path: Path
) -> None:
    """A 200 MiB body is fetched by a real daemon while its RSS is sampled every 20 ms:
    the peak stays within 64 MiB of the RSS before the transfer (the body streams to a
    spill file and is copied into the segment in the kernel); the stored record has the
    body's sha256, and a range from its middle is served exactly. Serving the whole body
    back (GET .../body, 200 MiB to a file here) keeps the daemon within the same bound,
    and what it serves has the body's size and sha256."""
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
    with _RssSampler(pid) as fetching:
        view = await d.submit({"url": target.url("/big"), "timeout": 100})
        done = await d.wait_state(view["id"], {"succeeded", "failed"}, seconds=100)
    print(
        f"\n200 MiB body: RSS {baseline / 1024:.0f} MiB before, peak while fetching "
        f"{fetching.peak / 1024:.0f} MiB (+{(fetching.peak - baseline) / 1024:.0f} MiB), "
        f"{len(fetching.samples)} samples, fetch {done['result']['timings']['total']:.2f} s"
    )
    assert done["state"] == "succeeded", done
    body = done["result"]["body"]
    assert body["size"] == BIG_CHUNKS * MIB
    assert body["sha256"] == expected.hexdigest()
    assert len(fetching.samples) > 10
    assert fetching.peak - baseline < 64 * 1024, (baseline, fetching.peak)
    stored = _segment_payload_sha256(d, body["warc"], body["size"])
    assert stored == expected.hexdigest()
    first = 123 * MIB + 4567
    reply = await d.request(
        "GET", f"/v1/jobs/{view['id']}/body", headers=[("Range", f"bytes={first}-{first + 999}")]
    )
    assert reply.status == 206
    chunk = _chunk(first // MIB) + _chunk(first // MIB + 1)
    assert reply.body == chunk[first % MIB : first % MIB + 1000]

    copy = tmp_path / "served.bin"
    before = _rss_kib(pid)
    with _RssSampler(pid) as serving:
        started = time.monotonic()
        response = await d.client.fetch(
            d.url(f"/v1/jobs/{view['id']}/body"), sink=str(copy), timeout=100
        )
        took = time.monotonic() - started
    print(
        f"serving it: RSS {before / 1024:.0f} MiB before, peak {serving.peak / 1024:.0f} MiB "
        f"(+{(serving.peak - baseline) / 1024:.0f} MiB over the first baseline), "
        f"{len(serving.samples)} samples, {took:.2f} s"
    )
    assert response.status == 200
    assert _sha256_file(copy) == (BIG_CHUNKS * MIB, expected.hexdigest())
    assert len(serving.samples) > 10
    assert serving.peak - baseline < 64 * 1024, (baseline, serving.peak)
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
        stored = (await d.job(job_id))["result"]["body"]
        assert stored["sha256"] == hashlib.sha256(reply.body).hexdigest()
        assert stored["warc"] is None
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


@pytest.fixture
def schema(daemons: Daemons) -> Iterator[PostgresSchema]:
    """A throwaway schema on the test server, dropped after the daemons stop."""
    require_postgres()
    pg = PostgresSchema()
    try:
        yield pg
    finally:
        daemons.stop_all()
        pg.drop()


_WRITER = re.compile(r"^curlfetch-\d{8}T\d{12}Z-(store-[ab])-\d{5}\.warc(\.gz)?$")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_instances_on_postgresql_serve_each_others_bodies(
    daemons: Daemons, target: LoopbackSite, schema: PostgresSchema, tmp_path: Path
) -> None:
    """Two instances share one PostgreSQL schema and one data directory, one writing
    plain segments and one gzip ones: every job, whichever instance it was submitted to
    and whichever wrote its body, is served byte for byte by both (with a range from its
    middle), before and after the writer stops and seals its segment; each instance's
    segment files carry its own instance id and its own compression."""
    shared = tmp_path / "shared-data"
    made = []
    for name, compression in (("a", "none"), ("b", "gzip")):
        daemon = daemons.make(
            f"--database={schema.url}",
            f"--instance-id=store-{name}",
            f"--body-compression={compression}",
            "--max-concurrency=4",
            "--drain-timeout=1",
            name=name,
        )
        daemon.data_dir = shared
        made.append(daemon)
    a, b = made
    await a.start(30)
    await b.start(30)

    sizes: dict[str, int] = {}
    submitted: dict[str, str] = {}
    for daemon, name, offset in ((a, "a", 0), (b, "b", 1)):
        ns = [(400_000 if i % 20 == 0 else 50) + 7 * i + offset for i in range(0, 300, 2)]
        views = await daemon.submit_batch([{"url": target.url(f"/bytes?n={n}")} for n in ns])
        for view, n in zip(views, ns, strict=True):
            sizes[view["id"]] = n
            submitted[view["id"]] = name

    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    while len(done) < len(sizes):
        assert time.monotonic() < deadline, f"{len(sizes) - len(done)} jobs not done"
        for view in await b.all_jobs():
            if view["state"] in {"succeeded", "failed", "cancelled"}:
                done[view["id"]] = view
        await sleep(0.1)
    assert set(done) == set(sizes)
    assert all(v["state"] == "succeeded" for v in done.values())

    writer: dict[str, str] = {}
    for job_id, view in done.items():
        match = _WRITER.match(view["result"]["body"]["warc"]["segment"])
        assert match is not None, view["result"]["body"]
        writer[job_id] = match[1]
    pairs = Counter((submitted[j], writer[j]) for j in sizes)
    print(f"\n(submitted to, written by): {dict(pairs)}")
    assert set(writer.values()) == {"store-a", "store-b"}

    async def served_by_both(job_ids: list[str]) -> None:
        for job_id in job_ids:
            n = sizes[job_id]
            for daemon in (a, b):
                reply = await daemon.get(f"/v1/jobs/{job_id}/body")
                assert reply.status == 200, (job_id, reply.status, reply.body[:200])
                assert reply.body == pattern_bytes(n), (job_id, writer[job_id])
                ranged = await daemon.request(
                    "GET", f"/v1/jobs/{job_id}/body", headers=[("Range", f"bytes={n // 3}-")]
                )
                assert ranged.status == 206, (job_id, ranged.status)
                assert ranged.body == pattern_bytes(n)[n // 3 :]

    await served_by_both(list(sizes))

    files = sorted(p.name for p in (shared / "segments").glob("curlfetch-*"))
    on_disk = set()
    for name in files:
        match = _WRITER.match(name.removesuffix(".open"))
        assert match is not None, name
        assert name.removesuffix(".open").endswith(".gz") == (match[1] == "store-b"), name
        on_disk.add(match[1])
    assert on_disk == {"store-a", "store-b"}, files

    a.stop_blocking()
    files = sorted(p.name for p in (shared / "segments").glob("curlfetch-*"))
    assert not [n for n in files if "-store-a-" in n and n.endswith(".open")], files
    written_by_a = [j for j in sizes if writer[j] == "store-a"]
    for job_id in written_by_a:
        n = sizes[job_id]
        reply = await b.get(f"/v1/jobs/{job_id}/body")
        assert reply.status == 200, (job_id, reply.status)
        assert reply.body == pattern_bytes(n)
    print(f"segment files: {files}")
