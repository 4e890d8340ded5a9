"""How fast the SQLite job store moves jobs: add in batches, claim in batches, save each.

    .venv/bin/python -m bench.store_bench [--jobs 20000] [--batch 500] [--dir DIR]

Three phases on a fresh database (WAL, synchronous=FULL, so every commit is an fsync):

- add: ``--jobs`` jobs as ``add()`` calls of ``--batch`` jobs, one after the other (each
  waits for its commit, as an API request does);
- claim + save: ``claim(--batch)``, then one ``save([job])`` per job in the same reactor
  turn (as a scheduler finishing jobs does), repeated until nothing is left;
- both at once: adds, claims and saves in flight together.

No assertions: it prints jobs/s and the number of transactions for each phase.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Any

import attrs
from twisted.internet import defer, task

from curlfetch.jobs import Job, JobSpec, JobState, Limits, new_job_id
from curlfetch.store.sqlite import SQLiteJobStore


def make_jobs(n: int) -> list[Job]:
    limits = Limits()
    now = time.time()
    return [
        Job(
            id=new_job_id(now),
            client=f"client{i % 10}",
            state=JobState.QUEUED,
            spec=JobSpec.from_json(
                {"url": f"https://host{i % 50}.example/path/{i}", "priority": i % 3}, limits
            ),
            created_at=now,
        )
        for i in range(n)
    ]


def report(name: str, jobs: int, seconds: float, transactions: int) -> None:
    print(
        f"{name:<14} {jobs:>7} jobs in {seconds:6.2f} s = {jobs / seconds:>9,.0f} jobs/s "
        f"({transactions} transactions)"
    )


async def add_all(store: SQLiteJobStore, jobs: list[Job], batch: int) -> None:
    for i in range(0, len(jobs), batch):
        await store.add(jobs[i : i + batch])


async def claim_and_save_all(
    reactor: Any, store: SQLiteJobStore, batch: int, until: int | None = None
) -> int:
    """Claim and save until nothing is left, or (``until``) until that many are done."""
    done = 0
    while until is None or done < until:
        now = time.time()
        claimed = await store.claim(batch, now, ())
        if not claimed:
            if until is None:
                break
            await task.deferLater(reactor, 0.001, lambda: None)
            continue
        saves = [
            store.save([attrs.evolve(j, state=JobState.SUCCEEDED, finished_at=now)])
            for j in claimed
        ]
        await defer.gatherResults(saves)
        done += len(claimed)
    return done


async def main(reactor: Any, args: argparse.Namespace) -> None:
    directory = args.dir or tempfile.mkdtemp(prefix="store-bench-")
    try:
        store = SQLiteJobStore(reactor, f"{directory}/jobs.sqlite3")
        await store.open()
        jobs = make_jobs(args.jobs)

        t, tx = time.perf_counter(), store.transactions
        await add_all(store, jobs, args.batch)
        report("add", len(jobs), time.perf_counter() - t, store.transactions - tx)

        t, tx = time.perf_counter(), store.transactions
        done = await claim_and_save_all(reactor, store, args.batch)
        report("claim + save", done, time.perf_counter() - t, store.transactions - tx)

        more = make_jobs(args.jobs)
        t, tx = time.perf_counter(), store.transactions
        adding = defer.ensureDeferred(add_all(store, more, args.batch))
        working = defer.ensureDeferred(claim_and_save_all(reactor, store, args.batch, len(more)))
        await adding
        await working
        report("all at once", len(more), time.perf_counter() - t, store.transactions - tx)
        await store.close()
    finally:
        if not args.dir:
            shutil.rmtree(directory)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--dir", help="where to put the database (default: a temporary dir)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    run()
