"""Request models of the parameter API, generated from the parameter groups.

Each group of :data:`chargegw.domain.params.GROUPS` becomes a model whose fields are the
group's fields, typed and ranged as the group's set command carries them on the wire
(the chargeproto message declaration: size, sign, unit scale, text length) and narrowed
by the group's :class:`~chargegw.domain.params.FieldRule` (the protocol reference's
ranges and allowed values). The schemas are documentation of the very tables
:func:`chargegw.domain.params.prepare` validates with: the request passes through as it
came (``extra`` kept, values untyped) so that ``prepare`` answers every problem itself,
naming the group and the field, with the reference it comes from.
"""

from __future__ import annotations

import struct
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, cast

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model

from chargegw.domain.params import GROUPS, Group
from chargegw.drivers import ap3000_commands, bkv_commands
from chargeproto import Message

__all__ = ["GROUP_MODELS", "ParamGroups", "group_schema"]

_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _message_class(group: Group) -> type[Message]:
    commands: Any = ap3000_commands if group.protocol == "ap3000" else bkv_commands
    cls: type[Message] = commands.GENERIC[group.set_command]
    return cls


def _scalar(hint: Any) -> Any:
    """``int`` for ``int | Absent`` and the like."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a in _TYPES]
        return args[0] if len(args) == 1 else hint
    return hint


def _integer_range(fmt: str) -> tuple[int, int] | None:
    """The range of a ``struct`` integer code (``B``, ``H``, ``i`` ...)."""
    if fmt not in "bBhHiIlLqQ" or len(fmt) != 1:
        return None
    bits = 8 * struct.calcsize("<" + fmt)
    if fmt.isupper():
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _wire(cls: type[Message], name: str) -> dict[str, Any]:
    """What the wire allows for field ``name`` of ``cls``: a numeric range (in the
    field's unit) or a text length; {} when the declaration does not say."""
    size, converter, fmt = None, None, None
    tags = getattr(cls, "TAG_MAP", None)
    if tags is not None:  # a BKV TLV message: one tag per field
        spec = next((t for t in tags.values() if t.name == name), None)
        kind = None if spec is None else spec.kind
        if kind is not None and type(kind).__name__ == "UInt":
            size, converter = kind.size, kind.conv
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(size)
    else:
        codec = cast(Any, cls).codec
        wire_field = next((w for w in codec.fields if w.name == name and w.kind == "fixed"), None)
        if wire_field is not None:
            fmt, converter = wire_field.fmt, codec.converter(name)
            size = wire_field.size
    if fmt is None or converter is None:
        return {}
    bounds = _integer_range(fmt)
    kind = type(converter).__name__
    if bounds is not None:
        low, high = bounds
        if kind == "Scale":
            divisor = cast(Any, converter).divisor
            return {"minimum": low / divisor, "maximum": high / divisor}
        if kind == "Temperature65":
            return {"minimum": 1 - 65, "maximum": high - 65}
        if type(converter).__mro__[0].__name__ == "Converter":
            return {"minimum": low, "maximum": high}
        return {}
    if fmt.endswith("s") and size is not None:
        if kind in ("Ascii", "EscapedAscii"):
            chars = getattr(converter, "max_chars", None)
            return {"maxLength": chars if chars is not None else size}
        if kind in ("Hex", "Converter"):  # bytes without a unit travel as hex
            return {"pattern": f"^([0-9A-Fa-f]{{2}}){{{size}}}$"}
    return {}


_PERIOD = {
    "type": "object",
    "properties": {
        "start": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
        "end": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
    },
    "required": ["start", "end"],
    "additionalProperties": False,
}


def _field_schema(group: Group, cls: type[Message], name: str) -> dict[str, Any]:
    hint = _scalar(typing.get_type_hints(cls).get(name, Any))
    schema: dict[str, Any] = {}
    if hint in _TYPES:
        schema["type"] = _TYPES[hint]
    elif name == "periods":  # BKV voice windows: at most two periods of the day
        schema.update(type="array", items=_PERIOD, maxItems=2)
    schema.update(_wire(cls, name))
    rule = group.rules.get(name)
    notes = []
    if rule is not None:
        if rule.values is not None:
            schema = {"type": schema.get("type", "integer"), "enum": sorted(rule.values)}
        if rule.low is not None:
            schema["minimum"] = max(rule.low, schema.get("minimum", rule.low))
        if rule.high is not None:
            schema["maximum"] = min(rule.high, schema.get("maximum", rule.high))
        if rule.source:
            notes.append(f"range: {rule.source}")
    step = group.resolution.get(name)
    if step is not None:
        notes.append(f"kept at a resolution of {step:g}")
    if notes:
        schema["description"] = "; ".join(notes)
    return schema


def group_schema(group: Group) -> dict[str, Any]:
    """The JSON schema of a group's fields, from its table and its set command."""
    cls = _message_class(group)
    properties = {name: _field_schema(group, cls, name) for name in group.fields}
    completion = (
        "only the fields to change (the device keeps the others)"
        if group.partial
        else "fields not given keep their last desired or reported value; a group never "
        "set or reported needs all of them"
    )
    return {
        "title": _model_name(group),
        "description": f"{group.protocol.upper()} parameter group `{group.name}` "
        f"({group.reference}): {completion}.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "minProperties": 1,
    }


def _model_name(group: Group) -> str:
    return "".join(part.capitalize() for part in group.name.split("_")) + "Params"


def _group_model(group: Group) -> type[BaseModel]:
    schema = group_schema(group)
    fields: dict[str, Any] = {
        name: (Annotated[Any, WithJsonSchema(spec)], Field(None))
        for name, spec in schema["properties"].items()
    }
    return create_model(
        schema["title"],
        __config__=ConfigDict(
            extra="allow",
            title=schema["title"],
            json_schema_extra={
                "description": schema["description"],
                "additionalProperties": False,
                "minProperties": 1,
            },
        ),
        __doc__=schema["description"],
        **fields,
    )


#: group name -> its model
GROUP_MODELS: dict[str, type[BaseModel]] = {name: _group_model(g) for name, g in GROUPS.items()}


def _groups_model() -> type[BaseModel]:
    fields: dict[str, Any] = {name: (model, Field(None)) for name, model in GROUP_MODELS.items()}
    return create_model(
        "ParamGroups",
        __config__=ConfigDict(
            extra="allow",
            json_schema_extra={
                "description": "Parameter groups by name, each with the fields to set. "
                "AP3000 devices take "
                + ", ".join(f"`{n}`" for n, g in GROUPS.items() if g.protocol == "ap3000")
                + "; BKV sockets take "
                + ", ".join(f"`{n}`" for n, g in GROUPS.items() if g.protocol == "bkv")
                + ".",
                "additionalProperties": False,
                "minProperties": 1,
            },
        ),
        **fields,
    )


if TYPE_CHECKING:
    ParamGroups: TypeAlias = BaseModel
else:
    #: ``{group: {field: value}}``: the body of ``PUT .../params`` and a profile's groups
    ParamGroups = _groups_model()


def groups_of(body: BaseModel) -> dict[str, Any]:
    """The groups a request gave, as it gave them."""
    return body.model_dump(exclude_unset=True)
