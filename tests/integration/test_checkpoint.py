"""CheckpointContainer (CRIU through runc) and restore by CreateContainer with the archive as the image.

The full checkpoint/restore round trip needs a CRIU that works on this kernel: the system's, or the one
tests/tools/criu.sh (run by `make test`) puts in .tools/criu when the system's fails `criu check`. Without
either it is skipped with criu's own words. The error paths are tested against the system's criu.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.daemon import REPO, ShimdProcess
from tests.support.runtime import Runtime, exec_sync, started_runtime

COUNTER = ["sh", "-c", "echo data > /made-here; rm -f /etc/group; i=0; "
           "while true; do i=$((i+1)); echo \"count $i\"; sleep 0.2; done"]
COUNT = re.compile(r" stdout F count (\d+)$", re.M)


TOOLS_CRIU = REPO / ".tools" / "criu" / "bin"


def _check(criu: str | None) -> str:
    if criu is None:
        return "criu is not installed"
    done = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode == 0:
        return ""
    errors = [ln for ln in (done.stderr + done.stdout).splitlines() if "Error" in ln]
    return "; ".join(errors[-3:]) or f"criu check exited {done.returncode}"


@cache
def criu_problem() -> str:
    """Why the system's CRIU cannot checkpoint here ("" when it can): criu's own error from `criu check`."""
    return _check(shutil.which("criu"))


@cache
def working_criu_dir() -> str | None:
    """A PATH entry for shimd under which `criu` works: "" for the system's own, None for none at all."""
    if not criu_problem():
        return ""
    if (TOOLS_CRIU / "criu").is_file() and not _check(str(TOOLS_CRIU / "criu")):
        return str(TOOLS_CRIU)
    return None


@pytest.fixture
def rt_criu(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str], cni_loopback_dir: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A shimd (and so its shims and runc) that finds a working criu first in its PATH."""
    where = working_criu_dir()
    if where is None:
        pytest.skip(f"CRIU cannot checkpoint on this host: {criu_problem()}; and no working criu in {TOOLS_CRIU} "
                    "(tests/tools/criu.sh fetches one)")
    if where:
        monkeypatch.setenv("PATH", f"{where}:{os.environ.get('PATH', os.defpath)}")
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir) as runtime:
        yield runtime


def _counts(log: Path) -> list[int]:
    return [int(n) for n in COUNT.findall(log.read_text())] if log.exists() else []


def _wait_count(log: Path, at_least: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(log)
        if (counts and counts[-1] >= at_least) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _running_counter(rt: Runtime, pod_name: str, at_least: int) -> tuple[str, Path]:
    """(container id, log) of a COUNTER container in a new pod, once it has counted to `at_least`."""
    pod_id, pod_cfg = rt.run_pod(pod_name)
    cid = rt.create(pod_id, pod_cfg, "counter", COUNTER)
    rt.start(cid)
    log = rt.log_dir / pod_name / "counter" / "0.log"
    assert _wait_count(log, at_least)[-1] >= at_least
    return cid, log


def _rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _checkpoint(rt: Runtime, cid: str, location: str | Path, timeout: int = 0) -> Any:
    return rt.client.runtime.CheckpointContainer(rt.pb.CheckpointContainerRequest(
        container_id=cid, location=str(location), timeout=timeout))


def _create_from(rt: Runtime, pod_id: str, pod_cfg: Any, name: str, archive: str | Path) -> str:
    pb = rt.pb
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=str(archive)),
                             log_path=f"{name}/0.log")
    return rt.client.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod_cfg)).container_id


def _leftover_checkpoint_dirs(rt: Runtime) -> list[str]:
    found = []
    for d in (rt.proc.state / "checkpoints", rt.proc.root / "checkpoints"):
        if d.is_dir():
            found += [str(p) for p in d.iterdir()]
    return found


# --- the round trip (needs a working CRIU) -----------------------------------------------------------
def test_checkpoint_and_restore_continue_the_counter(rt_criu: Runtime) -> None:
    rt = rt_criu
    pb = rt.pb
    cid, src_log = _running_counter(rt, "ck-src", 5)

    archive = rt.proc.base / "counter.tar"
    _checkpoint(rt, cid, archive)
    at_checkpoint = _counts(src_log)[-1]
    # kubelet's checkpoint API leaves the container running.
    assert rt.status(cid).state == pb.CONTAINER_RUNNING
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        config = json.load(tar.extractfile("config.dump"))  # type: ignore[arg-type]
        spec = json.load(tar.extractfile("spec.dump"))  # type: ignore[arg-type]
        diff = tarfile.open(fileobj=io.BytesIO(tar.extractfile("rootfs-diff.tar").read()))  # type: ignore[union-attr]
        deleted = json.load(tar.extractfile("deleted.files"))  # type: ignore[arg-type]
    assert {"config.dump", "spec.dump", "checkpoint", "rootfs-diff.tar", "dump.log"} <= names, names
    assert "checkpoint/inventory.img" in names, names
    assert config["id"] == cid and config["name"] == "counter"
    assert config["rootfsImageName"] == rt.image and config["runtime"] == "runc"
    assert spec["process"]["args"] == COUNTER
    assert "made-here" in diff.getnames()
    assert deleted == ["/etc/group"]
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))

    # Restored into another pod: the counter goes on from where the checkpoint caught it.
    pod2, pod2_cfg = rt.run_pod("ck-dst")
    restored = _create_from(rt, pod2, pod2_cfg, "restored", archive)
    st = rt.status(restored)
    assert st.state == pb.CONTAINER_CREATED and st.image.image == rt.image
    # What StartContainer restores from is on disk: a daemon killed in between still restores it.
    rt.proc.kill()
    rt.proc.start()
    rt.start(restored)
    rt.wait_state(restored, pb.CONTAINER_RUNNING)
    dst_log = rt.log_dir / "ck-dst" / "restored" / "0.log"
    counts = _wait_count(dst_log, at_checkpoint + 5)
    # Not restarted (it would start at 1): it goes on from the count it had when it was dumped.
    assert counts and 1 < counts[0] <= at_checkpoint + 1, counts
    assert counts[-1] >= at_checkpoint + 5, counts
    assert exec_sync(rt, restored, ["cat", "/made-here"])[1] == "data\n"
    assert exec_sync(rt, restored, ["test", "-e", "/etc/group"])[0] == 1
    rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=restored))
    assert _leftover_checkpoint_dirs(rt) == []


# --- without a usable CRIU -----------------------------------------------------------------------
def test_checkpoint_fails_cleanly_where_criu_check_fails(rt: Runtime) -> None:
    why = criu_problem()
    if not why or not shutil.which("criu"):
        pytest.skip("criu is installed and works here: the round trip test covers checkpointing")
    pb = rt.pb
    cid, log = _running_counter(rt, "ck-nocriu", 2)
    archive = rt.proc.base / "never.tar"
    err = _rpc_error(lambda: _checkpoint(rt, cid, archive))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "criu check" in err.details() and "Error" in err.details(), err.details()
    assert not archive.exists()
    assert _leftover_checkpoint_dirs(rt) == []
    # The container was not disturbed.
    before = _counts(log)[-1]
    assert rt.status(cid).state == pb.CONTAINER_RUNNING
    assert _wait_count(log, before + 2)[-1] >= before + 2


@pytest.fixture
def rt_without_criu(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
                    cni_loopback_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Runtime]:
    """A shimd (and so its shims) whose PATH has every sbin tool but criu: a node without the package."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for d in ("/usr/local/sbin", "/usr/sbin"):
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if name != "criu" and not (sbin / name).exists():
                (sbin / name).symlink_to(os.path.join(d, name))
    monkeypatch.setenv("PATH", f"{sbin}:/usr/local/bin:/usr/bin")
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir) as runtime:
        yield runtime


def test_checkpoint_without_criu_names_what_is_missing(rt_without_criu: Runtime) -> None:
    rt = rt_without_criu
    pod_id, pod_cfg = rt.run_pod("ck-missing")
    cid = rt.create(pod_id, pod_cfg, "sleeper", ["sleep", "1000"])
    rt.start(cid)
    err = _rpc_error(lambda: _checkpoint(rt, cid, rt.proc.base / "x.tar"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "criu binary is not installed" in err.details(), err.details()
    assert rt.status(cid).state == rt.pb.CONTAINER_RUNNING


# --- request checks (any host) ------------------------------------------------------------------------
def test_checkpoint_request_errors(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("ck-bad")
    created = rt.create(pod_id, pod_cfg, "created", ["sleep", "1000"])
    running = rt.create(pod_id, pod_cfg, "running", ["sleep", "1000"])
    rt.start(running)
    base = rt.proc.base
    cases = [
        ("", base / "a.tar", grpc.StatusCode.INVALID_ARGUMENT, "container_id"),
        ("f" * 64, base / "a.tar", grpc.StatusCode.NOT_FOUND, "f" * 64),
        (running, "", grpc.StatusCode.INVALID_ARGUMENT, "location"),
        (running, "relative/a.tar", grpc.StatusCode.INVALID_ARGUMENT, "location"),
        (running, base / "no-such-dir" / "a.tar", grpc.StatusCode.INVALID_ARGUMENT, "location"),
        (running, base, grpc.StatusCode.INVALID_ARGUMENT, "location"),
        (created, base / "a.tar", grpc.StatusCode.FAILED_PRECONDITION, "running"),
    ]
    for cid, location, code, word in cases:
        err = _rpc_error(lambda cid=cid, location=location: _checkpoint(rt, cid, location))
        assert err.code() == code, (cid, location, err.details())
        assert word in err.details(), (cid, location, err.details())
    err = _rpc_error(lambda: _checkpoint(rt, running, base / "a.tar", timeout=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout" in err.details()
    try:  # the largest timeout a client can send is no crash (it succeeds where criu works)
        _checkpoint(rt, running, base / "a.tar", timeout=2**63 - 1)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
    assert rt.status(running).state == pb.CONTAINER_RUNNING
    assert _leftover_checkpoint_dirs(rt) == []


# --- restore: CreateContainer with an archive as the image ------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(path: Path, image: str, *, config_dump: bool = True, diff: dict[str, bytes] | None = None,
             deleted: list[str] | None = None, images: bool = True) -> Path:
    """An archive in the checkpoint layout, made by hand (its CRIU images are not CRIU's)."""
    with tarfile.open(path, "w") as tar:
        if config_dump:
            _add(tar, "config.dump", json.dumps({"id": "0" * 64, "name": "orig", "rootfsImageName": image}).encode())
        _add(tar, "spec.dump", json.dumps({"process": {"args": ["sleep", "4242"], "cwd": "/tmp"}}).encode())
        d = tarfile.TarInfo("checkpoint")
        d.type, d.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(d)
        if images:
            _add(tar, "checkpoint/inventory.img", b"not really CRIU's")
            _add(tar, "checkpoint/descriptors.json", b'["/dev/null", "pipe:[1]", "pipe:[2]"]')
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as inner:
            for name, data in (diff or {}).items():
                _add(inner, name, data)
        _add(tar, "rootfs-diff.tar", buf.getvalue())
        if deleted is not None:
            _add(tar, "deleted.files", json.dumps(deleted).encode())
    return path


def test_restore_rejects_what_is_not_a_usable_archive(rt: Runtime) -> None:
    pod_id, pod_cfg = rt.run_pod("rs-bad")
    base = rt.proc.base
    (base / "junk.tar").write_bytes(b"not a tar at all" * 100)
    cases = [
        (base / "missing.tar", grpc.StatusCode.NOT_FOUND, "no such checkpoint archive"),
        (base / "junk.tar", grpc.StatusCode.INVALID_ARGUMENT, "not a readable checkpoint archive"),
        (_archive(base / "nodump.tar", rt.image, config_dump=False), grpc.StatusCode.INVALID_ARGUMENT,
         "config.dump"),
        (_archive(base / "noimage.tar", "shimd-test/never-pulled:1"), grpc.StatusCode.NOT_FOUND, "pull it first"),
        (_archive(base / "nocriu.tar", rt.image, images=False), grpc.StatusCode.INVALID_ARGUMENT, "inventory.img"),
        (_archive(base / "escape.tar", rt.image, deleted=["/../../../etc/passwd"]), grpc.StatusCode.INVALID_ARGUMENT,
         "deleted.files"),
    ]
    for i, (archive, code, words) in enumerate(cases):
        err = _rpc_error(lambda i=i, archive=archive: _create_from(rt, pod_id, pod_cfg, f"c{i}", archive))
        assert err.code() == code, (archive, err.details())
        assert "config.image.image" in err.details() and words in err.details(), (archive, err.details())
    assert rt.client.runtime.ListContainers(rt.pb.ListContainersRequest()).containers == []
    assert _leftover_checkpoint_dirs(rt) == []


def test_restore_creates_the_container_from_the_archive(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("rs-ok")
    archive = _archive(rt.proc.base / "hand.tar", rt.image, diff={"restored.txt": b"from the archive\n"},
                       deleted=["/etc/group"])
    cid = _create_from(rt, pod_id, pod_cfg, "restored", archive)
    st = rt.status(cid)
    assert st.state == pb.CONTAINER_CREATED
    assert st.image.image == rt.image and st.metadata.name == "restored"
    # The checkpointed process and writable layer, laid into the new container's layer.
    upper = rt.proc.root / "rw" / cid / "upper"
    assert (upper / "restored.txt").read_text() == "from the archive\n"
    whiteout = os.lstat(upper / "etc" / "group")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    unpacked = rt.proc.root / "checkpoints" / cid
    assert (unpacked / "checkpoint").is_dir()

    # Start is `runc restore`: these CRIU images are not real, so it must fail, as a start error.
    err = _rpc_error(lambda: rt.start(cid))
    if criu_problem():
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "criu" in err.details(), err.details()
    else:  # CRIU's own complaint reaches the caller, not only runc's "criu failed"
        assert "runc restore failed" in err.details() and "restore.log: Error (" in err.details(), err.details()
        assert "inventory.img" in err.details(), err.details()
    st = rt.status(cid)
    assert st.state == pb.CONTAINER_EXITED and st.reason == "StartError", st
    rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert not unpacked.exists() and _leftover_checkpoint_dirs(rt) == []


# --- runsc --------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed")
def test_checkpoint_of_a_runsc_container_is_refused_with_the_reason(rt: Runtime) -> None:
    pod_id, pod_cfg = rt.run_pod("ck-gv", handler="runsc")
    cid = rt.create(pod_id, pod_cfg, "app", ["sleep", "1000"])
    rt.start(cid)
    rt.wait_state(cid, rt.pb.CONTAINER_RUNNING)
    err = _rpc_error(lambda: _checkpoint(rt, cid, rt.proc.base / "gv.tar"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "runsc" in err.details() and "sandbox" in err.details(), err.details()
    assert rt.status(cid).state == rt.pb.CONTAINER_RUNNING
