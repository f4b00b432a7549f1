"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (by tests/test_metrics.py).

``retrieval_metrics`` with the references split over 8 devices (``mesh=``) must give exactly the
single-device metrics: self-retrieval, query/gallery and mixed query/gallery flags, classes of 1 to 100 members, exact ties
(±1 vectors: every product is a multiple of 1/16, so many references tie with the best correct
one and with each other), reference counts that 8 × 64 does not divide, top-R lists longer than a
device's share of the references, and both top-k paths. Prints one JSON line: per case, the two
results and whether they are equal.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from hdml_jax.evaluation import metrics


def clustered(rng, sizes, dim, noise):
    """Embeddings of classes of the given sizes (shuffled), Gaussian noise around random centres."""
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), dim))
    x = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


def signs(rng, sizes, dim=16, flips=3):
    """±1 vectors, each a copy of its class's vector with ``flips`` random signs flipped: exact
    products on any device, hence ties in every row (and duplicate rows)."""
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    base = rng.choice([-1.0, 1.0], size=(len(sizes), dim))[labels]
    flip = rng.integers(0, dim, size=(labels.size, flips))
    np.put_along_axis(base, flip, -np.take_along_axis(base, flip, axis=1), axis=1)
    return base.astype(np.float32), labels


def varied_sizes(rng, total, low, high):
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(low, high + 1)))
    sizes[-1] -= sum(sizes) - total
    return [s for s in sizes if s > 0]


def cases():
    rng = np.random.default_rng(0)
    ks = (1, 2, 4, 8, 16, 100, 1000)
    x, y = clustered(rng, varied_sizes(rng, 1000, 1, 40), 8, 1.0)
    yield "self, varied classes, N=1000", (x, y), {"ks": ks}
    yield "self, varied classes, chunk 7", (x[:300], y[:300]), {"ks": ks, "chunk_size": 7}
    x, y = signs(rng, varied_sizes(rng, 700, 1, 30))
    yield "self, ±1 ties, N=700", (x, y), {"ks": ks}
    # Classes up to 100 in 300: top-R lists longer than a device's 64 references.
    x, y = signs(rng, varied_sizes(rng, 300, 2, 100), flips=5)
    yield "self, ±1 ties, classes up to 100, N=300", (x, y), {"ks": ks}
    # Pairs in 5,000 (top-2 lists): a device's 640 references take the grouped top-k.
    x, y = signs(rng, [2] * 2500, flips=4)
    yield "self, ±1 pairs, N=5000 (grouped top-k)", (x, y), {"ks": ks}
    x, y = clustered(rng, varied_sizes(rng, 1400, 1, 25), 8, 1.0)
    y[:40] += 10_000  # queries whose class has no gallery image
    query, gallery = (x[:300], y[:300]), (x[300:], y[300:])
    yield "query/gallery, N=1100", (*query, *gallery), {"ks": ks}
    x, y = signs(rng, varied_sizes(rng, 900, 1, 20))
    yield "query/gallery, ±1 ties, N=650", (x[:250], y[:250], x[250:], y[250:]), {"ks": ks, "chunk_size": 64}
    # Open Metric Learning's flags: rows both, query-only and gallery-only, mixed.
    x, y = signs(rng, varied_sizes(rng, 800, 1, 20))
    role = rng.choice(3, size=y.size, p=[0.5, 0.25, 0.25])
    flags = {"is_query": role != 2, "is_gallery": role != 1}
    yield "mixed flags, ±1 ties, N=800", (x, y), {"ks": ks, **flags}
    yield (
        "mixed flags, ±1 ties, misses, chunk 50",
        (x, y),
        {"ks": ks, **flags, "chunk_size": 50, "unmatched_queries": "miss"},
    )
    # Poincaré ranking: lattice points (eighths, c = 1/4, exact products) repeated across classes.
    points = rng.integers(-2, 3, size=(60, 8)) / 8
    y = rng.integers(0, 40, 900)
    x = points[rng.integers(0, 60, 900)].astype(np.float32)
    poincare = {"ks": ks, "distance": "poincare", "curvature": 0.25}  # ties, flags and chunks at once
    yield "poincare, lattice, mixed flags, chunk 50", (x, y), {**poincare, **flags_of(rng, y), "chunk_size": 50}


def flags_of(rng, y):
    role = rng.choice(3, size=y.size, p=[0.5, 0.25, 0.25])
    return {"is_query": role != 2, "is_gallery": role != 1}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("references",))
    report = {}
    for name, args, kwargs in cases():
        single = metrics.retrieval_metrics(*args, **kwargs)
        sharded = metrics.retrieval_metrics(*args, **kwargs, mesh=mesh)
        report[name] = {"single": single, "sharded": sharded, "equal": single == sharded}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
