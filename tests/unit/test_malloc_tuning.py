import subprocess
import sys


def test_tune_applies_on_glibc() -> None:
    # In a child process: the settings are process-wide and must not leak into the test runner.
    code = "from shimd import malloc_tuning; print(malloc_tuning.tune())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "True"


def test_trim_runs_and_the_periodic_trim_stops_when_cancelled() -> None:
    code = """
import asyncio
from shimd import malloc_tuning

async def main():
    calls = []
    real = malloc_tuning.trim
    malloc_tuning.trim = lambda: calls.append(1) or real()
    task = asyncio.create_task(malloc_tuning.trim_periodically(0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return len(calls)

print(malloc_tuning.trim(), asyncio.run(main()) >= 3)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == ["True", "True"]
