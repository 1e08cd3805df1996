"""The shim's small protobuf codec against the betterproto bindings: encode with one, decode with the
other, both ways, for every message the shim reads or writes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import betterproto
import betterproto.lib.google.protobuf as pb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shimd.api.containerd import types as ctypes
from shimd.api.containerd.runc import v1 as runc_v1
from shimd.api.containerd.task import v2 as task
from shimd.api.containerd.v1 import types as v1types
from shimproto import messages as m
from shimproto.proto import DecodeError, decode, encode

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
WHEN_DICT = {"seconds": int(WHEN.timestamp()), "nanos": 123456000}
ANY_B = pb.Any(type_url="containerd.runc.v1.Options", value=b"\x32\x04runc")
ANY_D = {"type_url": "containerd.runc.v1.Options", "value": b"\x32\x04runc"}
MOUNT_B = ctypes.Mount(type="overlay", source="overlay", target="", options=["lowerdir=/a", "upperdir=/b"])
MOUNT_D = {"type": "overlay", "source": "overlay", "target": "", "options": ["lowerdir=/a", "upperdir=/b"]}

# (schema, betterproto message, the same message as the codec's dict)
CASES: list[tuple[str, dict[int, Any], betterproto.Message, dict[str, Any]]] = [
    ("CreateTaskRequest", m.CREATE_TASK_REQUEST,
     task.CreateTaskRequest(id="c1", bundle="/b", rootfs=[MOUNT_B], terminal=True, stdin="/in", stdout="crilog:///l",
                            stderr="crilog:///l", checkpoint="", parent_checkpoint="", options=ANY_B),
     {"id": "c1", "bundle": "/b", "rootfs": [MOUNT_D], "terminal": True, "stdin": "/in", "stdout": "crilog:///l",
      "stderr": "crilog:///l", "checkpoint": "", "parent_checkpoint": "", "options": ANY_D}),
    ("CreateTaskResponse", m.CREATE_TASK_RESPONSE, task.CreateTaskResponse(pid=4242), {"pid": 4242}),
    ("DeleteRequest", m.DELETE_REQUEST, task.DeleteRequest(id="c", exec_id="e"), {"id": "c", "exec_id": "e"}),
    ("DeleteResponse", m.DELETE_RESPONSE, task.DeleteResponse(pid=7, exit_status=137, exited_at=WHEN),
     {"pid": 7, "exit_status": 137, "exited_at": WHEN_DICT}),
    ("ExecProcessRequest", m.EXEC_PROCESS_REQUEST,
     task.ExecProcessRequest(id="c", exec_id="e", terminal=False, stdin="/f0", stdout="/f1", stderr="/f2",
                             spec=pb.Any(type_url=m.PROCESS_SPEC_TYPE_URL, value=b'{"args":["true"]}')),
     {"id": "c", "exec_id": "e", "terminal": False, "stdin": "/f0", "stdout": "/f1", "stderr": "/f2",
      "spec": {"type_url": m.PROCESS_SPEC_TYPE_URL, "value": b'{"args":["true"]}'}}),
    ("ResizePtyRequest", m.RESIZE_PTY_REQUEST, task.ResizePtyRequest(id="c", exec_id="e", width=80, height=24),
     {"id": "c", "exec_id": "e", "width": 80, "height": 24}),
    ("StateRequest", m.STATE_REQUEST, task.StateRequest(id="c"), {"id": "c", "exec_id": ""}),
    ("StateResponse", m.STATE_RESPONSE,
     task.StateResponse(id="c", bundle="/b", pid=9, status=v1types.Status.STOPPED, stdin="", stdout="/o",
                        stderr="/e", terminal=True, exit_status=3, exited_at=WHEN, exec_id="x"),
     {"id": "c", "bundle": "/b", "pid": 9, "status": m.STATUS_STOPPED, "stdin": "", "stdout": "/o", "stderr": "/e",
      "terminal": True, "exit_status": 3, "exited_at": WHEN_DICT, "exec_id": "x"}),
    ("KillRequest", m.KILL_REQUEST, task.KillRequest(id="c", exec_id="", signal=9, all=True),
     {"id": "c", "exec_id": "", "signal": 9, "all": True}),
    ("CloseIORequest", m.CLOSE_IO_REQUEST, task.CloseIoRequest(id="c", exec_id="e", stdin=True),
     {"id": "c", "exec_id": "e", "stdin": True}),
    ("PidsRequest", m.PIDS_REQUEST, task.PidsRequest(id="c"), {"id": "c"}),
    ("PidsResponse", m.PIDS_RESPONSE,
     task.PidsResponse(processes=[v1types.ProcessInfo(pid=1, info=None), v1types.ProcessInfo(pid=20, info=ANY_B)]),
     {"processes": [{"pid": 1, "info": None}, {"pid": 20, "info": ANY_D}]}),
    ("CheckpointTaskRequest", m.CHECKPOINT_TASK_REQUEST,
     task.CheckpointTaskRequest(id="c", path="/p", options=ANY_B), {"id": "c", "path": "/p", "options": ANY_D}),
    ("UpdateTaskRequest", m.UPDATE_TASK_REQUEST,
     task.UpdateTaskRequest(id="c", resources=pb.Any(type_url="r", value=b"{}"), annotations={"a": "1", "b": ""}),
     {"id": "c", "resources": {"type_url": "r", "value": b"{}"}, "annotations": {"a": "1", "b": ""}}),
    ("StartRequest", m.START_REQUEST, task.StartRequest(id="c", exec_id="e"), {"id": "c", "exec_id": "e"}),
    ("StartResponse", m.START_RESPONSE, task.StartResponse(pid=4294967295), {"pid": 4294967295}),
    ("WaitRequest", m.WAIT_REQUEST, task.WaitRequest(id="c", exec_id=""), {"id": "c", "exec_id": ""}),
    ("WaitResponse", m.WAIT_RESPONSE, task.WaitResponse(exit_status=3, exited_at=WHEN),
     {"exit_status": 3, "exited_at": WHEN_DICT}),
    ("StatsRequest", m.STATS_REQUEST, task.StatsRequest(id="c"), {"id": "c"}),
    ("StatsResponse", m.STATS_RESPONSE, task.StatsResponse(stats=ANY_B), {"stats": ANY_D}),
    ("ConnectRequest", m.CONNECT_REQUEST, task.ConnectRequest(id="p"), {"id": "p"}),
    ("ConnectResponse", m.CONNECT_RESPONSE, task.ConnectResponse(shim_pid=10, task_pid=11, version="v"),
     {"shim_pid": 10, "task_pid": 11, "version": "v"}),
    ("ShutdownRequest", m.SHUTDOWN_REQUEST, task.ShutdownRequest(id="p", now=True), {"id": "p", "now": True}),
    ("PauseRequest", m.PAUSE_REQUEST, task.PauseRequest(id="c"), {"id": "c"}),
    ("ResumeRequest", m.RESUME_REQUEST, task.ResumeRequest(id="c"), {"id": "c"}),
    ("Mount", m.MOUNT, MOUNT_B, MOUNT_D),
    ("Options", m.RUNC_OPTIONS,
     runc_v1.Options(no_pivot_root=True, no_new_keyring=False, shim_cgroup="/s", io_uid=1000, io_gid=1001,
                     binary_name="runc", root="/run/r", criu_path="", systemd_cgroup=True, criu_image_path="/i",
                     criu_work_path="/w"),
     {"no_pivot_root": True, "no_new_keyring": False, "shim_cgroup": "/s", "io_uid": 1000, "io_gid": 1001,
      "binary_name": "runc", "root": "/run/r", "criu_path": "", "systemd_cgroup": True, "criu_image_path": "/i",
      "criu_work_path": "/w"}),
    ("ProcessDetails", m.RUNC_PROCESS_DETAILS, runc_v1.ProcessDetails(exec_id="e1"), {"exec_id": "e1"}),
    ("Empty", m.EMPTY, pb.Empty(), {}),
]


@pytest.mark.parametrize(("name", "schema", "bp", "d"), CASES, ids=[c[0] for c in CASES])
def test_betterproto_to_codec(name: str, schema: dict[int, Any], bp: betterproto.Message, d: dict[str, Any]) -> None:
    assert decode(schema, bytes(bp)) == d


@pytest.mark.parametrize(("name", "schema", "bp", "d"), CASES, ids=[c[0] for c in CASES])
def test_codec_to_betterproto(name: str, schema: dict[int, Any], bp: betterproto.Message, d: dict[str, Any]) -> None:
    parsed = type(bp)().parse(encode(schema, d))
    assert parsed.to_dict() == bp.to_dict()
    assert bytes(parsed) == bytes(bp)


def test_codec_skips_defaults_like_proto3() -> None:
    assert encode(m.KILL_REQUEST, {"id": "", "exec_id": "", "signal": 0, "all": False}) == b""
    assert bytes(task.KillRequest()) == b""


def test_decode_fills_defaults_and_ignores_unknown_fields() -> None:
    # field 15 (unknown, varint) and field 14 (unknown, bytes) before a known one
    data = bytes([15 << 3 | 0, 1, 14 << 3 | 2, 2, 0x61, 0x62]) + bytes(task.ConnectRequest(id="x"))
    assert decode(m.CONNECT_REQUEST, data) == {"id": "x"}
    assert decode(m.STATE_RESPONSE, b"")["exited_at"] is None
    assert decode(m.PIDS_RESPONSE, b"") == {"processes": []}


@pytest.mark.parametrize("bad", [b"\x0a\x05ab", b"\x08", b"\x0b", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"])
def test_decode_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(m.CONNECT_RESPONSE | {1: ("id", "string", None)}, bad)


def test_negative_int_round_trip() -> None:
    ts = {"seconds": -62135596800, "nanos": 0}  # Go's zero time, as gogoproto non-nullable stdtime sends it
    assert decode(m.TIMESTAMP, encode(m.TIMESTAMP, ts)) == ts
    assert pb.Timestamp().parse(encode(m.TIMESTAMP, ts)).seconds == -62135596800


@settings(max_examples=200, deadline=None)
@given(id=st.text(max_size=40), exec_id=st.text(max_size=20), pid=st.integers(0, 2**32 - 1),
       status=st.integers(0, 2**32 - 1), terminal=st.booleans(),
       # betterproto turns timestamps into datetimes: years 1..9999, microsecond precision
       seconds=st.integers(-62135596800, 253402300799), nanos=st.integers(0, 999_999).map(lambda us: us * 1000))
def test_state_response_round_trips(id: str, exec_id: str, pid: int, status: int, terminal: bool, seconds: int,
                                    nanos: int) -> None:
    d = {"id": id, "bundle": "/b", "pid": pid, "status": 2, "stdin": "", "stdout": "", "stderr": "",
         "terminal": terminal, "exit_status": status, "exited_at": {"seconds": seconds, "nanos": nanos},
         "exec_id": exec_id}
    bp = task.StateResponse().parse(encode(m.STATE_RESPONSE, d))
    assert (bp.id, bp.pid, bp.exit_status, bp.terminal, bp.exec_id) == (id, pid, status, terminal, exec_id)
    # betterproto treats the epoch as "unset" and leaves the field out
    expected = d if (seconds, nanos) != (0, 0) else {**d, "exited_at": None}
    assert decode(m.STATE_RESPONSE, bytes(bp)) == expected


def test_shim_process_imports_stay_light() -> None:
    """The codec exists so the shim never loads betterproto (nor does shimproto, the package both sides share);
    nor may it load shimd, structlog, grpclib or ssl, and its own event loop (aio.py) exists so it never loads
    asyncio (nor typing or logging with it)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "import shims.runc.zygote, shims.runc.shim, shims.runc.server, shims.runc.service\n"
            "import shimproto, shimproto.proto, shimproto.messages, shimproto.ttrpc, shimproto.idmap, shimproto.paths\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('betterproto', 'shimd', 'structlog', 'grpclib', 'grpc', 'google', 'hashlib', 'dataclasses', 'ssl', "
            "'asyncio', 'typing', 'logging', 'concurrent', 'inspect', 'subprocess'))\n"
            "print(','.join(bad))")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == ""
