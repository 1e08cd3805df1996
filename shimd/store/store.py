"""The pod and container store: lookups, name reservation, per-pod locks, durable writes.

A record that cannot be parsed at start-up is renamed aside (`<id>.json.unreadable`, reported by the log
and `shimd check`) and its id kept in `unreadable_pods` / `unreadable_containers`, so recovery can clean
up what it owned instead of forgetting it; containers whose pod is unknown wait in `orphans`.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import defaultdict
from pathlib import Path

from shimd import errors, fsutil, log
from shimd.store.records import ContainerRecord, PodRecord

UNREADABLE_SUFFIX = ".unreadable"
_ID = re.compile(r"[0-9a-f]{64}")
_DELETED = "_store_deleted"


class Store:
    def __init__(self, root: Path) -> None:
        self.pod_dir = root / "pods"
        self.container_dir = root / "containers"
        self.pods: dict[str, PodRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        self._names: dict[str, str] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # One writer at a time per record file: the last change made is the one that ends up on disk.
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

    # --- durable writes --------------------------------------------------------------------
    # Listed only once durable: a failed first write (disk full) must not leave a listed ghost.
    async def _write(self, path: Path, record: PodRecord | ContainerRecord, remove: bool = False) -> bool:
        """Writes (or with remove, deletes) one record file; False when the record was deleted meanwhile."""
        key = str(path)
        entry = self._write_locks.get(key)
        if entry is None:
            entry = self._write_locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                if vars(record).get(_DELETED):
                    return False  # a save that lost the race with the removal must not bring the file back
                if remove:
                    vars(record)[_DELETED] = True  # on the object, not a field: never written to disk
                    await fsutil.remove_file(path)
                else:
                    # Serialised inside the lock: a save that waited writes the record as it is now.
                    await fsutil.write_json(path, record.to_dict())
                return True
        finally:
            users[0] -= 1
            if not users[0]:
                del self._write_locks[key]

    async def save_pod(self, pod: PodRecord) -> None:
        if await self._write(self.pod_dir / f"{pod.id}.json", pod):
            self.pods[pod.id] = pod
            self.generation += 1

    async def save_container(self, ctr: ContainerRecord) -> None:
        if await self._write(self.container_dir / f"{ctr.id}.json", ctr):
            self.containers[ctr.id] = ctr
            self.generation += 1

    async def delete_pod(self, pod: PodRecord) -> None:
        await self._write(self.pod_dir / f"{pod.id}.json", pod, remove=True)
        self.pods.pop(pod.id, None)
        self.release_name(pod.name_key, pod.id)
        self._locks.pop(pod.id, None)
        self.generation += 1

    async def delete_container(self, ctr: ContainerRecord) -> None:
        await self._write(self.container_dir / f"{ctr.id}.json", ctr, remove=True)
        self.containers.pop(ctr.id, None)
        pod = self.pods.get(ctr.pod_id)
        if pod is not None:
            self.release_name(ctr.name_key(pod), ctr.id)
        self.generation += 1

    def image_in_use(self, image_id: str) -> bool:
        # An image mounted as a volume (CRI Mount.image) is in use as much as a container's own.
        return any(c.image_id == image_id or any(m.get("image_id") == image_id for m in c.mounts)
                   for c in self.containers.values())
