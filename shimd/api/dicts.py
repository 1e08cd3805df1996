"""`to_dict(msg)`: what betterproto's `msg.to_dict()` returns (camelCase, defaults left out), faster.

Measured on the CreateContainerRequest's config that CreateContainer keeps in its record: betterproto's
to_dict took 1.6-2.3 ms (every attribute read goes through Message.__getattribute__, every default is
built), about a tenth of the call. This walks the fields from a per-class plan built once with
betterproto's own metadata, reads them without the library's hooks, and builds no default; a message
with anything the plan does not cover (oneof groups, optional or wrapped fields, floats, timestamps)
is left to betterproto. tests/unit/test_proto_dicts.py holds it to betterproto's to_dict.
"""

from __future__ import annotations

import base64
from typing import Any

import betterproto
from betterproto import PLACEHOLDER
from betterproto.casing import camel_case

_INT64 = frozenset({"int64", "uint64", "sint64", "fixed64", "sfixed64"})
_PLAIN = frozenset({"string", "bool", "int32", "uint32", "sint32", "fixed32", "sfixed32"})
_SUPPORTED = _INT64 | _PLAIN | {"message", "map", "enum", "bytes"}

# (field name, JSON name, proto type, repeated, default, enum class)
_Field = tuple[str, str, str, bool, Any, Any]
_plans: dict[type, list[_Field] | None] = {}


def _plan(cls: type[betterproto.Message]) -> list[_Field] | None:
    meta = cls._betterproto
    hints: dict[str, Any] | None = None
    plan: list[_Field] = []
    for name, fm in meta.meta_by_field_name.items():
        if fm.proto_type not in _SUPPORTED or fm.group or fm.optional or fm.wraps:
            return None
        repeated = meta.default_gen[name] is list
        default = None if fm.proto_type in ("message", "map") or repeated else meta.default_gen[name]()
        enum_cls = None
        if fm.proto_type == "message":
            sub = meta.cls_by_field.get(name)
            if not (isinstance(sub, type) and issubclass(sub, betterproto.Message)):
                return None  # datetime, timedelta: betterproto's own formats
        elif fm.proto_type == "enum":
            hints = hints if hints is not None else cls._type_hints()
            enum_cls = hints[name].__args__[0] if repeated else hints[name]
        plan.append((name, camel_case(name).rstrip("_"), fm.proto_type, repeated, default, enum_cls))
    return plan


def to_dict(msg: betterproto.Message) -> dict[str, Any]:
    """msg.to_dict() (default casing, no default values)."""
    cls = type(msg)
    try:
        plan = _plans[cls]
    except KeyError:
        plan = _plans[cls] = _plan(cls)
    if plan is None:
        return msg.to_dict()
    get = object.__getattribute__
    out: dict[str, Any] = {}
    for name, key, kind, repeated, default, enum_cls in plan:
        value = get(msg, name)
        if value is PLACEHOLDER or value is None:
            continue  # never set: its default, which to_dict leaves out
        if kind == "message":
            if repeated:
                if value:
                    out[key] = [to_dict(v) for v in value]
            elif get(value, "_serialized_on_wire"):
                out[key] = to_dict(value)
        elif kind == "map":
            if value:
                out[key] = {k: to_dict(v) if isinstance(v, betterproto.Message) else v for k, v in value.items()}
        elif repeated:
            if value:
                if kind in _INT64:
                    out[key] = [str(n) for n in value]
                elif kind == "bytes":
                    out[key] = [base64.b64encode(b).decode("utf8") for b in value]
                elif kind == "enum":
                    out[key] = [enum_cls(v).name for v in value]
                else:
                    out[key] = value
        elif value != default:
            if kind in _INT64:
                out[key] = str(value)
            elif kind == "bytes":
                out[key] = base64.b64encode(value).decode("utf8")
            elif kind == "enum":
                out[key] = enum_cls(value).name
            else:
                out[key] = value
    return out
