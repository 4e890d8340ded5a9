"""The ``curlfetch`` command: the REST API from a shell, with a live progress bar.

It talks to a running service (``--url`` or ``CURLFETCH_URL``, default
``http://127.0.0.1:8080``) with a bearer token (``--token`` or ``CURLFETCH_TOKEN``), over
httpx. Every command takes ``--json`` for machine-readable output; human output uses rich
and stays plain when stdout is not a terminal (no progress-bar escapes in a pipe).

Exit codes: 0 everything succeeded, 1 some jobs failed (or the server refused a
request), 2 a usage error, 3 the server was unreachable or refused the token, 130 when
Ctrl-C stops ``--wait`` (the jobs go on; the batch id is printed). An error is one line,
the server's JSON error made readable, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:8080"
NDJSON = "application/x-ndjson"


class CliError(click.ClickException):
    """One line on stderr and an exit code (not click's usage 2 unless it is one)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code

    def show(self, file: Any = None) -> None:
        click.echo(f"curlfetch: {self.format_message()}", err=True)


class Api:
    """The service's REST API over one httpx client."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        headers = {"User-Agent": "curlfetch-cli/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise CliError(f"cannot reach {self.url}: {e}", EXIT_UNREACHABLE) from None
        return self.check(response)

    def check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        with contextlib.suppress(httpx.HTTPError):
            response.read()
        message = _error_line(response)
        code = EXIT_UNREACHABLE if response.status_code == 401 else EXIT_FAILED
        raise CliError(message, code)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def stream(self, method: str, path: str, **kwargs: Any) -> Any:
        """A streamed response (a context manager), checked before its body is read (the
        request goes out on entering it)."""
        return _Checked(self, self.client.stream(method, path, **kwargs))


class _Checked:
    def __init__(self, api: Api, inner: Any) -> None:
        self.api = api
        self.inner = inner

    def __enter__(self) -> httpx.Response:
        try:
            response: httpx.Response = self.inner.__enter__()
        except httpx.TransportError as e:
            raise CliError(f"cannot reach {self.api.url}: {e}", EXIT_UNREACHABLE) from None
        try:
            return self.api.check(response)
        except BaseException:
            self.inner.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


def _error_line(response: httpx.Response) -> str:
    """``HTTP 400 invalid_request: url: must be ... (field jobs[0].url)``."""
    try:
        error = response.json()["error"]
        line = f"HTTP {response.status_code} {error['code']}: {error['message']}"
        if error.get("field"):
            line += f" (field {error['field']})"
        return line
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return f"HTTP {response.status_code} {text}".strip()


class Output:
    """Human (rich; plain when not a terminal) or ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(highlight=False, soft_wrap=True)
        self.tty = self.console.is_terminal

    def data(self, value: Any) -> None:
        click.echo(json.dumps(value, indent=None if not self.tty else 2))

    def line(self, text: str) -> None:
        if not self.as_json:
            self.console.print(text, markup=False)

    def table(
        self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """A rich table on a terminal; tab-separated lines, never cut, in a pipe."""
        cells = [[("" if cell is None else str(cell)) for cell in row] for row in rows]
        if not self.tty:
            if title:
                click.echo(title)
            click.echo("\t".join(columns))
            for row in cells:
                click.echo("\t".join(row))
            return
        table = Table(title=title, show_edge=False, box=None)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in cells:
            table.add_row(*row)
        self.console.print(table)


# -- the command group ------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url", envvar="CURLFETCH_URL", default=DEFAULT_URL, show_default=True,
    help="The service's base URL (CURLFETCH_URL).",
)  # fmt: skip
@click.option("--token", envvar="CURLFETCH_TOKEN", help="A bearer token (CURLFETCH_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None, as_json: bool) -> None:
    """Submit and follow fetch jobs on a curlfetch service."""
    ctx.obj = (Api(url, token), Output(as_json))


def _ctx() -> tuple[Api, Output]:
    api, out = click.get_current_context().obj
    return api, out


def _parse_header(value: str) -> list[str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="--header")
    return [name.strip(), rest.strip()]


def _parse_metadata(values: Sequence[str]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not key=value", param_hint="--metadata")
        out[key] = rest
    return out or None


def _urls(urls: Sequence[str], file: str | None) -> list[str]:
    found = list(urls)
    if file is not None:
        stream = sys.stdin if file == "-" else open(file, encoding="utf-8")  # noqa: SIM115
        with stream:
            found += [line.strip() for line in stream if line.strip() and not line.startswith("#")]
    if not found:
        raise click.UsageError("give URLs, or -f FILE (- for stdin)")
    return found


@main.command()
@click.argument("urls", nargs=-1)
@click.option("-f", "--file", "file", help="URLs, one per line (- for stdin).")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value' (repeatable).")
@click.option("--timeout", type=float, help="Seconds per transfer.")
@click.option("--priority", type=int, help="Higher runs first.")
@click.option("--metadata", "metadata", multiple=True, help="key=value (repeatable).")
@click.option("--wait", is_flag=True, help="Show progress until the batch is finished.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Save each body here.")
def submit(  # noqa: PLR0917 - one per option
    urls: Sequence[str],
    file: str | None,
    headers: Sequence[str],
    timeout: float | None,
    priority: int | None,
    metadata: Sequence[str],
    wait: bool,
    out_dir: str | None,
) -> None:
    """Submit URLS as one batch (NDJSON, up to 100,000)."""
    api, out = _ctx()
    spec: dict[str, Any] = {}
    if headers:
        spec["headers"] = [_parse_header(h) for h in headers]
    if timeout is not None:
        spec["timeout"] = timeout
    if priority is not None:
        spec["priority"] = priority
    meta = _parse_metadata(metadata)
    if meta is not None:
        spec["metadata"] = meta
    body = b"".join(json.dumps({"url": u, **spec}).encode() + b"\n" for u in _urls(urls, file))
    batch = api.json("POST", "/v1/batches", content=body, headers={"Content-Type": NDJSON})
    if not wait:
        if out.as_json:
            out.data(batch)
        else:
            out.line(f"batch {batch['id']}: {batch['total']} jobs queued")
        return
    try:
        final = _follow(api, out, batch, Path(out_dir) if out_dir else None)
    except KeyboardInterrupt:
        click.echo(
            f"stopped waiting; batch {batch['id']} goes on (curlfetch status {batch['id']})",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    _summary(out, final)
    failed = final["counts"].get("failed", 0) + final["counts"].get("cancelled", 0)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _follow(api: Api, out: Output, batch: dict[str, Any], out_dir: Path | None) -> dict[str, Any]:
    """Long-poll the batch until it is finished, with a progress bar on a terminal."""
    saved: set[str] = set()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    show = out.tty and not out.as_json
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[failures]}"),
        TimeRemainingColumn(),
        console=out.console,
        disable=not show,
        transient=False,
    )
    started = time.monotonic()
    with progress:
        task = progress.add_task(batch["id"][:12], total=batch["total"], rate="", failures="")
        view = batch
        while True:
            view = api.json("GET", f"/v1/batches/{batch['id']}", params={"wait": "1"})
            if out_dir is not None:
                _save_bodies(api, batch["id"], out_dir, saved)
            elapsed = max(time.monotonic() - started, 1e-6)
            failures = ", ".join(f"{e['code']} {e['count']}" for e in view["errors"][:3])
            progress.update(
                task,
                completed=view["done"],
                rate=f"{view['done'] / elapsed:,.0f}/s",
                failures=failures,
            )
            if view["finished_at"] is not None:
                break
    if out_dir is not None:
        _save_bodies(api, batch["id"], out_dir, saved)
    return dict(view)


def _save_bodies(api: Api, batch: str, out_dir: Path, saved: set[str]) -> None:
    for job in _jobs(api, {"batch": batch, "state": "succeeded"}):
        if job["id"] in saved or (job.get("result") or {}).get("body") is None:
            continue
        with (
            api.stream("GET", f"/v1/jobs/{job['id']}/body") as response,
            open(out_dir / job["id"], "wb") as f,
        ):
            for chunk in response.iter_bytes():
                f.write(chunk)
        saved.add(job["id"])


def _jobs(api: Api, params: dict[str, str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    seen = 0
    while True:
        page = api.json(
            "GET",
            "/v1/jobs",
            params={**params, "limit": "1000", **({"cursor": cursor} if cursor else {})},
        )
        for job in page["jobs"]:
            yield job
            seen += 1
            if limit is not None and seen >= limit:
                return
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _summary(out: Output, view: dict[str, Any]) -> None:
    if out.as_json:
        out.data(view)
        return
    counts = view["counts"]
    out.table(
        f"batch {view['id']}: {view['state']}",
        ["total", "succeeded", "failed", "cancelled", "bytes"],
        [
            [
                view["total"],
                counts["succeeded"],
                counts["failed"],
                counts["cancelled"],
                view["bytes"],
            ]
        ],
    )
    if view["errors"]:
        out.table(
            "failures",
            ["code", "jobs", "e.g."],
            [[e["code"], e["count"], ", ".join(e["jobs"])] for e in view["errors"]],
        )


@main.command()
@click.argument("ident")
def status(ident: str) -> None:
    """A batch's progress, or a job's state."""
    api, out = _ctx()
    try:
        view = api.json("GET", f"/v1/batches/{ident}")
    except CliError as e:
        if "HTTP 404" not in str(e):
            raise
        job = api.json("GET", f"/v1/jobs/{ident}")
        if out.as_json:
            out.data(job)
        else:
            error = (job.get("error") or {}).get("message", "")
            out.line(f"job {job['id']}: {job['state']} {error}".rstrip())
        sys.exit(EXIT_FAILED if job["state"] in ("failed", "cancelled") else EXIT_OK)
    _summary(out, view)


@main.command()
@click.argument("job_id")
def get(job_id: str) -> None:
    """A job's view."""
    api, out = _ctx()
    job = api.json("GET", f"/v1/jobs/{job_id}")
    if out.as_json or not out.tty:
        out.data(job)
    else:
        out.console.print_json(data=job)


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="A file (default: stdout).")
def body(job_id: str, output: str | None) -> None:
    """A job's body, as stored."""
    api, _ = _ctx()
    with api.stream("GET", f"/v1/jobs/{job_id}/body") as response:
        target = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        try:
            for chunk in response.iter_bytes():
                target.write(chunk)
        finally:
            if output:
                target.close()
            else:
                target.flush()


@main.command()
@click.argument("host", required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
def hosts(host: str | None, limit: int) -> None:
    """Hosts of your jobs (or HOST, as host:port): queued, running, pause, robots.txt."""
    api, out = _ctx()
    if host is not None:
        view = api.json("GET", f"/v1/hosts/{host}")
        if out.as_json:
            out.data(view)
            return
        out.table(
            None, ["host", "queued", "running", "interval", "paused", "robots"], [_host_row(view)]
        )
        for label, key in (("failed jobs", "last_errors"), ("failed attempts", "attempt_errors")):
            rows = [[e["at"], e["code"], e["message"]] for e in view.get(key, [])]
            if rows:
                out.table(label, ["at", "code", "message"], rows)
        return
    views = api.json("GET", "/v1/hosts", params={"limit": str(limit)})["hosts"]
    if out.as_json:
        out.data(views)
        return
    out.table(None, _HOST_COLUMNS, [_host_row(view) for view in views])


_HOST_COLUMNS = ("host", "queued", "running", "interval", "paused", "robots")


def _host_row(view: dict[str, Any]) -> list[Any]:
    pause = view["cooldown"]
    paused = "" if pause is None else f"until {pause['until']}: {pause['reason']}"
    robots = ", ".join(f"{r['origin']} {r['state']}" for r in view["robots"])
    return [view["host"], view["queued"], view["in_flight"], view["interval"], paused, robots]


@main.command(name="ls")
@click.option(
    "--state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])
)
@click.option("--batch", help="Jobs of this batch.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
def list_jobs(state: str | None, batch: str | None, limit: int) -> None:
    """Jobs, newest first."""
    api, out = _ctx()
    params = {k: v for k, v in (("state", state), ("batch", batch)) if v}
    jobs = list(_jobs(api, params, limit))
    if out.as_json:
        out.data(jobs)
        return
    rows = [
        [
            j["id"],
            j["state"],
            (j.get("result") or {}).get("status", ""),
            (j.get("error") or {}).get("curl_name") or (j.get("error") or {}).get("code", ""),
            j["request"]["url"],
        ]
        for j in jobs
    ]
    out.table(None, ["id", "state", "status", "error", "url"], rows)


@main.command()
@click.argument("job_id", required=False)
@click.option("--batch", help="Cancel every unfinished job of this batch.")
def cancel(job_id: str | None, batch: str | None) -> None:
    """Cancel a job, or a batch."""
    api, out = _ctx()
    if (job_id is None) == (batch is None):
        raise click.UsageError("give a JOB_ID or --batch ID")
    if batch is not None:
        view = api.json("DELETE", f"/v1/batches/{batch}")
        _summary(out, view)
        return
    job = api.json("DELETE", f"/v1/jobs/{job_id}")
    if out.as_json:
        out.data(job)
    else:
        out.line(f"job {job['id']}: {job['state']}")


@main.command()
@click.option("--batch", help="Only this batch's events.")
@click.option("--types", help="Only these event types (comma-separated).")
@click.option("--since", "since", help="Resume after this event id (0-0: everything kept).")
@click.option("--no-follow", is_flag=True, help="Stop once caught up.")
def watch(batch: str | None, types: str | None, since: str | None, no_follow: bool) -> None:
    """Follow the event stream, one line per event."""
    api, out = _ctx()
    params = {k: v for k, v in (("batch", batch), ("types", types), ("last_event_id", since)) if v}
    if no_follow:
        params["follow"] = "false"
    try:
        with api.stream(
            "GET", "/v1/events", params=params, timeout=httpx.Timeout(30, read=None)
        ) as response:
            event: dict[str, str] = {}
            for line in response.iter_lines():
                if not line:
                    if "data" in event:
                        _event_line(out, event)
                    event = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                event[name] = value[1:] if value.startswith(" ") else value
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _event_line(out: Output, event: dict[str, str]) -> None:
    if out.as_json:
        click.echo(event["data"])
        return
    data = json.loads(event["data"])
    kind = event.get("event", "message")
    if kind == "error":
        raise CliError(f"event stream: {data.get('code')}: {data.get('message')}")
    inner = data.get("data", {})
    if "job" in inner:
        job = inner["job"]
        what = (
            job.get("status")
            or (job.get("error") or {}).get("curl_name")
            or (job.get("error") or {}).get("code", "")
        )
        out.line(f"{data['timestamp']} {kind:<15} {job['id']} {what} {job['url']}")
    else:
        b = inner.get("batch", {})
        out.line(
            f"{data['timestamp']} {kind:<15} {b.get('id')} {b.get('done', '')}/{b.get('total', '')}"
        )


@main.command()
@click.option(
    "--warc", "warc", type=click.Path(dir_okay=False), help="Write a WARC (.warc or .warc.gz)."
)
@click.option("--ndjson", "ndjson", type=click.Path(dir_okay=False), help="Write NDJSON job views.")
@click.option("--state", help="Only jobs in this state.")
@click.option("--batch", help="Only this batch's jobs.")
def export(warc: str | None, ndjson: str | None, state: str | None, batch: str | None) -> None:
    """Download the caller's jobs as one WARC or NDJSON file."""
    api, out = _ctx()
    if (warc is None) == (ndjson is None):
        raise click.UsageError("give --warc FILE or --ndjson FILE")
    target = str(warc or ndjson)
    kind = "ndjson" if ndjson else ("warc.gz" if target.endswith(".gz") else "warc")
    params = {k: v for k, v in (("state", state), ("batch", batch)) if v}
    written = 0
    with (
        api.stream(
            "GET", f"/v1/jobs/export.{kind}", params=params, timeout=httpx.Timeout(30, read=None)
        ) as response,
        open(target, "wb") as f,
    ):
        for chunk in response.iter_bytes():
            f.write(chunk)
            written += len(chunk)
    if out.as_json:
        out.data({"file": target, "bytes": written})
    else:
        out.line(f"{target}: {written:,} bytes")


@main.command()
def doctor() -> None:
    """Check the server, the token and what the service allows, in plain words."""
    api, out = _ctx()
    checks: list[tuple[str, bool, str]] = []
    try:
        health = api.client.get("/healthz")
        checks.append(("server", health.status_code == 200, f"{api.url} answers"))
    except httpx.TransportError as e:
        checks.append(("server", False, f"cannot reach {api.url}: {e}"))
        _report(out, checks)
        sys.exit(EXIT_UNREACHABLE)
    ready = api.client.get("/readyz")
    detail = "ready" if ready.status_code == 200 else _error_line(ready)
    checks.append(("ready", ready.status_code == 200, detail))
    auth = api.client.get("/v1/jobs", params={"limit": "1"})
    token_ok = auth.status_code == 200
    checks.append(("token", token_ok, "accepted" if token_ok else _error_line(auth)))
    info = api.client.get("/v1/info")
    if info.status_code == 200:
        data = info.json()
        curl = data["libcurl"]
        checks.append(
            (
                "server",
                True,
                f"curlfetch {data['version']}, libcurl {curl['version']} ({curl['ssl']})",
            )
        )
        missing = [f for f in ("AsynchDNS", "HTTP2", "HTTP3") if f not in curl["features"]]
        detail = "features " + " ".join(curl["features"])
        if missing:
            detail += "; missing: " + " ".join(missing)
        checks.append(("curl", "AsynchDNS" in curl["features"], detail))
        egress = data["egress"]
        if egress is not None:
            ports = ",".join(egress["allow_ports"])
            words = f"ports {ports}"
            if not egress["loopback_allowed"]:
                words += (
                    "; loopback is denied (jobs to 127.0.0.1 or localhost fail with "
                    "egress_denied; the service needs --allow-cidr 127.0.0.0/8 for them)"
                )
            if not egress["private_allowed"]:
                words += "; private networks are denied"
            if egress["allow_hosts"]:
                words += "; only hosts " + ",".join(egress["allow_hosts"])
            checks.append(("egress", True, words))
    elif token_ok:
        checks.append(("server", False, _error_line(info)))
    _report(out, checks)
    if not all(ok for _, ok, _ in checks):
        sys.exit(EXIT_FAILED if token_ok else EXIT_UNREACHABLE)


def _report(out: Output, checks: list[tuple[str, bool, str]]) -> None:
    if out.as_json:
        out.data([{"check": name, "ok": ok, "detail": detail} for name, ok, detail in checks])
        return
    for name, ok, detail in checks:
        out.line(f"{'ok  ' if ok else 'FAIL'} {name:<6} {detail}")


def run() -> NoReturn:
    """The console script: usage errors exit 2, our errors their own code."""
    try:
        main.main(standalone_mode=False, prog_name="curlfetch")
    except click.UsageError as e:
        e.show()
        sys.exit(EXIT_USAGE)
    except CliError as e:
        e.show()
        sys.exit(e.code)
    except click.exceptions.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        os._exit(EXIT_OK)
    sys.exit(EXIT_OK)
