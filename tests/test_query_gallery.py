"""Open Metric Learning's query/gallery semantics: any row a query, a gallery item or both.

Held to two references: OML 4.0's own ``EmbeddingMetrics``, run once on the same embeddings and
flags (``tests/oml_reference.py`` wrote ``tests/data/oml_retrieval.json``), and a per-query NumPy
loop written from the definitions (float64): a query is searched among the gallery rows other
than its own row; R = the other gallery rows of its class; queries with R = 0 are left out
(``unmatched_queries="skip"``) or scored as misses (``"miss"``, OML's way).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hdml_jax.evaluation import metrics
from tests.numerics import assert_close

FIXTURE = Path(__file__).resolve().parent / "data" / "oml_retrieval.json"
OML = json.loads(FIXTURE.read_text())
KS = tuple(OML["ks"])
F32 = float(np.finfo(np.float32).eps)


def poincare_similarity(x, candidates, q, c):
    """−d_c(x_q, x_g) for each candidate g, one pair at a time in float64: Möbius addition with
    hyptorch's +1e-5, the clamped artanh (hdml_jax.hyperbolic's module docstring)."""
    out = []
    for g in candidates:
        a, b = -x[q], x[g]
        xy, x2, y2 = a @ b, a @ a, b @ b
        m = ((1 + 2 * c * xy + c * y2) * a + (1 - c * x2) * b) / (1 + 2 * c * xy + c**2 * x2 * y2 + 1e-5)
        z = min(np.sqrt(c) * np.linalg.norm(m), 1 - 1e-5)
        out.append(-2 / np.sqrt(c) * np.arctanh(z))
    return np.array(out)


def per_query_reference(x, labels, is_query, is_gallery, ks, curvature=0.0):
    """One query at a time, float64: ``(per-query metrics dict of arrays, R per query)``.

    Recall@K counts the wrong gallery rows at least as similar as the best correct one (a tie
    counts against the query); the top-R list breaks ties by gallery position, as documented.
    ``curvature > 0``: the rows are points of that Poincaré ball, ranked by −distance.
    """
    x = np.asarray(x, np.float64)
    if not curvature:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    query_rows, gallery_rows = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    rows = {f"recall@{k}": [] for k in ks} | {"precision@1": [], "r_precision": [], "map@r": []}
    num_relevant = []
    for q in query_rows:
        candidates = np.array([g for g in gallery_rows if g != q], int)
        similarity = poincare_similarity(x, candidates, q, curvature) if curvature else x[candidates] @ x[q]
        correct = labels[candidates] == labels[q]
        r = int(correct.sum())
        num_relevant.append(r)
        if r == 0:
            for values in rows.values():
                values.append(0.0)
            continue
        rank = int(np.sum(~correct & (similarity >= similarity[correct].max())))
        for k in ks:
            rows[f"recall@{k}"].append(float(rank < k))
        order = sorted(range(len(candidates)), key=lambda t: (-similarity[t], t))
        relevant = correct[order]
        rows["precision@1"].append(float(relevant[0]))
        rows["r_precision"].append(float(relevant[:r].sum()) / r)
        hits = np.cumsum(relevant[:r])
        rows["map@r"].append(float(np.sum(hits / np.arange(1, r + 1) * relevant[:r])) / r)
    return {name: np.array(values) for name, values in rows.items()}, np.array(num_relevant)


def reference_means(per_query, num_relevant, unmatched_queries):
    scored = num_relevant > 0 if unmatched_queries == "skip" else np.ones(len(num_relevant), bool)
    count = max(int(scored.sum()), 1)
    return {name: float(values[scored].sum() / count) for name, values in per_query.items()}


def case_arrays(name):
    case = OML["cases"][name]
    return (
        np.array(case["embeddings"], np.float32),
        np.array(case["labels"]),
        np.array(case["is_query"]),
        np.array(case["is_gallery"]),
    )


def assert_same_metrics(actual, expected, num_queries, num_gallery):
    """Equal ranks give equal metrics up to float64 round-off of sums of at most Q·G terms ≤ 1."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], n_terms=num_queries * num_gallery, scale=1.0, err_msg=name)


@pytest.mark.parametrize("name", sorted(OML["cases"]))
@pytest.mark.parametrize("unmatched_queries", ["skip", "miss"])
def test_open_metric_learnings_own_results(name, unmatched_queries):
    x, labels, is_query, is_gallery = case_arrays(name)
    oml = OML["cases"][name]["oml"]
    num_relevant = np.array(oml["num_relevant"])
    ours = metrics.retrieval_metrics(
        x, labels, is_query=is_query, is_gallery=is_gallery, ks=KS, unmatched_queries=unmatched_queries
    )
    # OML keeps a query without a relevant gallery row and scores it 0 ("miss"); "skip" is OML's
    # per-query scores averaged over the other queries.
    scored = num_relevant > 0 if unmatched_queries == "skip" else np.ones(len(num_relevant), bool)
    q, g = int(is_query.sum()), int(is_gallery.sum())
    for k in KS:
        expected = float(np.mean(np.array(oml["per_query"][f"cmc@{k}"])[scored]))
        assert_close(ours[f"recall@{k}"], expected, n_terms=q, scale=1.0, err_msg=f"{name} recall@{k}")
    if unmatched_queries == "miss":  # OML's own mean, in float32
        assert_close(ours["recall@1"], oml["mean"]["cmc@1"], n_terms=q, scale=1.0, eps=F32)
    # OML's precision@1 of a query with nothing to find is 0/0 = NaN; "miss" scores it 0.
    precision = np.array(oml["per_query"]["precision@1"], float)
    assert np.array_equal(np.isnan(precision), num_relevant == 0)
    expected = float(np.mean(np.nan_to_num(precision, nan=0.0)[scored]))
    assert_close(ours["precision@1"], expected, n_terms=q, scale=1.0)
    # MAP@R and R-Precision from OML's ranking (its retrieved gallery positions) and its R.
    gallery_labels = labels[is_gallery]
    query_labels = labels[is_query]
    average_precision, r_precision = [], []
    for i, retrieved in enumerate(oml["retrieved"]):
        r = num_relevant[i]
        relevant = gallery_labels[np.array(retrieved[:r], int)] == query_labels[i] if r else np.zeros(0, bool)
        hits = np.cumsum(relevant)
        average_precision.append(float(np.sum(hits / np.arange(1, r + 1) * relevant)) / r if r else 0.0)
        r_precision.append(float(relevant.sum()) / r if r else 0.0)
    count = max(int(scored.sum()), 1)
    assert_close(ours["map@r"], sum(average_precision) / count, n_terms=q * g, scale=1.0)
    assert_close(ours["r_precision"], sum(r_precision) / count, n_terms=q * g, scale=1.0)
    unmatched, queries = metrics.count_unmatched_queries(labels, is_query, is_gallery)
    assert (unmatched, queries) == (int(np.sum(num_relevant == 0)), len(num_relevant))


def test_the_fixture_holds_every_mix():
    roles = {}
    for name in OML["cases"]:
        _, _, is_query, is_gallery = case_arrays(name)
        roles[name] = {
            "both": int(np.sum(is_query & is_gallery)),
            "query only": int(np.sum(is_query & ~is_gallery)),
            "gallery only": int(np.sum(~is_query & is_gallery)),
            "unmatched": int(np.sum(np.array(OML["cases"][name]["oml"]["num_relevant"]) == 0)),
        }
    assert roles["all_both"]["query only"] == roles["all_both"]["gallery only"] == 0
    assert roles["all_split"]["both"] == 0
    assert all(roles["mixed"][kind] > 0 for kind in ("both", "query only", "gallery only"))
    assert roles["unmatched_queries"]["unmatched"] >= 2
    x, _, _, _ = case_arrays("ties")
    assert len(np.unique(x, axis=0)) == len(x) // 2  # every vector twice


def _signs(rng, labels, dim=16, flips=3):
    """±1 vectors near their class's: unit rows are ±1/4, so every cosine is a multiple of 1/16,
    exact in float32 and float64 alike, and many tie across classes."""
    base = rng.choice([-1.0, 1.0], size=(100, dim))[labels]
    flip = rng.integers(0, dim, size=(labels.size, flips))
    np.put_along_axis(base, flip, -np.take_along_axis(base, flip, axis=1), axis=1)
    return base.astype(np.float32)


def _mixed_roles(rng, n, p_both=0.5):
    role = rng.choice(3, size=n, p=[p_both, (1 - p_both) / 2, (1 - p_both) / 2])
    return role != 2, role != 1


@pytest.mark.parametrize(
    "kind, p_both", [("gaussian", 0.5), ("gaussian", 0.0), ("gaussian", 1.0), ("signs", 0.5), ("signs", 0.2)]
)
@pytest.mark.parametrize("unmatched_queries", ["skip", "miss"])
def test_per_query_reference(kind, p_both, unmatched_queries):
    rng = np.random.default_rng([len(kind), round(10 * p_both)])
    labels = rng.integers(0, 25, 240)
    labels[0] = 99  # a class of one row: a query that can only find itself (unmatched)
    if kind == "signs":  # cross-class ties: the tie rules decide
        x = _signs(rng, labels)
    else:
        x = (rng.normal(size=(100, 12))[labels] + 1.2 * rng.normal(size=(240, 12))).astype(np.float32)
    is_query, is_gallery = _mixed_roles(rng, 240, p_both)
    is_query[0] = is_gallery[0] = True
    if p_both < 1.0:  # class 24: queries only (unmatched too)
        is_query[labels == 24], is_gallery[labels == 24] = True, False
    ks = (1, 2, 4, 8, 100)
    ours = metrics.retrieval_metrics(
        x, labels, is_query=is_query, is_gallery=is_gallery, ks=ks, unmatched_queries=unmatched_queries
    )
    per_query, num_relevant = per_query_reference(x, labels, is_query, is_gallery, ks)
    assert np.sum(num_relevant == 0) >= 1 + (p_both < 1.0)
    expected = reference_means(per_query, num_relevant, unmatched_queries)
    assert_same_metrics(ours, expected, int(is_query.sum()), int(is_gallery.sum()))
    # Small chunks (the last one overlapping) and the separate-reference form agree exactly.
    assert (
        metrics.retrieval_metrics(
            x,
            labels,
            is_query=is_query,
            is_gallery=is_gallery,
            ks=ks,
            unmatched_queries=unmatched_queries,
            chunk_size=7,
        )
        == ours
    )


def test_flags_reduce_to_the_two_classic_forms_exactly():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 20, 200)
    x = (rng.normal(size=(20, 8))[labels] + rng.normal(size=(200, 8))).astype(np.float32)
    every = np.ones(200, bool)
    assert metrics.retrieval_metrics(
        x, labels, is_query=every, is_gallery=every
    ) == metrics.retrieval_metrics(x, labels)
    is_query = rng.random(200) < 0.4
    assert metrics.retrieval_metrics(
        x, labels, is_query=is_query, is_gallery=~is_query
    ) == metrics.retrieval_metrics(x[is_query], labels[is_query], x[~is_query], labels[~is_query])


def test_a_query_outside_a_one_class_gallery_is_perfect():
    # Every gallery row is of the query's class: R = N, more than any top-R list holds.
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    is_query = np.array([True, True, False, True, False])
    is_gallery = np.array([False, True, True, False, False])
    result = metrics.retrieval_metrics(x, labels, is_query=is_query, is_gallery=is_gallery, ks=(1,))
    per_query, num_relevant = per_query_reference(x, labels, is_query, is_gallery, (1,))
    assert num_relevant.tolist() == [2, 1, 0]
    assert result == reference_means(per_query, num_relevant, "skip")
    assert result["map@r"] == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"is_query": np.ones(3, bool)}, r"is_query must be a \(4,\) bool array"),
        ({"is_gallery": np.ones(4, int)}, "is_gallery must be a"),
        ({"unmatched_queries": "drop"}, "unmatched_queries must be one of"),
        ({"is_query": np.zeros(4, bool)}, "at least one query"),
    ],
)
def test_flag_errors(kwargs, message):
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        metrics.retrieval_metrics(x, np.array([0, 0, 1, 1]), **kwargs)


def test_flags_with_a_separate_reference_set_are_refused():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="flag the rows of one embedding set"):
        metrics.retrieval_metrics(x, np.arange(4), x, np.arange(4), is_query=np.ones(4, bool))


@pytest.mark.parametrize(
    "kind, p_both", [("gaussian", 1.0), ("gaussian", 0.5), ("lattice", 1.0), ("lattice", 0.3)]
)
def test_poincare_ranking_equals_a_per_query_reference(kind, p_both):
    """``distance="poincare"``: ranked by the ball's distance (which differs from the cosine
    ranking here: the norms vary), equal to the float64 loop. Lattice points (coordinates in
    eighths, c = 1/4: every product, norm and Möbius coefficient exact in float32) repeat across
    classes, so exact ties occur and the tie rules decide."""
    rng = np.random.default_rng([len(kind), round(10 * p_both)])
    labels = rng.integers(0, 20, 200)
    if kind == "lattice":
        c = 0.25
        points = rng.integers(-2, 3, size=(40, 8)) / 8
        x = points[rng.integers(0, 40, 200)].astype(np.float32)
    else:
        c = 0.1
        centres = rng.normal(size=(20, 12))[labels]
        x = centres + rng.normal(size=(200, 12))
        x = (
            x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.1, 0.95, (200, 1)) / np.sqrt(c)
        ).astype(np.float32)
    is_query, is_gallery = _mixed_roles(rng, 200, p_both)
    ks = (1, 2, 4, 8)
    flags = {} if p_both == 1.0 else {"is_query": is_query, "is_gallery": is_gallery}
    if p_both == 1.0:
        is_query = is_gallery = np.ones(200, bool)
    ours = metrics.retrieval_metrics(x, labels, ks=ks, distance="poincare", curvature=c, **flags)
    per_query, num_relevant = per_query_reference(x, labels, is_query, is_gallery, ks, curvature=c)
    assert_same_metrics(
        ours, reference_means(per_query, num_relevant, "skip"), int(is_query.sum()), int(is_gallery.sum())
    )
    if kind == "gaussian":
        assert ours != metrics.retrieval_metrics(x, labels, ks=ks, **flags)  # not the cosine ranking
    assert (
        metrics.retrieval_metrics(x, labels, ks=ks, distance="poincare", curvature=c, chunk_size=7, **flags)
        == ours
    )
    mesh = jax.make_mesh((1,), ("refs",), devices=jax.devices()[:1])
    assert (
        metrics.retrieval_metrics(x, labels, ks=ks, distance="poincare", curvature=c, mesh=mesh, **flags)
        == ours
    )


def test_poincare_arguments_are_checked():
    x = np.full((4, 3), 0.5, np.float32)
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="needs a curvature"):
        metrics.retrieval_metrics(x, labels, distance="poincare")
    with pytest.raises(ValueError, match=r"not points of the Poincaré ball of curvature 4\.0"):
        metrics.retrieval_metrics(x, labels, distance="poincare", curvature=4.0)
    with pytest.raises(ValueError, match="distance must be one of"):
        metrics.retrieval_metrics(x, labels, distance="euclid")
    with pytest.raises(ValueError, match="applies to distance='poincare' only"):
        metrics.retrieval_metrics(x, labels, curvature=0.1)
