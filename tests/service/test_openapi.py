"""The OpenAPI 3.1 document against the implementation: it is a valid document, it lists
exactly the Klein routes and methods, and real responses of the running service (success
and error, for every route) validate against the documented schemas and headers."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.internet import protocol

from curlfetch.api import JobAPI
from curlfetch.quotas import ClientQuotas
from curlfetch.webhooks import new_secret

from .apiserver import Reply, Service, ServiceFactory, services, svc

__all__ = ["services", "svc"]  # fixtures

DOC_URI = "urn:curlfetch:openapi"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Checker:
    """Validates replies against the document and records which documented responses
    were seen."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)
        self.covered: set[tuple[str, str, str]] = set()

    def check(self, reply: Reply, path: str, method: str) -> None:
        """``reply`` to ``method path`` (a template, ``/v1/jobs/{job_id}``) is documented
        with its status, and its headers and body match."""
        operation = self.doc["paths"][path][method.lower()]
        status = str(reply.status)
        assert status in operation["responses"], (
            f"{method} {path} answered {status}, which is not documented: {reply.body!r}"
        )
        where = ("paths", path, method.lower(), "responses", status)
        self._check(reply, operation["responses"][status], where)
        self.covered.add((path, method.lower(), status))

    def check_component(self, reply: Reply, name: str) -> None:
        """``reply`` matches ``components/responses/<name>``."""
        where = ("components", "responses", name)
        self._check(reply, self.doc["components"]["responses"][name], where)

    def _check(self, reply: Reply, response: dict[str, Any], where: tuple[str, ...]) -> None:
        if "$ref" in response:
            ref = response["$ref"]
            assert ref.startswith("#/components/responses/")
            name = ref.rsplit("/", 1)[1]
            response = self.doc["components"]["responses"][name]
            where = ("components", "responses", name)
        for header in response.get("headers", {}):
            assert reply.headers.get(header) is not None, f"{where}: no {header} header"
        content = response.get("content")
        if not content:
            assert reply.body == b"", f"{where}: documented without a body"
            return
        media = reply.content_type.split(";")[0].strip()
        key = media if media in content else "*/*"
        assert key in content, f"{where}: {media} is not a documented media type"
        if key != "application/json":
            return
        schema_ref = f"{DOC_URI}#{_pointer(*where, 'content', key, 'schema')}"
        validator = Draft202012Validator(
            {"$ref": schema_ref},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(json.loads(reply.body))
        ]
        assert not errors, f"{where}: {errors}\n{reply.body[:2000]!r}"

    def documented(self) -> set[tuple[str, str, str]]:
        return {
            (path, method, status)
            for path, item in self.doc["paths"].items()
            for method, operation in item.items()
            if method in METHODS
            for status in operation["responses"]
        }


async def fetch_document(service: Service) -> dict[str, Any]:
    reply = await service.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    doc: dict[str, Any] = reply.json()
    return doc


@pytest_twisted.ensureDeferred
async def test_the_document_is_valid_openapi_3_1(svc: Service) -> None:
    """GET /openapi.json is a valid OpenAPI 3.1 document whose schemas are valid JSON
    Schema 2020-12, with this instance's limits in it."""
    doc = await fetch_document(svc)
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert name
    batch = doc["components"]["schemas"]["Batch"]["properties"]["jobs"]
    assert batch["maxItems"] == svc.api.max_batch


@pytest_twisted.ensureDeferred
async def test_every_route_is_documented_and_vice_versa(svc: Service) -> None:
    """The Klein routes and the document's paths are the same set, with the same methods
    (HEAD, which werkzeug adds to every GET route, is implied by GET)."""
    doc = await fetch_document(svc)
    routes: dict[str, set[str]] = {}
    for rule in JobAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(
            m.lower() for m in (rule.methods or ()) if m != "HEAD"
        )
    documented = {path: {m for m in item if m in METHODS} for path, item in doc["paths"].items()}
    assert routes == documented


class _Raw(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest_twisted.ensureDeferred
async def test_real_responses_match_the_document(services: ServiceFactory) -> None:
    """Every route, in success and in error, answers with a documented status, headers
    and body; and every documented response (but 500, a bug) is produced by the run.
    The service has tokens, so authentication failures and quotas are covered too."""
    s = await services(
        max_batch=2,
        max_queued=2,
        max_concurrency=1,
        max_request_bytes=64 * 1024,
        tokens={"alice": ALICE, "bob": BOB},
        webhook_secrets={"bob": new_secret()},
        webhook_backoff=0.05,
        webhook_horizon=0.3,
    )
    doc = await fetch_document(s)
    c = Checker(doc)
    job_path, body_path, jobs_path = "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/body", "/v1/jobs"

    c.check(await s.call("GET", "/healthz"), "/healthz", "GET")
    c.check(await s.call("GET", "/ui/", anonymous=True), "/ui/", "GET")
    for name in ("app.js", "app.css", "nope.js"):
        c.check(await s.call("GET", f"/ui/{name}", anonymous=True), "/ui/{name}", "GET")
    c.check(await s.call("GET", "/v1/stats"), "/v1/stats", "GET")
    c.check(await s.call("GET", "/v1/info"), "/v1/info", "GET")
    c.check(await s.call("GET", "/readyz"), "/readyz", "GET")
    c.check(await s.call("GET", "/openapi.json"), "/openapi.json", "GET")

    # Success, result, body.
    reply = await s.submit({"url": s.url("/bytes?n=100"), "metadata": {"a": 1}})
    c.check(reply, jobs_path, "POST")
    ok = reply.json()["id"]
    reply = await s.call("GET", f"/v1/jobs/{ok}?wait=5")
    assert reply.json()["state"] == "succeeded"
    c.check(reply, job_path, "GET")
    reply = await s.call("GET", f"/v1/jobs/{ok}/body")
    c.check(reply, body_path, "GET")
    etag = reply.headers.get("etag") or ""
    c.check(
        await s.call("GET", f"/v1/jobs/{ok}/body", headers=[("If-None-Match", etag)]),
        body_path,
        "GET",
    )
    c.check(await s.call("DELETE", f"/v1/jobs/{ok}"), job_path, "DELETE")  # 409

    # Failure: a curl error in the view.
    port = s.reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    refused = f"http://127.0.0.1:{port.getHost().port}/"
    await port.stopListening()
    failed = (await s.submit({"url": refused, "retry": {"max_attempts": 1}})).json()["id"]
    reply = await s.call("GET", f"/v1/jobs/{failed}?wait=5")
    assert reply.json()["error"]["code"] == "curl_error"
    c.check(reply, job_path, "GET")

    # A batch, and the ways a submission fails.
    reply = await s.submit({"jobs": [{"url": s.url("/bytes")}, {"url": s.url("/bytes")}]})
    c.check(reply, jobs_path, "POST")
    for job in reply.json()["jobs"]:
        await s.wait_job(job["id"])
    c.check(await s.submit({"jobs": [{"url": s.url("/")}] * 3}), jobs_path, "POST")  # 413
    c.check(await s.submit({"url": s.url("/"), "x": 1}), jobs_path, "POST")  # 400
    reply = await s.call(
        "POST", jobs_path, body=b"{", headers=[("Content-Type", "application/json")]
    )
    c.check(reply, jobs_path, "POST")
    reply = await s.call("POST", jobs_path, body=b"{}", headers=[("Content-Type", "text/plain")])
    c.check(reply, jobs_path, "POST")  # 415
    c.check(await s.submit({"url": s.url("/"), "metadata": {"p": "x" * 70_000}}), jobs_path, "POST")

    # Idempotency-Key: a replay (201), another body (422), still in progress (409), and a
    # malformed key (400).
    body = json.dumps({"url": s.url("/bytes")}).encode()
    json_type = ("Content-Type", "application/json")
    for _ in range(2):
        reply = await s.call(
            "POST", jobs_path, body=body, headers=[json_type, ("Idempotency-Key", "k1")]
        )
        c.check(reply, jobs_path, "POST")
    assert reply.headers.get("idempotent-replayed") == "true"
    await s.wait_job(reply.json()["id"])
    reply = await s.call(
        "POST", jobs_path, json_body={"url": s.url("/")}, headers=[("Idempotency-Key", "k1")]
    )
    assert reply.status == 422
    c.check(reply, jobs_path, "POST")
    fingerprint = hashlib.sha256(body).hexdigest()
    assert await s.store.reserve_key("alice", "k2", fingerprint, s.reactor.seconds()) is None
    reply = await s.call(
        "POST", jobs_path, body=body, headers=[json_type, ("Idempotency-Key", "k2")]
    )
    assert reply.status == 409
    c.check(reply, jobs_path, "POST")
    await s.store.release_key("alice", "k2")
    reply = await s.call("POST", jobs_path, body=body, headers=[json_type, ("Idempotency-Key", "")])
    assert reply.status == 400
    c.check(reply, jobs_path, "POST")

    # A body deleted under its finished job: 410.
    lost = (await s.submit({"url": s.url("/bytes?n=10")})).json()["id"]
    assert (await s.call("GET", f"/v1/jobs/{lost}?wait=5")).json()["state"] == "succeeded"
    segment = (await s.call("GET", f"/v1/jobs/{lost}")).json()["result"]["body"]["warc"]
    os.unlink(s.root / "segments" / (segment["segment"] + ".open"))
    reply = await s.call("GET", f"/v1/jobs/{lost}/body")
    assert reply.status == 410
    c.check(reply, body_path, "GET")
    # A range past the end: 416; one within: 206.
    kept = (await s.submit({"url": s.url("/bytes?n=10")})).json()["id"]
    assert (await s.call("GET", f"/v1/jobs/{kept}?wait=5")).json()["state"] == "succeeded"
    reply = await s.call("GET", f"/v1/jobs/{kept}/body", headers=[("Range", "bytes=10-")])
    assert reply.status == 416
    c.check(reply, body_path, "GET")
    reply = await s.call("GET", f"/v1/jobs/{kept}/body", headers=[("Range", "bytes=2-4")])
    assert reply.status == 206
    c.check(reply, body_path, "GET")

    # Queued and running jobs: cancel, backpressure, bodies not there yet.
    busy = (await s.submit({"url": s.url("/delay?s=30")})).json()["id"]

    async def busy_running() -> bool:
        reply = await s.call("GET", f"/v1/jobs/{busy}")
        state: str = reply.json()["state"]
        return state == "running"

    await s.until(busy_running)
    queued = (await s.submit({"url": s.url("/bytes")})).json()["id"]
    reply = await s.submit({"jobs": [{"url": s.url("/bytes")}, {"url": s.url("/bytes")}]})
    assert reply.status == 503
    c.check(reply, jobs_path, "POST")
    reply = await s.call("GET", f"/v1/jobs/{queued}?wait=0.1")
    assert reply.json()["state"] == "queued"
    c.check(reply, job_path, "GET")
    c.check(await s.call("GET", f"/v1/jobs/{queued}/body"), body_path, "GET")  # 404
    c.check(await s.call("DELETE", f"/v1/jobs/{queued}"), job_path, "DELETE")
    c.check(await s.call("DELETE", f"/v1/jobs/{busy}"), job_path, "DELETE")

    # Lists, bad parameters, unknown jobs.
    c.check(await s.call("GET", "/v1/jobs?limit=2"), jobs_path, "GET")
    c.check(await s.call("GET", "/v1/jobs?state=succeeded"), jobs_path, "GET")
    c.check(await s.call("GET", "/v1/jobs?limit=0"), jobs_path, "GET")  # 400
    c.check(await s.call("GET", f"/v1/jobs/{ok}?wait=x"), job_path, "GET")  # 400
    unknown = "0123456789abcdef0123456789abcdef"
    c.check(await s.call("GET", f"/v1/jobs/{unknown}"), job_path, "GET")
    c.check(await s.call("DELETE", f"/v1/jobs/{unknown}"), job_path, "DELETE")
    c.check(await s.call("GET", f"/v1/jobs/{unknown}/body"), body_path, "GET")
    c.check(await s.call("GET", "/metrics"), "/metrics", "GET")
    exports = [f"/v1/jobs/export.{kind}" for kind in ("warc", "warc.gz", "ndjson")]
    for export in exports:
        c.check(await s.call("GET", f"{export}?state=succeeded"), export, "GET")
        c.check(await s.call("GET", f"{export}?created_since=x"), export, "GET")  # 400

    # Batches, events, webhooks.
    batches_path, batch_path = "/v1/batches", "/v1/batches/{batch_id}"
    batch_jobs_path, events_path = "/v1/batches/{batch_id}/jobs", "/v1/events"
    secret_path, deliveries_path = "/v1/webhooks/secret", "/v1/webhooks/deliveries"
    delivery_path = "/v1/webhooks/deliveries/{delivery_id}"
    retry_path = "/v1/webhooks/deliveries/{delivery_id}/retry"
    reply = await s.call("POST", secret_path)
    c.check(reply, secret_path, "POST")  # 201
    c.check(await s.call("POST", secret_path, token=BOB), secret_path, "POST")  # 409
    hook = {"url": f"http://127.0.0.1:{s.port_number}/nowhere", "events": ["batch.completed"]}
    reply = await s.call(
        "POST", batches_path, json_body={"jobs": [{"url": s.url("/bytes")}], "notify": hook}
    )
    c.check(reply, batches_path, "POST")  # 201
    batch = reply.json()["id"]
    c.check(await s.call("GET", f"/v1/batches/{batch}?wait=5"), batch_path, "GET")
    c.check(await s.call("GET", f"/v1/batches/{batch}?wait=x"), batch_path, "GET")  # 400
    c.check(await s.call("GET", f"/v1/batches/{unknown}"), batch_path, "GET")  # 404
    c.check(await s.call("GET", f"/v1/batches/{batch}/jobs"), batch_jobs_path, "GET")
    c.check(await s.call("GET", f"/v1/batches/{batch}/jobs?limit=0"), batch_jobs_path, "GET")
    c.check(await s.call("GET", f"/v1/batches/{unknown}/jobs"), batch_jobs_path, "GET")
    c.check(await s.call("DELETE", f"/v1/batches/{batch}"), batch_path, "DELETE")
    c.check(await s.call("DELETE", f"/v1/batches/{unknown}"), batch_path, "DELETE")
    c.check(await s.call("GET", batches_path), batches_path, "GET")
    c.check(await s.call("GET", f"{batches_path}?limit=x"), batches_path, "GET")  # 400
    ndjson_type = ("Content-Type", "application/x-ndjson")
    line = json.dumps({"url": s.url("/bytes")}).encode() + b"\n"
    reply = await s.call("POST", batches_path, body=line * 3, headers=[ndjson_type])
    assert reply.status == 503  # max_queued=2
    c.check(reply, batches_path, "POST")
    reply = await s.call("POST", batches_path, body=b"{\n", headers=[ndjson_type])
    c.check(reply, batches_path, "POST")  # 400
    reply = await s.call("POST", batches_path, json_body={"jobs": [{"url": s.url("/")}] * 3})
    c.check(reply, batches_path, "POST")  # 413
    reply = await s.call("POST", batches_path, body=b"x", headers=[("Content-Type", "text/plain")])
    c.check(reply, batches_path, "POST")  # 415
    body = json.dumps({"jobs": [{"url": s.url("/bytes")}]}).encode()
    fingerprint = hashlib.sha256(body).hexdigest()
    assert await s.store.reserve_key("alice", "b1", fingerprint, s.reactor.seconds()) is None
    reply = await s.call(
        "POST", batches_path, body=body, headers=[json_type, ("Idempotency-Key", "b1")]
    )
    c.check(reply, batches_path, "POST")  # 409
    reply = await s.call(
        "POST", batches_path, body=body + b" ", headers=[json_type, ("Idempotency-Key", "b1")]
    )
    c.check(reply, batches_path, "POST")  # 422
    await s.store.release_key("alice", "b1")

    async def failed_delivery() -> list[dict[str, Any]]:
        reply = await s.call("GET", f"{deliveries_path}?status=failed")
        c.check(reply, deliveries_path, "GET")
        found: list[dict[str, Any]] = reply.json()["deliveries"]
        return found

    await s.until(lambda: _truthy(failed_delivery()))
    [delivery] = await failed_delivery()
    c.check(await s.call("GET", f"{deliveries_path}?status=x"), deliveries_path, "GET")  # 400
    c.check(await s.call("GET", f"/v1/webhooks/deliveries/{delivery['id']}"), delivery_path, "GET")
    c.check(await s.call("GET", "/v1/webhooks/deliveries/msg_x"), delivery_path, "GET")  # 404
    retry = f"/v1/webhooks/deliveries/{delivery['id']}/retry"
    c.check(await s.call("POST", retry), retry_path, "POST")  # 200
    c.check(await s.call("POST", retry), retry_path, "POST")  # 409: pending now
    c.check(await s.call("POST", "/v1/webhooks/deliveries/msg_x/retry"), retry_path, "POST")
    await s.store.purge_loop(s.reactor.seconds() + 10, 0)
    expired = await s.call("GET", f"{events_path}?last_event_id=0-0")  # 200: ends at once
    assert expired.status == 200
    assert b"event: error" in expired.body
    c.check(expired, events_path, "GET")
    c.check(await s.call("GET", f"{events_path}?types=x"), events_path, "GET")  # 400

    # Hosts: the list, one host, and each refusing a bad argument.
    target_host = urlsplit(s.url("/")).netloc
    host_path = f"/v1/hosts/{target_host}"
    c.check(await s.call("GET", "/v1/hosts"), "/v1/hosts", "GET")
    c.check(await s.call("GET", "/v1/hosts?limit=0"), "/v1/hosts", "GET")  # 400
    c.check(await s.call("GET", host_path), "/v1/hosts/{host}", "GET")
    c.check(await s.call("GET", "/v1/hosts/no-port"), "/v1/hosts/{host}", "GET")  # 400

    # The new routes that read the store (each also answers 503 once it is gone).
    over_store = (
        ("GET", batches_path, batches_path),
        ("GET", batch_path, f"/v1/batches/{batch}"),
        ("DELETE", batch_path, f"/v1/batches/{batch}"),
        ("GET", batch_jobs_path, f"/v1/batches/{batch}/jobs"),
        ("POST", secret_path, secret_path),
        ("GET", deliveries_path, deliveries_path),
        ("GET", delivery_path, f"/v1/webhooks/deliveries/{delivery['id']}"),
        ("POST", retry_path, retry),
        ("GET", "/v1/stats", "/v1/stats"),
        ("GET", "/v1/hosts", "/v1/hosts"),
        ("GET", "/v1/hosts/{host}", host_path),
    )

    # Authentication: none, an unknown token, a malformed header; another client's job.
    for method, template, path in (
        ("POST", jobs_path, jobs_path),
        ("GET", jobs_path, jobs_path),
        ("GET", job_path, f"/v1/jobs/{ok}"),
        ("DELETE", job_path, f"/v1/jobs/{ok}"),
        ("GET", body_path, f"/v1/jobs/{ok}/body"),
        ("GET", "/metrics", "/metrics"),
        *(("GET", export, export) for export in exports),
        ("POST", batches_path, batches_path),
        ("GET", events_path, events_path),
        ("GET", "/v1/info", "/v1/info"),
        *over_store,
    ):
        reply = await s.call(method, path, anonymous=True)
        assert reply.status == 401
        c.check(reply, template, method)
        reply = await s.call(method, path, token="unknown-token-0123456789")
        assert reply.status == 401
        c.check(reply, template, method)
        malformed = [("Authorization", "Bearer")]
        reply = await s.call(method, path, anonymous=True, headers=malformed)
        assert reply.status == 400
        c.check(reply, template, method)
    reply = await s.call("POST", jobs_path, anonymous=True, json_body={"url": s.url("/")})
    assert reply.status == 401  # refused before the body is read
    c.check(reply, jobs_path, "POST")
    reply = await s.call("GET", f"/v1/jobs/{ok}", token=BOB)
    assert reply.status == 404
    c.check(reply, job_path, "GET")

    # Quotas (on another service with a rate quota): 429.
    limited = await services(tokens={"alice": ALICE}, quotas=ClientQuotas(rate=0.001, burst=1))
    assert (await limited.submit({"url": limited.url("/bytes")})).status == 201
    reply = await limited.submit({"url": limited.url("/bytes")})
    assert reply.status == 429
    c.check(reply, jobs_path, "POST")
    reply = await limited.call(
        "POST", batches_path, json_body={"jobs": [{"url": limited.url("/bytes")}]}
    )
    assert reply.status == 429
    c.check(reply, batches_path, "POST")

    # Unknown paths and methods.
    c.check_component(await s.call("GET", "/nope"), "NotFound")
    c.check_component(await s.call("PATCH", jobs_path), "MethodNotAllowed")
    c.check_component(await s.call("POST", f"/v1/jobs/{ok}"), "MethodNotAllowed")

    # Draining: not ready, no submissions.
    s.api.start_draining()
    c.check(await s.call("GET", "/readyz"), "/readyz", "GET")
    c.check(await s.submit({"url": s.url("/")}), jobs_path, "POST")  # 503
    reply = await s.call("POST", batches_path, json_body={"jobs": [{"url": s.url("/")}]})
    c.check(reply, batches_path, "POST")  # 503
    c.check(await s.call("GET", events_path), events_path, "GET")  # 503

    # The store is gone: 503, not 500.
    await s.scheduler.stopService()
    await s.store.close()
    c.check(await s.call("GET", f"/v1/jobs/{ok}"), job_path, "GET")
    c.check(await s.call("DELETE", f"/v1/jobs/{ok}"), job_path, "DELETE")
    c.check(await s.call("GET", f"/v1/jobs/{ok}/body"), body_path, "GET")
    c.check(await s.call("GET", jobs_path), jobs_path, "GET")
    for export in exports:
        c.check(await s.call("GET", export), export, "GET")
    for method, template, path in over_store:
        reply = await s.call(method, path)
        assert reply.status == 503, (path, reply)
        c.check(reply, template, method)

    missing = {r for r in c.documented() - c.covered if r[2] != "500"}
    assert not missing, f"documented but never produced: {sorted(missing)}"


async def _truthy(d: Any) -> bool:
    return bool(await d)
