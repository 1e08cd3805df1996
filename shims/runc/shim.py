"""The runc shim process: `python -m shims.runc.shim -namespace NS -address ADDR -id ID start|delete`.

Invoked like any containerd shim v2 binary, with cwd = the pod's bundle directory:
- `start` launches the long-lived shim (own session, stdio detached), waits until it answers on its
  socket, prints `unix://<socket>` and writes it to ./address. A shim already serving that id is reused.
- `delete` cleans up after a dead shim: force-deletes the runc container named by -id and unmounts
  ./rootfs, then prints a DeleteResponse.
- `serve` (internal) is the long-lived shim itself.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from shimproto.paths import socket_path as shim_socket_path

USAGE = "usage: shim -namespace NS -address ADDR [-publish-binary P] -id ID [-bundle DIR] [-debug] start|delete"


def parse_args(argv: list[str]) -> tuple[dict[str, str], str]:
    """Go flag syntax (-name value / --name=value / -debug), then the command."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name = argv[i].lstrip("-")
        if "=" in name:
            name, value = name.split("=", 1)
        elif name in ("debug", "v"):
            value = "true"
        else:
            i += 1
            if i >= len(argv):
                raise SystemExit(f"flag -{name} needs a value\n{USAGE}")
            value = argv[i]
        flags[name] = value
        i += 1
    if i >= len(argv):
        raise SystemExit(USAGE)
    return flags, argv[i]


def socket_path(flags: dict[str, str]) -> str:
    base = os.environ.get("SHIMD_SHIM_DIR") or os.path.join(os.path.dirname(flags.get("address", "") or "/run/shimd/x"),
                                                            "s")
    return shim_socket_path(base, flags.get("namespace", ""), flags["id"])


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _write_address(address: str) -> None:
    tmp = "address.tmp"
    with open(tmp, "w") as f:
        f.write(address)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, "address")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def cmd_start(flags: dict[str, str]) -> int:
    path = socket_path(flags)
    address = f"unix://{path}"
    if os.path.exists(path):
        if _answers(path):
            _write_address(address)
            print(address, flush=True)
            return 0
        os.unlink(path)  # stale socket of a dead shim
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SHIMD_SHIM_SOCKET"] = path
    # -S: no site (the venv's site-packages are not needed and its import hooks cost memory);
    # -OO: no docstrings in memory (the shim uses no assert).
    argv = [sys.executable, "-S", "-OO", "-m", "shims.runc.shim", *sys.argv[1:-1], "serve"]
    devnull = os.open(os.devnull, os.O_RDWR)
    errlog = os.open("shim.stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    # Whatever else the caller let us inherit (uvloop leaks its stdio socketpair ends) must not reach
    # the long-lived shim: a kept copy of the caller's pipe would stop it from ever seeing EOF.
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2 and int(fd) not in (devnull, errlog)]
    closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited if _is_open(fd)]
    pid = os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, errlog, 2),
        *closes])
    os.close(devnull)
    os.close(errlog)
    deadline = time.monotonic() + float(os.environ.get("SHIMD_SHIM_START_TIMEOUT", "20"))
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.stderr.write(f"shim exited during start-up (status {status}); see shim.stderr.log\n")
            return 1
        if os.path.exists(path) and _answers(path):
            _write_address(address)
            print(address, flush=True)
            return 0
        time.sleep(0.02)
    sys.stderr.write("shim did not start listening in time\n")
    return 1


def cmd_delete(flags: dict[str, str]) -> int:
    """Best-effort cleanup of one container after its shim died (containerd calls this)."""
    import json
    import subprocess

    from shimproto import messages as m
    from shimproto.proto import encode
    from shims.runc.mounts import unmount

    bundle = flags.get("bundle") or os.getcwd()
    opts: dict[str, object] = {}
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            opts = json.load(f)
    except (OSError, ValueError):
        pass
    argv = [str(opts.get("binary_name") or "runc"), "--root",
            str(opts.get("root") or f"/run/containerd/runc/{flags.get('namespace', 'default')}")]
    if opts.get("systemd_cgroup"):
        argv.append("--systemd-cgroup")
    subprocess.run([*argv, "delete", "--force", flags["id"]], stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=60, check=False)
    try:
        unmount(os.path.join(bundle, "rootfs"))
    except OSError as e:
        sys.stderr.write(f"{e}\n")
    now = time.time_ns()
    resp = {"pid": 0, "exit_status": 128 + 9, "exited_at": {"seconds": now // 10**9, "nanos": now % 10**9}}
    sys.stdout.buffer.write(encode(m.DELETE_RESPONSE, resp))
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    flags, command = parse_args(sys.argv[1:] if argv is None else argv)
    if "id" not in flags:
        raise SystemExit(f"-id is required\n{USAGE}")
    if command == "start":
        return cmd_start(flags)
    if command == "delete":
        return cmd_delete(flags)
    if command == "serve":
        from shims.runc.server import serve

        return serve(flags, os.environ.get("SHIMD_SHIM_SOCKET") or socket_path(flags))
    raise SystemExit(f"unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    sys.exit(main())
