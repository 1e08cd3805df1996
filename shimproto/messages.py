"""Schemas of the messages a shim speaks, for shimproto.proto.

Field names and numbers are those of the containerd shim v2 task API (containerd v1.6.20,
runtime/v2/task/shim.proto and the types it imports), the runc options (runtime/v2/runc/options),
and the ttrpc envelope (containerd/ttrpc). Only the wire facts are restated here.
"""

from __future__ import annotations

from shimproto.proto import REPEATED, Schema, repeated

S, B, U32, I32, I64, BOOL, ENUM = "string", "bytes", "uint32", "int32", "int64", "bool", "enum"
M = "message"

# --- a container's attach socket (shims.common.stdio.AttachFanout), not protobuf ---------------------
# Frames: one stream byte, a 4-byte big-endian length, that many bytes of output.
ATTACH_STDOUT = 1
ATTACH_STDERR = 2
ATTACH_HEADER_SIZE = 5

# --- google.protobuf -----------------------------------------------------------------------------
EMPTY: Schema = {}
ANY: Schema = {1: ("type_url", S, None), 2: ("value", B, None)}
TIMESTAMP: Schema = {1: ("seconds", I64, None), 2: ("nanos", I32, None)}
RPC_STATUS: Schema = {1: ("code", I32, None), 2: ("message", S, None), 3: ("details", M, repeated(ANY))}

# --- ttrpc envelope -------------------------------------------------------------------------------
KEY_VALUE: Schema = {1: ("key", S, None), 2: ("value", S, None)}
TTRPC_REQUEST: Schema = {
    1: ("service", S, None), 2: ("method", S, None), 3: ("payload", B, None),
    4: ("timeout_nano", I64, None), 5: ("metadata", M, repeated(KEY_VALUE)),
}
TTRPC_RESPONSE: Schema = {1: ("status", M, RPC_STATUS), 2: ("payload", B, None)}

# --- containerd types -----------------------------------------------------------------------------
MOUNT: Schema = {1: ("type", S, None), 2: ("source", S, None), 3: ("target", S, None), 4: ("options", S, REPEATED)}
PROCESS_INFO: Schema = {1: ("pid", U32, None), 2: ("info", M, ANY)}
# containerd.v1.types.Status
STATUS_UNKNOWN, STATUS_CREATED, STATUS_RUNNING, STATUS_STOPPED, STATUS_PAUSED, STATUS_PAUSING = range(6)

RUNC_OPTIONS: Schema = {
    1: ("no_pivot_root", BOOL, None), 2: ("no_new_keyring", BOOL, None), 3: ("shim_cgroup", S, None),
    4: ("io_uid", U32, None), 5: ("io_gid", U32, None), 6: ("binary_name", S, None), 7: ("root", S, None),
    8: ("criu_path", S, None), 9: ("systemd_cgroup", BOOL, None), 10: ("criu_image_path", S, None),
    11: ("criu_work_path", S, None),
}
RUNC_PROCESS_DETAILS: Schema = {1: ("exec_id", S, None)}
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"
# An OCI spec annotation from shimd: the task's Start always follows its Create with nothing in between,
# so a shim may make it running in Create already (runc: one `runc run --detach`) and answer Start at once.
START_ON_CREATE_ANNOTATION = "io.shimd.start-on-create"
# CRI's annotation of a task's role: "sandbox" for the pod's pause task, "container" otherwise.
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
RUNC_CHECKPOINT_OPTIONS: Schema = {
    1: ("exit", BOOL, None), 2: ("open_tcp", BOOL, None), 3: ("external_unix_sockets", BOOL, None),
    4: ("terminal", BOOL, None), 5: ("file_locks", BOOL, None), 6: ("empty_namespaces", S, REPEATED),
    7: ("cgroups_mode", S, None), 8: ("image_path", S, None), 9: ("work_path", S, None),
}
RUNC_CHECKPOINT_OPTIONS_TYPE_URL = "containerd.runc.v1.CheckpointOptions"
PROCESS_SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"

# --- containerd.task.v2 ---------------------------------------------------------------------------
ID_EXEC: Schema = {1: ("id", S, None), 2: ("exec_id", S, None)}
ID_ONLY: Schema = {1: ("id", S, None)}
PID_ONLY: Schema = {1: ("pid", U32, None)}

CREATE_TASK_REQUEST: Schema = {
    1: ("id", S, None), 2: ("bundle", S, None), 3: ("rootfs", M, repeated(MOUNT)), 4: ("terminal", BOOL, None),
    5: ("stdin", S, None), 6: ("stdout", S, None), 7: ("stderr", S, None), 8: ("checkpoint", S, None),
    9: ("parent_checkpoint", S, None), 10: ("options", M, ANY),
}
CREATE_TASK_RESPONSE = PID_ONLY
DELETE_REQUEST = ID_EXEC
DELETE_RESPONSE: Schema = {1: ("pid", U32, None), 2: ("exit_status", U32, None), 3: ("exited_at", M, TIMESTAMP)}
EXEC_PROCESS_REQUEST: Schema = {
    1: ("id", S, None), 2: ("exec_id", S, None), 3: ("terminal", BOOL, None), 4: ("stdin", S, None),
    5: ("stdout", S, None), 6: ("stderr", S, None), 7: ("spec", M, ANY),
}
RESIZE_PTY_REQUEST: Schema = {1: ("id", S, None), 2: ("exec_id", S, None), 3: ("width", U32, None),
                              4: ("height", U32, None)}
STATE_REQUEST = ID_EXEC
STATE_RESPONSE: Schema = {
    1: ("id", S, None), 2: ("bundle", S, None), 3: ("pid", U32, None), 4: ("status", ENUM, None),
    5: ("stdin", S, None), 6: ("stdout", S, None), 7: ("stderr", S, None), 8: ("terminal", BOOL, None),
    9: ("exit_status", U32, None), 10: ("exited_at", M, TIMESTAMP), 11: ("exec_id", S, None),
}
KILL_REQUEST: Schema = {1: ("id", S, None), 2: ("exec_id", S, None), 3: ("signal", U32, None), 4: ("all", BOOL, None)}
CLOSE_IO_REQUEST: Schema = {1: ("id", S, None), 2: ("exec_id", S, None), 3: ("stdin", BOOL, None)}
PIDS_REQUEST = ID_ONLY
PIDS_RESPONSE: Schema = {1: ("processes", M, repeated(PROCESS_INFO))}
CHECKPOINT_TASK_REQUEST: Schema = {1: ("id", S, None), 2: ("path", S, None), 3: ("options", M, ANY)}
UPDATE_TASK_REQUEST: Schema = {1: ("id", S, None), 2: ("resources", M, ANY), 3: ("annotations", "map", None)}
START_REQUEST = ID_EXEC
START_RESPONSE = PID_ONLY
WAIT_REQUEST = ID_EXEC
WAIT_RESPONSE: Schema = {1: ("exit_status", U32, None), 2: ("exited_at", M, TIMESTAMP)}
STATS_REQUEST = ID_ONLY
STATS_RESPONSE: Schema = {1: ("stats", M, ANY)}
CONNECT_REQUEST = ID_ONLY
CONNECT_RESPONSE: Schema = {1: ("shim_pid", U32, None), 2: ("task_pid", U32, None), 3: ("version", S, None)}
SHUTDOWN_REQUEST: Schema = {1: ("id", S, None), 2: ("now", BOOL, None)}
PAUSE_REQUEST = ID_ONLY
RESUME_REQUEST = ID_ONLY

TASK_SERVICE = "containerd.task.v2.Task"
LOGS_SERVICE = "shimd.shim.v1.Logs"

# method -> (request schema, response schema)
TASK_METHODS: dict[str, tuple[Schema, Schema]] = {
    "State": (STATE_REQUEST, STATE_RESPONSE),
    "Create": (CREATE_TASK_REQUEST, CREATE_TASK_RESPONSE),
    "Start": (START_REQUEST, START_RESPONSE),
    "Delete": (DELETE_REQUEST, DELETE_RESPONSE),
    "Pids": (PIDS_REQUEST, PIDS_RESPONSE),
    "Pause": (PAUSE_REQUEST, EMPTY),
    "Resume": (RESUME_REQUEST, EMPTY),
    "Checkpoint": (CHECKPOINT_TASK_REQUEST, EMPTY),
    "Kill": (KILL_REQUEST, EMPTY),
    "Exec": (EXEC_PROCESS_REQUEST, EMPTY),
    "ResizePty": (RESIZE_PTY_REQUEST, EMPTY),
    "CloseIO": (CLOSE_IO_REQUEST, EMPTY),
    "Update": (UPDATE_TASK_REQUEST, EMPTY),
    "Wait": (WAIT_REQUEST, WAIT_RESPONSE),
    "Stats": (STATS_REQUEST, STATS_RESPONSE),
    "Connect": (CONNECT_REQUEST, CONNECT_RESPONSE),
    "Shutdown": (SHUTDOWN_REQUEST, EMPTY),
}
LOGS_METHODS: dict[str, tuple[Schema, Schema]] = {"Reopen": (CONNECT_REQUEST, EMPTY)}
