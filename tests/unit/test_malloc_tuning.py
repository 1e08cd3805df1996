import subprocess
import sys


def test_tune_applies_on_glibc() -> None:
    # In a child process: the settings are process-wide and must not leak into the test runner.
    code = "from shimd import malloc_tuning; print(malloc_tuning.tune())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "True"
