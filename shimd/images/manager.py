"""ImageManager: pulls, stores, finds and removes images for the CRI ImageService and the pod layer.

Pull = resolve the manifest (through mirrors, then the origin), fetch the config, then for each
layer download its blob (concurrently, bounded) and unpack it into a snapshot keyed by chain id.
Identical work is shared: a second pull of the same image, or of another image with common
layers, awaits the task already running instead of downloading again. The image becomes visible
only when index.json is replaced, after every blob and snapshot it needs is in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shimd import config, errors, fsutil, log
from shimd.images import digest as digests
from shimd.images import reference, store, unpack
from shimd.images.auth import Auth
from shimd.images.follow import FollowReader, Progress
from shimd.images.remote import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Endpoint, Remote, select_platform
from shimd.images.store import FsUsage, Layout

__all__ = ["Auth", "FsUsage", "Image", "ImageManager"]

INDEX_VERSION = 1
MAX_CONFIG = 4 << 20   # as the manifest (remote.MAX_MANIFEST); containers/image allows the same
UNPACK_TIMEOUT = 1800.0
UNPACK_THREADS = 4


@dataclass
class Image:
    id: str                      # config digest "sha256:..."
    repo_tags: list[str]
    repo_digests: list[str]
    size: int                    # compressed layers + config
    config: dict[str, Any]       # the full OCI image config JSON
    layers: list[str]            # snapshot dirs, TOP-MOST FIRST (overlay lowerdir order)
    pinned: bool = False


@dataclass
class _Record:
    """What index.json keeps per image."""

    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    manifest_digests: list[str]          # index (if any) then the platform manifest
    layer_digests: list[str]
    chain_ids: list[str]                 # bottom-most first
    pinned: bool = False
    created: float = field(default_factory=time.time)

    def blobs(self) -> set[str]:
        return {self.id, *self.manifest_digests, *self.layer_digests}


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


class ImageManager:
    def __init__(self, cfg: config.Config, root: Path, snapshot_mode: str | None = None) -> None:
        self.cfg = cfg
        self.root = Path(root)              # <daemon.root>/images
        self.log = log.get("images")
        self._mode = snapshot_mode          # "overlay" | "copy"; probed at start when None
        self.layout = Layout(self.root, snapshot_mode or "overlay")
        self._records: dict[str, _Record] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._in_use: Callable[[str], bool] = lambda _id: False
        self._lock = asyncio.Lock()         # index.json updates and GC
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy: Counter[str] = Counter()  # blobs/chains an unfinished pull relies on (GC keeps them)
        self._downloads = asyncio.Semaphore(cfg.registries.max_concurrent_downloads)
        self._unpacks = asyncio.Semaphore(UNPACK_THREADS)
        # Unpacks that follow a download block on it: their own threads keep the default pool free.
        self._executor = concurrent.futures.ThreadPoolExecutor(UNPACK_THREADS, thread_name_prefix="unpack")
        self._progress: dict[str, Progress] = {}
        self._session: aiohttp.ClientSession | None = None
        self._remote: Remote | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        if self._mode is None:
            self._mode = "overlay" if await self._overlay_works() else "copy"
        self.layout = Layout(self.root, self._mode)
        await asyncio.to_thread(self.layout.prepare)
        await self._load()
        timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=120)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, read_bufsize=1 << 18,
                                              connector=aiohttp.TCPConnector(limit=64))
        self._remote = Remote(self.cfg.registries, self._session, timeout)
        self.log.info("image store ready", root=str(self.root), snapshotter=self._mode, images=len(self._records))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for p in list(self._progress.values()):
            p.fail("shutting down")
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def set_in_use_check(self, fn: Callable[[str], bool]) -> None:
        self._in_use = fn

    @property
    def snapshot_mode(self) -> str:
        return self._mode or "overlay"

    async def _overlay_works(self) -> bool:
        """Mount a tiny two-lower overlay; shimd may run where overlayfs is missing (or nested)."""
        probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
        lower1, lower2, merged = probe / "l1", probe / "l2", probe / "m"
        for d in (lower1, lower2, merged):
            await asyncio.to_thread(d.mkdir, parents=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                "mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower1}:{lower2}", str(merged),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            rc = await asyncio.wait_for(proc.wait(), timeout=10)
            if rc == 0:
                umount = await asyncio.create_subprocess_exec("umount", str(merged))
                await asyncio.wait_for(umount.wait(), timeout=10)
            return rc == 0
        except (OSError, TimeoutError):
            return False
        finally:
            await asyncio.to_thread(shutil.rmtree, probe, True)

    async def _load(self) -> None:
        def read() -> tuple[dict[str, _Record], dict[str, dict[str, Any]]]:
            try:
                raw = fsutil.read_json_sync(self.layout.index)
            except FileNotFoundError:
                return {}, {}
            records, configs = {}, {}
            for item in raw.get("images", []):
                try:
                    rec = _Record(**item)
                    configs[rec.id] = json.loads(store.read_verified(self.layout.blob(rec.id), rec.id))
                    missing = [c for c in rec.chain_ids if not self.layout.snapshot_ready(c)]
                    if missing:
                        raise errors.FailedPrecondition(f"snapshots missing: {missing}")
                except (OSError, ValueError, TypeError, errors.ShimdError) as e:
                    self.log.error("dropping broken image", image=digests.brief(item.get("id")),
                                   error=digests.brief(str(e), 512))
                    continue
                records[rec.id] = rec
            return records, configs

        self._records, self._configs = await asyncio.to_thread(read)

    async def _save(self, records: dict[str, _Record]) -> None:
        data = {"version": INDEX_VERSION, "images": [vars(r) for r in records.values()]}
        await fsutil.write_json(self.layout.index, data)

    # --- lookups ----------------------------------------------------------------------------

    def _image(self, rec: _Record) -> Image:
        snaps = [str(self.layout.snapshot(c)) for c in reversed(rec.chain_ids)]
        if self._mode == "copy":
            snaps = snaps[:1]  # the top copy snapshot is the whole rootfs
        return Image(rec.id, list(rec.repo_tags), list(rec.repo_digests), rec.size, self._configs[rec.id],
                     snaps, rec.pinned)

    def _find(self, ref: str) -> _Record | None:
        if not ref:
            return None
        if reference.is_id(ref):
            rec = self._records.get(ref if ref.startswith("sha256:") else f"sha256:{ref}")
            if rec:
                return rec
        try:
            r = reference.parse(ref)
        except errors.InvalidArgument:
            return None
        for rec in self._records.values():
            if r.digest and f"{r.name}@{r.digest}" in rec.repo_digests:
                return rec
            if not r.digest and r.tagged in rec.repo_tags:
                return rec
        return None

    def get(self, ref: str) -> Image | None:
        rec = self._find(ref)
        return self._image(rec) if rec else None

    def list(self, ref_filter: str = "") -> list[Image]:
        if ref_filter:
            img = self.get(ref_filter)
            return [img] if img else []
        return [self._image(r) for r in sorted(self._records.values(), key=lambda r: r.created)]

    def manifest_digests(self, image_id: str) -> list[str]:
        rec = self._records.get(image_id)
        return list(rec.manifest_digests) if rec else []

    def chain_ids(self, image_id: str) -> list[str]:
        rec = self._records.get(image_id)
        return list(rec.chain_ids) if rec else []

    # --- pull -------------------------------------------------------------------------------

    async def pull(self, ref: str, auth: Auth | None = None) -> Image:
        r = reference.parse(ref)
        if self._remote is None:
            raise errors.Unavailable("image manager is not started")
        try:
            return await self._shared(("pull", str(r), auth), lambda: self._pull(r, auth))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise errors.ResourceExhausted(f"{reference.FIELD}: no space left pulling {r}: {e}") from e
            raise

    def _shared(self, key: Hashable, factory: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """Run factory() once per key at a time; every caller awaits the same task."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            self._tasks.add(task)

            def done(t: asyncio.Task[Any]) -> None:
                self._inflight.pop(key, None)
                self._tasks.discard(t)
                if not t.cancelled():
                    t.exception()  # retrieved here so an abandoned failure is not reported as lost

            task.add_done_callback(done)
        return asyncio.shield(task)

    async def _pull(self, r: reference.Reference, auth: Auth | None) -> Image:
        assert self._remote is not None
        lg = self.log.bind(image=str(r))
        started = time.monotonic()
        endpoints = self._remote.endpoints(r)
        body, mt, top_digest, endpoints = await self._remote.fetch_manifest(r, r.object, auth, endpoints)
        manifest_digests = [top_digest]
        blobs: dict[str, bytes] = {top_digest: body}
        doc = _json(body, f"manifest {top_digest}")
        if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(doc, top_digest)
            body, mt, digest, endpoints = await self._remote.fetch_manifest(r, desc.digest, auth, endpoints)
            manifest_digests.append(digest)
            blobs[digest] = body
            doc = _json(body, f"manifest {digest}")
        if doc.get("schemaVersion") == 1:
            raise errors.FailedPrecondition(f"{reference.FIELD}: {r} uses Docker schema 1 manifests (unsupported)")
        if mt not in MANIFEST_TYPES and not ("config" in doc and "layers" in doc):
            raise errors.FailedPrecondition(f"{reference.FIELD}: {r}: unsupported manifest type {digests.brief(mt)}")
        cfg_desc = Descriptor.of(doc.get("config"), f"manifest {manifest_digests[-1]} config")
        if cfg_desc.size > MAX_CONFIG:
            # Read whole and parsed: bounded as the manifest is, before a byte is fetched.
            raise errors.FailedPrecondition(f"{reference.FIELD}: {r}: image config {cfg_desc.digest} is "
                                            f"{cfg_desc.size} bytes, more than the {MAX_CONFIG} allowed")
        layers = [Descriptor.of(d, f"manifest {manifest_digests[-1]} layer {i}")
                  for i, d in enumerate(doc.get("layers") or [])]

        keys = [*manifest_digests, cfg_desc.digest, *(d.digest for d in layers)]
        self._busy.update(keys)
        try:
            await asyncio.to_thread(self._put_small, blobs)
            await self._ensure_blob(r, cfg_desc, auth, endpoints)
            cfg_bytes = await asyncio.to_thread(store.read_verified, self.layout.blob(cfg_desc.digest),
                                                cfg_desc.digest)
            image_config = _json(cfg_bytes, f"image config {cfg_desc.digest}")
            diff_ids = _diff_ids(image_config, cfg_desc.digest)
            if len(diff_ids) != len(layers):
                raise errors.FailedPrecondition(f"{reference.FIELD}: {r}: config has {len(diff_ids)} diff ids for "
                                                f"{len(layers)} layers")
            chains = chain_ids(diff_ids)
            self._busy.update(chains)
            try:
                for attempt in range(2):
                    await self._snapshots(r, layers, diff_ids, chains, auth, endpoints)
                    async with self._lock:
                        if await asyncio.to_thread(self._all_present, chains):
                            rec = await self._commit(r, cfg_desc, layers, manifest_digests, chains, image_config)
                            break
                    lg.info("snapshots vanished before commit, redoing", attempt=attempt)
                else:
                    raise errors.Unavailable(f"{reference.FIELD}: {r}: store changed during pull, retry")
            finally:
                self._busy.subtract(chains)
        finally:
            self._busy.subtract(keys)
            self._busy += Counter()  # drop zero counts
        lg.info("pulled", id=rec.id, size=rec.size, layers=len(layers),
                seconds=round(time.monotonic() - started, 3))
        return self._image(rec)

    def _put_small(self, blobs: dict[str, bytes]) -> None:
        for digest, data in blobs.items():
            final = self.layout.blob(digest)
            if not final.exists():
                tmp = self.layout.ingest_file(digest)
                tmp.write_bytes(data)
                store.commit_file(tmp, final)

    def _all_present(self, chains: list[str]) -> bool:
        return all(self.layout.snapshot_ready(c) for c in chains)

    def _blob_task(self, r: reference.Reference, desc: Descriptor, auth: Auth | None,
                   endpoints: list[Endpoint]) -> tuple[Awaitable[None], Progress]:
        """The download of this blob, joining one in flight; synchronous so no one else can slip in."""
        key = ("blob", desc.digest)
        prog = self._progress.get(desc.digest)
        if key in self._inflight and prog is not None:
            return asyncio.shield(self._inflight[key]), prog
        prog = Progress(self.layout.ingest_file(desc.digest), self.layout.blob(desc.digest))
        self._progress[desc.digest] = prog
        fut = self._shared(key, lambda: self._download(r, desc, auth, endpoints, prog))

        def forget(_: object) -> None:
            if self._progress.get(desc.digest) is prog:
                del self._progress[desc.digest]

        self._inflight[key].add_done_callback(forget)
        return fut, prog

    async def _ensure_blob(self, r: reference.Reference, desc: Descriptor, auth: Auth | None,
                           endpoints: list[Endpoint]) -> None:
        if await asyncio.to_thread(self.layout.blob(desc.digest).exists):
            return
        fut, _ = self._blob_task(r, desc, auth, endpoints)
        await fut

    async def _download(self, r: reference.Reference, desc: Descriptor, auth: Auth | None,
                        endpoints: list[Endpoint], prog: Progress) -> None:
        assert self._remote is not None
        final = self.layout.blob(desc.digest)
        if await asyncio.to_thread(final.exists):
            prog.complete_existing(desc.size)
            return
        tmp = prog.path
        try:
            async with self._downloads:
                await self._remote.fetch_blob(r, desc, tmp, auth, endpoints, prog)
            prog.finish()   # verified: followers may read to the end (from tmp, or final once renamed)
            await asyncio.to_thread(store.commit_file, tmp, final)
        except BaseException as e:
            prog.fail(str(e) or type(e).__name__)
            await fsutil.remove_file(tmp)
            raise

    async def _snapshots(self, r: reference.Reference, layers: list[Descriptor], diff_ids: list[str],
                         chains: list[str], auth: Auth | None, endpoints: list[Endpoint]) -> None:
        present = await asyncio.to_thread(lambda: [self.layout.snapshot_ready(c) for c in chains])
        if self._mode == "copy":
            # Each copy snapshot starts from its parent, so unpack in order; downloads still overlap.
            missing = [i for i, ok in enumerate(present) if not ok]
            fetches = [asyncio.ensure_future(self._ensure_blob(r, layers[i], auth, endpoints)) for i in missing]
            try:
                for i, fetch in zip(missing, fetches, strict=True):
                    await fetch
                    parent = chains[i - 1] if i else None
                    await self._shared(("snap", chains[i]),
                                       lambda i=i, parent=parent: self._unpack(layers[i], diff_ids[i], chains[i],
                                                                               parent))
            finally:
                for f in fetches:
                    f.cancel()
                await asyncio.gather(*fetches, return_exceptions=True)
            return

        async def one(i: int) -> None:
            desc, chain = layers[i], chains[i]
            if await asyncio.to_thread(self.layout.blob(desc.digest).exists):
                await self._shared(("snap", chain), lambda: self._unpack(desc, diff_ids[i], chain, None))
                return
            # Unpack while downloading: overlay lower dirs do not depend on each other.
            fut, prog = self._blob_task(r, desc, auth, endpoints)
            try:
                await self._shared(("snap", chain), lambda: self._unpack(desc, diff_ids[i], chain, None, prog, fut))
            finally:
                await asyncio.gather(fut, return_exceptions=True)
            await fut

        # Let every layer settle before reporting a failure, so the store is quiet when the RPC returns.
        results = await asyncio.gather(*(one(i) for i, ok in enumerate(present) if not ok), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def _unpack(self, desc: Descriptor, diff_id: str, chain: str, parent: str | None,
                      follow: Progress | None = None, download: Awaitable[None] | None = None) -> None:
        if await asyncio.to_thread(self.layout.snapshot_ready, chain):
            return
        tmp = self.layout.snapshot_tmp()
        lg = self.log.bind(layer=desc.digest, chain=chain)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            async with self._unpacks:
                if parent is not None:
                    await self._copy_tree(self.layout.snapshot(parent), tmp)
                else:
                    await asyncio.to_thread(tmp.mkdir, 0o755)
                source: Path | FollowReader = FollowReader(follow) if follow else self.layout.blob(desc.digest)
                try:
                    await asyncio.wait_for(
                        loop.run_in_executor(self._executor, unpack.apply_layer, source, desc.media_type, tmp,
                                             self._mode == "overlay", diff_id),
                        timeout=UNPACK_TIMEOUT)
                except Exception as e:
                    if download is not None:
                        # A failed download explains a failed unpack better than the unpack does.
                        try:
                            await download
                        except Exception as dl_error:
                            raise dl_error from e
                    raise
            if download is not None:
                await download   # only a verified blob may become a snapshot
            await asyncio.to_thread(self.layout.commit_snapshot, tmp, chain)
        except BaseException:
            if follow is not None:
                follow.fail("unpack abandoned")  # never leave the unpack thread waiting for data
            await fsutil.remove_tree(tmp)
            raise
        lg.debug("unpacked", seconds=round(time.monotonic() - started, 3), streamed=follow is not None)

    async def _copy_tree(self, src: Path, dst: Path) -> None:
        # cp -a keeps hard links, owners, modes, xattrs and device nodes in one pass.
        proc = await asyncio.create_subprocess_exec("cp", "-a", "--", str(src), str(dst),
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=UNPACK_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            msg = err.decode(errors="replace").strip()
            if "No space left" in msg:
                raise OSError(errno.ENOSPC, msg)
            raise errors.ShimdError(f"copying snapshot {src.name}: {msg}")

    async def _commit(self, r: reference.Reference, cfg_desc: Descriptor, layers: list[Descriptor],
                      manifest_digests: list[str], chains: list[str], image_config: dict[str, Any]) -> _Record:
        """Called with the lock held: record the image and write index.json."""
        image_id = cfg_desc.digest
        records = {k: _Record(**vars(v)) for k, v in self._records.items()}
        rec = records.get(image_id) or _Record(image_id, [], [], 0, [], [], [])
        rec.size = cfg_desc.size + sum(d.size for d in layers)
        rec.manifest_digests = list(dict.fromkeys([*manifest_digests, *rec.manifest_digests]))
        rec.layer_digests = [d.digest for d in layers]
        rec.chain_ids = chains
        if r.tag:
            for other in records.values():   # a tag names one image: it moves to the new one
                if r.tagged in other.repo_tags:
                    other.repo_tags.remove(r.tagged)
            rec.repo_tags.append(r.tagged)
        digest_ref = f"{r.name}@{manifest_digests[0]}"
        if digest_ref not in rec.repo_digests:
            rec.repo_digests.append(digest_ref)
        records[image_id] = rec
        await self._save(records)
        self._records = records
        self._configs[image_id] = image_config
        return rec

    # --- remove / usage ---------------------------------------------------------------------

    async def remove(self, ref: str) -> None:
        rec = self._find(ref)
        if rec is None:
            return  # RemoveImage is idempotent
        if self._in_use(rec.id):
            raise errors.FailedPrecondition(f"image.image: image {ref} ({rec.id}) is in use by a container")
        async with self._lock:
            records = {k: v for k, v in self._records.items() if k != rec.id}
            await self._save(records)
            self._records = records
            self._configs.pop(rec.id, None)
            live_blobs = set().union(*(x.blobs() for x in records.values())) | set(self._busy)
            live_chains = {c for x in records.values() for c in x.chain_ids} | set(self._busy)
            nb, ns = await asyncio.to_thread(self.layout.gc, live_blobs, live_chains)
        self.log.info("removed", image=rec.id, ref=ref, blobs_freed=nb, snapshots_freed=ns)

    async def fs_info(self) -> FsUsage:
        return await asyncio.to_thread(self.layout.usage)


def _diff_ids(image_config: dict[str, Any], config_digest: str) -> list[str]:
    """rootfs.diff_ids, each checked: the first is a chain id, and chain ids name snapshot dirs."""
    rootfs = image_config.get("rootfs") or {}
    raw = (rootfs.get("diff_ids") if isinstance(rootfs, dict) else None) or []
    if not isinstance(raw, list):
        raise errors.FailedPrecondition(f"{reference.FIELD}: image config {config_digest}: rootfs.diff_ids "
                                        "is not a list")
    return [digests.check(d, f"{reference.FIELD}: image config {config_digest} rootfs.diff_ids[{i}]")
            for i, d in enumerate(raw)]


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise errors.FailedPrecondition(f"{reference.FIELD}: {what} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise errors.FailedPrecondition(f"{reference.FIELD}: {what} is not a JSON object")
    return doc

