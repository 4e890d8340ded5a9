"""The export endpoints against a running service: ``GET /v1/jobs/export.warc``,
``.warc.gz`` and ``.ndjson``, read back with warcio (its ``ArchiveIterator`` and its
``check`` and ``index`` tools) and FastWARC, every payload against its stored sha256;
filters and client scope as the list's; backpressure; a failure midway cuts the
download short rather than ending it cleanly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from fastwarc.warc import ArchiveIterator as FastIterator
from fastwarc.warc import WarcRecordType
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail
from warcio.archiveiterator import ArchiveIterator

from curlfetch.api import export as export_api
from curlfetch.engine import CurlError
from curlfetch.jobs import Job, JobSpec, JobState, Limits, new_job_id
from curlfetch.store import StoreUnavailableError
from tests.engine.servers import pattern_bytes

from .apiserver import Reply, Service, ServiceFactory, services, sleep

__all__ = ["services"]  # fixtures

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
WARCIO = os.path.join(os.path.dirname(sys.executable), "warcio")
SIZES = (0, 10, 1000, 70_000, 300_000, 2_500_000)
"""Empty, small, in memory, spilled (> 256 KiB) and streamed (> the 1 MiB buffer)."""


async def _fetch_all(s: Service, sizes: tuple[int, ...] = SIZES, **spec: Any) -> list[str]:
    """Jobs for ``/bytes?n=N`` (distinct sizes: distinct bodies), all succeeded."""
    ids = []
    for n in sizes:
        reply = await s.submit({"url": s.url(f"/bytes?n={n}"), **spec})
        assert reply.status == 201, reply
        ids.append(reply.json()["id"])
    for job_id in ids:
        assert (await s.wait_job(job_id, 10))["state"] == "succeeded"
    return ids


async def _views(s: Service, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {i: (await s.call("GET", f"/v1/jobs/{i}")).json() for i in ids}


def _records(data: bytes) -> list[Any]:
    """(type, headers, payload) of every record, by warcio, checking its digests."""
    out = []
    for record in ArchiveIterator(io.BytesIO(data), check_digests=True):
        payload = record.content_stream().read()
        out.append((record.rec_type, record.rec_headers, payload, record.http_headers))
    return out


def _fields(payload: bytes) -> dict[str, str]:
    return dict(
        line.split(": ", 1) for line in payload.decode().split("\r\n") if line and ": " in line
    )


def _gzip_members(data: bytes) -> int:
    """How many gzip members ``data`` is, each decompressed alone."""
    count = 0
    while data:
        d = zlib.decompressobj(31)
        d.decompress(data)
        assert d.eof, "a gzip member is cut short"
        data = d.unused_data
        count += 1
    return count


def _check_with_tools(path: Path) -> list[dict[str, Any]]:
    """``warcio check`` passes and ``warcio index`` lists every record."""
    checked = subprocess.run(
        [WARCIO, "check", "-v", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "digest pass" in checked.stdout or "no digest" in checked.stdout, checked.stdout
    assert "digest fail" not in checked.stdout, checked.stdout
    indexed = subprocess.run(
        [WARCIO, "index", "-f", "warc-type,warc-target-uri,length,offset", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in indexed.stdout.splitlines()]


def _fastwarc_payloads(path: Path) -> dict[str, bytes]:
    """FastWARC's reading: target URI -> payload of every response record."""
    out = {}
    with open(path, "rb") as f:
        for record in FastIterator(f, record_types=WarcRecordType.response, parse_http=True):
            assert record.verify_payload_digest(), record.headers["WARC-Target-URI"]
            out[record.headers["WARC-Target-URI"]] = record.reader.read()
    return out


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _flip(path: Path, at: int) -> None:
    """Damage one byte, as a bad disk would."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


async def _download(s: Service, path: str, **kwargs: Any) -> Reply:
    return await s.call("GET", path, seconds=30, **kwargs)


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("kind", ["warc", "warc.gz"])
@pytest_twisted.ensureDeferred
async def test_warc_export_copies_every_stored_record(
    services: ServiceFactory, tmp_path: Path, compression: str, kind: str
) -> None:
    """An export is a warcinfo record, each succeeded job's stored response record
    (newest first, byte for byte the stored record when the compressions agree), then a
    metadata record with the counts and ``export-complete: true``; warcio (iterator,
    check, index) and FastWARC read it, and every payload is the fetched body with the
    job's sha256. A failed job adds no record. ``.warc.gz`` is one gzip member per
    record, sent as application/gzip without Content-Encoding."""
    s = await services(compression=compression)
    ids = await _fetch_all(s)
    port = s.reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    refused = f"http://127.0.0.1:{port.getHost().port}/"
    await port.stopListening()
    failed = (await s.submit({"url": refused, "retry": {"max_attempts": 1}})).json()["id"]
    assert (await s.wait_job(failed))["state"] == "failed"
    views = await _views(s, ids)

    reply = await _download(s, f"/v1/jobs/export.{kind}")
    assert reply.status == 200, reply
    media = "application/gzip" if kind == "warc.gz" else "application/warc"
    assert reply.content_type == media
    assert reply.headers.get("content-encoding") is None
    disposition = reply.headers.get("content-disposition") or ""
    assert re.fullmatch(
        rf'attachment; filename="curlfetch-export-\d{{8}}T\d{{6}}Z\.{re.escape(kind)}"',
        disposition,
    ), disposition

    records = _records(reply.body)
    types = [r[0] for r in records]
    assert types == ["warcinfo"] + ["response"] * len(ids) + ["metadata"]
    info = _fields(records[0][2])
    assert info["software"].startswith("curlfetch/")
    responses = records[1:-1]
    newest_first = sorted(ids, reverse=True)
    for job_id, (_, headers, payload, http_headers) in zip(newest_first, responses, strict=True):
        view = views[job_id]
        body = view["result"]["body"]
        assert headers.get_header("WARC-Target-URI") == view["result"]["effective_url"]
        assert headers.get_header("WARC-IP-Address") == "127.0.0.1"
        assert http_headers.get_statuscode() == "200"
        assert hashlib.sha256(payload).hexdigest() == body["sha256"]
        assert payload == pattern_bytes(body["size"])
    tail = _fields(records[-1][2])
    assert tail == {
        "export-jobs": str(len(ids) + 1),
        "export-responses": str(len(ids)),
        "export-responses-built": "0",
        "export-skipped": "0",
        "export-no-body": "1",
        "export-not-modified": "0",
        "export-complete": "true",
    }

    if kind == "warc.gz":
        assert _gzip_members(reply.body) == len(records)
    if (kind == "warc.gz") == (compression == "gzip"):
        # The very bytes of the stored records: copied, not rebuilt.
        for job_id in ids:
            warc = views[job_id]["result"]["body"]["warc"]
            segment = s.bodies.segment_path(warc["segment"])
            assert segment is not None
            assert _read_at(Path(segment), warc["offset"], warc["length"]) in reply.body

    path = tmp_path / f"export.{kind}"
    path.write_bytes(reply.body)
    index = _check_with_tools(path)
    assert [entry["warc-type"] for entry in index] == types
    by_uri = _fastwarc_payloads(path)
    assert len(by_uri) == len(ids)
    for job_id in ids:
        view = views[job_id]
        payload = by_uri[view["result"]["effective_url"]]
        assert hashlib.sha256(payload).hexdigest() == view["result"]["body"]["sha256"]


@pytest.mark.parametrize("kind", ["warc", "warc.gz"])
@pytest_twisted.ensureDeferred
async def test_file_store_bodies_are_exported_in_built_records(
    services: ServiceFactory, tmp_path: Path, kind: str
) -> None:
    """A body of the file-per-body store has no stored record: the export builds one
    around it (the stored status and headers, then the bytes), counted as built, and
    the result passes ``warcio check`` with every payload matching its sha256."""
    s = await services(body_store="files")
    ids = await _fetch_all(s, (5, 5000, 400_000))
    views = await _views(s, ids)
    reply = await _download(s, f"/v1/jobs/export.{kind}")
    assert reply.status == 200
    records = _records(reply.body)
    assert [r[0] for r in records] == ["warcinfo", "response", "response", "response", "metadata"]
    for job_id, (_, headers, payload, http_headers) in zip(
        sorted(ids, reverse=True), records[1:-1], strict=True
    ):
        assert hashlib.sha256(payload).hexdigest() == views[job_id]["result"]["body"]["sha256"]
        assert headers.get_header("WARC-Target-URI") == views[job_id]["result"]["effective_url"]
        assert http_headers.get_statuscode() == "200"
    tail = _fields(records[-1][2])
    assert (tail["export-responses"], tail["export-responses-built"]) == ("0", "3")
    assert tail["export-complete"] == "true"
    path = tmp_path / f"export.{kind}"
    path.write_bytes(reply.body)
    _check_with_tools(path)


@pytest_twisted.ensureDeferred
async def test_a_lost_or_damaged_body_becomes_a_metadata_record(
    services: ServiceFactory,
) -> None:
    """A record whose bytes no longer match its sha256, or whose segment is gone, is
    not copied: a metadata record names the job and why, the other records are
    exported, and the counts say how many were skipped."""
    s = await services()
    ids = await _fetch_all(s, (100, 200, 300))
    views = await _views(s, ids)
    damaged = views[ids[1]]["result"]["body"]["warc"]
    segment = s.bodies.segment_path(damaged["segment"])
    assert segment is not None
    _flip(Path(segment), damaged["offset"] + damaged["payload_at"] + 50)
    reply = await _download(s, "/v1/jobs/export.warc")
    assert reply.status == 200
    records = _records(reply.body)
    assert [r[0] for r in records] == ["warcinfo", "response", "metadata", "response", "metadata"]
    lost = _fields(records[2][2])
    assert lost["curlfetch-job-id"] == ids[1]
    assert "sha256" in lost["curlfetch-body-lost"]
    assert records[2][1].get_header("WARC-Target-URI") == s.url("/bytes?n=200")
    tail = _fields(records[-1][2])
    assert (tail["export-responses"], tail["export-skipped"]) == ("2", "1")

    # The whole segment gone (retention, or by hand): every body is a metadata record.
    os.unlink(segment)
    records = _records((await _download(s, "/v1/jobs/export.warc")).body)
    assert [r[0] for r in records] == ["warcinfo"] + ["metadata"] * 4
    assert "missing" in _fields(records[1][2])["curlfetch-body-lost"]
    assert _fields(records[-1][2])["export-skipped"] == "3"


@pytest_twisted.ensureDeferred
async def test_ndjson_export_is_the_callers_job_views_filtered(
    services: ServiceFactory,
) -> None:
    """``export.ndjson`` is one job view per line, as ``GET /v1/jobs/{id}`` shows it,
    newest first, only the caller's jobs; the state, creation-time and metadata filters
    select as the list endpoint does, which takes them too; a bad filter is 400
    ``invalid_request`` naming it; an unauthenticated request is 401."""
    s = await services(tokens={"alice": ALICE, "bob": BOB})
    mine = await _fetch_all(s, (1, 2), metadata={"crawl": "a"})
    mine += await _fetch_all(s, (3,), metadata={"crawl": "b", "n": 5})
    theirs = (await s.submit({"url": s.url("/bytes?n=4")}, token=BOB)).json()["id"]
    await s.wait_job(theirs, token=BOB)

    reply = await _download(s, "/v1/jobs/export.ndjson")
    assert reply.status == 200
    assert reply.content_type == "application/x-ndjson"
    assert reply.body.endswith(b"\n")
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert [j["id"] for j in lines] == sorted(mine, reverse=True)
    for line in lines:
        assert line == (await s.call("GET", f"/v1/jobs/{line['id']}")).json()

    async def selected(query: str) -> list[str]:
        exported = await _download(s, f"/v1/jobs/export.ndjson?{query}")
        assert exported.status == 200, exported
        listed = await s.call("GET", f"/v1/jobs?{query}")
        assert listed.status == 200, listed
        ids = [json.loads(line)["id"] for line in exported.body.splitlines()]
        assert ids == [j["id"] for j in listed.json()["jobs"]]
        return ids

    assert await selected("metadata=crawl:a") == sorted(mine[:2], reverse=True)
    assert await selected("metadata=crawl:b") == [mine[2]]
    assert await selected("metadata=n") == [mine[2]]
    assert await selected("metadata=n:5") == []  # a number is not the string "5"
    assert await selected("state=failed") == []
    assert await selected("state=succeeded&metadata=crawl") == sorted(mine, reverse=True)
    third = (await s.call("GET", f"/v1/jobs/{mine[2]}")).json()["created_at"]
    assert await selected(f"created_since={third}") == [mine[2]]
    assert await selected(f"created_until={third}") == sorted(mine[:2], reverse=True)
    assert await selected("created_since=2000-01-01&created_until=2000-01-02") == []
    assert await selected("created_since=0") == sorted(mine, reverse=True)

    for query, field in (
        ("state=done", "state"),
        ("created_since=yesterday", "created_since"),
        ("created_until=2026-01-01T10:00:00", "created_until"),  # no offset
        ("metadata=a%20b", "metadata"),
    ):
        for path in ("/v1/jobs/export.ndjson", "/v1/jobs/export.warc", "/v1/jobs"):
            bad = await s.call("GET", f"{path}?{query}")
            assert bad.status == 400, (path, query, bad)
            assert bad.error["code"] == "invalid_request"
            assert bad.error["field"] == field
    assert (await s.call("GET", "/v1/jobs/export.warc", anonymous=True)).status == 401
    bobs = await _download(s, "/v1/jobs/export.ndjson", token=BOB)
    assert [json.loads(line)["id"] for line in bobs.body.splitlines()] == [theirs]


def _queued_jobs(count: int, now: float) -> list[Job]:
    spec = JobSpec.from_json({"url": "http://127.0.0.1:9/", "metadata": {"x": "y" * 500}}, Limits())
    return [
        Job(id=new_job_id(now), client="", state=JobState.QUEUED, spec=spec, created_at=now)
        for _ in range(count)
    ]


class _SlowReader(protocol.Protocol):
    """Reads an HTTP response only when told to (``resume``)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.pauseProducing()
        transport.write(
            b"GET /v1/jobs/export.ndjson HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.data))


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_holds_the_export_back(services: ServiceFactory) -> None:
    """While the client does not read, the export stops reading pages from the store
    and its own buffer stays small (backpressure); once it reads, all 6,000 jobs arrive in
    one chunked download that ends cleanly."""
    s = await services(max_queued=10_000, max_concurrency=1)
    await s.scheduler.stopService()  # the jobs stay queued: their views do not change
    for _ in range(6):
        await s.store.add(_queued_jobs(1000, s.reactor.seconds()))
    pages = 0
    list_jobs = s.store.list_jobs

    def counting(*args: Any) -> Any:
        nonlocal pages
        pages += 1
        return list_jobs(*args)

    s.store.list_jobs = counting  # type: ignore[method-assign,assignment]
    reader = _SlowReader()
    factory = protocol.ClientFactory.forProtocol(lambda: reader)
    connector = s.reactor.connectTCP("127.0.0.1", s.port_number, factory)
    await sleep(1.0)
    # 6,000 views of ~1.5 KB are 13 pages; held back, the export stops after what the
    # kernel's socket buffers (a few MB on loopback) and one transport buffer take.
    seen = pages
    await sleep(0.5)
    assert pages == seen < 13, (seen, pages)
    held = sum(len(c.dataBuffer) + sum(map(len, c._tempDataBuffer)) for c in _channels(s))
    assert held < 4 * 1024 * 1024, held
    reader.transport.resumeProducing()  # type: ignore[union-attr]
    raw = await reader.done.addTimeout(30, s.reactor)
    connector.disconnect()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")
    assert body.count(b'"state":"queued"') == 6000
    assert pages == 13


def _channels(s: Service) -> list[Any]:
    return [
        r
        for r in s.reactor.getWriters() + s.reactor.getReaders()
        if getattr(r, "getHost", None) and r.getHost().port == s.port_number
    ]


@pytest_twisted.ensureDeferred
async def test_a_failure_midway_cuts_the_download_short(
    services: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store fails after the 200 has started (the second page), the
    connection is closed before the final chunk: the client sees a broken transfer,
    never a download that looks complete. A store down at the start is a 503."""
    s = await services(max_queued=10_000)
    await s.scheduler.stopService()
    monkeypatch.setattr(export_api, "PAGE", 50)
    await s.store.add(_queued_jobs(120, s.reactor.seconds()))
    calls = 0
    list_jobs = s.store.list_jobs

    def failing_later(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= 2:
            return fail(StoreUnavailableError("the database went away"))
        return list_jobs(*args)

    s.store.list_jobs = failing_later  # type: ignore[method-assign,assignment]
    for kind in ("ndjson", "warc", "warc.gz"):
        calls = 0
        with pytest.raises(CurlError):
            await _download(s, f"/v1/jobs/export.{kind}")
    calls = 1
    reply = await _download(s, "/v1/jobs/export.warc")
    assert reply.status == 503
    assert reply.error["code"] == "store_unavailable"
