"""Per-phase timing of the pod and container lifecycle RPCs (issue 18), always on.

The CRI dispatcher opens a `Phases` for each timed call and keeps it in a context variable, so the
code below it only says where a step ended: `phase("cni_add")` right after the step. A phase lasts
from the previous mark (or the call's start) to its own, so the phases of a call add up to its
duration; what follows the last mark is `other`. Tasks started during the call inherit the variable
and may mark too (the CNI chain runs in one); once the call has ended its marks are ignored, so a
long-lived task started by it (an exit watcher) never touches it again. Steps that run concurrently
within one call should be marked once, after they are all done.

At the end of a call its breakdown goes to one debug log line and, for calls that succeeded, to the
observers (the Prometheus histogram shimd_phase_duration_seconds{rpc,phase}).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar, Token

from shimd import log

# The calls of a pod's start and teardown; other RPCs are not timed by phase.
TIMED_RPCS = frozenset({"RunPodSandbox", "CreateContainer", "StartContainer", "StopPodSandbox", "RemovePodSandbox"})
OTHER = "other"

Observer = Callable[[str, dict[str, float]], None]  # (rpc, seconds by phase)
_observers: list[Observer] = []
_current: ContextVar[Phases | None] = ContextVar("shimd_phases", default=None)
_log = log.get("phases")


class Phases:
    """The phases of one call, in the order they first ended; a phase marked twice adds up."""

    __slots__ = ("_last", "closed", "context", "rpc", "started", "steps")

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self.started = self._last = time.perf_counter()
        self.steps: dict[str, float] = {}
        self.context: dict[str, str] = {}
        self.closed = False

    def mark(self, name: str) -> None:
        if self.closed:
            return
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + (now - self._last)
        self._last = now

    def finish(self) -> float:
        """Closes the call (the rest becomes `other`); returns its total duration in seconds."""
        self.mark(OTHER)
        self.closed = True
        return self._last - self.started


def add_observer(fn: Observer) -> None:
    """Called with (rpc, {phase: seconds}) after every timed call that succeeded; used by metrics."""
    _observers.append(fn)


def begin(rpc: str) -> Token[Phases | None] | None:
    """Starts timing a call if it is one of TIMED_RPCS; pass the result to end()."""
    if rpc not in TIMED_RPCS:
        return None
    return _current.set(Phases(rpc))


def end(token: Token[Phases | None] | None, status: str) -> None:
    if token is None:
        return
    p = _current.get()
    _current.reset(token)
    if p is None:
        return
    total = p.finish()
    _log.debug("rpc phases", rpc=p.rpc, status=status, total_ms=round(total * 1000, 3),
               phases={name: round(s * 1000, 3) for name, s in p.steps.items()}, **p.context)
    if status == "OK":
        for obs in _observers:
            obs(p.rpc, p.steps)


def phase(name: str) -> None:
    """The step `name` of the current call has just ended (a no-op outside a timed call)."""
    p = _current.get()
    if p is not None:
        p.mark(name)


def phase_context(**ids: str) -> None:
    """Ids (pod_id, container_id) the call's log line carries."""
    p = _current.get()
    if p is not None and not p.closed:
        p.context.update(ids)
