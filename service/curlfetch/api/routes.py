"""Routes declared once: a resource's method carries its path, its HTTP method and its
OpenAPI operation, and both the Klein app and the document's ``paths`` are built from
those declarations (``mount``, ``paths``), so a route cannot exist undocumented. A query
or header parameter (``Param``) is likewise one declaration that reads and checks it
and documents it.

A resource is a class with ``@route`` methods, built with the ``JobAPI`` it serves;
adding one is a new module and one line in ``api/__init__.py``'s ``RESOURCES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
from klein import Klein
from twisted.web.iweb import IRequest

from .http import ApiError, query

if TYPE_CHECKING:
    from . import JobAPI

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
Operation = dict[str, Any] | Callable[["JobAPI"], dict[str, Any]]
"""An OpenAPI operation object, or a function of the API (its limits) that makes one."""

_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_ROUTE_ATTR = "__curlfetch_route__"


@attrs.frozen
class Route:
    path: str
    """Klein (werkzeug) rule: ``/v1/jobs/<job_id>``."""
    method: str
    operation: Operation

    @property
    def template(self) -> str:
        """The OpenAPI path: ``/v1/jobs/{job_id}``."""
        return _PARAM.sub(r"{\1}", self.path)

    @property
    def path_parameters(self) -> list[str]:
        return _PARAM.findall(self.path)


@attrs.frozen
class Param(Generic[T]):
    """A query parameter (or a header, given once): ``get`` is its value, ``None`` when
    absent, or 400 ``invalid_request`` naming it with ``message``; ``doc`` is its
    OpenAPI parameter object. ``parse`` raises ``ValueError`` for a bad value; a
    ``pattern`` is checked first (whole value) and documented as the schema's pattern."""

    name: str
    schema: dict[str, Any]
    parse: Callable[[str], T]
    message: str
    where: str = "query"
    pattern: str | None = None
    description: str | None = None
    _regex: re.Pattern[str] | None = attrs.field(init=False, eq=False, repr=False)

    @_regex.default
    def _compile(self) -> re.Pattern[str] | None:
        return None if self.pattern is None else re.compile(self.pattern)

    def get(self, request: IRequest) -> T | None:
        if self.where == "header":
            values = request.requestHeaders.getRawHeaders(self.name.lower().encode())
            if values is None:
                return None
            if len(values) != 1:
                raise self.invalid()
            raw: str | None = values[0].decode("latin-1")
        else:
            raw = query(request, self.name)
        if raw is None:
            return None
        if self._regex is not None and not self._regex.fullmatch(raw):
            raise self.invalid()
        try:
            return self.parse(raw)
        except ValueError:
            raise self.invalid() from None

    def invalid(self) -> ApiError:
        return ApiError(400, "invalid_request", self.message, field=self.name)

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "in": self.where}
        if self.where == "header":
            out["required"] = False
        if self.description:
            out["description"] = self.description
        schema = dict(self.schema)
        if self.pattern is not None:
            schema["pattern"] = f"^{self.pattern}$"
        out["schema"] = schema
        return out


def route(path: str, method: str, operation: Operation) -> Callable[[F], F]:
    """Declare a resource method as the handler of ``method path``, documented by
    ``operation``."""

    def declare(f: F) -> F:
        setattr(f, _ROUTE_ATTR, Route(path, method.upper(), operation))
        return f

    return declare


class ApiResource:
    """A group of routes over the API's shared services; ``start_draining`` lets it
    release what it holds (long-polls) when the service shuts down."""

    def __init__(self, api: JobAPI) -> None:
        self.api = api

    def start_draining(self) -> None:
        """Called once when the service starts draining."""

    @staticmethod
    def schemas(api: JobAPI) -> dict[str, Any]:
        """Component schemas the resource's operations refer to, by name."""
        return {}

    @classmethod
    def routes(cls) -> Iterator[tuple[str, Route]]:
        for name in dir(cls):
            declared = getattr(getattr(cls, name), _ROUTE_ATTR, None)
            if isinstance(declared, Route):
                yield name, declared


def mount(app: Klein, resources: Sequence[type[ApiResource]]) -> None:
    """Add every declared route of ``resources`` to ``app``; the handler finds the
    resource instance on the ``JobAPI`` Klein binds (``api.component(cls)``)."""
    for cls in resources:
        for name, declared in cls.routes():
            app.route(declared.path, methods=[declared.method], endpoint=f"{cls.__name__}.{name}")(
                _handler(cls, name)
            )


def _handler(cls: type[ApiResource], name: str) -> Callable[..., Any]:
    def handler(api: JobAPI, request: IRequest, **kwargs: Any) -> Any:
        return getattr(api.component(cls), name)(request, **kwargs)

    handler.__name__ = name
    return handler


def paths(api: JobAPI, resources: Sequence[type[ApiResource]]) -> dict[str, Any]:
    """The document's ``paths``: every route's operation, path parameters on the path."""
    out: dict[str, dict[str, Any]] = {}
    for cls in resources:
        for _, declared in sorted(cls.routes(), key=lambda r: r[1].path):
            item = out.setdefault(declared.template, {})
            names = declared.path_parameters
            if names and "parameters" not in item:
                item["parameters"] = [
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in names
                ]
            op = declared.operation
            item[declared.method.lower()] = op(api) if callable(op) else op
    return out
