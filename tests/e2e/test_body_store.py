"""The body store in a real ``twistd curlfetch``: a 200 MiB body streams to disk, and
back out, with the process's memory bounded (RSS sampled while it transfers); a data
directory written by the file-per-body store keeps working when the service starts on
segments; and two instances on one PostgreSQL and one data directory serve each other's
bodies from segments named for their writers."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.interfaces import IPullProducer
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request
from warcio.archiveiterator import ArchiveIterator
from zope.interface import implementer

from ..engine.servers import LoopbackSite, pattern_bytes
from ..service.backends import PostgresSchema
from .conftest import Daemon, Daemons, append_half_record, rss_kib, segment_file, sleep

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
            self.samples.append(rss_kib(self.pid))
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
    path = segment_file(d.data_dir, warc["segment"])
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
    baseline = rss_kib(pid)
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
    before = rss_kib(pid)
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
    assert rss_kib(pid) - baseline < 64 * 1024


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


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_killed_instances_open_segment_is_served_by_the_other(
    daemons: Daemons, target: LoopbackSite, schema: PostgresSchema, tmp_path: Path
) -> None:
    """On one PostgreSQL and one data directory, ``kill -9`` of instance A mid-stream
    leaves its segment ``.open`` with a torn tail (half a record appended here, as a kill
    between two writes leaves it): instance B serves every body A had stored, from that
    open segment, byte for byte. A restarted with the same ``--instance-id`` cuts the
    tail and seals the segment at once, takes back its jobs, and every job ends with its
    body served by both; every segment is then valid WARC and none is left open."""
    shared = tmp_path / "shared-data"
    common = (f"--database={schema.url}", "--max-concurrency=8", "--drain-timeout=1")
    a = daemons.make(*common, "--instance-id=store-a", name="a")
    b = daemons.make(*common, "--instance-id=store-b", name="b")
    a.data_dir = b.data_dir = shared
    await a.start(30)

    sizes: dict[str, int] = {}
    ns = [(MIB if i % 100 == 50 else 300_000 if i % 40 == 0 else 100) + 3 * i for i in range(1500)]

    def url(n: int) -> str:  # the 1 MiB ones trickle in: mid-spill at the kill
        if n >= MIB:
            return target.url(f"/stream?n={n}&chunk=65536&delay=0.05")
        return target.url(f"/bytes?n={n}")

    for start in range(0, len(ns), 500):
        batch = ns[start : start + 500]
        views = await a.submit_batch([{"url": url(n)} for n in batch])
        sizes.update((view["id"], n) for view, n in zip(views, batch, strict=True))

    def succeeded() -> list[tuple[str, dict[str, Any]]]:
        rows = schema.execute("SELECT id, result FROM jobs WHERE state = 'succeeded'")
        return [(i, r["body"] if isinstance(r, dict) else json.loads(r)["body"]) for i, r in rows]

    deadline = time.monotonic() + 30
    while len(succeeded()) < 300:
        assert time.monotonic() < deadline, "A stored too few bodies"
        await sleep(0.02)
    assert a.proc is not None
    killed_pid = a.proc.pid
    a.kill()
    promised = succeeded()
    spilled = sorted(p.name for p in (shared / "segments" / "spool").iterdir())
    assert len(promised) < len(sizes), "A finished everything before the kill"
    segments = shared / "segments"
    left_open = [p for p in segments.glob("curlfetch-*-store-a-*.open")]
    assert len(left_open) == 1, left_open
    sealed = left_open[0].name.removesuffix(".open")
    warc = next(body["warc"] for _, body in promised if body["warc"]["segment"] == sealed)
    torn = append_half_record(left_open[0], warc)

    await b.start(30)
    for job_id, body in promised:
        assert body["warc"]["segment"] == sealed
        reply = await b.get(f"/v1/jobs/{job_id}/body")
        assert reply.status == 200, (job_id, reply.status, reply.body[:200])
        assert reply.body == pattern_bytes(sizes[job_id]), job_id
    print(f"\nB served {len(promised)} bodies from A's open segment {left_open[0].name}")

    await a.start(30)
    assert not left_open[0].exists()
    assert (segments / sealed).is_file()
    assert f"recovered 1 open segments ({torn} bytes of torn tail cut)" in a.log()

    deadline = time.monotonic() + 60
    while True:
        states = Counter(s for (s,) in schema.execute("SELECT state FROM jobs"))
        if states["succeeded"] == len(sizes):
            break
        assert not set(states) - {"queued", "running", "succeeded"}, states
        assert time.monotonic() < deadline, states
        await sleep(0.1)
    for job_id, n in sizes.items():
        for daemon in (a, b):
            reply = await daemon.get(f"/v1/jobs/{job_id}/body")
            assert reply.status == 200, (job_id, reply.status, reply.body[:200])
            assert reply.body == pattern_bytes(n), job_id

    a.stop_blocking()
    b.stop_blocking()
    records = 0
    for path in sorted(segments.glob("curlfetch-*")):
        assert not path.name.endswith(".open"), path.name
        for record in ArchiveIterator(io.BytesIO(path.read_bytes()), check_digests=True):
            record.content_stream().read()
            records += 1
    spool = sorted(p.name for p in (segments / "spool").iterdir())
    print(
        f"{records} records in the segments; spill files at the kill: {spilled}; "
        f"left in the shared spool after both stopped: {spool} (killed pid {killed_pid})"
    )
    assert records >= len(sizes)


@pytest_twisted.ensureDeferred
async def test_a_restart_with_the_same_instance_id_removes_its_spill_files(
    daemons: Daemons, target: LoopbackSite, schema: PostgresSchema
) -> None:
    """On PostgreSQL, an instance killed while a body is spilling and restarted with the
    same ``--instance-id`` removes the spill file it left (as it recovers its own open
    segment at once), before it is ready; the job is run again and succeeds."""
    d = await daemons.start(
        f"--database={schema.url}", "--instance-id=store-a", "--drain-timeout=1"
    )
    n = 4 * MIB
    view = await d.submit({"url": target.url(f"/stream?n={n}&chunk=65536&delay=0.05")})
    spool = d.data_dir / "segments" / "spool"
    deadline = time.monotonic() + 10
    while not any(spool.iterdir()):
        assert time.monotonic() < deadline, "the body never spilled"
        await sleep(0.02)
    assert d.proc is not None
    killed = f"~{d.proc.pid}-"
    d.kill()
    await d.start(30)
    left = [p.name for p in spool.iterdir() if killed in p.name]
    done = await d.wait_state(view["id"], {"succeeded", "failed"}, seconds=30)
    assert done["state"] == "succeeded", done
    assert (await d.get(f"/v1/jobs/{view['id']}/body")).body == pattern_bytes(n)
    assert left == [], left
