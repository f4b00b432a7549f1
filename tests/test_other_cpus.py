"""The numerics-sensitive tests pass with another CPU's summation order, not only with this one's.

XLA's CPU backend picks its vector width from the instruction set it finds, and with it the
order in which reductions add up; so does every BLAS. A tolerance tuned to what one machine
printed then fails on the next machine (it did: the masked-row and optimizer-parity tests,
tuned on AVX2, failed on AVX-512). ``--xla_cpu_max_isa`` caps the instruction set XLA uses, which
is the nearest thing to running on an older CPU: this test reruns the modules whose assertions
compare floating-point results of different programs (other shapes, device layouts, libraries)
under SSE4.2 (and under AVX2 as well, in the exhaustive run, when this CPU has AVX-512). Their
tolerances come from error analysis (``tests/numerics.py``), so they hold under any order; this
keeps it that way.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import OPTIMIZATION_FLAG

ROOT = Path(__file__).resolve().parents[1]

# The modules whose assertions compare two float32 evaluations of one formula: the losses against
# per-sample references and across shapes, the networks against PyTorch forwards, the metrics
# against NumPy. (The trainer's and the optimizers' parity with PyTorch run in float64, where the
# instruction set moves nothing near their bounds: test_parity.py, test_optim.py.)
NUMERICS_MODULES = (
    "tests/test_losses.py",
    "tests/test_classification_losses.py",
    "tests/test_pair_losses.py",
    "tests/test_xbm.py",
    "tests/test_metrics.py",
    "tests/test_models.py",
    "tests/test_bn_inception.py",
)
# Of those, the tests that compare two programs (another shape, library, formulation or jit):
# their names say so. Left out: the rest of each module (errors, shapes, training runs), which no
# summation order changes, and the 8-device metrics (test_sharding's subprocess pattern; their
# tolerance is test_metrics' own, checked here on one device) and bfloat16 against float32, whose
# bound is bfloat16's rounding (2⁻⁸), 65,000 times float32's: no summation order comes near it.
# Also left out: jit against eager and vmap against a loop (two of our programs; the jitted one is
# held to its float64 reference here, under this instruction set, and the eager one runs the same
# operations one at a time, each compiled alone: a fifth of this rerun's time).
# About 2 minutes on 2 cores.
COMPARISONS = (
    "(match or equal or agree or change_nothing or garbage or reference or torch or pml or close)"
    " and not sharded and not bfloat16 and not eager and not vmap"
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _capped_instruction_sets() -> list:
    """SSE4_2 always (on x86); AVX2 too where the CPU has more than AVX2 (AVX-512), in the
    exhaustive run: each rerun takes about 2 minutes of the suite's 12, and one other summation
    order already tests that the tolerances are bounds rather than this machine's printout."""
    cpu = _cpu_flags()
    caps: list = ["SSE4_2"]
    if any(flag.startswith("avx512") for flag in cpu):
        caps.append(pytest.param("AVX2", marks=pytest.mark.exhaustive))
    return caps


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("HDML_JAX_OTHER_CPU"),
    reason="--xla_cpu_max_isa names x86 instruction sets (and no rerun inside the rerun)",
)
@pytest.mark.parametrize("isa", _capped_instruction_sets())
def test_numerics_hold_with_another_cpus_summation_order(isa):
    # The optimised compilation users run (the rest of the suite compiles at -O0, see conftest),
    # under another instruction set: both change the evaluation order the tolerances must cover.
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != OPTIMIZATION_FLAG]
    flags = " ".join([*kept, f"--xla_cpu_max_isa={isa}"])
    env = {**os.environ, "XLA_FLAGS": flags, "HDML_JAX_OTHER_CPU": isa, "HDML_JAX_OPTIMIZED_COMPILE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-k", COMPARISONS, *NUMERICS_MODULES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"with XLA_FLAGS={flags}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
