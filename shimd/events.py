"""Lifecycle events (created, started, stopped, deleted) fanned out to subscribers.

Publishing never blocks: each subscriber has a bounded queue, and one that falls behind is cut
off with SubscriberOverflow rather than letting memory grow; it is expected to resubscribe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CREATED = "CREATED"
STARTED = "STARTED"
STOPPED = "STOPPED"
DELETED = "DELETED"


@dataclass(frozen=True)
class LifecycleEvent:
    kind: str  # CREATED | STARTED | STOPPED | DELETED
    container_id: str  # a pod sandbox's own events carry the pod id here, as containerd does
    pod_id: str
    at_ns: int = field(default_factory=time.time_ns)


class SubscriberOverflow(Exception):
    pass


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[LifecycleEvent | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def _offer(self, ev: LifecycleEvent) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True
            # Make room for the wake-up marker so the reader learns of the overflow promptly.
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> LifecycleEvent:
        ev = await asyncio.wait_for(self._queue.get(), timeout)
        if ev is None or self.overflowed:
            raise SubscriberOverflow("event subscriber fell too far behind; resubscribe")
        return ev

    def close(self) -> None:
        self._bus._subs.discard(self)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[LifecycleEvent], None]] = []

    def add_listener(self, fn: Callable[[LifecycleEvent], None]) -> None:
        """Called synchronously at publish time (while the records the event is about still exist)."""
        self._listeners.append(fn)

    @property
    def subscribed(self) -> bool:
        return bool(self._subs)

    def publish(self, kind: str, container_id: str, pod_id: str) -> None:
        ev = LifecycleEvent(kind, container_id, pod_id)
        for fn in self._listeners:
            fn(ev)
        for sub in list(self._subs):
            sub._offer(ev)

    def subscribe(self, maxsize: int = 1024) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.add(sub)
        return sub
