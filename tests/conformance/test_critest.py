"""critest, cri-tools' CRI validation suite, against a shimd of its own.

The shimd has its own socket, root, state and CNI network, and registry mirrors that send the public
registries critest names to a local docker-registry holding stand-ins built by tests/support/critest_images.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conformance.conftest import MirroredShimd
from tests.support.daemon import ShimdProcess
from tests.support.gotools import tool

# critest's one test that needs an image only the upstream registry has (pulled by a fixed digest).
UPSTREAM_ONLY = "Image Manager public image with digest should be pulled and removed"
PARALLEL = int(os.environ.get("SHIMD_CRITEST_PARALLEL", "1"))
CRITEST_TIMEOUT = 900


@pytest.fixture
def critest_shimd(mirrored_shimd: MirroredShimd) -> ShimdProcess:
    return mirrored_shimd("")


def _cases(report: Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(passed, failed with message, skipped) from critest's JUnit report."""
    passed, failed, skipped = [], [], []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        if (skip := case.find("skipped")) is not None:
            skipped.append(f"{name}: {(skip.get('message') or '')[:200]}")
        elif (bad := case.find("failure")) is not None or (bad := case.find("error")) is not None:
            failed.append((name, (bad.get("message") or bad.text or "")[:400]))
        else:
            passed.append(name)
    return passed, failed, skipped


def test_critest(critest_shimd: ShimdProcess, conformance_base: Path) -> None:
    critest = tool("critest")
    reports = conformance_base / "reports"
    reports.mkdir()
    endpoint = f"unix://{critest_shimd.socket}"
    argv = [str(critest), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}",
            f"--ginkgo.junit-report={reports / 'junit.xml'}", "--ginkgo.no-color", "--ginkgo.timeout=20m"]
    if PARALLEL > 1:
        argv.append(f"--parallel={PARALLEL}")
    log = conformance_base / "critest.log"
    with open(log, "wb") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=CRITEST_TIMEOUT,
                            cwd=conformance_base).returncode
    if keep := os.environ.get("SHIMD_CRITEST_KEEP"):  # a directory to keep critest's and shimd's logs in
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(log, Path(keep) / "critest.log")
        shutil.copy(critest_shimd.log_path, Path(keep) / "shimd.log")
        for report in reports.glob("*.xml"):
            shutil.copy(report, Path(keep) / report.name)
    junit = sorted(reports.glob("*.xml"))
    assert junit, f"critest wrote no report (exit {rc}):\n{log.read_text(errors='replace')[-4000:]}"
    passed, failed, skipped = [], [], []
    for report in junit:
        p, f, s = _cases(report)
        passed += p
        failed += f
        skipped += s
    summary = f"critest: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
    print(summary)
    unexpected = [(n, m) for n, m in failed if UPSTREAM_ONLY not in n]
    assert not unexpected, summary + "\n" + "\n".join(f"- {n}: {m}" for n, m in unexpected) + \
        f"\n(shimd log tail)\n{critest_shimd.log_tail(60)}"
    assert passed, summary
