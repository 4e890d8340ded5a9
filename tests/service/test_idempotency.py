"""Idempotency-Key on ``POST /v1/jobs``: the store's reservations and records (each
backend, ``now`` driven by the test), then the API over real HTTP on 127.0.0.1
(``apiserver``, SQLite). Only loopback traffic; every wait is bounded."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from curlfetch.store import (
    IDEMPOTENCY_ABANDONED_AFTER,
    IDEMPOTENCY_TTL,
    IdempotencyInProgressError,
    IdempotencyMismatchError,
    IdempotencyRecord,
    StoredResponse,
)
from curlfetch.store.sqlite import MIGRATIONS

from .apiserver import Reply, Service, ServiceFactory, services, svc
from .backends import AnyStore, Backend
from .conftest import db_path, make_job, open_backend, open_store, reactor, within

__all__ = ["services", "svc"]  # fixtures

T0 = 1_700_000_000.0
FP = "a" * 64
OTHER_FP = "b" * 64
RESPONSE = StoredResponse(
    201, (("Content-Type", "application/json"), ("Location", "/v1/jobs/x")), b'{"id":"x"}'
)
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"


def record(key: str = "k", client: str = "alice", response: StoredResponse = RESPONSE) -> Any:
    return IdempotencyRecord(client, key, response)


async def reserve(
    store: AnyStore, key: str = "k", fp: str = FP, now: float = T0, client: str = "alice"
) -> StoredResponse | None:
    return await within(store.reserve_key(client, key, fp, now))


async def submit_once(store: AnyStore, key: str = "k", now: float = T0) -> None:
    """Reserve ``key`` and record RESPONSE with one new job, as the API does."""
    assert await reserve(store, key, now=now) is None
    await within(store.add([make_job()], record(key)))


# -- the store ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reserve_record_then_replay(store: AnyStore) -> None:
    """A free key is reserved (None); once ``add`` records the response with its jobs,
    the same key and fingerprint fire with that response, headers and bytes intact."""
    job = make_job()
    assert await reserve(store) is None
    await within(store.add([job], record()))
    assert await reserve(store) == RESPONSE
    assert await reserve(store, now=T0 + 3600) == RESPONSE
    assert await within(store.get("alice", job.id)) == job


@pytest_twisted.ensureDeferred
async def test_another_fingerprint_is_a_mismatch(store: AnyStore) -> None:
    """The same key with another fingerprint fails with IdempotencyMismatchError, both
    while the first is reserved and once it is recorded (a mismatch wins over 409)."""
    assert await reserve(store) is None
    with pytest.raises(IdempotencyMismatchError):
        await reserve(store, fp=OTHER_FP)
    await within(store.add([make_job()], record()))
    with pytest.raises(IdempotencyMismatchError):
        await reserve(store, fp=OTHER_FP)


@pytest_twisted.ensureDeferred
async def test_a_reserved_key_is_in_progress(store: AnyStore) -> None:
    """Until the response is recorded, the same key and fingerprint fail with
    IdempotencyInProgressError, also when both reservations share one transaction."""
    first = store.reserve_key("alice", "k", FP, T0)
    second = store.reserve_key("alice", "k", FP, T0)
    assert await within(first) is None
    with pytest.raises(IdempotencyInProgressError):
        await within(second)
    with pytest.raises(IdempotencyInProgressError):
        await reserve(store, now=T0 + 10)


@pytest_twisted.ensureDeferred
async def test_release_frees_the_key_but_never_a_record(store: AnyStore) -> None:
    """A released reservation leaves the key free for any body; releasing a recorded key
    changes nothing (the API may release after a committed add)."""
    assert await reserve(store) is None
    await within(store.release_key("alice", "k"))
    assert await reserve(store, fp=OTHER_FP) is None
    await within(store.release_key("alice", "k"))
    await submit_once(store, "k2")
    await within(store.release_key("alice", "k2"))
    assert await reserve(store, "k2") == RESPONSE


@pytest_twisted.ensureDeferred
async def test_keys_expire_after_the_ttl(store: AnyStore) -> None:
    """A key counts from its reservation: just under IDEMPOTENCY_TTL later it replays;
    at the TTL it is free again, for any body, and counts from the new reservation."""
    await submit_once(store, now=T0)
    assert await reserve(store, now=T0 + IDEMPOTENCY_TTL - 1) == RESPONSE
    assert await reserve(store, fp=OTHER_FP, now=T0 + IDEMPOTENCY_TTL) is None
    with pytest.raises(IdempotencyInProgressError):
        await reserve(store, fp=OTHER_FP, now=T0 + IDEMPOTENCY_TTL + 1)


@pytest_twisted.ensureDeferred
async def test_keys_are_scoped_to_the_client(store: AnyStore) -> None:
    """Bob's key "k" is not Alice's: reserving, recording and releasing one leaves the
    other alone, whatever the bodies."""
    assert await reserve(store, client="alice") is None
    assert await reserve(store, fp=OTHER_FP, client="bob") is None
    bob = StoredResponse(201, (), b"bob")
    await within(store.add([make_job("bob")], record(client="bob", response=bob)))
    await within(store.release_key("bob", "k"))
    with pytest.raises(IdempotencyInProgressError):
        await reserve(store, client="alice")
    assert await reserve(store, fp=OTHER_FP, client="bob") == bob


@pytest_twisted.ensureDeferred
async def test_only_another_instances_old_reservation_is_abandoned(backend: Backend) -> None:
    """A reservation of another store instance (a process that died before recording)
    is taken over once IDEMPOTENCY_ABANDONED_AFTER old, for any body; before that it is
    in progress. An instance's own reservation is never abandoned (only the TTL ends it),
    and the instance that lost its reservation cannot record it: its add fails and
    stores no job."""
    first = await open_backend(backend, instance_id="first")
    second = await open_backend(backend, instance_id="second")
    try:
        assert await reserve(first) is None
        assert await reserve(first, "own") is None
        with pytest.raises(IdempotencyInProgressError):
            await reserve(first, "own", now=T0 + IDEMPOTENCY_TTL - 1)
        with pytest.raises(IdempotencyInProgressError):
            await reserve(second, now=T0 + IDEMPOTENCY_ABANDONED_AFTER - 1)
        assert await reserve(second, fp=OTHER_FP, now=T0 + IDEMPOTENCY_ABANDONED_AFTER) is None

        lost = make_job()
        with pytest.raises(IdempotencyInProgressError):
            await within(first.add([lost], record()))
        assert await within(first.get("alice", lost.id)) is None
        await within(first.release_key("alice", "k"))  # not first's any more: a no-op
        await within(second.add([make_job()], record()))
        assert await reserve(first, fp=OTHER_FP, now=T0 + 100) == RESPONSE
    finally:
        await within(first.close())
        await within(second.close())


@pytest_twisted.ensureDeferred
async def test_a_restarted_process_abandons_its_predecessors_reservation(
    backend: Backend,
) -> None:
    """A store opened again (a restarted process, even under the same instance id) is
    another instance: the reservation its predecessor left is free again at the latest
    IDEMPOTENCY_ABANDONED_AFTER later, not held until the TTL."""
    first = await open_backend(backend)
    assert await reserve(first) is None
    await within(first.close())
    second = await open_backend(backend)
    try:
        assert await reserve(second, now=T0 + IDEMPOTENCY_ABANDONED_AFTER) is None
        await within(second.add([make_job()], record()))
        assert await reserve(second, now=T0 + 100) == RESPONSE
    finally:
        await within(second.close())


@pytest_twisted.ensureDeferred
async def test_the_record_and_the_jobs_commit_together(backend: Backend, store: AnyStore) -> None:
    """If the jobs cannot be stored (a duplicate id), the response is not recorded
    either: the key stays reserved. Recording without a reservation stores nothing."""
    job = make_job()
    await within(store.add([job]))
    assert await reserve(store) is None
    with pytest.raises(backend.integrity_error):
        await within(store.add([job], record()))
    with pytest.raises(IdempotencyInProgressError):
        await reserve(store)

    stray = make_job()
    with pytest.raises(IdempotencyInProgressError):
        await within(store.add([stray], record("never-reserved")))
    assert await within(store.get("alice", stray.id)) is None
    assert store.queued() == 1


@pytest_twisted.ensureDeferred
async def test_records_survive_a_reopen(backend: Backend) -> None:
    """A recorded key is durable: a store opened again on the database replays it (and
    sees a mismatch for another body)."""
    first = await open_backend(backend)
    await submit_once(first)
    await within(first.close())
    second = await open_backend(backend)
    try:
        assert await reserve(second, now=T0 + 60) == RESPONSE
        with pytest.raises(IdempotencyMismatchError):
            await reserve(second, fp=OTHER_FP, now=T0 + 60)
    finally:
        await within(second.close())


@pytest_twisted.ensureDeferred
async def test_purge_drops_keys_older_than_the_ttl(store: AnyStore) -> None:
    """``purge`` (whatever its job cutoff) deletes keys reserved more than
    IDEMPOTENCY_TTL ago by the reactor's clock, and keeps younger ones."""
    now = reactor().seconds()
    old = now - IDEMPOTENCY_TTL - 10
    await submit_once(store, "old", now=old)
    await submit_once(store, "young", now=now - 10)
    await within(store.purge(0))
    # Asked as of a time when both would still be valid: only the young one is left.
    assert await reserve(store, "old", OTHER_FP, now=old + 1) is None
    with pytest.raises(IdempotencyMismatchError):
        await reserve(store, "young", OTHER_FP, now=now)


@pytest_twisted.ensureDeferred
async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    """A database of schema version 1 (before Idempotency-Keys) gets migration 2 on open
    and keeps its jobs."""
    path = db_path(tmp_path)
    Path(path).parent.mkdir(parents=True)
    job = make_job()
    store = await open_store(str(tmp_path / "scratch.sqlite3"))
    await within(store.add([job]))
    await within(store.close())
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute(f"ATTACH DATABASE '{tmp_path / 'scratch.sqlite3'}' AS scratch")
        v1 = (
            "seq, id, client, state, priority, host, created_at, not_before, started_at, "
            "finished_at, attempts, spec, metadata, result, error, owner, lease_until"
        )
        conn.execute(f"INSERT INTO jobs SELECT {v1} FROM scratch.jobs")
    conn.close()

    migrated = await open_store(path)
    try:
        assert await within(migrated.get("alice", job.id)) == job
        await submit_once(migrated)
        assert await reserve(migrated) == RESPONSE
    finally:
        await within(migrated.close())
    with sqlite3.connect(path) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    conn.close()
    assert versions[:2] == [1, 2]


# -- the API --------------------------------------------------------------------------------


JSON = ("Content-Type", "application/json")


async def post(service: Service, body: object, key: str | None, token: str | None = None) -> Reply:
    """POST ``body`` (JSON, sent as exactly these bytes every time) with ``key``."""
    headers = [JSON] if key is None else [JSON, ("Idempotency-Key", key)]
    data = json.dumps(body).encode()
    return await service.call("POST", "/v1/jobs", body=data, headers=headers, token=token)


async def job_ids(service: Service, token: str | None = None) -> list[str]:
    reply = await service.call("GET", "/v1/jobs?limit=1000", token=token)
    assert reply.status == 200, reply
    return [job["id"] for job in reply.json()["jobs"]]


@pytest_twisted.ensureDeferred
async def test_same_key_and_body_replays_the_first_response(svc: Service) -> None:
    """A repeat with the same key and body answers the first 201 byte for byte (its
    Location too), marked ``Idempotent-Replayed: true``, and creates no job; the same
    holds for a batch."""
    spec = {"url": svc.url("/bytes?n=10"), "metadata": {"n": 1}}
    first = await post(svc, spec, "key-1")
    assert first.status == 201, first
    assert first.headers.get("idempotent-replayed") is None
    again = await post(svc, spec, "key-1")
    assert (again.status, again.body) == (201, first.body)
    assert again.headers.get("location") == first.headers.get("location")
    assert again.headers.get("content-type") == "application/json"
    assert again.headers.get("idempotent-replayed") == "true"

    batch = {"jobs": [{"url": svc.url("/bytes")}, {"url": svc.url("/bytes?n=2")}]}
    first_batch = await post(svc, batch, "key-2")
    assert first_batch.status == 201
    assert (await post(svc, batch, "key-2")).body == first_batch.body
    created = [first.json()["id"]] + [j["id"] for j in first_batch.json()["jobs"]]
    assert sorted(await job_ids(svc)) == sorted(created)


@pytest_twisted.ensureDeferred
async def test_same_key_with_another_body_is_422(svc: Service) -> None:
    """The same key with another body (even one differing only in spacing: the
    fingerprint is the raw bytes) is 422 ``idempotency_key_reused`` naming the header;
    the first response is still replayed."""
    spec = {"url": svc.url("/bytes")}
    first = await post(svc, spec, "k")
    assert first.status == 201
    for body in ({"url": svc.url("/bytes?n=1")}, {"url": svc.url("/bytes"), "priority": 0}):
        reply = await post(svc, body, "k")
        assert reply.status == 422, reply
        assert reply.error["code"] == "idempotency_key_reused"
        assert reply.error["field"] == "Idempotency-Key"
    spaced = json.dumps(spec, indent=1).encode()
    reply = await svc.call(
        "POST", "/v1/jobs", body=spaced, headers=[JSON, ("Idempotency-Key", "k")]
    )
    assert reply.status == 422
    assert (await post(svc, spec, "k")).body == first.body
    assert await job_ids(svc) == [first.json()["id"]]


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_posts_with_one_key_create_one_job(svc: Service) -> None:
    """20 concurrent POSTs with the same key and body: one job exists; every answer is
    that job's 201 or a 409 ``idempotency_key_in_progress`` with Retry-After; a retry
    after them all replays the 201."""
    spec = {"url": svc.url("/bytes?n=100")}
    calls = [Deferred.fromCoroutine(post(svc, spec, "burst")) for _ in range(20)]
    replies: list[Reply] = await gatherResults(calls)
    created = [r for r in replies if r.status == 201]
    conflicts = [r for r in replies if r.status == 409]
    assert len(created) + len(conflicts) == 20, [r.status for r in replies]
    assert created
    assert {r.body for r in created} == {created[0].body}
    for r in conflicts:
        assert r.error["code"] == "idempotency_key_in_progress"
        assert r.headers.get("retry-after") == "1"
    assert await job_ids(svc) == [created[0].json()["id"]]
    assert (await post(svc, spec, "burst")).body == created[0].body


@pytest_twisted.ensureDeferred
async def test_keys_are_per_client(services: ServiceFactory) -> None:
    """Bob's "k" is not Alice's: the same key (and body) from another client creates an
    independent job, and each client's repeat replays its own."""
    s = await services(tokens={"alice": ALICE, "bob": BOB})
    spec = {"url": s.url("/bytes")}
    alice = await post(s, spec, "k", token=ALICE)
    bob = await post(s, spec, "k", token=BOB)
    assert (alice.status, bob.status) == (201, 201)
    assert alice.json()["id"] != bob.json()["id"]
    assert (await post(s, spec, "k", token=ALICE)).body == alice.body
    assert (await post(s, spec, "k", token=BOB)).body == bob.body
    assert await job_ids(s, ALICE) == [alice.json()["id"]]
    assert await job_ids(s, BOB) == [bob.json()["id"]]


@pytest_twisted.ensureDeferred
async def test_a_refused_request_does_not_use_the_key(svc: Service) -> None:
    """Requests that fail validation (400, 415) are not saved, nor are refusals the
    client should retry (503 queue_full): the key then takes any valid body."""
    invalid = await post(svc, {"url": "ftp://example.test/"}, "k")
    assert invalid.status == 400
    reply = await svc.call(
        "POST",
        "/v1/jobs",
        body=b"{}",
        headers=[("Content-Type", "text/plain"), ("Idempotency-Key", "k")],
    )
    assert reply.status == 415
    svc.api.max_queued = 0
    spec = {"url": svc.url("/bytes")}
    full = await post(svc, spec, "k")
    assert (full.status, full.error["code"]) == (503, "queue_full")
    svc.api.max_queued = 1000
    accepted = await post(svc, spec, "k")
    assert accepted.status == 201, accepted
    assert accepted.headers.get("idempotent-replayed") is None
    assert await job_ids(svc) == [accepted.json()["id"]]


@pytest_twisted.ensureDeferred
async def test_a_replay_is_not_charged_to_the_quota(services: ServiceFactory) -> None:
    """With a rate quota of one job, the replay of an accepted submission still answers
    its 201 (it creates nothing), while a new submission is 429."""
    from curlfetch.quotas import ClientQuotas

    s = await services(tokens={"alice": ALICE}, quotas=ClientQuotas(rate=0.001, burst=1))
    spec = {"url": s.url("/bytes")}
    first = await post(s, spec, "k")
    assert first.status == 201
    assert (await post(s, spec, "k")).body == first.body
    assert (await post(s, spec, "other")).status == 429


@pytest_twisted.ensureDeferred
async def test_malformed_keys_are_400_naming_the_header(svc: Service) -> None:
    """A key must be one header of 1-255 visible ASCII characters: 256 characters, a
    space, a tab, DEL or two headers are 400 with ``field: Idempotency-Key``, and
    nothing is created; 255 characters are fine."""
    spec = json.dumps({"url": svc.url("/bytes")}).encode()
    bad = [
        [("Idempotency-Key", "x" * 256)],
        [("Idempotency-Key", "a b")],
        [("Idempotency-Key", "a\tb")],
        [("Idempotency-Key", "del\x7f")],
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    ]
    for headers in bad:
        reply = await svc.call("POST", "/v1/jobs", body=spec, headers=[JSON, *headers])
        assert reply.status == 400, (headers, reply)
        assert reply.error["field"] == "Idempotency-Key"
    assert await job_ids(svc) == []
    reply = await svc.call(
        "POST", "/v1/jobs", body=spec, headers=[JSON, ("Idempotency-Key", "~" * 255)]
    )
    assert reply.status == 201


@pytest_twisted.ensureDeferred
async def test_a_key_older_than_24_hours_creates_a_new_job(svc: Service) -> None:
    """Once a key's reservation is IDEMPOTENCY_TTL old (the test moves it back in the
    database rather than waiting a day), the same key and body create a new job."""
    spec = {"url": svc.url("/bytes")}
    first = await post(svc, spec, "k")
    assert first.status == 201
    path = svc.root / "jobs.sqlite3"
    with sqlite3.connect(path, timeout=5) as conn:
        conn.execute("UPDATE idempotency_keys SET created_at = created_at - ?", (IDEMPOTENCY_TTL,))
    conn.close()
    second = await post(svc, spec, "k")
    assert second.status == 201
    assert second.headers.get("idempotent-replayed") is None
    assert second.json()["id"] != first.json()["id"]
    assert (await post(svc, spec, "k")).body == second.body
    assert len(await job_ids(svc)) == 2
