"""The pod and container state machines: the one place that says which state change is legal.

Pod sandbox (`PodRecord.state`)::

      RunPodSandbox                 setup done
    ────────────────► INITIALIZING ────────────► READY
                           │                       │ StopPodSandbox begins, or the pod's shim died
                           │ setup failed,         ▼
                           │ or recovery        NOTREADY
                           │                       │ containers, sandbox task, shim and network stopped
                           │                       ▼
                           └──── deleted ◄───── STOPPED

    An INITIALIZING pod stays so through its teardown: if shimd dies before the record is deleted,
    recovery still knows the pod never became ready and tears it down again, instead of keeping it.
    Only INITIALIZING and STOPPED pods are deleted (RemovePodSandbox stops a pod first).

Container (`ContainerRecord.state`)::

      CreateContainer          StartContainer           exit, kill, or its shim died
    ──────────────────► CREATED ──────────────► RUNNING ─────────────────────────────► EXITED
                           │                                                           ▲
                           └────────────────── start failed ───────────────────────────┘

    Only CREATED and EXITED containers are deleted (RemoveContainer stops a running one first).

A change that keeps the state (a pod's resources, a container's updated config) is always legal.
`Store.update_pod` / `Store.update_container` check every change here before it is written.
"""

from __future__ import annotations

from shimd import errors

POD_INITIALIZING = "INITIALIZING"
POD_READY = "READY"
POD_NOTREADY = "NOTREADY"
POD_STOPPED = "STOPPED"

CONTAINER_CREATED = "CREATED"
CONTAINER_RUNNING = "RUNNING"
CONTAINER_EXITED = "EXITED"

POD_TRANSITIONS: dict[str, frozenset[str]] = {
    POD_INITIALIZING: frozenset({POD_READY}),
    POD_READY: frozenset({POD_NOTREADY}),
    POD_NOTREADY: frozenset({POD_STOPPED}),
    POD_STOPPED: frozenset(),
}
POD_DELETABLE = frozenset({POD_INITIALIZING, POD_STOPPED})

CONTAINER_TRANSITIONS: dict[str, frozenset[str]] = {
    CONTAINER_CREATED: frozenset({CONTAINER_RUNNING, CONTAINER_EXITED}),
    CONTAINER_RUNNING: frozenset({CONTAINER_EXITED}),
    CONTAINER_EXITED: frozenset(),
}
CONTAINER_DELETABLE = frozenset({CONTAINER_CREATED, CONTAINER_EXITED})


# Starts every IllegalTransition message: the integration tests fail on any daemon log line that has it.
MARKER = "illegal state change: "


class IllegalTransition(errors.ShimdError):
    """A state change the state machine does not allow: a bug, reported as INTERNAL."""

    def __init__(self, message: str) -> None:
        super().__init__(MARKER + message)


def _check(what: str, ident: str, table: dict[str, frozenset[str]], old: str, new: str) -> None:
    if new not in table:
        raise IllegalTransition(f"{what} {ident}: unknown state {new!r}")
    if old != new and new not in table.get(old, frozenset()):
        raise IllegalTransition(f"{what} {ident}: {old} -> {new} is not a legal transition")


def check_pod(ident: str, old: str, new: str) -> None:
    _check("pod sandbox", ident, POD_TRANSITIONS, old, new)


def check_container(ident: str, old: str, new: str) -> None:
    _check("container", ident, CONTAINER_TRANSITIONS, old, new)


def check_pod_deletable(ident: str, state: str) -> None:
    if state not in POD_DELETABLE:
        raise IllegalTransition(f"pod sandbox {ident}: a {state} pod cannot be deleted (stop it first)")


def check_container_deletable(ident: str, state: str) -> None:
    if state not in CONTAINER_DELETABLE:
        raise IllegalTransition(f"container {ident}: a {state} container cannot be deleted (stop it first)")
