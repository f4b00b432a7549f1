"""Open Metric Learning's own retrieval metrics on small query/gallery cases: the fixture that
``tests/test_query_gallery.py`` holds ours to.

Open Metric Learning 4.0 pins ``numpy<2`` and pulls torchvision, albumentations and OpenCV, so it
is not a test dependency. The fixture is written once, in a throwaway venv, from the repository
root (the script imports neither JAX nor ``hdml_jax``)::

    python3 -m venv /tmp/oml && /tmp/oml/bin/pip install open-metric-learning==4.0.0 omegaconf
    /tmp/oml/bin/python tests/oml_reference.py --write

It writes ``tests/data/oml_retrieval.json``: for every case the embeddings (float32, unit rows),
labels and ``is_query`` / ``is_gallery`` flags, and what OML's ``EmbeddingMetrics`` (the metric a
``DFQueryGalleryLabeledDataset`` is evaluated with) computes from them: per query (``reduce=False``)
``cmc@k``, ``precision@k`` and ``map@k``, the number of relevant gallery rows (``gt_ids``) and the
retrieved gallery positions, and the means. ``--check`` recomputes and compares instead of writing.

What OML does with a query that has no relevant gallery row (checked here, not assumed): it keeps
it, warns "Some of the queries don't have available gts.", and scores ``cmc@k = 0``,
``map@k = 0`` and ``precision@k = 0/0 = NaN`` (so the mean precision is NaN).

The cases (``cases``) are the mixes a user's CSV can hold: every row both (self-retrieval), query
and gallery disjoint, a mix of both-rows with query-only and gallery-only ones, a class present
only as queries and a class whose single row is both (queries with no other gallery row of their
class), and exact ties (duplicate rows within a class, so that OML's order among them, which
``torch.topk`` leaves unspecified, changes no metric).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "oml_retrieval.json"
KS = (1, 2, 3, 5, 10)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(
    rng: np.random.Generator, sizes: list[int], dim: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), dim))
    return _unit_rows(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels


def cases() -> dict[str, dict[str, list]]:
    """The embeddings, labels and flags of every case (deterministic)."""
    rng = np.random.default_rng(30)
    out = {}

    x, y = _clustered(rng, [4, 5, 3, 6, 4, 2], 6, 0.9)
    out["all_both"] = (x, y, np.ones(len(y), bool), np.ones(len(y), bool))

    x, y = _clustered(rng, [5, 6, 4, 5, 4], 6, 0.9)
    is_query = np.zeros(len(y), bool)
    for label in np.unique(y):  # two queries of every class, the rest gallery
        is_query[np.flatnonzero(y == label)[:2]] = True
    out["all_split"] = (x, y, is_query, ~is_query)

    x, y = _clustered(rng, [6, 5, 6, 4, 5, 4], 6, 1.0)
    role = rng.choice(3, size=len(y), p=[0.5, 0.25, 0.25])  # 0 both, 1 query only, 2 gallery only
    out["mixed"] = (x, y, role != 2, role != 1)

    # Class 4: queries only. Class 5: one row, both query and gallery (it can only find itself).
    x, y = _clustered(rng, [5, 5, 4, 4, 3, 1], 6, 1.0)
    role = rng.choice(3, size=len(y), p=[0.5, 0.25, 0.25])
    role[y == 4], role[y == 5] = 1, 0
    out["unmatched_queries"] = (x, y, role != 2, role != 1)

    # Exact ties: every row of a class appears twice (the same float32 vector), roles mixed.
    x, y = _clustered(rng, [3, 3, 2, 3, 2], 6, 1.0)
    x, y = np.repeat(x, 2, axis=0), np.repeat(y, 2)
    role = rng.choice(3, size=len(y), p=[0.5, 0.25, 0.25])
    out["ties"] = (x, y, role != 2, role != 1)

    return {
        name: {
            "embeddings": x.astype(np.float32).tolist(),
            "labels": y.astype(int).tolist(),
            "is_query": q.astype(bool).tolist(),
            "is_gallery": g.astype(bool).tolist(),
        }
        for name, (x, y, q, g) in out.items()
    }


def oml_results(case: dict[str, list]) -> dict:
    """OML's ``EmbeddingMetrics`` on one case: per-query and mean cmc / precision / map at ``KS``."""
    import pandas as pd
    import torch
    from oml.datasets.dataframe import DFQueryGalleryLabeledDataset
    from oml.interfaces.datasets import IBaseDataset
    from oml.metrics.embeddings import EmbeddingMetrics

    class Rows(IBaseDataset):
        """OML's dataset interface over row numbers (the embeddings are given, nothing is read)."""

        index_key, input_tensors_key = "idx", "input_tensors"

        def __init__(self, n: int):
            self.n, self.extra_data = n, {}

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, item: int) -> dict:
            return {self.index_key: item}

    frame = pd.DataFrame(
        {"label": case["labels"], "is_query": case["is_query"], "is_gallery": case["is_gallery"]}
    )
    dataset = DFQueryGalleryLabeledDataset(Rows(len(frame)), frame)
    calculator = EmbeddingMetrics(
        dataset, cmc_top_k=KS, precision_top_k=KS, map_top_k=KS, pcf_variance=(), verbose=False
    )
    calculator.setup(len(frame))
    calculator.update(torch.tensor(case["embeddings"], dtype=torch.float32), list(range(len(frame))))
    reduced = calculator.compute_metrics()["OVERALL"]
    unreduced = calculator.metrics_unreduced["OVERALL"]
    rr = calculator.retrieval_results
    return {
        "per_query": {
            f"{metric}@{k}": [float(v) for v in unreduced[metric][k]]
            for metric in ("cmc", "precision", "map")
            for k in KS
        },
        "mean": {
            f"{metric}@{k}": float(reduced[metric][k]) for metric in ("cmc", "precision", "map") for k in KS
        },
        "num_relevant": [len(g) for g in rr.gt_ids],
        "retrieved": [[int(i) for i in r] for r in rr.retrieved_ids],
    }


def build() -> dict:
    import oml

    return {
        "oml_version": oml.__version__,
        "ks": list(KS),
        "cases": {name: {**case, "oml": oml_results(case)} for name, case in cases().items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true", help="recompute and compare with the fixture")
    args = parser.parse_args(argv)
    try:
        record = build()
    except ImportError as error:
        print(
            f"error: {error}; run this in a venv with open-metric-learning (see the docstring).",
            file=sys.stderr,
        )
        return 2
    if args.write:
        FIXTURE.write_text(json.dumps(record, indent=1) + "\n")
        print(
            f"wrote {FIXTURE.relative_to(ROOT)} (OML {record['oml_version']}, {len(record['cases'])} cases)"
        )
        return 0
    stored = json.loads(FIXTURE.read_text())
    # OML's precision@k of a query with nothing to find is 0/0 = NaN: compare the JSON text.
    same = json.dumps(stored["cases"], sort_keys=True) == json.dumps(record["cases"], sort_keys=True)
    print("the fixture matches OML" if same else "the fixture differs from OML's results")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
