"""Shared pytest configuration: a small, deadline-free hypothesis profile (jit compiles are slow),
the persistent compilation cache, and fixtures more than one test module uses."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "hdml",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("hdml")

# The trainer tests build the same small networks several times (each run jits its own step
# function); the persistent compilation cache turns every repeat into a cache hit.
import os  # noqa: E402
import tempfile  # noqa: E402

# The suite compiles its programs without XLA's backend optimisation (LLVM -O0): the tiny networks'
# compilation, not their execution, is most of its time, and -O0 compiles 2-3x faster. The
# tolerances are error bounds for any evaluation order, so they hold for this code as for the
# optimised one, which test_other_cpus runs (HDML_JAX_OPTIMIZED_COMPILE=1) on the comparisons.
# Set before JAX creates its CPU backend; the subprocesses inherit it.
OPTIMIZATION_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("HDML_JAX_OPTIMIZED_COMPILE") != "1" and OPTIMIZATION_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), OPTIMIZATION_FLAG]))

import jax  # noqa: E402

JIT_CACHE = os.environ.get("HDML_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "hdml_jax_jit_cache"))
jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Subprocesses (8 simulated devices, 2 processes, the CLI) read the same cache from the environment:
# their repeated trainer runs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JIT_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU this process may use, at most 4 and one per 6 GiB of memory
    (a worker peaks near 6 GiB: JAX, PyTorch and a test's subprocess), none (run in this process)
    where that leaves one. Compilation, most of the suite's time, is single-threaded, so two
    workers on 2 cores take about 2/3 of the time of one (10 rather than 15 minutes cold)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    memory = _memory_bytes()
    by_memory = 4 if memory is None else memory // (6 * 2**30)
    workers = max(1, min(4, cpus, by_memory))
    return workers if workers > 1 else 0


# The longest files first (cold cache, 2 cores: the guard 2.4 min, then 1.6, 1.3, 1.0 ...): the
# workers take whole files in this order (pyproject's --no-loadscope-reorder keeps it), and a long
# file started last would be the suite's tail.
LONGEST_FIRST = (
    "tests/test_other_cpus.py",
    "tests/test_train.py",
    "tests/test_sharding.py",
    "tests/test_multihost.py",
    "tests/test_parity.py",
    "tests/test_losses.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable


@pytest.fixture
def convert_fails(capsys):
    """``convert_fails(*argv)``: ``python -m hdml_jax.models.convert ARGV`` exits with status 2 and
    a one-line ``error:`` message (``usage=True``: argparse's usage text and error), no traceback;
    returns the message."""
    from hdml_jax.models import convert

    def run(*argv: str, usage: bool = False) -> str:
        with pytest.raises(SystemExit) as info:
            convert.main(list(argv))
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if usage:
            assert err.startswith("usage: ") and "error: " in err
        else:
            assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    return run
