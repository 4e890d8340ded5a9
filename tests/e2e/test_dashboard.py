"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against a
real ``twistd curlfetch``. Enter a token, submit a batch through the API and watch the
counts and the batch's progress bar reach done; open a failed job (its curl error) and
a succeeded one (its timing waterfall); filter the table; a wrong token gets a clear
message; and a job whose URL, headers, metadata and body carry ``<script>`` and
``javascript:`` payloads is shown as text, with no script run. Screenshots go to
``tests/artifacts/`` (gitignored)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from playwright.sync_api import Browser, Dialog, Page, sync_playwright
from twisted.internet import protocol, threads
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.engine.servers import LoopbackSite

from .conftest import Daemon, Daemons, reactor

TOKEN = "dashboard-token-0123456789abcdef"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAYLOAD = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


def in_browser(work: Callable[[Page], Any]) -> Any:
    """Run ``work`` with a fresh page in headless Chromium (in a thread: the service's
    targets live on this test's reactor)."""

    def run() -> Any:
        with sync_playwright() as p:
            browser: Browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(15_000)
                dialogs: list[str] = []

                def dialog(d: Dialog) -> None:
                    dialogs.append(d.message)
                    d.dismiss()

                page.on("dialog", dialog)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                result = work(page)
                assert dialogs == [], dialogs
                return result, errors
            finally:
                browser.close()

    return threads.deferToThreadPool(reactor(), reactor().getThreadPool(), run)


def until(page: Page, expression: str, timeout: float = 15_000) -> None:
    """Poll ``expression`` in the page until it is truthy (``wait_for_function`` would
    evaluate a string, which the page's CSP forbids, as it should)."""
    waited = 0.0
    while not page.evaluate(expression):
        assert waited < timeout, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)
        waited += 100


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.fixture
def hostile() -> Iterator[str]:
    """A target whose body is an HTML page with scripts (and a javascript: link)."""

    class Evil(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            request.setHeader(b"Content-Type", b"text/html")
            request.setHeader(b"X-Evil", PAYLOAD.encode())
            return (PAYLOAD + '<a href="javascript:window.__pwned=3">x</a>').encode()

    port = reactor().listenTCP(0, Site(Evil()), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    port.stopListening()


async def started(daemons: Daemons) -> Daemon:
    d = daemons.make(env={"CURLFETCH_TOKENS": f"alice:{TOKEN}"})
    await d.start()
    d.token = TOKEN
    return d


async def refused_url() -> str:
    port = reactor().listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/gone"
    await port.stopListening()
    return url


@pytest_twisted.ensureDeferred
async def test_watch_a_batch_open_jobs_and_filter(daemons: Daemons, target: LoopbackSite) -> None:
    """Token, then a batch of 12 (10 good, 2 refused) submitted through the API: the
    tiles reach 10 succeeded and 2 failed, the batch's bar is full; a failed job shows
    COULDNT_CONNECT, a succeeded one its waterfall; the state filter lists the 2."""
    d = await started(daemons)
    refused = await refused_url()
    base = d.url("")

    def before(page: Page) -> None:
        page.goto(base + "/ui/")
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("#app:not([hidden])")

    specs: list[dict[str, Any]] = [{"url": target.url(f"/bytes?n={100 + i}")} for i in range(10)]
    specs += [{"url": refused, "retry": {"max_attempts": 1}}] * 2

    def scenario(page: Page) -> None:
        before(page)
        # Submitted once the page follows the event stream, so its chart sees the jobs.
        page.wait_for_timeout(500)
        post = urllib.request.Request(
            base + "/v1/batches",
            data=json.dumps({"jobs": specs}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(post, timeout=10) as response:
            assert response.status == 201
        until(
            page,
            "document.querySelector('.tile.succeeded b')?.textContent === '10' && "
            "document.querySelector('.tile.failed b')?.textContent === '2'",
            timeout=20_000,
        )
        until(
            page,
            "(() => { const p = document.querySelector('#batches progress');"
            " return p && p.value === p.max && p.max === 12; })()",
        )
        assert page.text_content("#batches .batch-state") == "completed"
        until(page, "document.querySelector('#rate').textContent.startsWith('last minute: 12 ')")
        hosts = page.text_content("#hosts tbody") or ""
        assert "COULDNT_CONNECT 2" in hosts, hosts
        shot(page, "dashboard-overview.png")
        page.select_option("#f-state", "failed")
        page.click("#filters button")
        until(page, "document.querySelectorAll('#jobs tbody tr').length === 2")
        page.click("#jobs tbody tr")
        page.wait_for_selector("#detail:not([hidden])")
        facts = page.text_content("#d-facts") or ""
        assert "COULDNT_CONNECT" in facts, facts
        assert "no response" in (page.text_content("#d-waterfall") or "")
        shot(page, "dashboard-failed-job.png")
        page.select_option("#f-state", "succeeded")
        page.click("#filters button")
        until(page, "document.querySelectorAll('#jobs tbody tr').length === 10")
        page.click("#jobs tbody tr")
        until(page, "document.querySelectorAll('#d-waterfall .phase').length === 6")
        assert "200" in (page.text_content("#d-facts") or "")
        shot(page, "dashboard-job.png")

    _, errors = await in_browser(scenario)
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_gets_a_clear_message(daemons: Daemons) -> None:
    """A refused token: the message says so and the token form is back."""
    d = await started(daemons)

    def scenario(page: Page) -> str:
        page.goto(d.url("/ui/"))
        page.fill("#token", "not-the-token-0123456789")
        page.click("#token-form button")
        page.wait_for_selector("#error:not([hidden])")
        assert page.is_visible("#login")
        shot(page, "dashboard-wrong-token.png")
        return page.text_content("#error") or ""

    message, errors = await in_browser(scenario)
    assert "refused this token" in message
    assert "HTTP 401" in message
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_hostile_strings_are_shown_as_text(daemons: Daemons, hostile: str) -> None:
    """A job whose URL, request headers, metadata and body (an HTML page with scripts, a
    javascript: link and an onerror image) carry payloads: the dashboard shows them as
    text, runs none of them, and serves itself with a strict CSP."""
    d = await started(daemons)
    reply = await d.request("GET", "/ui/")
    csp = reply.headers.get("content-security-policy") or ""
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert reply.headers.get("x-content-type-options") == "nosniff"
    spec = {
        "url": hostile + "/?q=<script>alert(1)</script>",
        "headers": [["X-Test", PAYLOAD]],
        "metadata": {"note": PAYLOAD, "link": "javascript:alert(1)"},
    }
    reply = await d.post_json("/v1/jobs", spec)
    if reply.status == 400:  # a URL libcurl refuses as given: keep the rest hostile
        spec["url"] = hostile + "/?q=%3Cscript%3E"
        reply = await d.post_json("/v1/jobs", spec)
    assert reply.status == 201, reply
    job = reply.json()["id"]
    await d.wait_state(job, {"succeeded"})

    def scenario(page: Page) -> dict[str, Any]:
        page.goto(d.url("/ui/"))
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        until(page, "document.querySelectorAll('#jobs tbody tr').length === 1")
        page.click("#jobs tbody tr")
        until(page, "document.querySelector('#d-body').textContent.length > 0")
        shot(page, "dashboard-hostile.png")
        return {
            "pwned": page.evaluate("window.__pwned === undefined ? null : window.__pwned"),
            "scripts": page.evaluate("document.scripts.length"),
            "images": page.evaluate("document.images.length"),
            "links": page.evaluate("document.querySelectorAll('a').length"),
            "body": page.text_content("#d-body"),
            "facts": page.text_content("#d-facts"),
            "headers": page.text_content("#d-headers"),
            "request": page.text_content("#d-request"),
        }

    seen, errors = await in_browser(scenario)
    assert seen["pwned"] is None
    assert seen["scripts"] == 1  # app.js
    assert seen["images"] == 0
    assert seen["links"] == 0
    assert "<script>window.__pwned=1</script>" in seen["body"]
    assert PAYLOAD in seen["facts"]  # the metadata, as text
    assert PAYLOAD in seen["headers"]
    assert PAYLOAD in seen["request"]
    assert errors == []
