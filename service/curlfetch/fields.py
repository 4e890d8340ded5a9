"""Declarative JSON fields: one declaration per field gives its validator (with the
service's own precise messages, naming the field) and its JSON Schema, both what a
client may send and what the API shows once defaults are filled in.

Why not msgspec or pydantic: their errors are their own ("Input should be a valid
number", "Expected `int`, got `str` - at `$.timeout`"), located per element rather
than per field (``headers[2][0]`` where the API says ``headers[2]``), and they collect
all errors rather than the first in declaration order. Mapping them back would be a
second table per field. Here a field kind carries its messages; a spec is checked by
closures bound once per ``Limits`` (``Table.parser``), as fast as the hand-written code.

``limits`` is the caller's caps object (``jobs.Limits``); bounds and defaults may be
functions of it, and defaults may also read fields checked before them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

Check = Callable[[Mapping[str, Any], dict[str, Any], dict[str, Any]], None]
"""``check(raw, out, root)``: validate this field of ``raw``, write it to ``out``;
``root`` is the whole spec parsed so far (for defaults that depend on other fields)."""
Bound = int | float | Callable[[Any], Any]
Default = Callable[[Any, dict[str, Any]], Any]
"""``default(limits, root)`` for an absent (or null) field."""
_MISSING: Any = object()


class SpecError(ValueError):
    """A job spec is invalid; ``field`` is a path into the submitted JSON."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def within(self, prefix: str) -> SpecError:
        """The same error, located inside ``prefix`` (``jobs[3]``)."""
        return SpecError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


def _resolve(bound: Bound, limits: Any) -> Any:
    return bound(limits) if callable(bound) else bound


def constant(value: Any) -> Default:
    return lambda limits, root: value


def described(schema: dict[str, Any], description: str | None) -> dict[str, Any]:
    if description:
        schema["description"] = description
    return schema


@attrs.frozen
class Field:
    """One key of a JSON object. Subclasses define ``bind``, ``schema`` and ``view``."""

    name: str
    description: str | None = attrs.field(default=None, kw_only=True)

    @property
    def names(self) -> tuple[str, ...]:
        """The keys of the object this field reads."""
        return (self.name,)

    @property
    def required(self) -> bool:
        """Whether a client must send it."""
        return False

    def bind(self, limits: Any) -> Check:
        raise NotImplementedError

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        """The JSON Schema of each key a client may send."""
        raise NotImplementedError

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        """Each key as shown once accepted: (schema, always present); {} if not shown."""
        raise NotImplementedError


@attrs.frozen
class Integer(Field):
    low: Bound
    high: Bound
    default: Default | None = None

    def bind(self, limits: Any) -> Check:
        name, default = self.name, self.default
        low, high = _resolve(self.low, limits), _resolve(self.high, limits)
        out_of_range = f"must be between {low} and {high}"

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is None:
                out[name] = None if default is None else default(limits, root)
                return
            if value.__class__ is bool or not isinstance(value, int):
                raise SpecError(name, "must be an integer")
            if not low <= value <= high:
                raise SpecError(name, out_of_range)
            out[name] = value

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        return {
            self.name: described(
                {
                    "type": ["integer", "null"],
                    "minimum": _resolve(self.low, limits),
                    "maximum": _resolve(self.high, limits),
                },
                self.description,
            )
        }

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        shown = "integer" if self.default is not None else ["integer", "null"]
        return {self.name: ({"type": shown}, True)}


@attrs.frozen
class Number(Field):
    """A number in (low, high] (``exclusive``) or [low, high]; stored as a float."""

    low: Bound
    high: Bound
    exclusive: bool = True
    default: Default | None = None

    def bind(self, limits: Any) -> Check:
        name, default, exclusive = self.name, self.default, self.exclusive
        low, high = _resolve(self.low, limits), _resolve(self.high, limits)
        if exclusive:
            not_number, out_of_range = "must be a number", f"must be > {low:g} and <= {high:g}"
        else:
            not_number = out_of_range = f"must be a number from {low:g} to {high:g}"

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is None:
                out[name] = None if default is None else default(limits, root)
                return
            if value.__class__ is bool or not isinstance(value, int | float):
                raise SpecError(name, not_number)
            if not (low < value <= high if exclusive else low <= value <= high):
                raise SpecError(name, out_of_range)
            out[name] = float(value)

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        low_key = "exclusiveMinimum" if self.exclusive else "minimum"
        schema = {
            "type": ["number", "null"],
            low_key: _resolve(self.low, limits),
            "maximum": _resolve(self.high, limits),
        }
        return {self.name: described(schema, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        shown = "number" if self.default is not None else ["number", "null"]
        return {self.name: ({"type": shown}, True)}


@attrs.frozen
class Boolean(Field):
    """true or false; absent means ``default`` (null is refused)."""

    default: bool = True

    def bind(self, limits: Any) -> Check:
        name, default = self.name, self.default

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name, default)
            if value is not True and value is not False:
                raise SpecError(name, "must be true or false")
            out[name] = value

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        schema = {"type": "boolean", "default": self.default}
        return {self.name: described(schema, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"type": "boolean"}, True)}


@attrs.frozen
class Choice(Field):
    """One of ``values`` (strings), or null."""

    values: tuple[str, ...]
    message: str

    def bind(self, limits: Any) -> Check:
        name, values, message = self.name, self.values, self.message

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is not None and (value.__class__ is not str or value not in values):
                raise SpecError(name, message)
            out[name] = value

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        return {self.name: described({"enum": [*self.values, None]}, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"enum": [*self.values, None]}, True)}


@attrs.frozen
class Text(Field):
    """A required, non-empty string, then ``check(value, limits)`` (which raises
    ``SpecError`` with its own message)."""

    max_length: Bound
    message: str
    check: Callable[[str, Any], None]

    @property
    def required(self) -> bool:
        return True

    def bind(self, limits: Any) -> Check:
        name, message, inspect = self.name, self.message, self.check

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value.__class__ is not str or not value:
                raise SpecError(name, message)
            inspect(value, limits)
            out[name] = value

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        schema = {"type": "string", "minLength": 1, "maxLength": _resolve(self.max_length, limits)}
        return {self.name: described(schema, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: ({"type": "string"}, True)}


@attrs.frozen
class JsonObject(Field):
    """Any JSON object of at most ``max_bytes`` (compact), or null; kept as given and
    not part of the view (the caller shows it elsewhere)."""

    max_bytes: Bound

    def bind(self, limits: Any) -> Check:
        name, max_bytes = self.name, _resolve(self.max_bytes, limits)
        too_large = f"is larger than {max_bytes} bytes"

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name)
            if value is not None:
                if not isinstance(value, dict):
                    raise SpecError(name, "must be a JSON object")
                if len(json.dumps(value, separators=(",", ":"))) > max_bytes:
                    raise SpecError(name, too_large)
            out[name] = value

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        return {self.name: described({"type": ["object", "null"]}, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        return {}


@attrs.frozen
class Table:
    """The fields of an object, in the order they are checked (the first error wins);
    unknown keys are refused first."""

    fields: Sequence[Field]
    description: str | None = None
    view_description: str | None = None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for f in self.fields for n in f.names)

    def bind(self, limits: Any) -> Check:
        """One check of an object: unknown keys first, then every field in order."""
        names = self.names
        checks = [f.bind(limits) for f in self.fields]

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            for key in raw:
                if key not in names:
                    raise SpecError(str(key), "unknown field")
            for c in checks:
                c(raw, out, root)

        return check

    def schema(self, limits: Any, *, nullable: bool = False) -> dict[str, Any]:
        """What a client may send: strict (``additionalProperties: false``)."""
        properties: dict[str, Any] = {}
        for f in self.fields:
            properties.update(f.schema(limits))
        required = [f.name for f in self.fields if f.required]
        schema: dict[str, Any] = {"type": ["object", "null"] if nullable else "object"}
        described(schema, self.description)
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False
        schema["properties"] = properties
        return schema

    def view(self, limits: Any) -> dict[str, Any]:
        """The object as accepted, every default filled in."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for f in self.fields:
            for name, (schema, always) in f.view(limits).items():
                properties[name] = schema
                if always:
                    required.append(name)
        schema = described({"type": "object"}, self.view_description)
        schema.update(required=required, additionalProperties=False, properties=properties)
        return schema


@attrs.frozen
class Object(Field):
    """A nested object with its own ``table``, or null (all defaults); errors are located
    inside it (``retry.max_attempts``); ``build`` makes the value from the checked keys."""

    table: Table
    message: str
    build: Callable[[dict[str, Any]], Any]

    def bind(self, limits: Any) -> Check:
        name, message, build = self.name, self.message, self.build
        check_fields = self.table.bind(limits)

        def check(raw: Mapping[str, Any], out: dict[str, Any], root: dict[str, Any]) -> None:
            value = raw.get(name, _MISSING)
            if value is None or value is _MISSING:
                value = {}
            elif not isinstance(value, dict):
                raise SpecError(name, message)
            fields: dict[str, Any] = {}
            try:
                check_fields(value, fields, root)
            except SpecError as e:
                raise e.within(name) from None
            out[name] = build(fields)

        return check

    def schema(self, limits: Any) -> dict[str, dict[str, Any]]:
        schema = self.table.schema(limits, nullable=True)
        return {self.name: described(schema, self.description)}

    def view(self, limits: Any) -> dict[str, tuple[dict[str, Any], bool]]:
        return {self.name: (self.table.view(limits), True)}
