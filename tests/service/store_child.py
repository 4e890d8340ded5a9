"""Child processes for the durability tests: each does its work, then leaves the way a
crash does (``os._exit``: no close, no checkpoint, no atexit, no buffers flushed).

``python -m tests.service.store_child add DB``: open a store, add one job, print its id,
and exit the moment ``add()`` fires.
``python -m tests.service.store_child body ROOT ID``: write half a body (past the memory
limit, so that it is in its temporary file), then exit.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, task

from curlfetch.bodies import DirectoryBodyStore
from curlfetch.jobs import Job, JobSpec, JobState, Limits, new_job_id
from curlfetch.store.sqlite import SQLiteJobStore


async def add_one(reactor: Any, path: str) -> None:
    store = SQLiteJobStore(reactor, path)
    await store.open()
    job = Job(
        id=new_job_id(),
        client="alice",
        state=JobState.QUEUED,
        spec=JobSpec.from_json({"url": "http://example.test/durable"}, Limits()),
        created_at=1_700_000_000.0,
    )
    await store.add([job])
    os.write(1, job.id.encode() + b"\n")
    os._exit(0)


def half_a_body(root: str, job_id: str) -> None:
    from twisted.internet import reactor

    writer = DirectoryBodyStore(reactor, root, memory_limit=1000).open_writer(job_id)
    writer.write(b"x" * 100_000)
    assert writer.temp_path is not None
    os.write(1, writer.temp_path.encode() + b"\n")
    os._exit(0)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "add":
        task.react(lambda reactor: defer.ensureDeferred(add_one(reactor, args[0])))
    elif mode == "body":
        half_a_body(args[0], args[1])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
