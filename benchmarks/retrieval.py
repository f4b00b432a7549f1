"""Wall time and peak memory of ``hdml_jax.metrics.retrieval_metrics`` against exact faiss search.

Run from the repository root::

    python benchmarks/retrieval.py                     # SOP size: N=60502, d=512, 2 timed runs
    python benchmarks/retrieval.py --n 5000 --repeats 3   # quick check
    python benchmarks/retrieval.py --skip-faiss

The data: self-retrieval over ``N`` L2-normalised embeddings with SOP-like classes (``N/5.35``
classes, 11,316 at full size, 2–12 images each); each embedding is its class centre (a random
unit vector) plus Gaussian noise (``--noise`` per coordinate), so the metrics are far from 0 and 1.
Metrics: Recall@K for ``--ks`` (default 1, 10, 100, 1000), precision@1, R-precision, MAP@R.

Each method runs in its own subprocess (same seed, same data), so its peak RSS
(``ru_maxrss``) is its own:

  * ``hdml_jax``: one call of ``retrieval_metrics(x, labels, ks=...)``, the whole thing
    (normalisation, chunked similarity matmuls, ranks, top-R, host-side means). "first call"
    includes compilation; its peak RSS is read right after it, before anything else runs. Then
    the timed calls alternate, round by round, with the floor: the same ``N × N × d`` product in
    the same query chunks (one ``lax.map`` over pre-normalised rows on device) consumed by a row
    max, written two ways: ``jnp.max(q @ r.T)``, which XLA:CPU compiles into one YNNPACK fusion of
    product and max, and the same max as a reduction XLA keeps apart from the product (the block
    is written, then read once). "ours/floor" divides by the faster of the two.
  * with ``--sharded``, also ``retrieval_metrics(..., mesh=...)`` with the references split over
    every device (several GPUs, or CPU devices simulated with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=D``, which share the same cores), timed in
    the same rounds; the row says whether its metrics equal the single-device ones.
  * ``faiss``: ``IndexFlatIP`` over the L2-normalised vectors, ``search`` with ``k = max(Ks)+1``
    (the query itself is dropped afterwards), then the same metrics in NumPy from the neighbour
    lists. Shown as search, post-processing and total.

Columns: median seconds, the best run, the first call, peak RSS of the worker process and its RSS
before the timed work (data already generated), and faiss/hdml_jax time (> 1: we are faster). The metric
values of both are printed side by side; Recall@K must agree up to ties and float rounding (a
few queries in 60,502).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _timing
import numpy as np

SOP_IMAGES, SOP_CLASSES = 60502, 11316
MIN_CLASS, MAX_CLASS = 2, 12


# -------------------------------------------------------------------------------------------- data


def class_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """SOP-like class sizes in [2, 12] summing to exactly ``n`` (mean ≈ 5.35 as in SOP's test set)."""
    if n < MIN_CLASS:
        raise SystemExit(f"--n must be at least {MIN_CLASS}")
    num_classes = max(1, round(n * SOP_CLASSES / SOP_IMAGES))
    num_classes = min(max(num_classes, -(-n // MAX_CLASS)), n // MIN_CLASS)
    mean_extra = n / num_classes - MIN_CLASS
    sizes = MIN_CLASS + rng.binomial(MAX_CLASS - MIN_CLASS, mean_extra / (MAX_CLASS - MIN_CLASS), num_classes)
    # Fix the total one image at a time on random classes that have room.
    while (excess := int(sizes.sum()) - n) != 0:
        room = np.flatnonzero(sizes > MIN_CLASS) if excess > 0 else np.flatnonzero(sizes < MAX_CLASS)
        pick = rng.choice(room, min(abs(excess), room.size), replace=False)
        sizes[pick] += -1 if excess > 0 else 1
    return sizes


def make_data(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, dim) float32, labels (n,) int32), deterministic for the arguments."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n, rng)
    labels = np.repeat(np.arange(sizes.size, dtype=np.int32), sizes)
    rng.shuffle(labels)
    centres = rng.standard_normal((sizes.size, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= np.float32(noise)
    x += centres[labels]
    return x, labels


# ----------------------------------------------------------------------------------------- workers


def metrics_from_neighbours(neighbours: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """The metrics of ``hdml_jax.metrics`` from (n, k) neighbour lists (self already removed)."""
    k = neighbours.shape[1]
    match = labels[neighbours] == labels[:, None]  # (n, k)
    first_hit = np.where(match.any(axis=1), match.argmax(axis=1), k)
    metrics = {f"recall@{kk}": float(np.mean(first_hit < kk)) for kk in ks}
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    num_relevant = counts[inverse] - 1  # R per query (self excluded)
    r_max = int(num_relevant.max())
    relevant = match[:, :r_max].astype(np.float64)
    position = np.arange(1, r_max + 1, dtype=np.float64)
    hits = relevant * (position[None, :] <= num_relevant[:, None])
    safe_r = np.maximum(num_relevant, 1).astype(np.float64)
    scored = num_relevant > 0
    num_scored = max(int(scored.sum()), 1)
    average_precision = np.sum(np.cumsum(relevant, axis=1) / position * hits, axis=1) / safe_r
    metrics["precision@1"] = float(relevant[scored, 0].sum() / num_scored)
    metrics["r_precision"] = float((hits.sum(axis=1) / safe_r)[scored].sum() / num_scored)
    metrics["map@r"] = float(average_precision[scored].sum() / num_scored)
    return metrics


def drop_self(indices: np.ndarray) -> np.ndarray:
    """Remove each query's own index from its (n, k+1) list (the last entry if it is absent)."""
    n = indices.shape[0]
    is_self = indices == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    # A row could hold itself twice only if faiss returned duplicates; it never does.
    return indices[~is_self].reshape(n, indices.shape[1] - 1)


def floor_calls(x: np.ndarray, chunk: int) -> dict:
    """The floor of ``retrieval_metrics``: its ``N × N × d`` product in the same query chunks,
    consumed by a row max, on rows normalised and padded beforehand (not timed). Two ways: as
    XLA fuses ``jnp.max(q @ r.T)``, and with the block written and then reduced (a select-form max,
    which XLA does not fold into the product)."""
    import functools

    import jax
    import jax.numpy as jnp

    from hdml_jax.losses._common import FULL_PRECISION

    n = x.shape[0]
    num_chunks = -(-n // chunk)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = jnp.asarray(np.pad(xn, ((0, num_chunks * chunk - n), (0, 0))).reshape(num_chunks, chunk, -1))
    reference = jnp.asarray(xn)

    @functools.partial(jax.jit, static_argnames="fused")
    def floor(queries, reference, fused):
        def one_chunk(q):
            similarity = jnp.matmul(q, reference.T, precision=FULL_PRECISION)
            if fused:
                return jnp.max(similarity, axis=1)
            return jax.lax.reduce(
                similarity, jnp.float32(-jnp.inf), lambda a, b: jnp.where(a > b, a, b), (1,)
            )

        return jax.lax.map(one_chunk, queries)

    calls = {
        "floor_fused": lambda: floor(queries, reference, True),
        "floor_apart": lambda: floor(queries, reference, False),
    }
    for call in calls.values():  # compile
        _timing.block(call())
    return calls


def busy_seconds() -> float | None:
    """CPU seconds all processes have used so far (Linux ``/proc/stat``), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def interleaved(calls: dict, rounds: int) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of each call, ``rounds`` times, one call of each per round (drift hits all alike);
    the order reverses every other round, so that no call always follows the same one. Also,
    per round, the share of the machine's CPUs that other processes used meanwhile."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    others = []
    names = list(calls)
    for round_index in range(max(1, rounds)):
        busy, own, start_round = busy_seconds(), time.process_time(), time.perf_counter()
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            _timing.block(calls[name]())
            times[name].append(time.perf_counter() - start)
        if busy is not None:
            other = busy_seconds() - busy - (time.process_time() - own)
            others.append(max(0.0, other) / (_timing.cpu_count() * (time.perf_counter() - start_round)))
    return times, others


def run_worker(method: str, args) -> dict:
    x, labels = make_data(args.n, args.dim, args.noise, args.seed)
    ks = tuple(k for k in args.ks if k <= args.n - 1) or (1,)
    result: dict = {"method": method, "ks": ks}
    if method == "hdml_jax":
        import jax

        from hdml_jax.evaluation import metrics as metrics_module

        result["device"] = str(jax.devices())
        result["rss_before_mib"] = _timing.current_rss_mib()
        start = time.perf_counter()
        metrics = metrics_module.retrieval_metrics(x, labels, ks=ks, chunk_size=args.chunk_size)
        result["first_s"] = time.perf_counter() - start
        result["peak_rss_mib"] = _timing.peak_rss_mib()  # before any floor ran
        chunk = args.chunk_size or metrics_module.default_chunk_size(args.n, args.n)
        result["chunk_size"] = chunk
        calls = {
            "ours": lambda: metrics_module.retrieval_metrics(x, labels, ks=ks, chunk_size=args.chunk_size),
            **floor_calls(x, chunk),
        }
        if args.sharded:
            mesh = jax.make_mesh((jax.device_count(),), ("references",))
            sharded = metrics_module.retrieval_metrics(x, labels, ks=ks, chunk_size=args.chunk_size, mesh=mesh)
            result["sharded_devices"] = jax.device_count()
            result["sharded_equal"] = sharded == metrics
            calls["sharded"] = lambda: metrics_module.retrieval_metrics(
                x, labels, ks=ks, chunk_size=args.chunk_size, mesh=mesh
            )
        if args.poincare:
            # The same rows as points of the ball: directions kept, norms spread over (0, 0.95 r).
            c = args.poincare
            norms = np.random.default_rng(args.seed + 1).uniform(0.05, 0.95, (len(x), 1)) / np.sqrt(c)
            ball = (x / np.linalg.norm(x, axis=1, keepdims=True) * norms).astype(np.float32)
            metrics_module.retrieval_metrics(ball, labels, ks=ks, distance="poincare", curvature=c)  # compile
            calls["poincare"] = lambda: metrics_module.retrieval_metrics(
                ball, labels, ks=ks, chunk_size=args.chunk_size, distance="poincare", curvature=c
            )
        result["times"], result["other_load"] = interleaved(calls, args.repeats)
    elif method == "faiss":
        import faiss

        faiss.omp_set_num_threads(_timing.cpu_count())
        result["device"] = f"faiss {faiss.__version__}, omp threads={faiss.omp_get_max_threads()}"
        result["rss_before_mib"] = _timing.current_rss_mib()
        k = min(max(ks), args.n - 1) + 1

        def search():
            xn = x / np.linalg.norm(x, axis=1, keepdims=True)
            index = faiss.IndexFlatIP(xn.shape[1])
            index.add(xn)
            _, indices = index.search(xn, k)
            return indices

        def post(indices):
            return metrics_from_neighbours(drop_self(indices), labels, ks)

        search_runs, post_runs = [], []
        for run in range(args.repeats + 1):
            start = time.perf_counter()
            indices = search()
            middle = time.perf_counter()
            metrics = post(indices)
            end = time.perf_counter()
            del indices
            if run == 0:
                result["first_s"] = end - start
            else:
                search_runs.append(middle - start)
                post_runs.append(end - middle)
        result["search_times"] = search_runs
        result["post_times"] = post_runs
        result["times"] = [a + b for a, b in zip(search_runs, post_runs, strict=True)]
    else:
        raise SystemExit(f"unknown worker {method!r}")
    result["metrics"] = metrics
    result.setdefault("peak_rss_mib", _timing.peak_rss_mib())
    return result


def spawn(method: str, args) -> dict | None:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        *("--n", str(args.n), "--dim", str(args.dim), "--repeats", str(args.repeats)),
        *("--noise", str(args.noise), "--seed", str(args.seed), "--ks", *map(str, args.ks)),
        *(("--chunk-size", str(args.chunk_size)) if args.chunk_size else ()),
        *(("--sharded",) if args.sharded else ()),
        *(("--poincare", str(args.poincare)) if args.poincare else ()),
    ]
    print(f"running {method} worker ...", flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        print(f"{method} worker failed with exit status {done.returncode}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--n", type=int, default=SOP_IMAGES, help="number of embeddings (queries = references)"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs after the first call (rounds with the floor)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="queries per step (default: the library's)"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="Gaussian noise per coordinate (0.1: recall@1 ≈ 0.7 at full size)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument(
        "--sharded",
        action="store_true",
        help="also time retrieval_metrics(mesh=...) with the references split over all devices "
        "(several GPUs; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=D simulates them)",
    )
    parser.add_argument(
        "--poincare",
        type=float,
        default=0.0,
        metavar="C",
        help="also time distance='poincare' at curvature C on the rows mapped into the ball",
    )
    parser.add_argument("--worker", choices=("hdml_jax", "faiss"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return 0

    faiss_note = "faiss: skipped (--skip-faiss)"
    if not args.skip_faiss:
        try:
            import faiss

            faiss_note = f"faiss {faiss.__version__}"
        except ImportError as error:
            faiss_note = f"faiss not importable ({error}); skipped"
            args.skip_faiss = True
    print(_timing.describe_environment([faiss_note]))
    sizes = class_sizes(args.n, np.random.default_rng(args.seed))
    print(
        f"data: N={args.n} d={args.dim} self-retrieval, {sizes.size} classes of {sizes.min()}-{sizes.max()} "
        f"images (mean {sizes.mean():.2f}), noise={args.noise}, seed={args.seed}; ks={tuple(args.ks)}; "
        f"{args.repeats} timed rounds after a first call (ours and its floor alternate), each method in "
        "its own process"
    )

    results = {"hdml_jax": spawn("hdml_jax", args)}
    if not args.skip_faiss:
        results["faiss"] = spawn("faiss", args)
    ours = results["hdml_jax"]
    if ours is None:
        return 1
    floors = {name: ours["times"].pop(name) for name in ("floor_fused", "floor_apart")}
    sharded_times = ours["times"].pop("sharded", None)
    poincare_times = ours["times"].pop("poincare", None)
    ours["times"] = ours["times"]["ours"]
    ours_median = float(np.median(ours["times"]))

    def fmt_mib(value):
        return f"{value:.0f} MiB"

    rows = [
        (
            "hdml_jax.retrieval_metrics",
            _timing.format_seconds(ours_median),
            _timing.format_seconds(min(ours["times"])),
            _timing.format_seconds(ours["first_s"]),
            fmt_mib(ours["peak_rss_mib"]),
            fmt_mib(ours["rss_before_mib"]),
            "1.00x",
        )
    ]
    if sharded_times is not None:
        rows.append(
            (
                f"hdml_jax, references over {ours['sharded_devices']} devices",
                _timing.format_seconds(float(np.median(sharded_times))),
                _timing.format_seconds(min(sharded_times)),
                *("-",) * 3,
                f"equal: {ours['sharded_equal']}",
            )
        )
    if poincare_times is not None:
        median = float(np.median(poincare_times))
        rows.append(
            (
                f"hdml_jax, distance='poincare' (c={args.poincare})",
                _timing.format_seconds(median),
                _timing.format_seconds(min(poincare_times)),
                *("-",) * 3,
                f"{median / ours_median:.2f}x",
            )
        )
    for label, key in (
        ("floor: product + max, fused by XLA", "floor_fused"),
        ("floor: product, then max", "floor_apart"),
    ):
        rows.append(
            (
                label,
                _timing.format_seconds(float(np.median(floors[key]))),
                _timing.format_seconds(min(floors[key])),
                *("-",) * 4,
            )
        )
    theirs = results.get("faiss")
    if theirs is not None:
        for label, key in (
            ("faiss search (k=max K+1)", "search_times"),
            ("numpy post-processing", "post_times"),
        ):
            rows.append(
                (label, _timing.format_seconds(float(np.median(theirs[key]))), "-", "-", "-", "-", "-")
            )
        theirs_median = float(np.median(theirs["times"]))
        rows.append(
            (
                "faiss total (search + post)",
                _timing.format_seconds(theirs_median),
                _timing.format_seconds(min(theirs["times"])),
                _timing.format_seconds(theirs["first_s"]),
                fmt_mib(theirs["peak_rss_mib"]),
                fmt_mib(theirs["rss_before_mib"]),
                _timing.format_ratio(theirs_median / ours_median),
            )
        )
    print(f"devices: hdml_jax worker {ours['device']}" + (f"; {theirs['device']}" if theirs else ""))
    _timing.print_table(
        ("method", "median", "best", "first call", "peak RSS", "RSS before", "faiss/ours"),
        rows,
        title=f"Self-retrieval metrics, N={args.n}, d={args.dim}, ks={tuple(ours['ks'])}, "
        f"{ours['chunk_size']} queries per chunk",
    )
    # Per round, ours over the faster floor of that round (timed back to back, so drift cancels).
    per_round = [
        t / min(a, b)
        for t, a, b in zip(ours["times"], floors["floor_fused"], floors["floor_apart"], strict=True)
    ]
    floor_median = min(float(np.median(v)) for v in floors.values())
    floor_best = min(min(v) for v in floors.values())
    print(
        f"ours/floor (floor = the faster of the two): medians {ours_median / floor_median:.3f}, "
        f"best runs {min(ours['times']) / floor_best:.3f}, per round {', '.join(f'{r:.3f}' for r in per_round)}"
    )
    if ours.get("other_load"):
        print(
            "CPU share used by other processes during each round: "
            + ", ".join(f"{100 * x:.0f}%" for x in ours["other_load"])
        )

    metric_rows = []
    agree = True
    for name, value in ours["metrics"].items():
        other = theirs["metrics"].get(name) if theirs else None
        diff = None if other is None else abs(value - other)
        if name.startswith("recall@") and diff is not None and diff * args.n > max(3, 1e-4 * args.n):
            agree = False
        metric_rows.append(
            (
                name,
                f"{value:.6f}",
                "-" if other is None else f"{other:.6f}",
                "-"
                if diff is None
                else f"{diff:.1e}"
                + (f" ({diff * args.n:.0f} queries)" if name.startswith("recall@") else ""),
            )
        )
    _timing.print_table(("metric", "hdml_jax", "faiss+numpy", "|diff|"), metric_rows, title="Metric values")
    if theirs is not None:
        print(
            "recall@K agreement: "
            + ("ok (equal up to ties / rounding)" if agree else "MISMATCH beyond ties / rounding")
        )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
