import tomllib
from pathlib import Path

import pytest

from shimd import config


def test_default_toml_is_the_embedded_default() -> None:
    assert config.parse(tomllib.loads(config.DEFAULT_TOML)) == config.parse({})


def test_defaults() -> None:
    cfg = config.parse({})
    assert cfg.daemon.socket == "/run/shimd/shimd.sock"
    assert cfg.daemon.root == "/var/lib/shimd"
    assert cfg.daemon.state == "/run/shimd"
    assert cfg.daemon.default_handler == "runc"
    assert set(cfg.handlers) == {"runc", "runsc"}
    assert cfg.handlers["runc"].root == "/run/shimd/runc"
    assert cfg.tracing.endpoint == ""  # off unless configured


def test_tracing_parses() -> None:
    cfg = config.parse({"tracing": {"endpoint": "https://otel.example:4318/", "sampling_ratio": 0,
                                    "service_name": "shimd-node1"}})
    assert cfg.tracing == config.TracingConfig("https://otel.example:4318/", 0.0, "shimd-node1")


@pytest.mark.parametrize(
    ("data", "key", "why"),
    [
        ({"daemon": {"sokket": "/x"}}, "daemon.sokket", "unknown key"),
        ({"bogus": {}}, "bogus", "unknown key"),
        ({"daemon": {"cgroup_driver": "foo"}}, "daemon.cgroup_driver", "must be one of"),
        ({"daemon": {"socket": "relative.sock"}}, "daemon.socket", "absolute"),
        ({"daemon": {"runtime_timeout_seconds": True}}, "daemon.runtime_timeout_seconds", "must be a number"),
        ({"daemon": {"default_handler": "kata"}}, "daemon.default_handler", "not a configured handler"),
        ({"daemon": {"max_recv_message_size": 1024}}, "daemon.max_recv_message_size", "between 65536"),
        ({"daemon": {"max_recv_message_size": "16M"}}, "daemon.max_recv_message_size", "must be a int"),
        ({"handlers": {"x": {"driver": "docker"}}}, "handlers.x.driver", "must be one of"),
        ({"handlers": {"x": {"driver": "shimv2"}}}, "handlers.x.binary", "needs a binary"),
        ({"handlers": {"x": {"platfrom": "kvm"}}}, "handlers.x.platfrom", "unknown key"),
        ({"handlers": {"x": {"shim": "go"}}}, "handlers.x.shim", "must be one of"),
        ({"handlers": {"x": {"driver": "runsc", "shim": "native"}}}, "handlers.x.shim", "runc handlers only"),
        ({"registries": {"hosts": {"r.io": {"mirrors": ["ftp://m"]}}}}, 'registries.hosts."r.io".mirrors', "http"),
        ({"registries": {"max_concurrent_downloads": 0}}, "registries.max_concurrent_downloads", "at least 1"),
        ({"cni": {"bin_dirs": [1]}}, "cni.bin_dirs", "list of strings"),
        ({"streaming": {"address": "nope"}}, "streaming.address", "host:port"),
        ({"streaming": {"tls_cert": "/a"}}, "streaming.tls_cert", "together"),
        ({"tracing": {"endpoint": "127.0.0.1:4318"}}, "tracing.endpoint", "http(s) URL"),
        ({"tracing": {"endpoint": "http://c:4318/?x=1"}}, "tracing.endpoint", "http(s) URL"),
        ({"tracing": {"sampling_ratio": 1.5}}, "tracing.sampling_ratio", "between 0 and 1"),
        ({"tracing": {"service_name": ""}}, "tracing.service_name", "must not be empty"),
        ({"tracing": {"endpiont": "http://c"}}, "tracing.endpiont", "unknown key"),
    ],
)
def test_errors_name_the_key(data: dict, key: str, why: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "test.toml")
    assert e.value.key == key
    assert why in e.value.why
    assert str(e.value).startswith("test.toml: ")


def test_load_reports_file_and_toml_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[daemon\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(p)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_handlers_and_registries_parse(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        '[handlers.kata]\ndriver = "shimv2"\nbinary = "containerd-shim-kata-v2"\n'
        'runtime_type = "io.containerd.kata.v2"\n'
        '[registries.hosts."docker.io"]\nmirrors = ["http://127.0.0.1:5000"]\ninsecure = true\n'
    )
    cfg = config.load(p)
    assert cfg.handlers["runc"].shim == "auto"
    assert cfg.handlers["kata"].driver == "shimv2"
    assert cfg.handlers["kata"].root == "/run/shimd/kata"
    assert cfg.registries.hosts["docker.io"].mirrors == ["http://127.0.0.1:5000"]
    assert cfg.registries.hosts["docker.io"].insecure
