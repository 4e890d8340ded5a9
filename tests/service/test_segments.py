"""``SegmentBodyStore``: bodies as WARC/1.1 records in append-only segments, made durable
in groups. Every segment is read back by warcio (its iterator and ``warcio check``) and
FastWARC; recovery, roll-over, retention and damage are checked on real files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from fastwarc.warc import ArchiveIterator as FastIterator
from fastwarc.warc import WarcRecordType
from twisted.internet.defer import Deferred, gatherResults
from warcio.archiveiterator import ArchiveIterator

from curlfetch.bodies import BodyLostError, BodyStoreClosedError
from curlfetch.jobs import BodyInfo, JobResult, JobState, new_job_id
from curlfetch.segments import OPEN_SUFFIX, SegmentBodyStore
from curlfetch.services import SEGMENT_MARGIN, RetentionService
from curlfetch.warc import ResponseMeta, http_head

from .apiserver import sleep
from .backends import Backend
from .conftest import make_job, open_backend, reactor, within

WARCIO = os.path.join(os.path.dirname(sys.executable), "warcio")
KIB = 1024


def meta(url: str = "http://127.0.0.1:9/page") -> ResponseMeta:
    return ResponseMeta(
        target_uri=url,
        ip_address="127.0.0.1",
        date=time.time(),
        head=http_head([b"HTTP/1.1 200 OK\r\n", b"Content-Type: text/plain\r\n", b"\r\n"]),
    )


def body(size: int, seed: int = 0) -> bytes:
    """Distinct, incompressible-enough content of ``size`` bytes."""
    block = hashlib.sha256(b"%d" % seed).digest() * 64
    return (block * (size // len(block) + 1))[:size]


def make(root: Path, **options: Any) -> SegmentBodyStore:
    options.setdefault("instance", "test-node")
    return SegmentBodyStore(reactor(), root, **options)


@pytest_twisted.async_yield_fixture
async def opened(tmp_path: Path) -> AsyncIterator[list[SegmentBodyStore]]:
    """Stores a test opens; all closed afterwards."""
    made: list[SegmentBodyStore] = []
    yield made
    for store in made:
        await within(store.close())


async def put(store: SegmentBodyStore, data: bytes, url: str = "http://127.0.0.1:9/p") -> BodyInfo:
    writer = store.open_writer(new_job_id())
    for at in range(0, len(data), 64 * KIB):
        writer.write(data[at : at + 64 * KIB])
    return await within(writer.commit(meta(url)))


def segment_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("curlfetch-"))


def warcio_check(path: Path) -> None:
    """``warcio check`` passes: every record parses and every digest matches."""
    checked = subprocess.run(
        [WARCIO, "check", "-v", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "digest fail" not in checked.stdout


def read_payload(store: SegmentBodyStore, info: BodyInfo) -> bytes:
    reader = store.open_payload("job", info)
    try:
        return b"".join(iter(lambda: reader.read(100 * KIB), b""))
    finally:
        reader.close()


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest_twisted.ensureDeferred
async def test_segments_are_valid_warc_for_warcio_and_fastwarc(
    tmp_path: Path, opened: list[SegmentBodyStore], compression: str
) -> None:
    """A segment is a warcinfo record naming curlfetch, then one response record per
    body with the WARC fields the README promises and a sha256 payload digest; warcio's
    iterator and ``warcio check`` and FastWARC read it; each row's offset and length is
    exactly its record (a gzip member alone, in ``.warc.gz``)."""
    store = make(tmp_path, compression=compression)
    opened.append(store)
    sizes = [0, 10, 5000, 300 * KIB]
    datas = [body(n, i) for i, n in enumerate(sizes)]
    infos = [await put(store, d, f"http://127.0.0.1:9/{i}") for i, d in enumerate(datas)]
    await within(store.close())

    files = segment_files(tmp_path)
    assert len(files) == 1
    path = files[0]
    suffix = ".warc.gz" if compression == "gzip" else ".warc"
    assert path.name.endswith(suffix)
    assert "-test-node-" in path.name
    raw = path.read_bytes()
    for info, data in zip(infos, datas, strict=True):
        assert info.segment == path.name
        assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        record = raw[info.offset : info.offset + info.length]
        if compression == "gzip":
            d = zlib.decompressobj(31)
            record = d.decompress(record)
            assert d.eof
            assert not d.unused_data
        assert record.startswith(b"WARC/1.1\r\n")
        assert record.endswith(b"\r\n\r\n")
        assert record[info.payload_at : info.payload_at + info.size] == data
        assert read_payload(store, info) == data

    records = list(ArchiveIterator(io.BytesIO(raw), check_digests=True))
    assert [r.rec_type for r in records] == ["warcinfo"] + ["response"] * len(datas)
    # warcio reads lazily: read each payload as it is reached.
    seen = []
    for record in ArchiveIterator(io.BytesIO(raw), check_digests=True):
        payload = record.content_stream().read()
        if record.rec_type == "warcinfo":
            assert b"software: curlfetch/" in payload
            assert b"instance: test-node" in payload
            continue
        h = record.rec_headers
        for field in ("WARC-Record-ID", "WARC-Date", "WARC-Warcinfo-ID"):
            assert h.get_header(field)
        assert h.get_header("WARC-IP-Address") == "127.0.0.1"
        assert h.get_header("WARC-Payload-Digest").startswith("sha256:")
        assert record.http_headers.get_statuscode() == "200"
        seen.append((h.get_header("WARC-Target-URI"), payload))
    assert seen == [(f"http://127.0.0.1:9/{i}", d) for i, d in enumerate(datas)]

    warcio_check(path)
    with open(path, "rb") as f:  # noqa: ASYNC230 - a local file
        fast = list(FastIterator(f, record_types=WarcRecordType.response, parse_http=True))
        assert len(fast) == len(datas)
    if compression == "gzip":
        assert gzip.decompress(raw).count(b"WARC/1.1\r\n") == len(datas) + 1


@pytest_twisted.ensureDeferred
async def test_bodies_finishing_together_share_a_sync(
    tmp_path: Path, opened: list[SegmentBodyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: 300 bodies committed in one turn take far fewer fdatasyncs than
    bodies, and each commit fires only after a sync that covers its record."""
    syncs: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        real(fd)
        syncs.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fdatasync", counting)
    store = make(tmp_path)
    opened.append(store)
    fired: list[bool] = []

    def check(info: BodyInfo) -> BodyInfo:
        # The record's end is within what the last sync covered.
        fired.append(bool(syncs) and info.offset + info.length <= syncs[-1])
        return info

    ds: list[Deferred[BodyInfo]] = []
    for i in range(300):
        writer = store.open_writer(new_job_id())
        writer.write(body(1000, i))
        ds.append(writer.commit(meta()).addCallback(check))
    infos = await within(gatherResults(ds))
    assert all(fired)
    assert len(fired) == 300
    assert store.records == 300
    assert 1 <= store.groups < 100, store.groups
    assert len(syncs) < 100
    assert len({i.offset for i in infos}) == 300


@pytest_twisted.ensureDeferred
async def test_a_large_body_streams_to_a_spill_file_and_memory_stays_bounded(
    tmp_path: Path, opened: list[SegmentBodyStore]
) -> None:
    """Past ``memory_limit`` a body goes to a spill file under spool/ as it is written:
    the writer never holds more than the limit in memory; at commit it is copied into
    its record and the spill file is gone."""
    store = make(tmp_path, memory_limit=64 * KIB)
    opened.append(store)
    data = body(5 * 1024 * KIB)
    writer: Any = store.open_writer(new_job_id())
    for at in range(0, len(data), 16 * KIB):
        writer.write(data[at : at + 16 * KIB])
        assert sum(map(len, writer._chunks)) <= 64 * KIB
    assert writer.spill_path is not None
    assert os.listdir(tmp_path / "spool") == [os.path.basename(writer.spill_path)]
    info = await within(writer.commit(meta()))
    assert os.listdir(tmp_path / "spool") == []
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert read_payload(store, info) == data


@pytest_twisted.ensureDeferred
async def test_segments_roll_over_by_size(tmp_path: Path, opened: list[SegmentBodyStore]) -> None:
    """A segment past ``max_segment_bytes`` is sealed and the next body starts a new
    one, with its own warcinfo; every body stays readable."""
    store = make(tmp_path, max_segment_bytes=100 * KIB)
    opened.append(store)
    datas = [body(30 * KIB, i) for i in range(10)]
    infos = [await put(store, d) for d in datas]
    names = {i.segment for i in infos}
    assert len(names) >= 3
    sealed = [p for p in segment_files(tmp_path) if not p.name.endswith(OPEN_SUFFIX)]
    assert len(sealed) >= 2
    for p in sealed:
        assert p.stat().st_size < 100 * KIB + 40 * KIB
    for info, data in zip(infos, datas, strict=True):
        assert read_payload(store, info) == data
    await within(store.close())
    for p in segment_files(tmp_path):
        records = list(ArchiveIterator(io.BytesIO(p.read_bytes())))
        assert records[0].rec_type == "warcinfo"


@pytest_twisted.ensureDeferred
async def test_an_idle_segment_is_sealed_at_its_age(
    tmp_path: Path, opened: list[SegmentBodyStore]
) -> None:
    """``max_segment_age`` seals a segment even when no more bodies come, and the next
    body opens a new segment; close() seals the last one."""
    store = make(tmp_path, max_segment_age=0.3)
    opened.append(store)
    first = await put(store, b"one")
    assert (tmp_path / (str(first.segment) + OPEN_SUFFIX)).exists()
    await sleep(1.0)
    assert [p.name for p in segment_files(tmp_path)] == [first.segment]
    second = await put(store, b"two")
    assert second.segment != first.segment
    await within(store.close())
    assert sorted(p.name for p in segment_files(tmp_path)) == sorted(
        [str(first.segment), str(second.segment)]
    )
    assert read_payload(store, second) == b"two"


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest_twisted.ensureDeferred
async def test_recover_cuts_a_torn_tail_and_keeps_every_whole_record(
    tmp_path: Path, opened: list[SegmentBodyStore], compression: str
) -> None:
    """After a crash mid-group (an ``.open`` segment ending in part of a record, and a
    spill file left in spool/), ``recover`` truncates the segment to its last whole
    record, seals it and removes the spill file: every body a row points to reads back
    with its sha256, and the segment is valid WARC."""
    live = make(tmp_path / "live", compression=compression)
    opened.append(live)
    datas = [body(n, i) for i, n in enumerate((100, 20 * KIB, 300 * KIB, 7))]
    infos = [await put(live, d) for d in datas]
    name = str(infos[0].segment)
    crashed = tmp_path / "crashed"
    (crashed / "spool").mkdir(parents=True)
    whole = (tmp_path / "live" / (name + OPEN_SUFFIX)).read_bytes()
    torn = whole[infos[1].offset : infos[1].offset + infos[1].length // 2]
    (crashed / (name + OPEN_SUFFIX)).write_bytes(whole + torn)
    (crashed / "spool" / "abc~other~1-1.spill").write_bytes(b"x" * 1000)

    store = make(crashed, compression=compression)
    opened.append(store)
    repaired, cut, spilled = store.recover()
    assert (repaired, cut, spilled) == (1, len(torn), 1)
    assert [p.name for p in segment_files(crashed)] == [name]
    assert (crashed / name).read_bytes() == whole
    for info, data in zip(infos, datas, strict=True):
        assert hashlib.sha256(read_payload(store, info)).hexdigest() == info.sha256
        assert read_payload(store, info) == data
    records = list(ArchiveIterator(io.BytesIO(whole), check_digests=True))
    assert len(records) == len(datas) + 1
    assert store.recover() == (0, 0, 0)  # nothing left to do


def test_on_a_shared_volume_recover_removes_only_its_own_or_stale_spill_files(
    tmp_path: Path,
) -> None:
    """With ``stale_after`` (a shared volume), recover removes the spill files named with
    its own instance id (its killed predecessor's, under a fixed ``--instance-id``) and
    those older than the bound; another instance's fresh spill file stays."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mine = spool / "abcd~node-a~123-0.spill"
    other = spool / "abcd~node-a.2~456-0.spill"  # an id that merely starts like ours
    old = spool / "efgh~node-b~789-0.spill"
    for path in (mine, other, old):
        path.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    store = make(tmp_path, instance="node-a")
    assert store.recover(stale_after=3600) == (0, 0, 2)
    assert sorted(os.listdir(spool)) == [other.name]


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest_twisted.ensureDeferred
async def test_a_gone_or_damaged_record_is_body_lost_never_wrong_bytes(
    tmp_path: Path, opened: list[SegmentBodyStore], compression: str
) -> None:
    """Reading a body whose bytes were changed, whose segment was cut short, or whose
    segment was deleted raises ``BodyLostError`` (the API's 410), at open for a small
    body, at the latest by the read of a large one's last bytes (it is hashed as it is
    read); never a whole wrong body, never a hang."""
    store = make(tmp_path, compression=compression)
    opened.append(store)
    small = await put(store, body(2000, 1))
    large = await put(store, body(2 * 1024 * KIB, 2))
    last = await put(store, body(100, 3))
    await within(store.close())
    path = tmp_path / str(small.segment)

    def flip(at: int) -> None:
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x55]))

    # Damage inside each record's payload (in .warc.gz: inside its deflate stream).
    flip(small.offset + min(small.payload_at + 10, small.length - 20))
    flip(large.offset + large.length // 2)
    with pytest.raises(BodyLostError):
        read_payload(store, small)
    with pytest.raises(BodyLostError):
        read_payload(store, large)
    assert read_payload(store, last) == body(100, 3)

    os.truncate(path, last.offset + last.length - 3)
    with pytest.raises(BodyLostError, match="cut short"):
        read_payload(store, last)
    path.unlink()
    with pytest.raises(BodyLostError, match="missing"):
        read_payload(store, last)


@pytest_twisted.ensureDeferred
async def test_delete_expired_removes_only_sealed_segments_older_than_the_cutoff(
    tmp_path: Path, opened: list[SegmentBodyStore]
) -> None:
    """Retention deletes sealed segments last written before the cutoff; a newer sealed
    segment, an open one and the spool are left alone."""
    old = make(tmp_path, instance="a")
    opened.append(old)
    old_info = await put(old, b"old")
    await within(old.close())
    old_path = tmp_path / str(old_info.segment)
    past = time.time() - 7200
    os.utime(old_path, (past, past))
    newer = make(tmp_path, instance="b")
    opened.append(newer)
    await within(newer.close())
    newer_info = await put(make_and_keep(tmp_path, opened, "c"), b"new")
    open_path = tmp_path / (str(newer_info.segment) + OPEN_SUFFIX)
    os.utime(open_path, (past, past))

    assert old_path.exists()
    assert opened[0].delete_expired(time.time() - 3600) == 1
    assert not old_path.exists()
    assert open_path.exists()
    assert (tmp_path / "spool").is_dir()
    with pytest.raises(BodyLostError):
        read_payload(opened[0], old_info)


def make_and_keep(root: Path, opened: list[SegmentBodyStore], instance: str) -> SegmentBodyStore:
    store = SegmentBodyStore(reactor(), root, instance=instance)
    opened.append(store)
    return store


@pytest_twisted.ensureDeferred
async def test_close_writes_what_was_handed_over_then_refuses_more(
    tmp_path: Path, opened: list[SegmentBodyStore]
) -> None:
    """close() fires once every committed body is durable and the segment is sealed;
    a commit afterwards fails with ``BodyStoreClosedError`` and leaves no spill file."""
    store = make(tmp_path)
    opened.append(store)
    writers = [store.open_writer(new_job_id()) for _ in range(20)]
    ds = []
    for i, writer in enumerate(writers):
        writer.write(body(3000, i))
        ds.append(writer.commit(meta()))
    closed = store.close()
    infos = await within(gatherResults(ds))
    await within(closed)
    assert all(not p.name.endswith(OPEN_SUFFIX) for p in segment_files(tmp_path))
    for i, info in enumerate(infos):
        assert read_payload(store, info) == body(3000, i)
    late = store.open_writer(new_job_id())
    late.write(body(300 * KIB))
    with pytest.raises(BodyStoreClosedError):
        await within(late.commit(meta()))
    assert os.listdir(tmp_path / "spool") == []


@pytest_twisted.ensureDeferred
async def test_retention_purges_old_jobs_then_the_segments_they_left(
    backend: Backend, tmp_path: Path, opened: list[SegmentBodyStore]
) -> None:
    """On either store, a retention pass deletes jobs finished before the retention and
    then every sealed segment last written before it (and a margin): the old job's
    segment goes; a recent job, its body and its segment stay."""
    store = await open_backend(backend)
    try:
        root = tmp_path / "segments"
        old_writer = make(root, instance="old")
        opened.append(old_writer)
        old_info = await put(old_writer, b"old body")
        await within(old_writer.close())
        old_segment = root / str(old_info.segment)
        long_ago = time.time() - 7200 - SEGMENT_MARGIN
        os.utime(old_segment, (long_ago, long_ago))
        bodies = make(root, instance="new")
        opened.append(bodies)
        new_info = await put(bodies, b"recent body")

        now = reactor().seconds()
        old, recent = make_job(created_at=now - 8000), make_job(created_at=now - 100)
        await within(store.add([old, recent]))
        claimed = {j.id: j for j in await within(store.claim(2, now, []))}
        done = []
        for job, info, finished in ((old, old_info, now - 7200), (recent, new_info, now - 60)):
            result = JobResult(200, "1.1", (), job.spec.url, "127.0.0.1", (), info, {})
            done.append(
                attrs.evolve(
                    claimed[job.id], state=JobState.SUCCEEDED, finished_at=finished, result=result
                )
            )
        await within(store.save(done))

        await within(
            RetentionService(reactor(), store=store, bodies=bodies, retention=3600).purge()
        )
        assert await within(store.get("alice", old.id)) is None
        assert not old_segment.exists()
        kept = await within(store.get("alice", recent.id))
        assert kept is not None
        assert kept.result is not None
        assert kept.result.body == new_info
        assert read_payload(bodies, new_info) == b"recent body"
    finally:
        await within(store.close())
