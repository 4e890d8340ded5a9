"""The export routes: the caller's selected jobs as one download, streamed.

``GET /v1/jobs/export.warc`` (and ``.warc.gz``) is one WARC of the jobs' stored records
(``export.py`` says what it holds); ``GET /v1/jobs/export.ndjson`` is the job views, one
per line. Both take the list's filters, newest first, and only the caller's jobs.

Streaming with backpressure: the jobs are read a page at a time (``PAGE``) and written
through a push producer, and the next write waits while the client is slower than the
store, so memory stays flat however many jobs are exported. The first page is read
before the answer starts, so a store that is down is a 503 like anywhere else. Once
the 200 has started, a failure can no longer change the status: the connection is
closed before the final chunk, and a reader sees a cut-short download (for a WARC, also
the missing ``export-complete: true`` record), never a short file that looks whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..export import WarcExport
from ..jobs import Job, rfc3339
from ..openapi import BAD_AUTH, V1_ERRORS, error_response
from ..store import JobFilter
from .http import ClientGoneError, PushStream, dumps, wait_resumed
from .jobs import FILTERS, job_filter
from .routes import ApiResource, route
from .views import job_view

if TYPE_CHECKING:
    from . import JobAPI

log = Logger()

PAGE = 500
"""Jobs read from the store at a time."""

_FORMATS = {
    "warc": ("application/warc", "warc"),
    "warc.gz": ("application/gzip", "warc.gz"),
    "ndjson": ("application/x-ndjson", "ndjson"),
}


def _export_doc(kind: str) -> Any:
    media, ext = _FORMATS[kind]
    summaries = {
        "warc": "The caller's selected jobs as one WARC file.",
        "warc.gz": "The caller's selected jobs as one gzipped WARC file.",
        "ndjson": "The caller's selected jobs, one job view per line.",
    }
    if kind == "ndjson":
        what = "One JSON object per line, each as `GET /v1/jobs/{job_id}` answers it."
    else:
        what = (
            "A `warcinfo` record, then each selected job's stored `response` record "
            "copied as stored (a body of the earlier file store: a record built around "
            "it; a body gone or damaged: a `metadata` record naming the job and why), "
            "then a `metadata` record with the counts and `export-complete: true`."
        )
        if kind == "warc.gz":
            what += " Each record is its own gzip member; no Content-Encoding is set."
    operation_ids = {"warc": "exportWarc", "warc.gz": "exportWarcGz", "ndjson": "exportNdjson"}

    def doc(api: JobAPI) -> dict[str, Any]:
        return {
            "operationId": operation_ids[kind],
            "summary": summaries[kind],
            "description": (
                f"{what}\n\nNewest first; the filters are the list's. Streamed as an "
                "attachment with backpressure, however many jobs. A failure after the "
                "download started closes the connection before its final chunk."
            ),
            "parameters": [f.doc() for f in FILTERS],
            "responses": {
                "200": {
                    "description": "The export, streamed.",
                    "headers": {
                        "Content-Disposition": {
                            "description": (
                                f'attachment; filename="curlfetch-export-<UTC time>.{ext}"'
                            ),
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {media: {"schema": {"type": "string", "format": "binary"}}},
                },
                "400": error_response(f"A bad filter. {BAD_AUTH}."),
                **V1_ERRORS,
            },
        }

    return doc


class ExportResource(ApiResource):
    """``/v1/jobs/export.*``: downloads of the caller's jobs."""

    @route("/v1/jobs/export.warc", "GET", _export_doc("warc"))
    async def export_warc(self, request: IRequest) -> IResource:
        return await self._export(request, "warc")

    @route("/v1/jobs/export.warc.gz", "GET", _export_doc("warc.gz"))
    async def export_warc_gz(self, request: IRequest) -> IResource:
        return await self._export(request, "warc.gz")

    @route("/v1/jobs/export.ndjson", "GET", _export_doc("ndjson"))
    async def export_ndjson(self, request: IRequest) -> IResource:
        return await self._export(request, "ndjson")

    async def _export(self, request: IRequest, kind: str) -> IResource:
        api = self.api
        client = api.client(request)
        where = job_filter(request)
        first = await api.store.list_jobs(client, where, PAGE, None)
        now = api.reactor.seconds()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        media, ext = _FORMATS[kind]
        filename = f"curlfetch-export-{stamp}.{ext}"
        writer: _Records
        if kind == "ndjson":
            writer = _Views()
        else:
            writer = WarcExport(
                api.bodies,
                gzip=kind == "warc.gz",
                filename=filename,
                now=now,
                fields=_filter_fields(where),
            )
        return _Download(
            api,
            client=client,
            where=where,
            first=first,
            records=writer,
            media=media,
            filename=filename,
        )


class _Records(Protocol):
    """What one format writes: before, per job, after (``WarcExport`` is one)."""

    def head(self) -> bytes: ...

    def job(self, job: Job) -> Iterable[bytes]: ...

    def tail(self) -> bytes: ...


class _Views:
    """NDJSON: nothing before or after, one job view per line."""

    def head(self) -> bytes:
        return b""

    def job(self, job: Job) -> Iterable[bytes]:
        return (dumps(job_view(job)) + b"\n",)

    def tail(self) -> bytes:
        return b""


class _Download(Resource):
    """The 200 answer: headers now, then the records, page by page."""

    isLeaf = True

    def __init__(
        self,
        api: JobAPI,
        *,
        client: str,
        where: JobFilter,
        first: list[Job],
        records: _Records,
        media: str,
        filename: str,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.api = api
        self.client = client
        self.where = where
        self.first = first
        self.records = records
        self.media = media
        self.filename = filename

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", self.media.encode("ascii"))
        request.setHeader(
            b"Content-Disposition", f'attachment; filename="{self.filename}"'.encode("ascii")
        )
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method == b"HEAD":
            return b""
        stream = PushStream(request)
        ensureDeferred(self._run(stream))
        return NOT_DONE_YET

    async def _run(self, stream: PushStream) -> None:
        try:
            await self._write_all(stream)
        except ClientGoneError:
            return
        except Exception:
            # Past the status line: the only honest signal left is a cut-short download.
            log.failure("an export for client {client!r} failed midway", client=self.client)
            stream.cut()
            return
        stream.end()

    async def _write_all(self, stream: PushStream) -> None:
        records = self.records
        await wait_resumed(stream.write(records.head()))
        page = self.first
        while True:
            for job in page:
                for chunk in records.job(job):
                    await wait_resumed(stream.write(chunk))
            if len(page) < PAGE:
                break
            page = await self.api.store.list_jobs(self.client, self.where, PAGE, page[-1].id)
            if stream.stopped:
                raise ClientGoneError()
        await wait_resumed(stream.write(records.tail()))


def _filter_fields(where: JobFilter) -> list[tuple[str, str]]:
    """The export's selection, recorded in its warcinfo record."""
    fields = []
    if where.state is not None:
        fields.append(("curlfetch-filter-state", where.state.value))
    if where.created_since is not None:
        fields.append(("curlfetch-filter-created-since", str(rfc3339(where.created_since))))
    if where.created_until is not None:
        fields.append(("curlfetch-filter-created-until", str(rfc3339(where.created_until))))
    if where.metadata_key is not None:
        value = "" if where.metadata_value is None else f":{where.metadata_value}"
        fields.append(("curlfetch-filter-metadata", where.metadata_key + value))
    for name, chosen in (("batch", where.batch), ("host", where.host), ("error", where.error)):
        if chosen is not None:
            fields.append((f"curlfetch-filter-{name}", chosen))
    return fields
