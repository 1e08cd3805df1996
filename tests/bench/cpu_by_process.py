"""Where a benchmark phase's CPU goes, by kind of process: `perf record -a` over the phase, samples
counted by the process that was on the CPU (its command name, and the daemon's and the client's pids).

bench_pod_start's `--perf` runs its 20-pods-at-once phase under it: that phase is bound by the
machine's cores, so each kind's CPU per pod is what it takes from the burst's wall time. Needs
`perf` (Debian's linux-perf) and root; without perf the phase runs unmeasured.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

FREQUENCY = 999  # samples per second per CPU

# Command names (what the kernel keeps, cut to 15 characters) by kind. Anything else is "other".
KINDS: dict[str, tuple[str, ...]] = {
    # runc's own re-executions keep a bracketed name; "exe" is /proc/self/exe before it renames itself.
    "runc": ("runc", "runc:[0:PARENT]", "runc:[1:CHILD]", "runc:[2:INIT]", "exe"),
    "CNI plugins": ("bridge", "host-local", "loopback", "portmap", "bandwidth", "firewall", "tuning", "ptp",
                    "iptables", "ip6tables", "iptables-nft", "xtables-nft-mul", "xtables-legacy-"),
    # The compiled shim's main thread, its blocking-pool threads and its file writer; containerd's shims.
    "shims": ("shimd-runc-shim", "tokio-rt-worker", "file-writer", "containerd-shim"),
    "pause processes": ("pause", "catatonit"),
}
KERNEL_PREFIXES = ("kworker", "ksoftirqd", "rcu", "migration", "kdamond", "kcompactd", "jbd2", "kswapd")


def kind_of(comm: str, pid: int, daemon_pid: int, client_pid: int) -> str:
    if pid == daemon_pid:
        return "daemon"
    if pid == client_pid:
        return "benchmark client"
    for kind, names in KINDS.items():
        if comm in names:
            return kind
    if comm.startswith(KERNEL_PREFIXES):
        return "kernel threads"
    return "other"


def summarize(perf_script: str, daemon_pid: int, client_pid: int) -> dict[str, int]:
    """Busy samples by kind, from `perf script -F comm,pid` output (the idle task left out)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in perf_script.splitlines():
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        comm, pid = parts[0].strip(), int(parts[1])
        if pid == 0:  # swapper: the CPU was idle
            continue
        counts[kind_of(comm, pid, daemon_pid, client_pid)] += 1
    return dict(counts)


class Profile:
    """Filled in when the `record` block ends: CPU seconds by kind."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}


def available() -> bool:
    return shutil.which("perf") is not None


@contextlib.contextmanager
def record(work: Path, daemon_pid: int, client_pid: int) -> Iterator[Profile]:
    """Samples every CPU while the block runs; the profile is empty when perf is missing or fails."""
    profile = Profile()
    if not available():
        yield profile
        return
    data = work / f"perf-{time.monotonic_ns()}.data"
    perf = subprocess.Popen(["perf", "record", "-a", "-F", str(FREQUENCY), "-o", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # perf has its events open before the phase starts
        yield profile
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(timeout=60)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait(timeout=10)
    try:
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid"], capture_output=True,
                                text=True, errors="replace", timeout=300, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return
    finally:
        data.unlink(missing_ok=True)
    profile.seconds = {k: n / FREQUENCY for k, n in summarize(script, daemon_pid, client_pid).items()}
