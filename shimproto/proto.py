"""A small schema-driven protobuf (proto3) codec producing and consuming plain dicts.

A schema is a dict {field_number: (name, kind, sub)}: kind is a scalar type name, "message" (sub
is the nested schema), or "map" (string->string); sub == REPEATED marks a repeated scalar. Decoded
messages hold every field of the schema (defaults for absent ones), so handlers never KeyError.
Unknown fields are skipped, as proto3 requires.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any

    Schema = dict[int, tuple[str, str, Any]]
else:
    Schema = dict


REPEATED = "repeated"
# Wire types.
VARINT, I64, LEN, I32 = 0, 1, 2, 5

_VARINT_KINDS = frozenset({"uint32", "uint64", "int32", "int64", "bool", "enum"})
_DEFAULTS: dict[str, Any] = {
    "string": "", "bytes": b"", "bool": False, "uint32": 0, "uint64": 0, "int32": 0, "int64": 0, "enum": 0,
}


class DecodeError(ValueError):
    pass


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        value += 1 << 64  # negative int32/int64 are sent as 10-byte two's complement
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def get_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at pos; DecodeError (a ValueError) when cut short or too long."""
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint too long")


def _put_key(out: bytearray, number: int, wire: int) -> None:
    _put_varint(out, (number << 3) | wire)


def _put_len(out: bytearray, number: int, data: bytes) -> None:
    _put_key(out, number, LEN)
    _put_varint(out, len(data))
    out += data


def _put_scalar(out: bytearray, number: int, kind: str, value: Any, keep_default: bool) -> None:
    if kind == "string":
        if value or keep_default:
            _put_len(out, number, value.encode())
    elif kind == "bytes":
        if value or keep_default:
            _put_len(out, number, bytes(value))
    elif kind in _VARINT_KINDS:
        value = int(value)
        if value or keep_default:
            _put_key(out, number, VARINT)
            _put_varint(out, value)
    else:
        raise TypeError(f"unsupported kind {kind!r}")


def encode(schema: Schema, msg: dict[str, Any]) -> bytes:
    out = bytearray()
    for number, (name, kind, sub) in schema.items():
        value = msg.get(name)
        if value is None:
            continue
        if kind == "message":
            if isinstance(sub, tuple):
                for item in value:
                    _put_len(out, number, encode(sub[0], item))
            else:
                _put_len(out, number, encode(sub, value))
        elif kind == "map":
            for k, v in value.items():
                entry = bytearray()
                _put_scalar(entry, 1, "string", k, False)
                _put_scalar(entry, 2, "string", v, False)
                _put_len(out, number, bytes(entry))
        elif sub == REPEATED:
            if kind in _VARINT_KINDS:
                if value:  # proto3 packs repeated scalars
                    packed = bytearray()
                    for v in value:
                        _put_varint(packed, int(v))
                    _put_len(out, number, bytes(packed))
            else:
                for v in value:
                    _put_scalar(out, number, kind, v, True)
        else:
            _put_scalar(out, number, kind, value, False)
    return bytes(out)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar(kind: str, value: int) -> Any:
    if kind == "bool":
        return value != 0
    if kind in ("int32", "enum"):
        return _signed(value, 32)
    if kind == "int64":
        return _signed(value, 64)
    if kind == "uint32":
        return value & 0xFFFFFFFF
    return value


def _empty(schema: Schema) -> dict[str, Any]:
    msg: dict[str, Any] = {}
    for name, kind, sub in schema.values():
        if sub == REPEATED or (kind == "message" and isinstance(sub, tuple)):
            msg[name] = []
        elif kind == "map":
            msg[name] = {}
        elif kind == "message":
            msg[name] = None
        else:
            msg[name] = _DEFAULTS[kind]
    return msg


def repeated(schema: Schema) -> tuple[Schema]:
    """Marks a repeated message field: ("name", "message", repeated(SubSchema))."""
    return (schema,)


def decode(schema: Schema, data: bytes | memoryview) -> dict[str, Any]:
    buf = memoryview(data)
    msg = _empty(schema)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = get_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            raw, pos = get_varint(buf, pos)
            chunk = None
        elif wire == LEN:
            n, pos = get_varint(buf, pos)
            if pos + n > end:
                raise DecodeError(f"field {number}: length {n} past the end of the message")
            chunk, pos = buf[pos:pos + n], pos + n
        elif wire == I64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64")
            raw, pos, chunk = struct.unpack_from("<Q", buf, pos)[0], pos + 8, None
        elif wire == I32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32")
            raw, pos, chunk = struct.unpack_from("<I", buf, pos)[0], pos + 4, None
        else:
            raise DecodeError(f"field {number}: unsupported wire type {wire}")
        field = schema.get(number)
        if field is None:
            continue
        name, kind, sub = field
        if kind == "message":
            if chunk is None:
                raise DecodeError(f"{name}: expected a length-delimited message")
            if isinstance(sub, tuple):
                msg[name].append(decode(sub[0], chunk))
            else:
                msg[name] = decode(sub, chunk)
        elif kind == "map":
            if chunk is None:
                raise DecodeError(f"{name}: expected a map entry")
            entry = decode(_MAP_ENTRY, chunk)
            msg[name][entry["key"]] = entry["value"]
        elif kind in ("string", "bytes"):
            if chunk is None:
                raise DecodeError(f"{name}: expected a length-delimited value")
            value: Any = bytes(chunk) if kind == "bytes" else str(chunk, "utf-8")
            if sub == REPEATED:
                msg[name].append(value)
            else:
                msg[name] = value
        elif sub == REPEATED:
            if chunk is not None:  # packed
                p = 0
                while p < len(chunk):
                    v, p = get_varint(chunk, p)
                    msg[name].append(_scalar(kind, v))
            else:
                msg[name].append(_scalar(kind, raw))
        else:
            if chunk is not None:
                raise DecodeError(f"{name}: expected a varint")
            msg[name] = _scalar(kind, raw)
    return msg


_MAP_ENTRY: Schema = {1: ("key", "string", None), 2: ("value", "string", None)}
