"""Fault family 7: damaged state on disk (issue 13).

A finished job's body record overwritten, cut short, or its segment deleted: ``GET
.../body`` answers a clear JSON error (410 ``body_lost``) and the service keeps serving.
A corrupted SQLite file, or an unwritable data directory: start-up fails with one clear
message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_twisted

from ..e2e.conftest import segment_file
from ..engine.servers import LoopbackSite
from .conftest import Daemon, Daemons, sleep, tmpfs

pytestmark = pytest.mark.timeout(60)


@pytest_twisted.ensureDeferred
async def test_damaged_truncated_or_deleted_body_is_410_body_lost(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Three jobs succeed with 200 kB bodies, their records in one segment. One record's
    payload is overwritten, the segment is then cut short inside the second record, and
    finally deleted (the third). Each ``GET .../body`` answers 410 with a JSON error whose
    code is ``body_lost`` (not a 200 with short or wrong bytes, not a 404 or 500); the job
    view still answers 200, /healthz 200, and a new job runs, its record goes to a new
    segment, and its body is served."""
    d = await daemons.start("--drain-timeout=1")
    views = []
    for i in range(3):  # one after another: their records in submission order
        view = await d.submit({"url": target.url(f"/bytes?n={200_000 + i}")})
        done = await d.wait_state(view["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded"
        views.append(done)
    damaged, truncated, deleted = views
    records = [v["result"]["body"]["warc"] for v in views]
    assert len({r["segment"] for r in records}) == 1
    segment = segment_file(d.data_dir, records[0]["segment"])
    fd = os.open(segment, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * 100, records[0]["offset"] + records[0]["payload_at"] + 100_000)
    finally:
        os.close(fd)
    answers = {}
    answers["damaged"] = await d.get(f"/v1/jobs/{damaged['id']}/body")
    os.truncate(segment, records[1]["offset"] + records[1]["length"] - 1000)
    answers["truncated"] = await d.get(f"/v1/jobs/{truncated['id']}/body")
    segment.unlink()
    answers["deleted"] = await d.get(f"/v1/jobs/{deleted['id']}/body")

    healthz = await d.get("/healthz")
    view = await d.submit({"url": target.url("/bytes?n=5000")})
    fresh = await d.wait_state(view["id"], {"succeeded", "failed"})
    fresh_body = await d.get(f"/v1/jobs/{view['id']}/body")
    summary = {name: (r.status, r.body[:120]) for name, r in answers.items()}
    print(f"\ndamaged bodies: {summary}; /healthz {healthz.status}; new job {fresh['state']}")
    assert healthz.status == 200
    assert fresh["state"] == "succeeded"
    assert fresh["result"]["body"]["warc"]["segment"] != records[0]["segment"]
    assert len(fresh_body.body) == 5000
    for name, reply in answers.items():
        assert reply.status == 410, (name, reply.status, reply.body[:200])
        assert "json" in (reply.headers.get("content-type") or ""), name
        assert b'"body_lost"' in reply.body, (name, reply.body[:200])
    assert (await d.get(f"/v1/jobs/{truncated['id']}")).status == 200


async def _fails_to_start(d: Daemon, seconds: float = 20) -> tuple[int, str, float]:
    """Spawn and wait for the exit; (code, what it logged, seconds)."""
    started = time.monotonic()
    d.spawn()
    code = await d.wait_exit(seconds)
    return code, d._new_log(), time.monotonic() - started


def _corrupt(db: Path) -> None:
    """Garbage over the header and the first pages; no WAL to recover from."""
    with open(db, "r+b") as f:
        f.write(os.urandom(8192))
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)


def _clear(log: str, subject: str, words: tuple[str, ...]) -> bool:
    """Some line names ``subject`` and says what is wrong with it (one of ``words``)."""
    return any(
        subject in line and any(w in line.lower() for w in words) for line in log.splitlines()
    )


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "#error]" in line or "#critical]" in line]


@pytest_twisted.ensureDeferred
async def test_corrupted_sqlite_file_fails_start_up_clearly(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """The SQLite file is overwritten with garbage (its header and first pages) while
    the service is stopped: the next start-up exits non-zero within 20 s with one clear
    message (a line naming the database file and saying it is damaged / not a database)
    and no traceback."""
    d = await daemons.start("--drain-timeout=1")
    await d.submit({"url": target.url("/bytes?n=10")})
    d.stop_blocking()
    db = d.data_dir / "jobs.sqlite3"
    _corrupt(db)
    code, log, took = await _fails_to_start(d)
    errors = _errors(log)
    print(f"\ncorrupted sqlite: exit {code} after {took:.1f}s; error lines {errors[:3]}")
    assert code != 0
    assert "Traceback" not in log, log[-3000:]
    assert _clear(log, "jobs.sqlite3", ("not a database", "malformed", "damaged", "corrupt"))


@pytest_twisted.ensureDeferred
async def test_unwritable_data_dir_fails_start_up_clearly(daemons: Daemons) -> None:
    """The data directory is a read-only filesystem (a ``ro`` tmpfs: root ignores
    permission bits): start-up exits non-zero within 20 s with one clear message (a line
    naming the directory and saying it cannot be written) and no traceback."""
    d = daemons.make("--drain-timeout=1")
    with tmpfs(d.data_dir, "size=1m,ro"):
        code, log, took = await _fails_to_start(d)
    errors = _errors(log)
    print(f"\nread-only data dir: exit {code} after {took:.1f}s; error lines {errors[:3]}")
    assert code != 0
    assert "Traceback" not in log, log[-3000:]
    assert _clear(log, str(d.data_dir), ("read-only", "not writable", "cannot write"))
    await sleep(0)
