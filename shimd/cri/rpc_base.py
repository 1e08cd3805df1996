"""What every RPC mixin of the RuntimeService shares: its collaborators, caches, and small helpers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from shimd.api.runtime import v1 as cri

if TYPE_CHECKING:
    from shimd.cri.deps import CriDeps
    from shimd.cri.wire import EncodingCache, ListCache
    from shimd.store.records import ContainerRecord, PodRecord

# Items per message of the Stream* RPCs.
STREAM_PAGE = 100

T = TypeVar("T")


def pages(items: Sequence[T]) -> list[list[T]]:
    return [list(items[i:i + STREAM_PAGE]) for i in range(0, len(items), STREAM_PAGE)]


class RpcBase:
    """Attributes the RuntimeService sets up once; the mixins read them."""

    d: CriDeps
    _pod_cache: EncodingCache[PodRecord]
    _container_cache: EncodingCache[ContainerRecord]
    # The unfiltered list responses, reused while the store is unchanged.
    _pod_list: ListCache
    _container_list: ListCache
    _last_pod_status: OrderedDict[str, bytes]

    # Provided by ContainerRpcs, used by the pod and event RPCs too.
    def _container_status(self, ctr: ContainerRecord) -> cri.ContainerStatus:
        raise NotImplementedError
