"""Small helpers shared by the benchmark scripts: timing, peak memory, a table printer.

Not a benchmark itself; ``benchmarks/losses.py`` and ``benchmarks/retrieval.py`` import it.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Let ``python benchmarks/<name>.py`` import the package from a plain checkout, too.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def block(result):
    """Wait for every JAX array in ``result`` (any pytree); other leaves pass through."""
    import jax

    return jax.block_until_ready(result)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs (warm-up runs excluded)."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median: a rough noise indicator."""
        return (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0


def time_call(
    fn: Callable[[], object],
    *,
    repeats: int = 10,
    warmup: int = 2,
    sync: Callable[[object], object] = block,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed (compilation, caches), then ``repeats`` times timed.

    Each timed run is ``sync(fn())``, so asynchronous dispatch is included (JAX: the result is
    waited for with ``jax.block_until_ready``).
    """
    for _ in range(warmup):
        sync(fn())
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        sync(fn())
        runs.append(time.perf_counter() - start)
    return Timing(tuple(runs))


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    per_round: int = 2,
    syncs: dict[str, Callable[[object], object]] | None = None,
) -> dict[str, Timing]:
    """Like ``time_call`` for several callables, taken in rounds of ``per_round`` timed calls each.

    Drifting background load then hits every callable alike, so ratios between them stay
    meaningful on a busy machine. On switching to a callable, one untimed call comes first: it
    absorbs the hand-over between thread pools (JAX's and torch's OpenMP threads spin a while
    after their work). ``syncs`` maps a name to its ``sync`` (default ``block``).
    """
    syncs = syncs or {}
    for name, fn in calls.items():
        for _ in range(warmup):
            syncs.get(name, block)(fn())
    runs: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(v) for v in runs.values()) < max(1, repeats):
        for name, fn in calls.items():
            sync = syncs.get(name, block)
            sync(fn())  # settle
            for _ in range(min(per_round, repeats - len(runs[name]))):
                start = time.perf_counter()
                sync(fn())
                runs[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in runs.items()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Current resident set size in MiB (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(extra: Sequence[str] = ()) -> str:
    """A few lines naming the device, CPU and library versions, for the top of a report."""
    import jax
    import numpy as np

    lines = [
        f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}",
        f"cpu: {_cpu_model()} | cpus usable={cpu_count()} (os.cpu_count()={os.cpu_count()}) | "
        f"python {platform.python_version()} numpy {np.__version__}",
        *extra,
    ]
    return "\n".join(lines)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None
) -> None:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    if title:
        print(f"\n{title}")
    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt(row))
    sys.stdout.flush()
