"""List responses assembled from cached wire encodings.

kubelet lists pods and containers every second. Encoding each item with betterproto costs far
more than the list itself, and an item's summary changes only when its state does, so each
summary is encoded once per state and the response is the concatenation of those bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import betterproto

from shimproto.proto import get_varint

R = TypeVar("R")
M = TypeVar("M", bound=betterproto.Message)

_RAW_TYPES: dict[type, type] = {}
_EMPTY_STATE: dict[type, tuple[dict[str, Any], tuple[str, ...]] | None] = {}


def varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64 values are sent as their 64-bit two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def without_fields(data: bytes, numbers: frozenset[int]) -> bytes:
    """data (an encoded message) with its top-level fields of these numbers left out, or data as it is
    when its framing is not plain (a group, a length past the end): the decoder then judges it whole.

    For fields a handler never reads: CreateContainer's sandbox_config is a whole PodSandboxConfig
    that kubelet sends with every call and shimd takes from the pod's record instead; decoding it was
    about half of the request's decoding time."""
    kept: list[bytes] = []
    pos = start = 0
    try:
        while pos < len(data):
            field_start = pos
            tag, pos = get_varint(data, pos)
            kind = tag & 7
            if kind == 0:
                _, pos = get_varint(data, pos)
            elif kind == 1:
                pos += 8
            elif kind == 2:
                size, pos = get_varint(data, pos)
                pos += size
            elif kind == 5:
                pos += 4
            else:
                return data
            if pos > len(data):
                return data
            if tag >> 3 in numbers:
                kept.append(data[start:field_start])
                start = pos
    except ValueError:
        return data
    if start == 0:
        return data
    kept.append(data[start:])
    return b"".join(kept)


def delimited(field_number: int, body: bytes) -> bytes:
    """One length-delimited field (wire type 2): a string, bytes or an encoded message."""
    return varint(field_number << 3 | 2) + varint(len(body)) + body


def repeated_message_field(field_number: int, encoded_items: Iterable[bytes]) -> bytes:
    return b"".join(delimited(field_number, item) for item in encoded_items)


def preencoded(cls: type[M], payload: bytes) -> M:
    """An instance of cls (so grpclib's type check passes) that serializes to payload as is."""
    raw_cls = _RAW_TYPES.get(cls)
    if raw_cls is None:
        def serialize(self: Any) -> bytes:
            return self._shimd_payload  # type: ignore[no-any-return]

        # Same module as cls: betterproto resolves the field annotations ("Container") there.
        raw_cls = type(cls.__name__, (cls,), {"SerializeToString": serialize, "__bytes__": serialize,
                                               "__module__": cls.__module__})
        _RAW_TYPES[cls] = raw_cls
    # Built without __init__: betterproto's per-field set-up costs more than a cached list answer,
    # and nothing reads fields of this instance (grpclib checks its type and serializes it).
    msg = object.__new__(raw_cls)
    object.__setattr__(msg, "_shimd_payload", payload)
    return msg  # type: ignore[no-any-return]


def empty(cls: type[M]) -> M:
    """What cls.FromString(b"") returns, built from a copy of its state.

    Most list and status requests come with an empty body. betterproto builds a message through
    __init__ and __post_init__, where every attribute read raises and catches an AttributeError until
    set-up ends: measured at about a sixth of the daemon's CPU for an unfiltered ListPodSandbox. An
    empty message holds only defaults, so the instance state the library left once is copied; a class
    whose state holds anything mutable besides plain dicts of constants is decoded by the library.
    """
    known = _EMPTY_STATE.get(cls, False)
    if known is False:
        known = _EMPTY_STATE[cls] = _empty_state(cls)
    if known is None:
        return cls.FromString(b"")
    state, dicts = known
    msg = object.__new__(cls)
    own = object.__getattribute__(msg, "__dict__")  # betterproto's __getattribute__ is not set up for this yet
    own.update(state)
    for name in dicts:
        own[name] = dict(state[name])
    return msg


def _empty_state(cls: type[M]) -> tuple[dict[str, Any], tuple[str, ...]] | None:
    state = dict(object.__getattribute__(cls.FromString(b""), "__dict__"))

    def constant(v: Any) -> bool:
        return v is betterproto.PLACEHOLDER or v is None or type(v) in (bool, int, str, bytes)

    dicts = tuple(k for k, v in state.items() if type(v) is dict)
    if not all(constant(v) for k, v in state.items() if k not in dicts):
        return None
    if not all(constant(x) for k in dicts for x in state[k].values()):
        return None
    return state, dicts


def submessage(msg: betterproto.Message, name: str) -> Any:
    """The sub-message field `name` if it was on the wire (even empty), else None.

    Reading an unset field through betterproto builds and stores a default instance; list
    requests mostly come without a filter, so the check avoids that work on every call.
    """
    value = object.__getattribute__(msg, name)
    if value is betterproto.PLACEHOLDER or value is None:
        return None
    return value if betterproto.serialized_on_wire(value) else None


class EncodingCache(Generic[R]):
    """Encoded summaries keyed by (id, version key); entries of items no longer listed are dropped."""

    def __init__(self, encode: Callable[[R], bytes], key: Callable[[R], Hashable],
                 ident: Callable[[R], str]) -> None:
        self._encode, self._key, self._ident = encode, key, ident
        self._cache: dict[str, tuple[Hashable, bytes]] = {}

    def encoded(self, item: R) -> bytes:
        ident, key = self._ident(item), self._key(item)
        hit = self._cache.get(ident)
        if hit is not None and hit[0] == key:
            return hit[1]
        data = self._encode(item)
        self._cache[ident] = (key, data)
        return data

    def prune(self, live: Iterable[str]) -> None:
        keep = set(live)
        for ident in [i for i in self._cache if i not in keep]:
            del self._cache[ident]


class ListCache:
    """The unfiltered list response, reused while the store's generation has not moved."""

    def __init__(self) -> None:
        self._generation = -1
        self._payload = b""

    def payload(self, generation: int, build: Callable[[], bytes]) -> bytes:
        if generation != self._generation:
            # Read the generation before building: a change during the build is then seen next time.
            self._payload, self._generation = build(), generation
        return self._payload
