"""The egress policy of a real ``twistd -n curlfetch`` process. Every target is on
loopback: the default policy must refuse it, and --allow-cidr/--allow-port (here from
the environment) open exactly what they list."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite
from .conftest import TERMINAL, Daemon, Daemons, reactor

pytestmark = pytest.mark.timeout(60)


async def run(daemon: Daemon, url: str, **spec: Any) -> dict[str, Any]:
    """Submit one job and return its terminal view."""
    job = await daemon.submit({"url": url, **spec})
    return await daemon.wait_state(job["id"], TERMINAL)


def denied(view: dict[str, Any]) -> str:
    """The message of a job that failed with egress_denied after a single attempt."""
    assert view["state"] == "failed", view
    assert view["attempts"] == 1, view
    assert view["error"]["code"] == "egress_denied", view
    message: str = view["error"]["message"]
    return message


@pytest_twisted.ensureDeferred
async def test_default_policy_denies_loopback_in_every_spelling(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """Started without egress options, the service refuses loopback targets however the
    URL writes them: the job fails at once with egress_denied (one attempt of three),
    the message names the address, port and rule, and the target sees nothing."""
    d = daemons.make("--drain-timeout=1")
    d.egress = []
    await d.start()
    port = target.port_number
    retry = {"retry": {"max_attempts": 3, "backoff": 0}}
    view = await run(d, target.url("/count/a"), **retry)
    assert denied(view) == (
        f"connection to 127.0.0.1:{port} denied by egress policy: "
        "default deny: loopback (127.0.0.0/8)"
    )
    message = denied(await run(d, f"http://127.0.0.2:{port}/count/b", **retry))
    assert "127.0.0.2" in message
    for host in ("2130706433", "0x7f.1", "127.1", "0177.0.0.1", "017700000001"):
        # Submission may already refuse a host libcurl reads differently (400); if it
        # is accepted, the connect-time check must refuse it.
        reply = await d.post_json("/v1/jobs", {"url": f"http://{host}:{port}/count/b"})
        if reply.status == 400:
            assert reply.json()["error"]["field"] == "url", reply
            continue
        assert reply.status == 201, reply
        view = await d.wait_state(reply.json()["id"], TERMINAL)
        assert "default deny: loopback (127.0.0.0/8)" in denied(view), host
    message = denied(await run(d, f"http://[::ffff:127.0.0.1]:{port}/count/c"))
    assert f"[::ffff:127.0.0.1]:{port}" in message
    assert "embedded in IPv4-mapped" in message
    message = denied(await run(d, f"http://localhost:{port}/count/d"))
    assert "loopback" in message
    assert target.root.hits == {}


@pytest_twisted.ensureDeferred
async def test_allow_options_open_exactly_what_they_list(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """CURLFETCH_ALLOW_CIDR=127.0.0.1/32 and CURLFETCH_ALLOW_PORT=<target port> open that
    address and port, by name too (localhost falls through ::1 to 127.0.0.1), but not
    127.0.0.2, not another port, and not a redirect to another port; a redirect to
    file: is refused as a protocol (curl error 1)."""
    port = target.port_number
    d = daemons.make(
        "--drain-timeout=1",
        env={"CURLFETCH_ALLOW_CIDR": "127.0.0.1/32", "CURLFETCH_ALLOW_PORT": str(port)},
    )
    d.egress = []
    await d.start()
    for host in ("127.0.0.1", "localhost"):
        view = await run(d, f"http://{host}:{port}/count/{host}")
        assert view["state"] == "succeeded", view
        assert view["result"]["primary_ip"] == "127.0.0.1"
    message = denied(await run(d, f"http://127.0.0.2:{port}/count/x"))
    assert message.startswith(f"connection to 127.0.0.2:{port} denied")
    other = LoopbackSite(reactor())
    try:
        hop = f"http://127.0.0.1:{other.port_number}/count/y"
        message = denied(await run(d, target.url(f"/redirect?to={hop}")))
        assert message == (
            f"connection to 127.0.0.1:{other.port_number} denied by egress policy: "
            f"port {other.port_number} not in --allow-port {port}"
        )
        assert other.root.hits == {}
    finally:
        await other.stop()
    view = await run(d, target.url("/redirect?to=file:///etc/hostname"))
    assert view["state"] == "failed", view
    assert (view["error"]["code"], view["error"]["curl_code"]) == ("curl_error", 1)
    assert set(target.root.hits) == {"/count/127.0.0.1", "/count/localhost"}
