"""``GET /v1/events``: the caller's job and batch events as Server-Sent Events, read from
the store's durable event log (``curlfetch.store.events``).

Every event carries its log id; ``Last-Event-ID`` (or ``?last_event_id=``, for a first
connection) resumes right after it, without loss, for as long as retention keeps the
log: a resume from before what retention deleted gets an ``error`` event
(``events_expired``) and the stream ends. Without one, the stream starts now.

The log is the buffer: the stream reads a page, writes it, and reads the next only once
the client has taken it (a push producer the transport pauses). A client that stops
reading for ``stall_timeout`` seconds is cut off, and resumes from the log when it
reconnects; the service never holds more than a page for it. A comment line every
``heartbeat`` seconds keeps proxies from closing a quiet stream. New events wake the
stream when they commit here, or on PostgreSQL when another instance says so; a poll
every ``poll_interval`` covers the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..jobs import EVENT_TYPES, rfc3339
from ..openapi import BAD_AUTH, V1_ERRORS, error_response
from ..store import Event, EventsExpiredError, StoreClosedError
from ..store.events import envelope, parse_event_id
from .http import ApiError, ClientGoneError, PushStream, dumps
from .jobs import BATCH
from .routes import ApiResource, Param, route

if TYPE_CHECKING:
    from . import JobAPI

log = Logger()

PAGE = 500
EVENT_STREAM = "text/event-stream"


def _types(raw: str) -> frozenset[str]:
    types = frozenset(t.strip() for t in raw.split(",") if t.strip())
    if not types or not types <= set(EVENT_TYPES):
        raise ValueError(raw)
    return types


TYPES = Param(
    "types",
    {"type": "string"},
    _types,
    f"types must be a comma-separated list of {list(EVENT_TYPES)}",
    description=f"Only these event types (comma-separated): {', '.join(EVENT_TYPES)}.",
)


def _follow(raw: str) -> bool:
    if raw not in ("true", "false"):
        raise ValueError(raw)
    return raw == "true"


FOLLOW = Param(
    "follow",
    {"type": "boolean", "default": True},
    _follow,
    "follow must be true or false",
    description=(
        "false: send what the log holds after the cursor, then end the stream (a "
        "catch-up for scripts, as `tail` without `-f`)."
    ),
)


def _event_id(raw: str) -> tuple[int, int]:
    parsed = parse_event_id(raw)
    if parsed is None:
        raise ValueError(raw)
    return parsed


LAST_EVENT_ID = Param(
    "last_event_id",
    {"type": "string"},
    _event_id,
    "last_event_id is not an event id",
    pattern="[0-9]{1,20}-[0-9]{1,19}",
    description=(
        "Resume after this event (as `Last-Event-ID`, which wins when both are given); "
        "`0-0` replays everything retention kept."
    ),
)


def _events_doc(api: JobAPI) -> dict[str, Any]:
    return {
        "operationId": "streamEvents",
        "summary": "The caller's job and batch events, as Server-Sent Events.",
        "description": (
            "Each event: `id` (resume with `Last-Event-ID`), `event` (its type) and "
            '`data`: `{"id", "type", "timestamp", "data": {"job": ...} | {"batch": ...}}`. '
            f"Types: {', '.join(EVENT_TYPES)}. Resuming never loses an event while "
            f"retention keeps it (`--event-retention`); from before that, an `error` event "
            f'with `{{"code": "events_expired"}}` and the stream ends. Heartbeat comments '
            f"every {api.events_heartbeat:g} s; a client that reads nothing for "
            f"{api.events_stall_timeout:g} s is cut off (resume from the log)."
        ),
        "parameters": [
            BATCH.doc(),
            TYPES.doc(),
            LAST_EVENT_ID.doc(),
            FOLLOW.doc(),
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The id of the last event received (EventSource sends it).",
            },
        ],
        "responses": {
            "200": {
                "description": "The stream.",
                "content": {
                    EVENT_STREAM: {
                        "schema": {
                            "type": "object",
                            "description": "One event of the stream (comments aside).",
                            "required": ["data"],
                            "properties": {
                                "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
                                "event": {"enum": [*EVENT_TYPES, "error"]},
                                "data": {
                                    "type": "string",
                                    "description": 'JSON: {"id", "type", "timestamp", '
                                    '"data": {"job": ...} or {"batch": ...}}; for an error '
                                    'event, {"code", "message"}.',
                                },
                                "retry": {"type": "integer"},
                            },
                        }
                    }
                },
            },
            "400": error_response(f"A bad filter or event id. {BAD_AUTH}."),
            **V1_ERRORS,
        },
    }


class EventsResource(ApiResource):
    """``/v1/events``."""

    def __init__(self, api: JobAPI) -> None:
        super().__init__(api)
        self.streams: set[_EventStream] = set()

    def start_draining(self) -> None:
        for stream in list(self.streams):
            stream.end()

    @route("/v1/events", "GET", _events_doc)
    async def events(self, request: IRequest) -> IResource:
        api = self.api
        client = api.client(request)
        batch = BATCH.get(request)
        types = TYPES.get(request)
        follow = FOLLOW.get(request)
        raw = request.getHeader(b"last-event-id")  # wins over the parameter
        if raw:
            cursor = parse_event_id(raw.decode("latin-1").strip())
            if cursor is None:
                raise ApiError(
                    400,
                    "invalid_request",
                    "Last-Event-ID is not an event id of ours",
                    field="Last-Event-ID",
                )
        else:
            cursor = LAST_EVENT_ID.get(request)
        if api.draining:
            raise ApiError(
                503,
                "draining",
                "the service is shutting down; reconnect to another instance",
                headers={"Retry-After": str(api.retry_after)},
            )
        if cursor is None:
            cursor = await api.store.events_start()
        return _EventStream(self, client, cursor, batch, types, follow=follow is not False)


class _EventStream(Resource):
    isLeaf = True

    def __init__(
        self,
        owner: EventsResource,
        client: str,
        cursor: tuple[int, int],
        batch: str | None,
        types: frozenset[str] | None,
        *,
        follow: bool = True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.follow = follow
        self.owner = owner
        self.api = owner.api
        self.client = client
        self.cursor = cursor
        self.batch = batch
        self.types = types
        self.stream: PushStream | None = None
        self.request: Request | None = None
        self.ending = False

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: do not buffer the stream
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        self.request = request
        self.stream = PushStream(request)
        self.owner.streams.add(self)
        self.api.metrics.event_streams.inc()
        ensureDeferred(self._run())
        return NOT_DONE_YET

    def end(self) -> None:
        """Draining: finish the stream (the client reconnects elsewhere)."""
        self.ending = True
        self.api.event_pulse.notify("*")

    async def _run(self) -> None:
        assert self.request is not None
        assert self.stream is not None
        request, stream = self.request, self.stream
        api = self.api
        pulse = api.event_pulse
        pulse.watch("*")
        # A client that hangs up while the stream waits: wake it to notice.
        request.notifyFinish().addBoth(lambda _: pulse.notify("*"))
        try:
            await self._write(b"retry: 2000\n: curlfetch events\n\n")
            beat_at = api.reactor.seconds() + api.events_heartbeat
            while not self.ending and not stream.stopped:
                seen = pulse.version("*")
                try:
                    events = await api.store.events_after(
                        self.client, self.cursor, PAGE, self.batch, self.types
                    )
                except EventsExpiredError as e:
                    error = {"code": "events_expired", "message": str(e)}
                    await self._write(b"event: error\ndata: " + dumps(error) + b"\n\n")
                    break
                if events:
                    await self._write(b"".join(_frame(e) for e in events))
                    last = events[-1].id.split("-")
                    self.cursor = (int(last[0]), int(last[1]))
                    beat_at = api.reactor.seconds() + api.events_heartbeat
                    if len(events) == PAGE:
                        continue
                if not self.follow:
                    break  # caught up
                now = api.reactor.seconds()
                if now >= beat_at:
                    await self._write(b": heartbeat\n\n")
                    beat_at = now + api.events_heartbeat
                    continue
                await pulse.wait("*", min(beat_at - now, api.poll_interval), seen)
        except ClientGoneError:
            return
        except StoreClosedError:
            # Stopping (or the database is down): end it; the client resumes elsewhere.
            stream.cut()
            return
        except _StalledError:
            api.metrics.event_streams_cut.inc()
            log.info(
                "event stream of client {client!r} cut off: it read nothing for {s} s",
                client=self.client,
                s=api.events_stall_timeout,
            )
            stream.cut(abort=True)  # unwritten bytes are dropped: nothing is kept for it
            return
        except Exception:
            log.failure("the event stream of client {client!r} failed", client=self.client)
            stream.cut()
            return
        finally:
            pulse.unwatch("*")
            self.owner.streams.discard(self)
            api.metrics.event_streams.dec()
        stream.end()

    async def _write(self, data: bytes) -> None:
        """Write, then wait while the client is behind: at most ``stall_timeout``."""
        assert self.stream is not None
        resumed = self.stream.write(data)
        if resumed is None:
            return
        timer = self.api.reactor.callLater(self.api.events_stall_timeout, resumed.cancel)
        try:
            await resumed
        except Exception:
            if not timer.active():
                raise _StalledError() from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        if self.stream.stopped:
            raise ClientGoneError()


class _StalledError(Exception):
    """The client read nothing for the stall timeout."""


def _frame(event: Event) -> bytes:
    """One SSE event; ``data`` is one line (JSON has no raw newlines)."""
    head = {"id": event.id, "type": event.type, "timestamp": rfc3339(event.created_at)}
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event.id.encode("ascii"),
        event.type.encode("ascii"),
        envelope(head, event.data).encode(),
    )
