"""Protobuf encodings of the list summaries (cri.Container, cri.PodSandbox) written straight from records.

Building and serializing a summary with betterproto costs about half a millisecond; after a
restart with 500 containers, the first ListContainers spent most of its 275 ms doing that, and
every state change pays it again for one item. These functions write the same bytes directly.
tests/unit/test_summary_wire.py holds them to betterproto's encoding of convert.container_summary
and convert.pod_summary for the same records, so the two cannot drift apart.

Field numbers are those of k8s.io/cri-api runtime/v1 api.proto. As betterproto does: scalars at
their default value are left out, sub-messages that are always set (metadata, image) are written
even when empty, map entries leave out an empty key or value.
"""

from __future__ import annotations

from collections.abc import Mapping

from shimd.cri import convert, wire
from shimd.store.records import ContainerRecord, PodRecord


def _string(field_number: int, value: str) -> bytes:
    return wire.delimited(field_number, value.encode()) if value else b""


def _integer(field_number: int, value: int) -> bytes:
    return wire.varint(field_number << 3) + wire.varint(value) if value else b""


def _string_map(field_number: int, values: Mapping[str, str]) -> bytes:
    return b"".join(wire.delimited(field_number, _string(1, k) + _string(2, v)) for k, v in values.items())


def container(ctr: ContainerRecord) -> bytes:
    """bytes(convert.container_summary(ctr)), without building the message."""
    metadata = _string(1, ctr.name) + _integer(2, ctr.attempt)
    annotations, user_specified = convert.image_as_given(ctr)
    image = _string(1, ctr.image_ref) + _string_map(2, annotations) + _string(18, user_specified)
    return b"".join((
        _string(1, ctr.id), _string(2, ctr.pod_id), wire.delimited(3, metadata), wire.delimited(4, image),
        _string(5, ctr.image_id), _integer(6, convert.container_state(ctr)), _integer(7, ctr.created_at),
        _string_map(8, ctr.labels), _string_map(9, ctr.annotations), _string(10, ctr.image_id),
    ))


def pod(record: PodRecord) -> bytes:
    """bytes(convert.pod_summary(record)), without building the message."""
    metadata = (_string(1, record.name) + _string(2, record.uid) + _string(3, record.namespace)
                + _integer(4, record.attempt))
    return b"".join((
        _string(1, record.id), wire.delimited(2, metadata), _integer(3, convert.pod_state(record)),
        _integer(4, record.created_at), _string_map(5, record.labels), _string_map(6, record.annotations),
        _string(7, record.handler),
    ))
