"""Run a ``tests.*`` check module on 8 simulated CPU devices, in a subprocess (the device count
must be set before JAX starts), and return the JSON report on its last stdout line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_eight_devices(module: str, *args: str) -> dict:
    """``python -m tests.<module> ARGS`` with ``--xla_force_host_platform_device_count=8``."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", f"tests.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
