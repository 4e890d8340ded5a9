"""Schemathesis against a real ``twistd curlfetch``: every operation of ``/openapi.json``
with generated valid and invalid requests, bounded by examples and wall-clock time.

No generated job can reach the network, by two fences: every job URL the service would
accept is pointed at a loopback target in this process before it is sent (a URL the
service refuses is sent as generated, to fuzz the validation), and the daemon only
fetches from ``--allow-host=127.0.0.1`` (checked on the URL's host before anything is
resolved or sent, and on every redirect), with ``--max-concurrency 1`` besides. Half the
positive cases with a refused URL get a target URL instead, so that jobs are accepted,
run, and their views and bodies are checked too; the job operations are then fuzzed
again with the ids of those real jobs.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from twisted.internet import threads

from curlfetch.jobs import JobSpec, Limits, SpecError

from ..engine.servers import LoopbackSite
from .conftest import Daemons, reactor

pytestmark = pytest.mark.timeout(120)

BUDGET = 60.0
"""Wall-clock seconds for all the generated requests together."""
MAX_EXAMPLES = 120
"""Per operation and generation mode."""
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
_HTTP_AUTHORITY = re.compile(r"\A(https?://)[^/?#]*", re.IGNORECASE)
_MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


class Fuzzer:
    """Sends generated cases until the budget is spent; collects failure reports."""

    def __init__(self, base_url: str, target: str) -> None:
        self.base_url = base_url
        self.target = target
        """``host:port`` of the loopback target every accepted job URL is pointed at."""
        self.session = requests.Session()
        self.session.trust_env = False  # never a proxy from the environment
        self.deadline = time.monotonic() + BUDGET
        self.sent = 0
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.job_ids: list[str] = []
        self.failures: list[str] = []

    def run(self, document: dict[str, Any]) -> None:
        schema = schemathesis.openapi.from_dict(document)
        operations: list[Any] = []
        for result in schema.get_all_operations():
            if isinstance(result, Ok):
                operations.append(result.ok())
            else:
                self.failures.append(f"the document has an invalid operation: {result.err()}")
        for operation in operations:
            for mode in _MODES:
                self.fuzz(operation, mode, operation.as_strategy(generation_mode=mode))
        for operation in operations:
            if "{job_id}" in operation.path:
                for mode in _MODES:
                    self.fuzz(operation, mode, self.with_real_ids(operation, mode))

    def with_real_ids(self, operation: Any, mode: GenerationMode) -> Any:
        """Cases for ``operation`` whose job_id is one of the jobs created so far."""

        def cases(job_id: str) -> Any:
            return operation.as_strategy(generation_mode=mode, path_parameters={"job_id": job_id})

        return st.sampled_from(self.job_ids[-20:] or ["0"]).flatmap(cases)

    def loopback_only(self, body: Any, replace_refused: bool) -> Any:
        """``body`` with every job URL the service would accept pointed at the target
        (and, if ``replace_refused``, every refused one replaced by a target URL)."""
        specs = body.get("jobs") if isinstance(body, dict) and "jobs" in body else [body]
        for spec in specs if isinstance(specs, list) else []:
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                continue
            try:
                JobSpec.from_json({"url": spec["url"]}, Limits())
            except SpecError:
                if replace_refused:
                    spec["url"] = f"http://{self.target}/bytes?n=100"
                continue
            spec["url"] = _HTTP_AUTHORITY.sub(rf"\g<1>{self.target}", spec["url"])
        return body

    def fuzz(self, operation: Any, mode: GenerationMode, cases: Any) -> None:
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def one(case: Any) -> None:
            if time.monotonic() > self.deadline or len(self.failures) >= 20:
                raise _BudgetSpentError()  # ends this operation's generation too
            if case.body is not None:
                replace = mode is GenerationMode.POSITIVE and self.sent % 2 == 0
                case.body = self.loopback_only(case.body, replace)
            if operation.path == "/v1/events":
                # A stream follows the log for ever: ask it to end once caught up.
                case.query = {**(case.query or {}), "follow": "false"}
            response = case.call(base_url=self.base_url, session=self.session, timeout=10)
            self.sent += 1
            self.statuses[operation.label, response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except (FailureGroup, Exception) as e:  # FailureGroup is a BaseExceptionGroup
                self.failures.append(f"{operation.label} ({mode.value}): {e}")
            if response.status_code == 201 and operation.label == "POST /v1/jobs":
                created = response.json()
                self.job_ids.extend(j["id"] for j in created.get("jobs", [created]))

        # Unsatisfiable: nothing to make invalid (no parameters).
        with contextlib.suppress(Unsatisfiable, _BudgetSpentError):
            one()


class _BudgetSpentError(Exception):
    """The time budget is spent (or enough failures are in): generate no more."""


def fuzz(base_url: str, document: dict[str, Any], target: str) -> Fuzzer:
    fuzzer = Fuzzer(base_url, target)
    fuzzer.run(document)
    return fuzzer


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_no_server_error_and_no_schema_drift(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Generated valid and invalid requests to every documented operation never get a
    5xx, and every response matches the document: its status is documented, its
    Content-Type is the documented one and its body validates against the schema."""
    d = await daemons.start("--max-concurrency=1", "--allow-host=127.0.0.1", "--drain-timeout=1")
    document = (await d.get("/openapi.json")).json()
    started = time.monotonic()
    fuzzer = await threads.deferToThreadPool(
        reactor(), reactor().getThreadPool(), fuzz, d.url(""), document, target.base[7:]
    )
    elapsed = time.monotonic() - started
    assert not fuzzer.failures, "\n\n".join(fuzzer.failures[:5])
    print(
        f"schemathesis: {fuzzer.sent} requests in {elapsed:.1f}s:", sorted(fuzzer.statuses.items())
    )
    assert fuzzer.sent >= 500, f"only {fuzzer.sent} requests in {elapsed:.1f}s"
    assert fuzzer.statuses["POST /v1/jobs", 201] >= 10, fuzzer.statuses
    assert (await d.get("/healthz")).status == 200
    assert "Traceback" not in d.log(), d.log()[-3000:]
