"""Version, Status and RuntimeConfig: what the runtime says about itself."""

from __future__ import annotations

from shimd import __version__
from shimd.api.runtime import v1 as cri
from shimd.config import Config

# (name, available, reason, user_namespaces, recursive_read_only_mounts) for each configured handler.
HandlerReport = tuple[str, bool, str, bool, bool]
NetworkReport = tuple[bool, str, str]  # (ready, reason, message) of the NetworkReady condition


def version() -> cri.VersionResponse:
    return cri.VersionResponse(version="0.1.0", runtime_name="shimd", runtime_version=__version__,
                               runtime_api_version="v1")


def status(cfg: Config, handlers: list[HandlerReport], network: NetworkReport, verbose: bool) -> cri.StatusResponse:
    net_ok, net_reason, net_msg = network
    default = cfg.daemon.default_handler
    default_ok = next((ok for name, ok, *_ in handlers if name == default), False)
    conditions = [
        cri.RuntimeCondition(type="RuntimeReady", status=default_ok,
                             reason="" if default_ok else "DefaultHandlerUnavailable",
                             message="" if default_ok else f"default handler {default!r} is not usable"),
        cri.RuntimeCondition(type="NetworkReady", status=net_ok, reason=net_reason, message=net_msg),
    ]
    info: dict[str, str] = {}
    if verbose:
        import json

        info["config"] = json.dumps({
            "source": cfg.source, "cgroup_driver": cfg.daemon.cgroup_driver, "default_handler": default,
            "handlers": {name: {"available": ok, "reason": why} for name, ok, why, *_ in handlers},
        })
    features = {name: cri.RuntimeHandlerFeatures(recursive_read_only_mounts=rro, user_namespaces=userns)
                for name, _ok, _why, userns, rro in handlers}
    # kubelet reads the entry with the empty name as the default handler's.
    runtime_handlers = [cri.RuntimeHandler(name="", features=features.get(default, cri.RuntimeHandlerFeatures()))]
    runtime_handlers += [cri.RuntimeHandler(name=name, features=f) for name, f in features.items()]
    return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions), info=info,
                              runtime_handlers=runtime_handlers,
                              features=cri.RuntimeFeatures(supplemental_groups_policy=True))


def runtime_config(cfg: Config) -> cri.RuntimeConfigResponse:
    driver = cri.CgroupDriver.SYSTEMD if cfg.daemon.cgroup_driver == "systemd" else cri.CgroupDriver.CGROUPFS
    return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))
