"""The deploy/ files stay in step with the code: the default config, the unit, the scripts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from shimd import config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_default_config_file_is_the_embedded_default_and_every_key_is_commented() -> None:
    text = (DEPLOY / "config.toml").read_text()
    assert text == config.DEFAULT_TOML, "regenerate with: shimd config default > deploy/config.toml"
    keys = [line for line in text.splitlines() if re.match(r"^#? ?[a-z_]+ = ", line)]
    assert keys and all(" # " in line or "  # " in line for line in keys), [ln for ln in keys if " # " not in ln]


def test_unit_is_notify_and_keeps_shims_alive() -> None:
    unit = (DEPLOY / "shimd.service").read_text()
    for directive in ("Type=notify", "KillMode=process", "Delegate=yes", "Restart=always",
                      "ExecStart=/usr/local/bin/shimd serve"):
        assert re.search(rf"^{re.escape(directive)}", unit, re.M), directive


def test_scripts_parse() -> None:
    for script in ("install.sh", "deps.sh", "daemonset/shimd-deploy.sh"):
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True, timeout=10)


def test_manifests_name_what_they_are() -> None:
    for name in ("runtimeclasses.yaml", "kubelet-config.yaml", "daemonset/shimd-deploy.yaml"):
        text = (DEPLOY / name).read_text()
        assert "\t" not in text, f"{name}: tabs are not YAML indentation"
        for doc in text.split("\n---\n"):
            body = [ln for ln in doc.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            if body:
                tops = {ln.split(":", 1)[0] for ln in body}
                assert {"apiVersion", "kind"} <= tops, f"{name}: a document without apiVersion/kind"
    assert "containerRuntimeEndpoint: unix:///run/shimd/shimd.sock" in (DEPLOY / "kubelet-config.yaml").read_text()


def test_python_choice_takes_the_given_interpreter_and_passes_over_one_that_cannot_make_a_venv(tmp_path: Path) -> None:
    script = str(DEPLOY / "python.sh")

    def chosen(given: str) -> str:
        done = subprocess.run(["bash", script], env={"PATH": "/usr/bin:/bin", "PYTHON": given},
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()

    assert chosen(sys.executable) == sys.executable
    old = tmp_path / "python-too-old"
    old.write_text("#!/bin/sh\nexit 1\n")  # what the version check sees from a 3.10
    old.chmod(0o755)
    fallback = chosen(str(old))
    assert fallback in ("/usr/bin/python3", "python3")
    assert chosen("") == fallback
