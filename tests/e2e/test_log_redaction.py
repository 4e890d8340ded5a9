"""Secrets never reach the logs of a real ``twistd curlfetch`` (text and JSON formats):
credentials in URLs, Authorization and Cookie headers, whether a job succeeds, fails in
curl, or is refused by the API or the egress policy. The job record keeps them: it has
to fetch with them."""

from __future__ import annotations

import json
import signal
import socket
from urllib.parse import quote

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite
from .conftest import TERMINAL, Daemons

pytestmark = pytest.mark.timeout(60)

SECRETS = ("secret", "xyz", "c00kie")
HEADERS = [["Authorization", "Bearer xyz"], ["Cookie", "session=c00kie"]]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_logs_never_show_credentials(
    daemons: Daemons, target: LoopbackSite, log_format: str
) -> None:
    """A URL with user:secret@ (refused, 400), redirects to user:secret@ URLs that
    succeed, fail to connect, fail to parse and are denied by the egress policy, and
    jobs sending ``Authorization: Bearer xyz`` and a Cookie: the job views keep the real
    URL and headers, but nothing the process writes to stdout/stderr contains the
    secrets. JSON logs stay one JSON object per line."""
    d = await daemons.start(f"--log-format={log_format}", "--drain-timeout=1")
    closed = closed_port()

    refused = await d.post_json(
        "/v1/jobs",
        {"url": f"http://user:secret@127.0.0.1:{target.port_number}/", "headers": HEADERS},
    )
    assert refused.status == 400
    assert "secret" not in refused.body.decode()

    def via_redirect(to: str) -> str:
        return target.url("/redirect?to=" + quote(to, safe=""))

    urls = {
        "succeeds": via_redirect(f"http://user:secret@127.0.0.1:{target.port_number}/echo"),
        "connect": via_redirect(f"http://user:secret@127.0.0.1:{closed}/x?token=secret"),
        "parse": via_redirect("http://user:secret@[bad/"),
        "egress": via_redirect("http://user:secret@127.0.0.1:80/"),
        "direct": f"http://127.0.0.1:{closed}/?access_token=secret",
    }
    jobs = {}
    for name, url in urls.items():
        jobs[name] = await d.submit({"url": url, "headers": HEADERS, "retry": {"max_attempts": 1}})
    done = {name: await d.wait_state(job["id"], TERMINAL) for name, job in jobs.items()}
    assert done["succeeds"]["state"] == "succeeded", done["succeeds"]
    for name in ("connect", "parse", "egress", "direct"):
        assert done[name]["state"] == "failed", done[name]
    assert done["egress"]["error"]["code"] == "egress_denied", done["egress"]
    for name, view in done.items():
        assert view["request"]["url"] == urls[name]
        assert view["request"]["headers"] == HEADERS

    listed = await d.request("GET", "/v1/jobs?limit=10", headers=[("Authorization", "Bearer xyz")])
    assert listed.status in (200, 401)
    d.signal(signal.SIGTERM)
    assert await d.wait_exit(15) == 0

    log = d.log()
    assert "POST /v1/jobs" in log  # the access log is there, and was checked too
    for secret in SECRETS:
        assert secret not in log, f"{secret!r} in the {log_format} log:\n{log}"
    if log_format == "json":
        for line in log.splitlines():
            if line.strip():
                json.loads(line)
