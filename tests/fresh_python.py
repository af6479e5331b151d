"""Python code run in a process of its own, as a reader's notebook starts: without ``TRITON_INTERPRET``.

conftest.py switches Triton's interpreter on for the test process; the
tests that see what happens when it is set late, or not at all, run their
code here.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_without_interpreter(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -c code *args`` with this environment less ``TRITON_INTERPRET``; its output as text."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
