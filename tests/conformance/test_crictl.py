"""The README's crictl walk-through, with crictl itself, for a runc pod and a gVisor (runsc) pod."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conformance.conftest import MirroredShimd
from tests.support.daemon import ShimdProcess
from tests.support.gotools import tool


class Crictl:
    def __init__(self, shimd: ShimdProcess, workdir: Path) -> None:
        self.binary = str(tool("crictl"))
        self.endpoint = f"unix://{shimd.socket}"
        self.workdir = workdir

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        argv = [self.binary, f"--runtime-endpoint={self.endpoint}", f"--image-endpoint={self.endpoint}",
                "--timeout=60s", *args]
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd=self.workdir)
        assert done.returncode == 0, f"crictl {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
        return done.stdout


def _write(path: Path, data: dict[str, object]) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("handler", ["runc", "runsc"])
def test_readme_walkthrough(mirrored_shimd: MirroredShimd, conformance_base: Path, handler: str) -> None:
    shimd = mirrored_shimd("")
    crictl = Crictl(shimd, conformance_base)
    logs = conformance_base / "logs"
    pod = _write(conformance_base / "pod.json", {
        "metadata": {"name": f"demo-{handler}", "namespace": "default", "uid": f"demo-uid-{handler}"},
        "log_directory": str(logs)})
    ctr = _write(conformance_base / "ctr.json", {
        "metadata": {"name": "hello"}, "image": {"image": "busybox"},
        "command": ["sh", "-c", "echo hi; sleep 3600"], "log_path": "hello.log"})

    assert "RuntimeReady" in crictl("info")
    assert any(h.get("name") == "runsc" for h in json.loads(crictl("info"))["runtimeHandlers"])
    crictl("pull", "busybox")
    assert "docker.io/library/busybox" in crictl("images")

    runp = ["runp", "--runtime", handler, pod] if handler != "runc" else ["runp", pod]
    pod_id = crictl(*runp).strip()
    try:
        ctr_id = crictl("create", pod_id, ctr, pod).strip()
        crictl("start", ctr_id)
        assert "Running" in crictl("ps", "--id", ctr_id)
        out = ""
        for _ in range(100):  # the container writes "hi" right after it starts
            out = crictl("logs", ctr_id)
            if "hi" in out:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert out.strip() == "hi"
        assert crictl("exec", ctr_id, "echo", "from exec").strip() == "from exec"
        assert crictl("exec", "-i", ctr_id, "sh", stdin="echo from stdin\nexit\n").strip() == "from stdin"
        inspect = json.loads(crictl("inspectp", pod_id))
        assert inspect["status"]["runtimeHandler"] == handler
        if handler == "runsc":
            assert "gVisor" in crictl("exec", ctr_id, "dmesg")  # the sandbox's own kernel, not the host's
        crictl("stopp", pod_id)
        assert "NotReady" in crictl("pods", "--id", pod_id)
    finally:
        subprocess.run([crictl.binary, f"--runtime-endpoint={crictl.endpoint}", "stopp", pod_id],
                       capture_output=True, timeout=120)
        subprocess.run([crictl.binary, f"--runtime-endpoint={crictl.endpoint}", "rmp", pod_id],
                       capture_output=True, timeout=120)
    assert pod_id not in crictl("pods", "-q")
