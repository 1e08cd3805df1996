"""Pure parts of the runsc and shim v2 drivers: flags, URIs, options, stats parsing."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from shimd.api.containerd.runc import v1 as runc_v1
from shimd.config import HandlerConfig, parse
from shimd.runtimes.runsc import RunscRuntime, global_flags, parse_events
from shimd.runtimes.shimv2 import RUNTIME_OPTIONS_TYPE_URL, RuntimeOptions, ShimV2Runtime, shim_binary_name


def test_runsc_global_flags_follow_the_handler_config() -> None:
    h = HandlerConfig(name="gv", driver="runsc", binary="runsc")
    assert global_flags(h) == ["--platform=ptrace", "--network=host", "--overlay2=root:memory"]
    h = HandlerConfig(name="gv", driver="runsc", binary="runsc", platform="kvm", network="none", overlay=False,
                      debug_log_dir="/var/log/runsc/", extra_args=["--net-raw"])
    assert global_flags(h) == ["--platform=kvm", "--network=none", "--overlay2=none", "--debug",
                               "--debug-log=/var/log/runsc/", "--net-raw"]


def test_default_runsc_handler_uses_a_platform_every_runsc_has() -> None:
    assert parse({}).handlers["runsc"].platform == "ptrace"


def test_runsc_driver_env_and_sandbox_task(tmp_path: Path) -> None:
    drv = RunscRuntime(HandlerConfig(name="gv", driver="runsc", binary="runsc", root="/run/x"), tmp_path)
    env = drv.shim_env()
    assert env["SHIMD_RUNTIME_FLAVOR"] == "runsc"
    assert json.loads(env["SHIMD_RUNTIME_ARGS"]) == drv.flags
    assert drv.needs_sandbox_task(False) and drv.needs_sandbox_task(True)
    assert drv.runtime_argv()[:3] == ["runsc", "--root", "/run/x"]


def test_runsc_events_parse() -> None:
    raw = (b'{"type":"stats","id":"c","data":{"cpu":{"usage":{"total":304382640}},"memory":{"usage":'
           b'{"limit":0,"usage":3715072,"failcnt":0},"swap":{"limit":0,"failcnt":0}},"pids":{"current":4}}}\n')
    s = parse_events(raw, now_ns=5)
    assert s is not None
    assert (s.timestamp_ns, s.cpu_usage_ns, s.memory_usage, s.working_set, s.pids) == (5, 304382640, 3715072,
                                                                                        3715072, 4)
    assert s.memory_limit is None
    assert parse_events(b"") is None and parse_events(b"not json") is None
    assert parse_events(b'{"type":"oom","id":"c"}') is None


def test_shim_binary_name() -> None:
    assert shim_binary_name("io.containerd.kata.v2") == "containerd-shim-kata-v2"
    assert shim_binary_name("io.containerd.runc.v2") == "containerd-shim-runc-v2"
    assert shim_binary_name("bogus") == ""


def test_shimv2_runc_options_and_binary_log_uri(tmp_path: Path) -> None:
    h = HandlerConfig(name="v2", driver="shimv2", binary="containerd-shim-runc-v2",
                      runtime_type="io.containerd.runc.v2", root="/run/v2")
    drv = ShimV2Runtime(h, tmp_path)
    opts = drv.runtime_options()
    assert opts is not None and opts.type_url == "containerd.runc.v1.Options"
    assert runc_v1.Options().parse(opts.value).root == "/run/v2"
    stdin, out, err = drv.log_stdio("/var/log/pods/ns_p_u/c/0 x.log", "")
    assert stdin == "" and out == err
    u = urlparse(out)
    assert u.scheme == "binary" and u.path == str(tmp_path / "bin" / "shimd-crilogger")
    assert parse_qs(u.query) == {"log": ["/var/log/pods/ns_p_u/c/0 x.log"]}
    assert drv.log_stdio("", "") == ("", "", "")
    assert drv.follows_log_rotation


def test_shimv2_kata_options_carry_the_config_path(tmp_path: Path) -> None:
    conf = tmp_path / "configuration.toml"
    conf.write_text("")
    h = HandlerConfig(name="kata", driver="shimv2", binary="containerd-shim-kata-v2",
                      runtime_type="io.containerd.kata.v2", config_path=str(conf))
    drv = ShimV2Runtime(h, tmp_path)
    opts = drv.runtime_options()
    assert opts is not None and opts.type_url == RUNTIME_OPTIONS_TYPE_URL
    assert RuntimeOptions().parse(opts.value).config_path == str(conf)
    assert drv.shim_env() == {"KATA_CONF_FILE": str(conf)}


def test_shimv2_missing_binary_is_reported(tmp_path: Path) -> None:
    h = HandlerConfig(name="nope", driver="shimv2", binary="containerd-shim-nosuch-v2")
    ok, why = ShimV2Runtime(h, tmp_path).available()
    assert not ok and "containerd-shim-nosuch-v2" in why


def test_deploy_config_with_all_handlers_parses() -> None:
    from shimd.config import load

    cfg = load(Path(__file__).resolve().parents[2] / "deploy" / "config-all-handlers.toml")
    assert {"runc", "runsc", "kata", "runc-v2"} <= set(cfg.handlers)
    assert cfg.handlers["kata"].driver == "shimv2" and cfg.handlers["runsc"].network == "host"


def test_runsc_platform_this_runsc_lacks_is_reported(tmp_path: Path) -> None:
    import shutil

    import pytest

    if shutil.which("runsc") is None:
        pytest.skip("runsc is not installed")
    drv = RunscRuntime(HandlerConfig(name="gv", driver="runsc", binary="runsc", platform="nosuch"), tmp_path)
    ok, why = drv.available()
    assert not ok and "'nosuch'" in why and "ptrace" in why
    ok, why = RunscRuntime(HandlerConfig(name="gv", driver="runsc", binary="runsc"), tmp_path).available()
    assert ok and "platform ptrace" in why
