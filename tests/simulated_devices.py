"""Run a ``tests.*`` check module on 8 simulated CPU devices, in a subprocess (the device count
must be set before JAX starts), and return the JSON report on its last stdout line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def xla_flags_with_devices(count: int | None) -> str:
    """This process's ``XLA_FLAGS`` with the simulated device count set to ``count`` (left out for
    None). The other flags pass on: a check run under ``--xla_cpu_max_isa=...`` compares its
    programs under that instruction set, not the machine's widest."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return " ".join([*kept, *([f"--xla_force_host_platform_device_count={count}"] if count else [])])


def run_check_module(module: str, *args: str, env: dict[str, str], timeout: int = 600) -> dict:
    """``python -m tests.<module> ARGS`` in a fresh interpreter with ``env`` added to this one's
    environment; returns the JSON report the module prints on its last stdout line."""
    result = subprocess.run(
        [sys.executable, "-m", f"tests.{module}", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_on_eight_devices(module: str, *args: str) -> dict:
    """``python -m tests.<module> ARGS`` with ``--xla_force_host_platform_device_count=8``."""
    return run_check_module(module, *args, env={"XLA_FLAGS": xla_flags_with_devices(8)})
