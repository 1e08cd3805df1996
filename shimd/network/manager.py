"""Pod networking: CNI ADD on sandbox start, DEL on stop, with what DEL needs recorded on disk.

A record <state_dir>/<pod_id>.json is written *before* the first ADD and completed with the
result after the last, so a crash at any point still leaves enough for teardown() (even in a
fresh process) to run DEL with the exact configuration that was added.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from shimd import config, fsutil, log, tasks
from shimd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ShimdError
from shimd.network import capabilities, cni, masq
from shimd.network.model import DnsSettings, PodNetworkRequest, PodNetworkResult, PortMapping, PreparedNetwork
from shimd.network.namespaces import namespace_alive
from shimd.phases import phase

__all__ = ["DnsSettings", "NetworkManager", "PodNetworkRequest", "PodNetworkResult", "PortMapping", "PreparedNetwork"]

IFNAME = "eth0"
RECORD_VERSION = 1
NOT_READY = "NetworkPluginNotReady"
T = TypeVar("T")


class NetworkManager:
    def __init__(self, cfg: config.CniConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self._configs = cni.ConfigCache(cfg.conf_dir)
        self._pod_cidrs: list[str] = []
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._log = log.get("network")

    # --- readiness -------------------------------------------------------------------------

    def status(self) -> tuple[bool, str, str]:
        """(ready, reason, message) for the NetworkReady condition; cheap enough for every Status call."""
        net, why = self._configs.get()
        if net is None:
            return False, NOT_READY, f"cni config uninitialized: {why}"
        missing = [p["type"] for p in net.plugins if cni.find_plugin(p["type"], self.cfg.bin_dirs) is None]
        if missing:
            return False, NOT_READY, (f"CNI plugins {missing} of network {net.name!r} ({net.source}) "
                                      f"not found in {', '.join(self.cfg.bin_dirs)}")
        if cni.uses_pod_cidr(net) and not self._pod_cidrs:
            return False, NOT_READY, f"network {net.name!r} ({net.source}) waits for the pod CIDR from kubelet"
        return True, "", ""

    def set_pod_cidr(self, cidr: str) -> None:
        """UpdateRuntimeConfig's pod CIDR; "v4,v6" for dual stack; "" leaves the current one."""
        cidrs = [c.strip() for c in cidr.split(",") if c.strip()]
        if not cidrs:
            return
        for c in cidrs:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise InvalidArgument(f"runtime_config.network_config.pod_cidr: {c!r} is not a CIDR") from None
        if cidrs != self._pod_cidrs:
            self._log.info("pod CIDR set", pod_cidr=cidrs)
        self._pod_cidrs = cidrs

    # --- setup / teardown --------------------------------------------------------------------

    def _record_path(self, pod_id: str) -> Path:
        if not pod_id or "/" in pod_id or pod_id.startswith("."):
            raise InvalidArgument(f"pod id {pod_id!r} is not usable as a network record name")
        return self.state_dir / f"{pod_id}.json"

    @contextlib.asynccontextmanager
    async def _pod_lock(self, pod_id: str) -> AsyncIterator[None]:
        """Serialises setup/teardown of one pod; the entry lives only while someone uses it."""
        entry = self._locks.setdefault(pod_id, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[pod_id]

    async def setup(self, pod: PodNetworkRequest) -> PodNetworkResult:
        """CNI ADD of every plugin of the current network into pod.netns_path; all-or-nothing."""
        prepared = await self.prepare(pod)
        result = await self.add(prepared)
        try:
            await _complete(self.save_result(prepared, result), asyncio.Event())
        except BaseException:
            # Cancelled (or failed) after the ADD: the caller never sees the result, so nothing may stay.
            undo = self._undo(prepared.record, prepared.path, len(prepared.network.plugins),
                              self._log.bind(pod_id=pod.pod_id))
            with contextlib.suppress(asyncio.CancelledError):
                await _complete(undo, asyncio.Event())
            raise
        return result

    async def prepare(self, pod: PodNetworkRequest) -> PreparedNetwork:
        """What an ADD needs, checked, and its record saved (durably: DEL reads it after a crash or a reboot).

        The namespace need not exist yet (its path must be known): RunPodSandbox prepares while it makes
        the namespaces. With a record and no ADD, teardown() runs a DEL that frees nothing, as the spec
        lets plugins expect."""
        path = self._record_path(pod.pod_id)
        record: dict[str, Any] = {
            "version": RECORD_VERSION, "pod_id": pod.pod_id, "netns": pod.netns_path, "ifname": IFNAME,
            "cni_args": capabilities.cni_args(pod), "runtime_config": capabilities.runtime_config(pod),
            "result": None,
        }
        async with self._pod_lock(pod.pod_id):
            # One hop to a thread for the config, the check and the write: each hop costs on a busy loop.
            net = await asyncio.to_thread(self._prepare_sync, record, path)
        phase("cni_prepare")
        return PreparedNetwork(pod.pod_id, net, record, path)

    def _prepare_sync(self, record: dict[str, Any], path: Path) -> cni.NetworkList:
        net, why = self._configs.get()
        if net is None:
            raise FailedPrecondition(f"pod network is not ready: {why}")
        net = cni.apply_pod_cidr(net, self._pod_cidrs)
        for p in net.plugins:  # fail before anything is added rather than half way through
            if cni.find_plugin(p["type"], self.cfg.bin_dirs) is None:
                raise FailedPrecondition(f"CNI plugin {p['type']!r} of network {net.name!r} ({net.source}) "
                                         f"not found in {', '.join(self.cfg.bin_dirs)}")
        if path.exists():
            raise AlreadyExists(f"pod {record['pod_id']} already has a network set up")
        record["network"] = net.to_json()
        fsutil.write_atomic_sync(path, fsutil.json_bytes(record))
        return net

    async def add(self, prepared: PreparedNetwork) -> PodNetworkResult:
        """The ADD chain of a prepared network; on failure (or cancellation) what it added is deleted.
        Its result is saved by save_result()."""
        logger = self._log.bind(pod_id=prepared.pod_id)
        net, record, path = prepared.network, prepared.record, prepared.path
        async with self._pod_lock(prepared.pod_id):
            if not namespace_alive(record["netns"]):
                await self._undo(record, path, 0, logger)
                raise FailedPrecondition(f"network namespace {record['netns']!r} of pod {prepared.pod_id} "
                                         "does not exist")
            stop = asyncio.Event()
            result = await _complete(self._add(net, record, path, stop, logger), stop,
                                     undo=lambda: self._undo(record, path, len(net.plugins), logger))
        ip, extra = cni.primary_and_additional(cni.result_ips(result))
        if not ip:
            logger.warning("CNI result has no pod IP", network=net.name)
        logger.info("pod network set up", network=net.name, ip=ip, additional_ips=extra)
        return PodNetworkResult(ip=ip, additional_ips=extra, raw=result)

    async def _add(self, net: cni.NetworkList, record: dict[str, Any], path: Path, stop: asyncio.Event,
                   logger: Any) -> dict[str, Any]:
        inv = cni.Invocation("ADD", record["pod_id"], record["netns"], IFNAME, record["cni_args"], self.cfg.bin_dirs)
        added = 0
        try:
            result: dict[str, Any] | None = None
            for plugin in net.plugins:
                if stop.is_set():
                    raise asyncio.CancelledError
                added += 1  # counted before the call: a failing plugin may hold resources too
                conf = cni.plugin_config(net, plugin, record["runtime_config"], result)
                if result is not None and cni.does_nothing(plugin["type"], conf):
                    continue  # its result would be prevResult unchanged
                result = await cni.exec_plugin(net, plugin, inv, conf)
                phase(f"cni_add:{plugin['type']}")
            assert result is not None
            return result
        except BaseException as e:
            logger.warning("CNI ADD failed; undoing", network=net.name, error=str(e) or type(e).__name__)
            await self._undo(record, path, added, logger)
            raise

    async def save_result(self, prepared: PreparedNetwork, result: PodNetworkResult) -> None:
        """The ADD's result into the record: DEL passes it as prevResult. Until it is saved (or when a crash
        came first) DEL runs with the record saved before ADD, which names all that the plugins free (the
        container id, ifname and netns they key their state by)."""
        prepared.record["result"] = result.raw
        async with self._pod_lock(prepared.pod_id):
            await fsutil.write_json(prepared.path, prepared.record)

    async def _undo(self, record: dict[str, Any], path: Path, added: int, logger: Any) -> None:
        """DEL the plugins an ADD reached (the last one failed, so its own DEL may fail too: ignored)."""
        try:
            await self._delete(record, record["netns"], added, tolerate_last=True)
        except Exception as e:
            # Keep the record: a later teardown (StopPodSandbox) retries the DEL.
            logger.error("CNI DEL after failed ADD failed; record kept for teardown", error=str(e))
            return
        await fsutil.remove_file(path)

    async def _delete(self, record: dict[str, Any], netns_path: str, count: int | None = None,
                      tolerate_last: bool = False) -> None:
        """DEL the first `count` plugins (all by default) in reverse order, continuing past failures."""
        net = cni.NetworkList.from_json(record["network"])
        plugins = net.plugins[: len(net.plugins) if count is None else count]
        # The spec lets DEL run without a namespace when it is gone; plugins then only free what they hold.
        netns = netns_path if netns_path and namespace_alive(netns_path) else ""
        inv = cni.Invocation("DEL", record["pod_id"], netns, record["ifname"], record["cni_args"], self.cfg.bin_dirs)
        phase("cni_prepare")
        prev = record.get("result") if cni.version_tuple(net.cni_version) >= (0, 4, 0) else None
        errors = []
        for i in reversed(range(len(plugins))):
            conf = cni.plugin_config(net, plugins[i], record["runtime_config"], prev)
            if i > 0 and cni.does_nothing(plugins[i]["type"], conf):
                continue  # skipped at ADD for the same reason: it holds nothing
            try:
                await cni.exec_plugin(net, plugins[i], inv, conf)
                phase(f"cni_del:{plugins[i]['type']}")
            except ShimdError as e:
                if tolerate_last and i == len(plugins) - 1:
                    self._log.info("DEL of the plugin whose ADD failed failed too", pod_id=record["pod_id"],
                                   error=str(e))
                    continue
                errors.append(e)  # keep going: the other plugins still hold their own resources
        if errors:
            raise errors[0]
        if not netns and any(p.get("ipMasq") for p in plugins):
            await masq.remove_stale_masquerade(net.name, record["pod_id"])

    async def teardown(self, pod_id: str, netns_path: str) -> None:
        """CNI DEL (reverse order) with the configuration recorded at setup; no-op when nothing is recorded."""
        path = self._record_path(pod_id)
        async with self._pod_lock(pod_id):
            try:
                record = await asyncio.to_thread(fsutil.read_json_sync, path)
            except FileNotFoundError:
                return
            except ValueError:
                # Unreadable record (cannot happen with atomic writes, but never wedge a pod on it).
                self._log.error("network record unreadable; dropping it", pod_id=pod_id, path=str(path))
                await fsutil.remove_file(path)
                return
            await _complete(self._delete(record, netns_path or record.get("netns", "")), asyncio.Event())
            await fsutil.remove_file(path)
            self._log.bind(pod_id=pod_id).info("pod network torn down", network=record["network"]["name"])

    def recorded_pods(self) -> list[str]:
        """Pods with a network record (for reconciling after a restart)."""
        try:
            return sorted(n[:-5] for n in os.listdir(self.state_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []


async def _complete(work: Coroutine[Any, Any, T], stop: asyncio.Event,
                    undo: Callable[[], Awaitable[None]] | None = None) -> T:
    """Run a CNI chain to its end even if the caller is cancelled.

    Killing a plugin half way leaves bridges, veths and iptables chains in states that the
    plugins' own DEL does not always undo; so cancellation only sets `stop`, which the chain
    checks between plugins (then undoes what it did), and the caller waits for that, bounded by
    the plugins' own timeouts, before the CancelledError propagates. If the work had already
    succeeded, `undo` reverses it, since the cancelled caller will never see the result.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await tasks.settle(task)
        if not task.cancelled() and task.exception() is None and undo is not None:
            await tasks.settle(asyncio.ensure_future(undo()))
        raise
