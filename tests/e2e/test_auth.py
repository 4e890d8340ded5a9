"""Authentication, isolation and quotas of a real ``twistd -n curlfetch`` started with a
tokens file, and its refusal to listen beyond loopback without tokens."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from ..engine.servers import LoopbackSite, pattern_bytes
from .conftest import TWISTD, Daemons

pytestmark = pytest.mark.timeout(60)

ALICE = "alice-e2e-token-0123456789"
BOB = "bob-e2e-token-0123456789"
CAROL = "carol-e2e-token-0123456789"


@pytest_twisted.ensureDeferred
async def test_tokens_isolation_and_quotas(
    daemons: Daemons, target: LoopbackSite, tmp_path: Path
) -> None:
    """With a tokens file (a plain and a hashed entry) plus CURLFETCH_TOKENS: /healthz and
    /readyz are open; /v1 and /metrics without a token are 401 with a Bearer challenge;
    each client sees only its own jobs (another's id is 404); over the rate quota a
    submission is 429 with Retry-After, per client."""
    tokens = tmp_path / "tokens"
    bob_hash = hashlib.sha256(BOB.encode()).hexdigest()
    tokens.write_text(f"# e2e\nalice:{ALICE}\nbob:sha256:{bob_hash}\n")
    d = daemons.make(
        f"--tokens-file={tokens}",
        "--client-rate=0.001",
        "--client-burst=2",
        env={"CURLFETCH_TOKENS": f"carol:{CAROL}"},
    )
    await d.start()
    assert (await d.get("/healthz")).status == 200
    for path in ("/v1/jobs", "/metrics"):
        reply = await d.get(path)
        assert reply.status == 401, path
        assert reply.headers.get("www-authenticate") == 'Bearer realm="curlfetch"'
        assert reply.json()["error"]["code"] == "unauthorized"
    wrong = await d.request("GET", "/v1/jobs", headers=[("Authorization", f"Bearer {BOB}x")])
    assert wrong.status == 401
    assert wrong.json()["error"]["code"] == "invalid_token"

    d.token = ALICE
    job = await d.submit({"url": target.url("/bytes?n=1000")})
    done = await d.wait_state(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert (await d.get(done["result"]["body"]["url"])).body == pattern_bytes(1000)
    assert (await d.get("/metrics")).status == 200

    for other in (BOB, CAROL):
        d.token = other
        assert (await d.get(f"/v1/jobs/{job['id']}")).status == 404
        assert (await d.get(f"/v1/jobs/{job['id']}/body")).status == 404
        assert (await d.request("DELETE", f"/v1/jobs/{job['id']}")).status == 404
        assert (await d.get("/v1/jobs")).json()["jobs"] == []

    d.token = ALICE
    await d.submit({"url": target.url("/bytes")})  # her burst of 2 is now spent
    reply = await d.post_json("/v1/jobs", {"url": target.url("/bytes")})
    assert reply.status == 429
    assert reply.json()["error"]["code"] == "rate_limited"
    assert int(reply.headers.get("retry-after")) >= 1
    assert len(await d.all_jobs()) == 2
    d.token = BOB
    await d.submit({"url": target.url("/bytes")})  # his own bucket


def test_no_tokens_refuses_to_listen_on_all_interfaces() -> None:
    """Without tokens, ``--listen=tcp:0`` (every interface) is a usage error before
    anything listens, telling the operator what to do; nothing is started."""
    env: dict[str, str] = {}
    run = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "curlfetch", "--listen=tcp:0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert run.returncode != 0
    assert "--listen: tcp:0 is reachable from other hosts and no tokens are configured" in (
        run.stdout
    )
    assert "--insecure-no-auth" in run.stdout
