"""The ``curlfetch`` command, run as the installed console script against a real ``twistd
curlfetch``: submit with a live wait and a summary, the exit codes (0, 1, 2, 3, 130),
errors as one readable line, --json everywhere, bodies saved with --out, Ctrl-C during
--wait (the jobs go on), plain output in a pipe, and one interactive progress bar in a
real terminal (tmux), its screen captured and checked."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from tests.engine.servers import LoopbackSite

from .conftest import Daemon, Daemons, reactor

CLI = Path(sys.executable).parent / "curlfetch"
TOKEN = "cli-test-token-0123456789abcdef"


def run_cli(
    d: Daemon | None,
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    seconds: float = 60,
) -> subprocess.CompletedProcess[str]:
    """The script in a subprocess (in a thread: the targets live on this reactor)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CURLFETCH_")}
    if d is not None:
        environ["CURLFETCH_URL"] = d.url("")
        if d.token:
            environ["CURLFETCH_TOKEN"] = d.token
    environ.update(env or {})
    return subprocess.run(
        [str(CLI), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=seconds,
        check=False,
    )


async def cli(d: Daemon | None, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = await threads.deferToThreadPool(
        reactor(), reactor().getThreadPool(), lambda: run_cli(d, *args, **kwargs)
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


async def authed(daemons: Daemons) -> Daemon:
    d = daemons.make(env={"CURLFETCH_TOKENS": f"alice:{TOKEN}"})
    await d.start()
    d.token = TOKEN
    return d


@pytest_twisted.ensureDeferred
async def test_submit_wait_summarizes_and_exits_by_outcome(
    daemons: Daemons, target: LoopbackSite, tmp_path: Path
) -> None:
    """submit --wait on 5 good URLs (from -f, and stdin with -f -) exits 0 with a summary
    table and saves every body with --out; one refused URL among them makes it exit 1
    and the summary names the error; --json gives the batch view."""
    d = await authed(daemons)
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(target.url(f"/bytes?n={10 + i}") + "\n" for i in range(5)))
    out_dir = tmp_path / "bodies"
    result = await cli(d, "submit", "-f", str(urls), "--wait", "--out", str(out_dir))
    assert result.returncode == 0, result
    assert "succeeded" in result.stdout
    assert "\x1b[" not in result.stdout  # not a terminal: no escape codes
    sizes = sorted(p.stat().st_size for p in out_dir.iterdir())
    assert sizes == [10, 11, 12, 13, 14]
    refused = "http://127.0.0.1:9/nothing\n"
    result = await cli(d, "--json", "submit", "-f", "-", "--wait", stdin=urls.read_text() + refused)
    assert result.returncode == 1, result
    view = json.loads(result.stdout)
    assert view["counts"]["succeeded"] == 5
    assert view["counts"]["failed"] == 1
    assert view["errors"][0]["code"] == "egress_denied"  # port 9: not an allowed port
    result = await cli(d, "submit", target.url("/bytes"), "--metadata", "k=v", "-H", "X-A: 1")
    assert result.returncode == 0
    assert result.stdout.startswith("batch ")


@pytest_twisted.ensureDeferred
async def test_the_other_commands(daemons: Daemons, target: LoopbackSite, tmp_path: Path) -> None:
    """status, get, body -o, ls (--state, --batch), cancel (a job, --batch), watch
    --no-follow, export --warc/--ndjson and hosts (all, one), each with --json too."""
    d = await authed(daemons)
    batch = json.loads(
        (await cli(d, "--json", "submit", target.url("/bytes?n=33"), "--wait")).stdout
    )
    job = json.loads((await cli(d, "--json", "ls", "--batch", batch["id"])).stdout)[0]
    assert job["state"] == "succeeded"
    assert "succeeded" in (await cli(d, "status", batch["id"])).stdout
    assert (await cli(d, "status", job["id"])).stdout.startswith(f"job {job['id']}: succeeded")
    assert json.loads((await cli(d, "get", job["id"])).stdout)["id"] == job["id"]
    await cli(d, "body", job["id"], "-o", str(tmp_path / "b"))
    assert (tmp_path / "b").stat().st_size == 33
    listed = await cli(d, "ls", "--state", "succeeded")
    assert job["id"] in listed.stdout
    events = await cli(d, "--json", "watch", "--since", "0-0", "--no-follow")
    kinds = [json.loads(line)["type"] for line in events.stdout.splitlines()]
    assert kinds == ["batch.created", "job.succeeded", "batch.completed"]
    human = await cli(d, "watch", "--since", "0-0", "--no-follow", "--types", "job.succeeded")
    assert human.stdout.count("job.succeeded") == 1
    for flag, name in (("--warc", "x.warc.gz"), ("--ndjson", "x.ndjson")):
        result = await cli(d, "export", flag, str(tmp_path / name), "--batch", batch["id"])
        assert result.returncode == 0, result
        assert (tmp_path / name).stat().st_size > 0
    slow = json.loads((await cli(d, "--json", "submit", target.url("/delay?s=30"))).stdout)
    host = target.url("/").split("/")[2]
    (listed_host,) = json.loads((await cli(d, "--json", "hosts")).stdout)
    assert (listed_host["host"], listed_host["queued"] + listed_host["in_flight"]) == (host, 1)
    one = await cli(d, "hosts", host)
    assert one.returncode == 0, one
    assert one.stdout.splitlines()[1].split("\t")[0] == host
    assert (await cli(d, "hosts", "no-port")).returncode == 1
    result = await cli(d, "--json", "cancel", "--batch", slow["id"])
    assert json.loads(result.stdout)["state"] == "cancelled"
    result = await cli(d, "cancel", job["id"])
    assert result.returncode == 1
    assert result.stderr.startswith("curlfetch: HTTP 409 conflict: ")


@pytest_twisted.ensureDeferred
async def test_exit_codes_and_one_line_errors(daemons: Daemons, target: LoopbackSite) -> None:
    """Usage errors exit 2; an unreachable server or a refused token exit 3; a refused
    request exits 1; each is one line on stderr naming what is wrong; doctor says so."""
    d = await authed(daemons)
    result = await cli(d, "submit")
    assert result.returncode == 2
    assert "give URLs" in result.stderr
    assert (await cli(d, "ls", "--state", "nope")).returncode == 2
    nowhere = await cli(None, "ls", env={"CURLFETCH_URL": "http://127.0.0.1:9"})
    assert nowhere.returncode == 3
    assert nowhere.stderr.startswith("curlfetch: cannot reach http://127.0.0.1:9")
    bad = await cli(d, "ls", env={"CURLFETCH_TOKEN": "wrong-token-0123456789abcdef"})
    assert bad.returncode == 3
    assert bad.stderr.startswith("curlfetch: HTTP 401 ")
    assert len(bad.stderr.strip().splitlines()) == 1
    refused = await cli(d, "submit", "ftp://example.org/")
    assert refused.returncode == 1
    assert "line 1: url" in refused.stderr
    doctor = await cli(d, "doctor")
    assert doctor.returncode == 0, doctor
    assert "ok   token" in doctor.stdout
    assert "AsynchDNS" in doctor.stdout
    assert "ports 1024-65535" in doctor.stdout  # the test daemons' --allow-port
    strict = daemons.make(name="strict")
    strict.egress = []  # the default egress policy
    await strict.start()
    said = await cli(strict, "doctor")
    assert "loopback is denied" in said.stdout, said.stdout
    doctor = await cli(d, "doctor", env={"CURLFETCH_TOKEN": "wrong-token-0123456789abcdef"})
    assert doctor.returncode == 3
    assert "FAIL token" in doctor.stdout


@pytest_twisted.ensureDeferred
async def test_ctrl_c_stops_waiting_but_not_the_jobs(
    daemons: Daemons, target: LoopbackSite
) -> None:
    """SIGINT during submit --wait: exit 130, the batch id on stderr, and the batch still
    running on the server."""
    d = await authed(daemons)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CURLFETCH_")}
    environ.update(CURLFETCH_URL=d.url(""), CURLFETCH_TOKEN=TOKEN)
    proc = _spawn(
        [str(CLI), "submit", target.url("/delay?s=20"), target.url("/delay?s=20"), "--wait"],
        environ,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            listed = (await d.get("/v1/batches")).json()["batches"]
            if listed and listed[0]["counts"]["running"] >= 1:
                break
            await _nap()
        proc.send_signal(signal.SIGINT)
        _, err = await threads.deferToThreadPool(
            reactor(), reactor().getThreadPool(), lambda: proc.communicate(timeout=10)
        )
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    batch = listed[0]["id"]
    assert f"batch {batch} goes on" in err
    view = (await d.get(f"/v1/batches/{batch}")).json()
    assert view["state"] == "running"
    assert view["counts"]["cancelled"] == 0


@pytest_twisted.ensureDeferred
async def test_an_interactive_progress_bar_in_tmux(daemons: Daemons, target: LoopbackSite) -> None:
    """In a real terminal (tmux), submit --wait draws a progress bar that ends at 40/40
    with the summary below it; the captured screen shows both."""
    assert shutil.which("tmux"), "tmux is installed by scripts/test"
    d = await authed(daemons)
    session = f"cf{os.getpid()}"
    urls = " ".join(shlex.quote(target.url(f"/delay?s=0.05&i={i}")) for i in range(40))
    command = (
        f"env CURLFETCH_URL={d.url('')} CURLFETCH_TOKEN={TOKEN} {CLI} submit {urls} --wait; "
        "echo EXIT=$?; sleep 30"
    )
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", command)
    try:
        screen = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            screen = _tmux("capture-pane", "-p", "-t", session)
            if "EXIT=" in screen:
                break
            await _nap()
    finally:
        _tmux("kill-session", "-t", session, check=False)
    assert "EXIT=0" in screen, screen
    assert "40/40" in screen, screen
    assert "succeeded" in screen, screen
    assert "━" in screen, screen  # the bar itself


def _tmux(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["tmux", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=10,
    )
    return done.stdout


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


async def _nap() -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor(), 0.1, lambda: None)
