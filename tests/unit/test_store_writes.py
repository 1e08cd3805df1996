"""Issue 16 item 8: concurrent saves of one record, and records that cannot be parsed at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from shimd import check, config, fsutil
from shimd.store.records import CONTAINER_EXITED, CONTAINER_RUNNING, ContainerRecord, PodRecord
from shimd.store.store import Store

POD = "a" * 64
CTR = "b" * 64


def _pod(pod_id: str = POD) -> PodRecord:
    return PodRecord(id=pod_id, name="p", namespace="ns", uid="u", attempt=0, handler="runc", created_at=1,
                     config={})


def _ctr() -> ContainerRecord:
    return ContainerRecord(id=CTR, pod_id=POD, name="c", attempt=0, created_at=1, config={}, image_ref="i",
                           image_id="sha256:x", log_path="", bundle="/nonexistent", state=CONTAINER_RUNNING)


async def _store_with_container(root: Path) -> tuple[Store, ContainerRecord]:
    """A loaded store holding one pod and its container, both recorded."""
    store = Store(root)
    await store.load()
    await store.add_pod(_pod())
    ctr = _ctr()
    await store.add_container(ctr)
    return store, ctr


def test_two_threads_writing_one_file_do_not_share_a_temp_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers are held inside their write until the other has written too: with one temp name per
    process, the second truncates the first's file and one rename finds nothing."""
    target = tmp_path / "r.json"
    barrier = threading.Barrier(2, timeout=10)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            barrier.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            fsutil.write_atomic_sync(target, data)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(json.dumps({"n": i}).encode(),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert json.loads(target.read_text()) in ({"n": 0}, {"n": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


async def test_concurrent_changes_of_one_record_are_all_kept(tmp_path: Path) -> None:
    """The exit watcher records an exit while other changes (a stop, an update) are on their way: none is
    lost, and memory and disk end the same."""
    store, _ = await _store_with_container(tmp_path)

    async def exit_recorded() -> None:  # what on_exit does
        await store.update_container(CTR, state=CONTAINER_EXITED, exit_code=137)

    async def other_change(i: int) -> None:  # each reads the current record and adds to it
        await asyncio.sleep(0)
        await store.update_container(CTR, lambda c: {"message": f"{c.message}{i},"})

    await asyncio.gather(exit_recorded(), *(other_change(i) for i in range(20)))
    final = store.containers[CTR]
    assert final.state == CONTAINER_EXITED and final.exit_code == 137
    assert sorted(int(n) for n in final.message.split(",") if n) == list(range(20))
    on_disk = json.loads((tmp_path / "containers" / f"{CTR}.json").read_text())
    assert on_disk == final.to_dict()
    assert sorted(p.name for p in (tmp_path / "containers").iterdir()) == [f"{CTR}.json"]


async def test_a_change_racing_the_removal_does_not_bring_the_record_back(tmp_path: Path) -> None:
    store, _ = await _store_with_container(tmp_path)
    await store.update_container(CTR, state=CONTAINER_EXITED)
    results = await asyncio.gather(store.delete_container(CTR), store.update_container(CTR, message="late"))
    assert results[1] is None  # dropped: the record was gone when its turn came
    assert not (tmp_path / "containers" / f"{CTR}.json").exists()
    assert CTR not in store.containers


async def test_unreadable_records_are_kept_aside_and_reported(tmp_path: Path) -> None:
    (tmp_path / "pods").mkdir()
    (tmp_path / "containers").mkdir()
    (tmp_path / "pods" / f"{POD}.json").write_text('{"id": "' + POD + '", "na')  # cut short
    (tmp_path / "pods" / f"{'c' * 64}.json").write_text("[1, 2]")  # not a record
    (tmp_path / "containers" / f"{CTR}.json").write_text(json.dumps(_ctr().to_dict()))
    store = Store(tmp_path)
    await store.load()
    assert store.pods == {} and store.containers == {}
    assert sorted(store.unreadable_pods) == [POD, "c" * 64]
    assert list(store.orphans) == [CTR]  # its pod's record was the unreadable one
    assert sorted(p.name for p in (tmp_path / "pods").iterdir()) == [f"{POD}.json.unreadable",
                                                                     f"{'c' * 64}.json.unreadable"]
    # Kept aside, not loaded again (nor renamed again) at the next start.
    again = Store(tmp_path)
    await again.load()
    assert again.unreadable_pods == []
    cfg = config.parse({"daemon": {"root": str(tmp_path), "state": str(tmp_path / "run")}})
    findings = check.check_records(cfg)
    assert len(findings) == 1 and findings[0].level == check.WARN and POD in findings[0].message


async def test_only_the_states_an_rpc_ends_in_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """INITIALIZING and NOTREADY only guide recovery after a crash of shimd (the page cache keeps them);
    READY, STOPPED and every container record are on disk before the call returns."""
    from shimd.store.records import POD_NOTREADY, POD_READY, POD_STOPPED

    store = Store(tmp_path)
    await store.load()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def fsyncs() -> int:
        n = len(synced)
        synced.clear()
        return n

    await store.add_pod(_pod())
    assert fsyncs() == 0
    await store.update_pod(POD, state=POD_READY)
    assert fsyncs() == 2  # the file, then its directory
    await store.add_container(_ctr())
    assert fsyncs() == 2
    await store.update_pod(POD, state=POD_NOTREADY)
    assert fsyncs() == 0
    await store.update_pod(POD, state=POD_STOPPED)
    assert fsyncs() == 2
    assert json.loads((tmp_path / "pods" / f"{POD}.json").read_text())["state"] == POD_STOPPED


def test_record_dicts_are_what_dataclasses_asdict_gives() -> None:
    """to_dict skips asdict's deep copy; the reference is asdict itself, on records with nested values."""
    import dataclasses

    config = {"metadata": {"name": "p", "attempt": 1}, "linux": {"securityContext": {"namespaceOptions": {
        "pid": "POD"}}, "sysctls": {"net.core.somaxconn": "1024"}}, "portMappings": [{"hostPort": 8080}]}
    pod = dataclasses.replace(_pod(), config=config, labels={"a": "b"}, namespaces={"network": "/run/x/net"},
                              additional_ips=["fd00::2"], resources={"resources": {"cpuShares": 2}})
    assert pod.to_dict() == {**dataclasses.asdict(pod), "initializing": True, "stopped": False}
    ctr = dataclasses.replace(_ctr(), config=config, mounts=[{"container_path": "/d", "image_id": "sha256:y"}],
                              user={"uid": 1, "gid": 2, "additionalGids": [3]})
    assert ctr.to_dict() == dataclasses.asdict(ctr)
    assert list(ctr.to_dict()) == [f.name for f in dataclasses.fields(ctr)]
    assert json.dumps(ctr.to_dict(), sort_keys=True) == json.dumps(dataclasses.asdict(ctr), sort_keys=True)
