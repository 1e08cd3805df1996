"""Container stats for runsc from `runsc events --stats`: with gVisor, the whole sandbox sits in the pod's
sandbox cgroup and a container's own cgroup stays empty, so only the sandbox can say what a container uses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from shimd.stats.cgroupfs import Sample


def _int(d: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return int(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


def parse_events(raw: bytes, now_ns: int | None = None) -> Sample | None:
    """One JSON event line of `runsc events --stats` as a Sample; None when it carries no stats."""
    line = raw.strip().splitlines()[0] if raw.strip() else b""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    data = event.get("data") if isinstance(event, dict) else None
    if event.get("type") != "stats" or not isinstance(data, dict):
        return None
    usage = _int(data, "memory", "usage", "usage")
    limit = _int(data, "memory", "usage", "limit")
    cache = _int(data, "memory", "cache")
    working_set = None if usage is None else max(0, usage - (_int(data, "memory", "raw", "total_inactive_file") or 0))
    return Sample(
        timestamp_ns=now_ns or time.time_ns(),
        cpu_usage_ns=_int(data, "cpu", "usage", "total"),
        memory_usage=usage,
        working_set=working_set,
        rss=_int(data, "memory", "raw", "total_rss") or _int(data, "memory", "raw", "rss"),
        cache=cache,
        memory_limit=limit if limit else None,  # runsc reports 0 for "no limit"
        swap_usage=_int(data, "memory", "swap", "usage"),
        pids=_int(data, "pids", "current"),
    )


async def sample(argv: list[str], container_id: str, timeout: float) -> Sample | None:
    """Run `<runsc and global flags> events --stats <id>`; None when the container is gone or runsc fails."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, "events", "--stats", container_id,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return None
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    return parse_events(out) if proc.returncode == 0 and out else None
