"""The pod and container store: lookups, name reservation, per-pod locks, durable copy-write-swap changes.

Two kinds of lock: `lock(pod_id)` serializes the lifecycle operations of one pod and its containers
(held for a whole RunPodSandbox, StopPodSandbox, CreateContainer...), and a short per-record lock,
taken inside every add/update/delete only, serializes the writers of one record file, so changes that
do not hold the pod's lock (an exit recorded by the exit watcher while an update is on its way) are
never lost. Every change is checked against the state machines of shimd/store/lifecycle.py.

A record that cannot be parsed at start-up is renamed aside (`<id>.json.unreadable`, reported by the log
and `shimd check`) and its id kept in `unreadable_pods` / `unreadable_containers`, so recovery can clean
up what it owned instead of forgetting it; containers whose pod is unknown wait in `orphans`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from shimd import errors, fsutil, log
from shimd.store import lifecycle
from shimd.store.records import ContainerRecord, PodRecord

_TRANSIENT_POD_STATES = frozenset({lifecycle.POD_INITIALIZING, lifecycle.POD_NOTREADY})

R = TypeVar("R", PodRecord, ContainerRecord)
# Given the current record, the fields to change (None: nothing to change).
Change = Callable[[R], "dict[str, Any] | None"]

UNREADABLE_SUFFIX = ".unreadable"
_ID = re.compile(r"[0-9a-f]{64}")


class Store:
    def __init__(self, root: Path) -> None:
        self.pod_dir = root / "pods"
        self.container_dir = root / "containers"
        self.pods: dict[str, PodRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        self._names: dict[str, str] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Record id -> (its writers' lock, how many hold or wait for it): dropped when unused.
        self._write_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self.unreadable_pods: list[str] = []
        self.unreadable_containers: list[str] = []
        self.orphans: dict[str, ContainerRecord] = {}
        # Bumped after every change is visible, so readers can tell a cached view is still current.
        self.generation = 0
        self.log = log.get("store")

    # --- loading -------------------------------------------------------------------------
    def _load_sync(self) -> tuple[list[PodRecord], list[ContainerRecord]]:
        pods: list[PodRecord] = []
        ctrs: list[ContainerRecord] = []
        for d, cls, out, bad in ((self.pod_dir, PodRecord, pods, self.unreadable_pods),
                                 (self.container_dir, ContainerRecord, ctrs, self.unreadable_containers)):
            d.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(d):
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    if entry.name.startswith("."):  # temp file of an interrupted write
                        os.unlink(entry.path)
                    continue
                try:
                    record = cls.from_dict(fsutil.read_json_sync(Path(entry.path)))
                    if record.id != entry.name.removesuffix(".json"):
                        raise ValueError(f"record id {str(record.id)[:80]!r} does not match its file name")
                    out.append(record)  # type: ignore[arg-type]
                except (OSError, ValueError, TypeError, AttributeError) as e:
                    aside = entry.path + UNREADABLE_SUFFIX
                    os.replace(entry.path, aside)
                    ident = entry.name.removesuffix(".json")
                    if _ID.fullmatch(ident):
                        bad.append(ident)
                    self.log.error("unreadable record kept aside; what it owned is cleaned up", path=aside,
                                   error=str(e)[:200])
        return pods, ctrs

    async def load(self) -> None:
        pods, ctrs = await asyncio.to_thread(self._load_sync)
        for p in pods:
            self.pods[p.id] = p
            self._names[p.name_key] = p.id
        for c in ctrs:
            pod = self.pods.get(c.pod_id)
            if pod is None:
                self.log.warning("container without pod", container_id=c.id, pod_id=c.pod_id)
                self.orphans[c.id] = c
                continue
            self.containers[c.id] = c
            self._names[c.name_key(pod)] = c.id

    def adopt_orphans(self, pod: PodRecord) -> None:
        """A pod put back in place of an unreadable record takes its containers back."""
        for c in [c for c in self.orphans.values() if c.pod_id == pod.id]:
            del self.orphans[c.id]
            self.containers[c.id] = c
            self._names[c.name_key(pod)] = c.id

    # --- locks and names -------------------------------------------------------------------
    def lock(self, pod_id: str) -> asyncio.Lock:
        """Serializes state changes of one pod and its containers."""
        return self._locks[pod_id]

    def reserve_name(self, key: str, owner: str, what: str) -> None:
        holder = self._names.get(key)
        if holder is not None and holder != owner:
            raise errors.AlreadyExists(f"{what} name {key!r} is reserved by {holder}")
        self._names[key] = owner

    def release_name(self, key: str, owner: str) -> None:
        if self._names.get(key) == owner:
            del self._names[key]

    # --- lookups ---------------------------------------------------------------------------
    @staticmethod
    def _find(table: dict[str, object], ident: str, what: str) -> object:
        if not ident:
            raise errors.InvalidArgument(f"{what} id must not be empty")
        if ident in table:
            return table[ident]
        matches = [k for k in table if k.startswith(ident)]
        if len(matches) == 1:
            return table[matches[0]]
        if len(matches) > 1:
            raise errors.InvalidArgument(f"{what} id prefix {ident!r} is ambiguous")
        raise errors.NotFound(f"{what} {ident!r} not found")

    def pod(self, ident: str) -> PodRecord:
        return self._find(self.pods, ident, "pod sandbox")  # type: ignore[return-value]

    def container(self, ident: str) -> ContainerRecord:
        return self._find(self.containers, ident, "container")  # type: ignore[return-value]

    def pod_containers(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self.containers.values() if c.pod_id == pod_id]

    # --- durable changes -------------------------------------------------------------------
    # A record is listed only once durable (a failed first write, disk full, must not leave a listed
    # ghost), and changed only by a copy that is written before it is swapped in: a failed write leaves
    # memory and disk agreeing on the old record.
    # Records that only crash recovery reads, a pod being made (INITIALIZING) or taken down (NOTREADY),
    # are renamed into place without fsync: a crash of shimd finds them in the page cache, and after a
    # crash of the machine nothing they guard is left (namespaces, shims, mounts: gone with
    # daemon.state; CNI's own record is fsynced, and recovery rule 2 DELs it when no pod names it). That
    # takes an fsync off RunPodSandbox's and StopPodSandbox's paths. Every state an RPC ends in is durable.
    @staticmethod
    def _durable(record: Any) -> bool:
        return not (isinstance(record, PodRecord) and record.state in _TRANSIENT_POD_STATES)

    @contextlib.asynccontextmanager
    async def _record_lock(self, ident: str) -> AsyncIterator[None]:
        """One writer at a time per record, held from reading the current record to swapping in the new."""
        entry = self._write_locks.get(ident)
        if entry is None:
            entry = self._write_locks[ident] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._write_locks[ident]

    async def add_pod(self, pod: PodRecord) -> None:
        lifecycle.check_pod(pod.id, lifecycle.POD_INITIALIZING, pod.state)  # every pod is born INITIALIZING
        await self._add(self.pods, self.pod_dir, pod, "pod sandbox")

    async def add_container(self, ctr: ContainerRecord) -> None:
        await self._add(self.containers, self.container_dir, ctr, "container")

    async def _add(self, table: dict[str, R], directory: Path, record: R, what: str) -> None:
        async with self._record_lock(record.id):
            if record.id in table:
                raise errors.AlreadyExists(f"{what} {record.id} already has a record")
            await fsutil.write_json(directory / f"{record.id}.json", record.to_dict(), durable=self._durable(record))
            table[record.id] = record
            self.generation += 1

    async def update_pod(self, pod_id: str, change: Change[PodRecord] | None = None,
                         **fields: Any) -> PodRecord | None:
        """Changes one pod record: copy, check the transition, write, swap in. See `_update`."""
        return await self._update(self.pods, self.pod_dir, pod_id, change, fields, lifecycle.check_pod)

    async def update_container(self, cid: str, change: Change[ContainerRecord] | None = None,
                               **fields: Any) -> ContainerRecord | None:
        """Changes one container record: copy, check the transition, write, swap in. See `_update`."""
        return await self._update(self.containers, self.container_dir, cid, change, fields,
                                  lifecycle.check_container)

    async def _update(self, table: dict[str, R], directory: Path, ident: str, change: Change[R] | None,
                      fields: dict[str, Any], check: Callable[[str, str, str], None]) -> R | None:
        """The record as changed, or None when it has been deleted (a change racing a removal is dropped).

        `change` sees the current record (under the record's lock) and returns the fields to set, or None
        for no change; `fields` are set as given. Nothing is written when nothing changes.
        """
        async with self._record_lock(ident):
            current = table.get(ident)
            if current is None:
                return None
            wanted = dict(fields)
            if change is not None:
                wanted.update(change(current) or {})
            wanted = {k: v for k, v in wanted.items() if getattr(current, k) != v}
            if not wanted:
                return current
            new = dataclasses.replace(current, **wanted)
            check(ident, current.state, new.state)  # type: ignore[attr-defined]
            await fsutil.write_json(directory / f"{ident}.json", new.to_dict(),  # type: ignore[attr-defined]
                                    durable=self._durable(new))
            table[ident] = new
            self.generation += 1
            return new

    async def delete_pod(self, pod_id: str) -> None:
        pod = await self._delete(self.pods, self.pod_dir, pod_id, lifecycle.check_pod_deletable)
        if pod is not None:
            self.release_name(pod.name_key, pod_id)
            self._locks.pop(pod_id, None)

    async def delete_container(self, cid: str) -> None:
        ctr = await self._delete(self.containers, self.container_dir, cid, lifecycle.check_container_deletable)
        pod = self.pods.get(ctr.pod_id) if ctr is not None else None
        if ctr is not None and pod is not None:
            self.release_name(ctr.name_key(pod), cid)

    async def _delete(self, table: dict[str, R], directory: Path, ident: str,
                      check: Callable[[str, str], None]) -> R | None:
        """Removes the record file, then the listing; the record removed, or None if there was none."""
        async with self._record_lock(ident):
            record = table.get(ident)
            if record is None:
                return None
            check(ident, record.state)  # type: ignore[attr-defined]
            await fsutil.remove_file(directory / f"{ident}.json")
            del table[ident]
            self.generation += 1
            return record

    def image_in_use(self, image_id: str) -> bool:
        # An image mounted as a volume (CRI Mount.image) is in use as much as a container's own.
        return any(c.image_id == image_id or any(m.get("image_id") == image_id for m in c.mounts)
                   for c in self.containers.values())
