"""Issue 17 item 5: records change by copy-write-swap through the store, and only along the state machines."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from shimd import fsutil
from shimd.store import lifecycle
from shimd.store.lifecycle import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_INITIALIZING,
    POD_NOTREADY,
    POD_READY,
    POD_STOPPED,
    IllegalTransition,
)
from shimd.store.records import ContainerRecord, PodRecord
from shimd.store.store import Store
from tests.support.daemon import ShimdProcess

POD = "a" * 64
CTR = "b" * 64
POD_STATES = [POD_INITIALIZING, POD_READY, POD_NOTREADY, POD_STOPPED]
CONTAINER_STATES = [CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED]
LEGAL_POD = {(POD_INITIALIZING, POD_READY), (POD_READY, POD_NOTREADY), (POD_NOTREADY, POD_STOPPED)}
LEGAL_CONTAINER = {(CONTAINER_CREATED, CONTAINER_RUNNING), (CONTAINER_CREATED, CONTAINER_EXITED),
                   (CONTAINER_RUNNING, CONTAINER_EXITED)}


def _pod(state: str = POD_INITIALIZING) -> PodRecord:
    return PodRecord(id=POD, name="p", namespace="ns", uid="u", attempt=0, handler="runc", created_at=1, config={},
                     state=state)


def _ctr(state: str = CONTAINER_CREATED) -> ContainerRecord:
    return ContainerRecord(id=CTR, pod_id=POD, name="c", attempt=0, created_at=1, config={}, image_ref="i",
                           image_id="sha256:x", log_path="", bundle="/nonexistent", state=state)


async def _store(root: Path) -> Store:
    store = Store(root)
    await store.load()
    return store


async def _pod_in(store: Store, state: str) -> None:
    """A pod record brought to `state` along the legal path."""
    await store.add_pod(_pod())
    path = POD_STATES[:POD_STATES.index(state) + 1]
    for nxt in path[1:]:
        await store.update_pod(POD, state=nxt)


def _on_disk(root: Path, kind: str, ident: str) -> dict[str, object]:
    return json.loads((root / kind / f"{ident}.json").read_text())


def test_the_tables_are_the_drawn_machines() -> None:
    """What the module docstring draws, and nothing more."""
    assert {(a, b) for a, bs in lifecycle.POD_TRANSITIONS.items() for b in bs} == LEGAL_POD
    assert {(a, b) for a, bs in lifecycle.CONTAINER_TRANSITIONS.items() for b in bs} == LEGAL_CONTAINER
    assert lifecycle.POD_DELETABLE == {POD_INITIALIZING, POD_STOPPED}
    assert lifecycle.CONTAINER_DELETABLE == {CONTAINER_CREATED, CONTAINER_EXITED}


@pytest.mark.parametrize(("old", "new"), [p for p in itertools.product(POD_STATES, POD_STATES) if p[0] != p[1]])
async def test_pod_transitions(tmp_path: Path, old: str, new: str) -> None:
    store = await _store(tmp_path)
    await _pod_in(store, old)
    generation = store.generation
    if (old, new) in LEGAL_POD:
        changed = await store.update_pod(POD, state=new)
        assert changed is store.pods[POD] and changed.state == new
        assert _on_disk(tmp_path, "pods", POD)["state"] == new
        assert store.generation == generation + 1
        return
    with pytest.raises(IllegalTransition, match=f"{old} -> {new} is not a legal transition"):
        await store.update_pod(POD, state=new)
    # Nothing of the refused change is seen, in memory or on disk.
    assert store.pods[POD].state == old and _on_disk(tmp_path, "pods", POD)["state"] == old
    assert store.generation == generation


@pytest.mark.parametrize(("old", "new"),
                         [p for p in itertools.product(CONTAINER_STATES, CONTAINER_STATES) if p[0] != p[1]])
async def test_container_transitions(tmp_path: Path, old: str, new: str) -> None:
    store = await _store(tmp_path)
    await store.add_pod(_pod())
    await store.add_container(_ctr(old))
    if (old, new) in LEGAL_CONTAINER:
        assert (await store.update_container(CTR, state=new)).state == new  # type: ignore[union-attr]
        assert _on_disk(tmp_path, "containers", CTR)["state"] == new
        return
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        await store.update_container(CTR, state=new)
    assert store.containers[CTR].state == old and _on_disk(tmp_path, "containers", CTR)["state"] == old


@pytest.mark.parametrize("state", POD_STATES)
async def test_only_initializing_or_stopped_pods_are_deleted(tmp_path: Path, state: str) -> None:
    store = await _store(tmp_path)
    await _pod_in(store, state)
    if state in (POD_INITIALIZING, POD_STOPPED):
        await store.delete_pod(POD)
        assert POD not in store.pods and not (tmp_path / "pods" / f"{POD}.json").exists()
        return
    with pytest.raises(IllegalTransition, match="cannot be deleted"):
        await store.delete_pod(POD)
    assert POD in store.pods and (tmp_path / "pods" / f"{POD}.json").exists()


@pytest.mark.parametrize("state", CONTAINER_STATES)
async def test_a_running_container_is_never_deleted(tmp_path: Path, state: str) -> None:
    store = await _store(tmp_path)
    await store.add_pod(_pod())
    await store.add_container(_ctr(state))
    if state == CONTAINER_RUNNING:
        with pytest.raises(IllegalTransition, match="cannot be deleted"):
            await store.delete_container(CTR)
        assert CTR in store.containers
    else:
        await store.delete_container(CTR)
        assert CTR not in store.containers


async def test_unknown_states_are_refused(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await store.add_pod(_pod())
    with pytest.raises(IllegalTransition, match="unknown state"):
        await store.update_pod(POD, state="PAUSED")
    with pytest.raises(IllegalTransition):
        await store.add_pod(dataclasses.replace(_pod(POD_STOPPED), id="c" * 64))  # born stopped


def test_records_cannot_be_changed_in_place() -> None:
    pod, ctr = _pod(), _ctr()
    with pytest.raises(dataclasses.FrozenInstanceError):
        pod.state = POD_READY  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctr.exit_code = 1  # type: ignore[misc]


async def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await _store(tmp_path)
    await _pod_in(store, POD_READY)
    before, generation = store.pods[POD], store.generation

    async def disk_full(path: Path, data: object, durable: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        await store.update_pod(POD, state=POD_NOTREADY, shim_dead=True)
    assert store.pods[POD] is before and store.generation == generation
    assert _on_disk(tmp_path, "pods", POD)["state"] == POD_READY


async def test_a_change_that_changes_nothing_is_not_written(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    await _pod_in(store, POD_READY)
    before, generation = store.pods[POD], store.generation
    assert await store.update_pod(POD, state=POD_READY, ip="") is before
    assert await store.update_pod(POD, lambda p: None) is before
    assert store.generation == generation


async def test_records_of_an_older_shimd_are_read_and_it_can_read_ours(tmp_path: Path) -> None:
    """Before the explicit states a pod was READY/NOTREADY plus `initializing` and `stopped` flags."""
    old = {k: v for k, v in _pod().to_dict().items() if k not in ("initializing", "stopped")}
    assert PodRecord.from_dict({**old, "state": "NOTREADY", "initializing": True, "stopped": False}).initializing
    assert PodRecord.from_dict({**old, "state": "NOTREADY", "initializing": False, "stopped": True}).stopped
    assert PodRecord.from_dict({**old, "state": "READY", "initializing": False, "stopped": False}).ready
    # Written with both, so a downgraded shimd still tears an interrupted pod down and skips a stopped one.
    assert {k: _pod(POD_INITIALIZING).to_dict()[k] for k in ("initializing", "stopped")} == {
        "initializing": True, "stopped": False}
    assert _pod(POD_STOPPED).to_dict()["stopped"] is True


def test_an_illegal_change_in_a_daemon_log_fails_the_test(tmp_path: Path) -> None:
    """The integration tests' shimd fixture reads its log at stop: an illegal change anywhere is a failure."""
    proc = ShimdProcess(tmp_path)
    proc.log_path.write_text('{"event": "fine"}\n')
    proc.assert_no_illegal_state_change()
    message = str(IllegalTransition(f"pod sandbox {POD}: STOPPED -> READY is not a legal transition"))
    proc.log_path.write_text(json.dumps({"event": "exit handler failed", "error": message}) + "\n")
    with pytest.raises(AssertionError, match="STOPPED -> READY"):
        proc.assert_no_illegal_state_change()
