"""Fault family 2: the data directory's disk fills up (issue 13).

The data directory is a small tmpfs of its own. The choice made: a body that cannot be
stored fails its job with a clear ``storage_full`` error (not held queued: a full disk
does not fix itself quickly, a held queue hides it; retrying is the client's call).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite, pattern_bytes
from .conftest import Daemons, sleep, tmpfs

pytestmark = pytest.mark.timeout(90)

BODY = 1_000_000


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, size: int) -> None:
    block = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while size > 0:
            f.write(block[: min(size, len(block))])
            size -= len(block)


@pytest_twisted.ensureDeferred
async def test_full_disk_fails_jobs_with_storage_full_and_recovers(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Data directory on a 24 MB tmpfs. Three 100 kB bodies are stored; then a filler
    file leaves 600 kB free and six jobs fetch 1 MB each: every one fails with error code
    ``storage_full`` (never ``internal_error``, never left queued or running), /readyz
    answers 503 naming ``storage_full``, /healthz stays 200, the stored bodies are intact
    (same sha256). Once the filler is deleted, /readyz is 200 within 10 s and a 1 MB job
    succeeds with the right body."""
    d = daemons.make("--drain-timeout=1")
    with tmpfs(d.data_dir, "size=24m,mode=0755"):
        await d.start()
        before = []
        for i in range(3):
            view = await d.submit({"url": target.url(f"/bytes?n={100_000 + i}")})
            before.append(await d.wait_state(view["id"], {"succeeded", "failed"}))
        assert {v["state"] for v in before} == {"succeeded"}

        filler = d.data_dir / "filler"
        _fill(filler, _free(d.data_dir) - 600_000)
        free_at_fill = _free(d.data_dir)
        started = time.monotonic()
        views = [
            await d.submit({"url": target.url(f"/bytes?n={BODY}"), "retry": {"max_attempts": 1}})
            for _ in range(6)
        ]
        ended = [await d.wait_state(v["id"], {"succeeded", "failed"}, 15) for v in views]
        failed_in = time.monotonic() - started
        readyz = await d.get("/readyz", seconds=10)
        healthz = await d.get("/healthz", seconds=5)
        intact = []
        for view in before:
            reply = await d.get(f"/v1/jobs/{view['id']}/body")
            intact.append(
                reply.status == 200
                and hashlib.sha256(reply.body).hexdigest() == view["result"]["body"]["sha256"]
            )
        codes = [(v["state"], (v.get("error") or {}).get("code")) for v in ended]
        print(
            f"\ndisk full: {free_at_fill} bytes free; 6 x 1 MB jobs ended in {failed_in:.2f}s "
            f"as {codes}; error {ended[0].get('error')}; /readyz {readyz.status} "
            f"{readyz.body[:160]!r}; /healthz {healthz.status}; earlier bodies intact {intact}"
        )
        assert healthz.status == 200
        assert intact == [True, True, True]
        assert codes == [("failed", "storage_full")] * 6
        assert readyz.status == 503
        assert b"storage_full" in readyz.body

        filler.unlink()
        freed = time.monotonic()
        while (await d.get("/readyz", seconds=10)).status != 200:
            assert time.monotonic() - freed < 10, "/readyz not 200 within 10s of freeing space"
            await sleep(0.2)
        view = await d.submit({"url": target.url(f"/bytes?n={BODY}")})
        done = await d.wait_state(view["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded", done
        body = await d.get(f"/v1/jobs/{view['id']}/body")
        assert body.body == pattern_bytes(BODY)
        print(f"disk full: recovered {time.monotonic() - freed:.2f}s after freeing space")
        d.stop_blocking()
