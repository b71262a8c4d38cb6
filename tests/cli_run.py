"""Run ``seg-rt`` in a subprocess as a user does: offline, output captured as text."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seg_rt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
