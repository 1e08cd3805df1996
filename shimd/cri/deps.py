"""The collaborators the CRI services use, handed over by the daemon once they are all built.

A typed set instead of the whole Daemon, so shimd.cri does not import shimd.daemon (issue 17, item 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shimd.config import Config
    from shimd.containers.exec import Execs
    from shimd.containers.service import ContainerService
    from shimd.events import EventBus
    from shimd.images.manager import ImageManager
    from shimd.metrics.server import MetricsServer
    from shimd.network.manager import NetworkManager
    from shimd.pods.service import PodService
    from shimd.stats.collector import StatsCollector
    from shimd.store.store import Store
    from shimd.streaming.server import StreamingServer


@dataclass(frozen=True)
class CriDeps:
    cfg: Config
    store: Store
    pods: PodService
    containers: ContainerService
    images: ImageManager
    execs: Execs
    streaming: StreamingServer
    stats: StatsCollector
    network: NetworkManager
    events: EventBus
    metrics: MetricsServer | None
    # (handler, available, reason, supports user namespaces, recursive read-only mounts) per handler, for Status.
    handler_reports: Callable[[], list[tuple[str, bool, str, bool, bool]]]
    # (ready, reason, message) of pod networking, for Status.
    network_status: Callable[[], tuple[bool, str, str]]
