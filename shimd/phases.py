"""Per-phase timing of the pod and container lifecycle RPCs (issue 18), always on.

The CRI dispatcher opens a `Phases` for each timed call and keeps it in a context variable, so the
code below it only says where a step ended: `phase("cni_add")` right after the step. A phase lasts
from the previous mark (or the call's start) to its own, so the phases of a call add up to its
duration; what follows the last mark is `other`. Tasks started during the call inherit the variable
and may mark too (the CNI chain runs in one); once the call has ended its marks are ignored, so a
long-lived task started by it (an exit watcher) never touches it again. Steps that run concurrently
within one call should be marked once, after they are all done.

A step that runs alongside the call's main line (CNI DEL while the pod's tasks are stopped) runs
under `side_branch()`: its marks time its own steps from the branch's start and go to the call's
`overlapped` phases, which do not add up with the others; the main line marks once after joining it
(`*_wait`: how long the branch kept the call waiting).

At the end of a call its breakdown goes to one debug log line and, for calls that succeeded, to the
observers (the Prometheus histogram shimd_phase_duration_seconds{rpc,phase}; overlapped phases
included, so a call's phases there may add up to more than its duration). With `record_intervals()`
(tracing is on) each mark also keeps when its step began and ended, for the call's trace spans.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token

from shimd import log

# The calls of a pod's start and teardown; other RPCs are not timed by phase.
TIMED_RPCS = frozenset({"RunPodSandbox", "CreateContainer", "StartContainer", "StopPodSandbox", "RemovePodSandbox"})
OTHER = "other"

Observer = Callable[[str, dict[str, float]], None]  # (rpc, seconds by phase)
_observers: list[Observer] = []
_current: ContextVar[Phases | None] = ContextVar("shimd_phases", default=None)
_log = log.get("phases")
_record_intervals = False

# One step of a call as a trace span shows it: (phase, began, ended, overlapped), times from perf_counter.
Interval = tuple[str, float, float, bool]


def record_intervals() -> None:
    """From now on every call keeps its steps' intervals (Phases.intervals): for tracing.configure."""
    global _record_intervals
    _record_intervals = True


class Phases:
    """The phases of one call, in the order they first ended; a phase marked twice adds up."""

    __slots__ = ("_last", "_parent", "closed", "context", "intervals", "overlapped", "rpc", "started", "steps")

    def __init__(self, rpc: str, parent: Phases | None = None) -> None:
        self.rpc = rpc
        self.started = self._last = time.perf_counter()
        self.steps: dict[str, float] = {}
        self.overlapped: dict[str, float] = {}
        self.context: dict[str, str] = {}
        self.closed = False
        self._parent = parent
        self.intervals: list[Interval] | None = [] if _record_intervals and parent is None else None

    def mark(self, name: str) -> None:
        if self.closed or (self._parent is not None and self._parent.closed):
            return
        now = time.perf_counter()
        main = self if self._parent is None else self._parent
        into = self.steps if self._parent is None else main.overlapped
        into[name] = into.get(name, 0.0) + (now - self._last)
        if main.intervals is not None:
            main.intervals.append((name, self._last, now, self._parent is not None))
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


def end(token: Token[Phases | None] | None, status: str) -> Phases | None:
    """Closes the call begin() started (logs and observes it) and returns it: None for an untimed call."""
    if token is None:
        return None
    p = _current.get()
    _current.reset(token)
    if p is None:
        return None
    total = p.finish()
    extra = {"overlapped": {name: round(s * 1000, 3) for name, s in p.overlapped.items()}} if p.overlapped else {}
    _log.debug("rpc phases", rpc=p.rpc, status=status, total_ms=round(total * 1000, 3),
               phases={name: round(s * 1000, 3) for name, s in p.steps.items()}, **extra, **p.context)
    if status == "OK":
        steps = p.steps
        if p.overlapped:
            steps = dict(steps)
            for name, s in p.overlapped.items():
                steps[name] = steps.get(name, 0.0) + s
        for obs in _observers:
            obs(p.rpc, steps)
    return p


def phase(name: str) -> None:
    """The step `name` of the current call has just ended (a no-op outside a timed call)."""
    p = _current.get()
    if p is not None:
        p.mark(name)


@contextlib.contextmanager
def side_branch() -> Iterator[None]:
    """Marks made inside (in a task of their own) time a step that runs alongside the call's main line."""
    p = _current.get()
    token = _current.set(Phases(p.rpc, parent=p) if p is not None else None)
    try:
        yield
    finally:
        _current.reset(token)


def phase_context(**ids: str) -> None:
    """Ids (pod_id, container_id) the call's log line carries."""
    p = _current.get()
    if p is not None and not p.closed:
        p.context.update(ids)
