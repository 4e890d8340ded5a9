"""Input limits and injection against a real ``twistd curlfetch``: every cap of a job spec
is a precise 4xx naming the field, and a huge request body is refused with bounded disk
use (twisted.web alone would spool it whole into a temporary file)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import threads

from curlfetch.api import DEFAULT_MAX_REQUEST_BYTES, REFUSE_GRACE
from curlfetch.jobs import Limits

from ..engine.servers import LoopbackSite
from .conftest import Daemon, Daemons, reactor, sleep

pytestmark = pytest.mark.timeout(90)

LIMITS = Limits()
JSON = [("Content-Type", "application/json")]
MB = 1024 * 1024


# -- a raw HTTP/1.1 client, for what the engine would refuse to send --------------------


@attrs.define
class Upload:
    """What a raw upload observed; times are seconds after the first byte was sent."""

    sent: int = 0
    sent_at_response: int | None = None
    response: bytes = b""
    response_at: float | None = None
    closed_at: float | None = None
    closed_how: str = ""

    @property
    def status(self) -> int:
        return int(self.response.split(b" ", 2)[1]) if self.response else 0

    def json(self) -> Any:
        return json.loads(self.response.partition(b"\r\n\r\n")[2])


def chunked_body(total: int, *, end: bool = True, chunk: int = 256 * 1024) -> Any:
    """``total`` bytes of JSON whitespace in HTTP/1.1 chunks, made one chunk at a time,
    with a 10 ms pause every 4 MiB (so that a sampler sees the spool grow), and the
    last chunk unless ``end`` is false (a client that stalls mid-body)."""
    piece = b"%x\r\n%s\r\n" % (chunk, b" " * chunk)
    for i in range(total // chunk):
        if i and i % (4 * MB // chunk) == 0:
            time.sleep(0.01)
        yield piece
    if end:
        yield b"0\r\n\r\n"


def raw_exchange(port: int, head: bytes, body: Any = (), seconds: float = 30.0) -> Upload:
    """Send ``head`` then the pieces of ``body`` while reading the answer, until the
    server closes the connection (or ``seconds`` pass). Blocking: run it in a thread."""
    out = Upload()
    body_iter = iter(body)
    pending: memoryview | None = memoryview(head)
    start = time.monotonic()
    deadline = start + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while time.monotonic() < deadline:
                for _key, events in sel.select(timeout=0.5):
                    if events & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except ConnectionResetError:
                            data, out.closed_how = b"", "reset"
                        if not data:
                            out.closed_at = time.monotonic() - start
                            out.closed_how = out.closed_how or "eof"
                            return out
                        if out.response_at is None:
                            out.response_at = time.monotonic() - start
                            out.sent_at_response = out.sent
                        out.response += data
                    if events & selectors.EVENT_WRITE and pending is not None:
                        try:
                            n = sock.send(pending)
                        except BlockingIOError:
                            n = 0
                        except (BrokenPipeError, ConnectionResetError):
                            pending = None
                            sel.modify(sock, selectors.EVENT_READ)
                            continue
                        out.sent += n
                        pending = pending[n:]
                        if not pending:
                            nxt = next(body_iter, None)
                            pending = None if nxt is None else memoryview(nxt)
                            if pending is None:
                                sel.modify(sock, selectors.EVENT_READ)
    return out


def post_head(port: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\n%s\r\n" % (port, extra)
    )


# -- disk use of the daemon -------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (``du``, without block rounding)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def spool_bytes(pid: int, tmpdir: Path) -> int:
    """Bytes in the files the process holds open in ``tmpdir`` or already deleted
    (``TemporaryFile`` is unlinked at once, so ``du`` never sees it; /proc does)."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else []:
        try:
            link = os.readlink(fd)
            if link.startswith(str(tmpdir)) or link.endswith("(deleted)"):
                st = os.stat(fd)
                if (st.st_mode & 0o170000) == 0o100000:  # a regular file
                    total += st.st_size
        except (FileNotFoundError, PermissionError):
            pass
    return total


@pytest_twisted.ensureDeferred
async def test_100_mb_chunked_post_is_413_with_bounded_disk_use(daemons: Daemons) -> None:
    """A 100 MB chunked POST (no Content-Length) is answered 413 once it passes the
    request cap, and the connection closes when the body ends. Meanwhile the daemon's
    spool files (in its own TMPDIR, watched through /proc/<pid>/fd since TemporaryFile
    is unlinked at once) never hold more than the cap, its data directory does not grow,
    and no spool file stays open afterwards. A client that stalls after the 413 is cut
    off REFUSE_GRACE seconds later."""
    tmpdir = daemons.tmp_path / "tmp"
    tmpdir.mkdir()
    d = daemons.make("--drain-timeout=1", env={"TMPDIR": str(tmpdir)})
    await d.start()
    assert d.proc is not None
    pid = d.proc.pid
    data_before = tree_bytes(d.data_dir)
    head = post_head(d.port, b"Transfer-Encoding: chunked\r\n")

    async def upload(body: Any) -> tuple[Upload, dict[str, int]]:
        peak = {"spool": 0, "tmp": 0, "data": 0, "samples": 0}
        pool = reactor().getThreadPool()
        done = threads.deferToThreadPool(reactor(), pool, raw_exchange, d.port, head, body)
        while not done.called:
            peak["spool"] = max(peak["spool"], spool_bytes(pid, tmpdir))
            peak["tmp"] = max(peak["tmp"], tree_bytes(tmpdir))
            peak["data"] = max(peak["data"], tree_bytes(d.data_dir) - data_before)
            peak["samples"] += 1
            await sleep(0.005)
        result: Upload = await done
        return result, peak

    full, peak = await upload(chunked_body(100 * MB))
    print(
        f"\n100 MB chunked POST: sent {full.sent / MB:.1f} MB in {full.closed_at:.2f}s; 413 "
        f"at {full.response_at:.2f}s after {(full.sent_at_response or 0) / MB:.1f} MB; "
        f"closed ({full.closed_how}) {(full.closed_at or 0) - (full.response_at or 0):.2f}s "
        f"after the 413; peak spool {peak['spool'] / MB:.2f} MB ({peak['samples']} samples), "
        f"TMPDIR du {peak['tmp']} B, data dir growth {peak['data']} B"
    )
    assert full.status == 413, full.response[:300]
    assert full.json()["error"]["code"] == "payload_too_large"
    assert full.response_at is not None
    assert full.closed_at is not None
    assert full.closed_at - full.response_at <= REFUSE_GRACE + 1.0
    assert (full.sent_at_response or 0) < 50 * MB  # answered long before the end
    assert peak["samples"] >= 10
    assert 0 < peak["spool"] <= DEFAULT_MAX_REQUEST_BYTES + MB
    assert peak["tmp"] <= MB
    assert peak["data"] <= 2 * MB
    await sleep(0.3)
    assert spool_bytes(pid, tmpdir) < MB, "a spool file is still open after the connection"

    stalled, peak = await upload(chunked_body(24 * MB, end=False))
    print(
        f"24 MB then stalled: 413 at {stalled.response_at:.2f}s, closed ({stalled.closed_how}) "
        f"{(stalled.closed_at or 0) - (stalled.response_at or 0):.2f}s after it; "
        f"peak spool {peak['spool'] / MB:.2f} MB"
    )
    assert stalled.status == 413
    assert stalled.response_at is not None
    assert stalled.closed_at is not None
    assert REFUSE_GRACE - 0.5 <= stalled.closed_at - stalled.response_at <= REFUSE_GRACE + 1.5
    assert peak["spool"] <= DEFAULT_MAX_REQUEST_BYTES + MB
    await sleep(0.3)
    assert spool_bytes(pid, tmpdir) < MB
    assert (await d.get("/healthz")).status == 200


@pytest_twisted.ensureDeferred
async def test_api_request_header_caps(daemons: Daemons) -> None:
    """The API's own request headers are capped by twisted.web: more than 500 header
    lines, or more than 16 KiB of them, is 400 and the connection closes; a single line
    over 16 KiB closes the connection at once (LineReceiver's limit, no response)."""
    d = await daemons.start("--drain-timeout=1")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
    large = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 500) for i in range(40))
    one_long_line = b"X-Big: " + b"a" * (20 * 1024) + b"\r\n"
    for extra, status in ((many, 400), (large, 400), (one_long_line, 0)):
        reply = await threads.deferToThreadPool(
            reactor(),
            reactor().getThreadPool(),
            raw_exchange,
            d.port,
            post_head(d.port, extra + b"Content-Length: 2\r\n") + b"{}",
            (),
            10.0,
        )
        assert reply.status == status, reply.response[:200]
        assert reply.closed_at is not None
        assert reply.closed_at < 2.0
    assert (await d.get("/healthz")).status == 200


async def expect_error(
    d: Daemon, payload: Any, status: int, field: str | None, code: str = "invalid_request"
) -> dict[str, Any]:
    reply = await d.post_json("/v1/jobs", payload)
    assert reply.status == status, (payload if len(str(payload)) < 300 else "...", reply)
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code, error
    assert error.get("field") == field, error
    return error


@pytest_twisted.ensureDeferred
async def test_job_spec_caps_and_injection_are_refused_naming_the_field(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Each cap and each injection attempt is a 4xx whose error names the field: CR/LF
    in a header value, NUL in the host (raw and %00), userinfo in the URL, an over-long
    URL, too many or too large headers, framing headers, a method not in the allow-list,
    unknown fields, metadata over the cap, timeout/connect_timeout/max_redirects/
    max_body_bytes over the caps (asking for less is accepted), a batch over the cap
    (413), the wrong Content-Type (415) and JSON nested too deeply. Nothing refused is
    stored."""
    d = await daemons.start("--drain-timeout=1")
    url = target.url("/bytes?n=10")

    await expect_error(
        d, {"url": url, "headers": [["X-A", "a\r\nX-Injected: 1"]]}, 400, "headers[0]"
    )
    await expect_error(
        d, {"url": url, "headers": [["X-Ok", "1"], ["X-A", "a\nb"]]}, 400, "headers[1]"
    )
    for bad_host in ("http://exa\u0000mple.com/", "http://exa%00mple.com/"):
        await expect_error(d, {"url": bad_host}, 400, "url")
    secret = await expect_error(d, {"url": "http://user:secret@127.0.0.1:1/"}, 400, "url")
    assert "secret" not in secret["message"]
    long_url = target.url("/?q=" + "a" * LIMITS.max_url_length)
    await expect_error(d, {"url": long_url}, 400, "url")
    too_many = [[f"X-H{i}", "v"] for i in range(LIMITS.max_headers + 1)]
    await expect_error(d, {"url": url, "headers": too_many}, 400, "headers")
    half = LIMITS.max_header_bytes // 2
    too_big = [["X-A", "a" * half], ["X-B", "b" * half]]
    await expect_error(d, {"url": url, "headers": too_big}, 400, "headers")
    smuggle = {"url": url, "method": "POST", "body": "x", "headers": [["Content-Length", "0"]]}
    await expect_error(d, smuggle, 400, "headers[0]")
    for method in ("TRACE", "CONNECT", "GET /x HTTP/1.1\r\n"):
        await expect_error(d, {"url": url, "method": method}, 400, "method")

    await expect_error(d, {"url": url, "bogus": 1}, 400, "bogus")
    for name in (
        "proxy",
        "resolve",
        "connect_to",
        "interface",
        "unix_socket",
        "unix_socket_path",
        "netrc",
        "cookie",
        "cookiefile",
        "cookiejar",
        "verify",
        "ca_bundle",
    ):
        await expect_error(d, {"url": url, name: "x"}, 400, name)
    await expect_error(
        d, {"jobs": [{"url": url}, {"url": url, "resolve": ["a:1:b"]}]}, 400, "jobs[1].resolve"
    )

    meta = {"k": "m" * LIMITS.max_metadata_bytes}
    await expect_error(d, {"url": url, "metadata": meta}, 400, "metadata")
    over: list[tuple[str, object]] = [
        ("timeout", LIMITS.max_timeout + 1),
        ("connect_timeout", LIMITS.max_timeout + 1),
        ("max_redirects", LIMITS.max_redirects + 1),
        ("max_body_bytes", LIMITS.max_body_bytes + 1),
        ("max_redirects", -1),
    ]
    for name, value in over:
        await expect_error(d, {"url": url, name: value}, 400, name)
    huge = b'{"url": "%s", "timeout": 1e400}' % url.encode()  # a float overflow: inf
    huge_reply = await d.request("POST", "/v1/jobs", huge, JSON)
    assert huge_reply.status == 400
    assert huge_reply.json()["error"]["field"] == "timeout"
    less = await d.submit(
        {"url": url, "timeout": 2, "connect_timeout": 1, "max_redirects": 0, "max_body_bytes": 5}
    )
    request = less["request"]
    assert (request["timeout"], request["connect_timeout"]) == (2, 1)
    assert (request["max_redirects"], request["max_body_bytes"]) == (0, 5)

    await expect_error(d, {"jobs": [{"url": url}] * 1001}, 413, "jobs", code="too_many_jobs")
    wrong_type = await d.request(
        "POST", "/v1/jobs", json.dumps({"url": url}).encode(), [("Content-Type", "text/plain")]
    )
    assert wrong_type.status == 415
    assert wrong_type.json()["error"]["code"] == "unsupported_media_type"
    nested = await d.request("POST", "/v1/jobs", b"[" * 200_000, JSON)
    assert nested.status == 400

    assert [job["id"] for job in await d.all_jobs()] == [less["id"]]
