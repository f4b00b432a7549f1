"""Retrieval metrics, NMI and k-means against slow per-query references."""

from __future__ import annotations

import math
import pickle

import jax
import numpy as np
import pytest

from hdml_jax.evaluation import cluster, evaluate, metrics, retrieval_kernels
from tests.numerics import assert_close, rounding_atol
from tests.simulated_devices import run_on_eight_devices


def reference_retrieval(
    query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8), unmatched_queries="skip"
):
    """One query at a time: rank every reference by cosine similarity, then count. A query with no
    reference of its class (R = 0) is left out (``"skip"``) or scored 0 (``"miss"``)."""
    self_retrieval = reference is None
    if self_retrieval:
        reference, reference_labels = query, query_labels
    recalls = {k: 0.0 for k in ks}
    precision_at_1 = r_precision = average_precision = 0.0
    scored = 0
    for i in range(len(query)):
        q = query[i] / np.linalg.norm(query[i])
        candidates = [j for j in range(len(reference)) if not (self_retrieval and j == i)]
        sims = [float(q @ (reference[j] / np.linalg.norm(reference[j]))) for j in candidates]
        order = sorted(range(len(candidates)), key=lambda t: -sims[t])
        ranked_relevant = [reference_labels[candidates[t]] == query_labels[i] for t in order]
        for k in ks:
            if any(ranked_relevant[:k]):
                recalls[k] += 1
        r = sum(ranked_relevant)
        if r == 0:
            scored += unmatched_queries == "miss"
            continue
        scored += 1
        precision_at_1 += ranked_relevant[0]
        r_precision += sum(ranked_relevant[:r]) / r
        hits, ap = 0, 0.0
        for position in range(1, r + 1):
            if ranked_relevant[position - 1]:
                hits += 1
                ap += hits / position
        average_precision += ap / r
    result = {f"recall@{k}": recalls[k] / max(scored, 1) for k in ks}
    result["precision@1"] = precision_at_1 / max(scored, 1)
    result["r_precision"] = r_precision / max(scored, 1)
    result["map@r"] = average_precision / max(scored, 1)
    return result


def clustered_data(seed, num_points, num_classes, dim, noise):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_points)
    centres = rng.normal(size=(num_classes, dim))
    return (centres[labels] + noise * rng.normal(size=(num_points, dim))).astype(np.float32), labels


def assert_metrics_close(actual, expected, *, queries: int, references: int):
    """The same ranks give the same metrics up to float64 round-off: both sides sum terms of at most
    1 (fractions of hits) over at most every (query, reference) pair. (A rank that differs is no
    round-off: it moves a metric by at least 1 / (queries · references³), far more.)"""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert isinstance(actual[name], float)
        assert_close(actual[name], expected[name], n_terms=queries * references, scale=1.0, err_msg=name)


@pytest.mark.parametrize("seed, noise", [(0, 0.5), (1, 1.5), (2, 4.0)])
def test_self_retrieval_matches_reference(seed, noise):
    x, y = clustered_data(seed, 300, 30, 16, noise)
    ks = (1, 2, 4, 8, 16)
    assert_metrics_close(
        metrics.retrieval_metrics(x, y, ks=ks), reference_retrieval(x, y, ks=ks), queries=300, references=300
    )


def test_query_gallery_matches_reference():
    x, y = clustered_data(3, 400, 25, 8, 1.0)
    query, gallery = (x[:150], y[:150]), (x[150:], y[150:])
    ks = (1, 10, 20, 30, 40, 50)
    assert_metrics_close(
        metrics.retrieval_metrics(*query, *gallery, ks=ks),
        reference_retrieval(*query, *gallery, ks=ks),
        queries=150,
        references=250,
    )


def test_chunk_size_does_not_change_the_result():
    x, y = clustered_data(4, 257, 20, 8, 1.0)
    whole = metrics.retrieval_metrics(x, y, ks=(1, 5))
    for chunk_size in (1, 7, 64, 1000):
        chunked = metrics.retrieval_metrics(x, y, ks=(1, 5), chunk_size=chunk_size)
        assert_metrics_close(chunked, whole, queries=257, references=257)


def pair_classes(seed, num_points, dim, noise):
    """Classes of 2-3 points: top-R stays small, so big sets take the grouped top-k path."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_points), rng.integers(2, 4, num_points))[:num_points]
    centres = rng.normal(size=(num_points, dim))
    return (centres[labels] + noise * rng.normal(size=(num_points, dim))).astype(np.float32), labels


@pytest.mark.parametrize("gallery", [False, True])
def test_large_reference_set_matches_reference(gallery):
    # 1,000 references = 16 groups of 64 columns: the grouped top-k and the padded columns
    # (1,024 - 1,000) are exercised against the one-query-at-a-time reference.
    x, y = pair_classes(12, 1100 if gallery else 1000, 8, 0.8)
    args = (x[:100], y[:100], x[100:], y[100:]) if gallery else (x, y)
    ks = (1, 2, 10, 100)
    queries, references = len(args[0]), len(args[-2])
    got, want = metrics.retrieval_metrics(*args, ks=ks), reference_retrieval(*args, ks=ks)
    assert_metrics_close(got, want, queries=queries, references=references)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_grouped_top_k_equals_top_k_with_ties(k):
    # Every value twice, scattered: ties across groups, which must still go to the lower index.
    rng = np.random.default_rng(k)
    rows = [rng.permutation(np.arange(64 * 40) // 2) - 10_000 for _ in range(9)]
    similarity = np.stack(rows).astype(np.float32)
    similarity[:, -5:] = 0  # padding columns (zero references), above every entry of the row
    num_valid = 64 * 40 - 5
    maxima, _ = retrieval_kernels.group_max_and_count(similarity, np.zeros(9, np.float32), num_valid, 1)
    values, columns = jax.jit(retrieval_kernels.top_k, static_argnames="k")(
        similarity, maxima, k=k, num_valid=num_valid
    )
    expected_values, expected_columns = jax.lax.top_k(similarity[:, :num_valid], k)
    np.testing.assert_array_equal(columns, expected_columns)
    np.testing.assert_array_equal(values, expected_values)


def test_group_max_and_count_equal_a_plain_count_and_max():
    rng = np.random.default_rng(13)
    similarity = rng.integers(-3, 4, (7, 64 * 5)).astype(np.float32)
    threshold = rng.integers(-4, 5, 7).astype(np.float32)
    num_valid = 64 * 3 + 9  # the last two groups hold padding (zeros), which no result may see
    similarity[:, num_valid:] = 0
    maxima, counts = retrieval_kernels.group_max_and_count(similarity, threshold, num_valid, 2)
    padded = np.where(np.arange(64 * 5) < num_valid, similarity, -np.inf)
    np.testing.assert_array_equal(counts, (padded >= threshold[:, None]).sum(axis=1))
    np.testing.assert_array_equal(maxima, padded.reshape(7, 5, 64).max(axis=2))


def test_negative_best_similarities_with_padding_columns_match_reference():
    # Each class is a pair of nearly opposite vectors, so the best correct similarity is near -1
    # and below the zeros of the padding columns (100 references: 28 of them in the last group).
    rng = np.random.default_rng(20)
    centres = rng.normal(size=(50, 6))
    x = np.concatenate([centres, -centres + 0.3 * rng.normal(size=(50, 6))]).astype(np.float32)
    y = np.concatenate([np.arange(50), np.arange(50)])
    ks = (1, 10, 50, 99)
    result = metrics.retrieval_metrics(x, y, ks=ks)
    assert_metrics_close(result, reference_retrieval(x, y, ks=ks), queries=100, references=100)
    assert result["recall@50"] < 0.5 < result["recall@99"]  # ranks far down the list, all counted


def test_sharded_path_on_a_one_device_mesh_and_its_argument_errors():
    x, y = clustered_data(21, 150, 12, 8, 1.0)
    mesh = jax.make_mesh((1,), ("references",))
    for args in ((x, y), (x[:50], y[:50], x[50:], y[50:])):
        assert metrics.retrieval_metrics(*args, mesh=mesh) == metrics.retrieval_metrics(*args)
    with pytest.raises(ValueError, match=r"mesh must be a 1-D jax.sharding.Mesh"):
        metrics.retrieval_metrics(x, y, mesh=jax.make_mesh((1, 1), ("a", "b")))
    with pytest.raises(ValueError, match=r"mesh must be a 1-D jax.sharding.Mesh"):
        metrics.retrieval_metrics(x, y, mesh="references")
    x[3, 1] = np.nan
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"1 of 150 embedding rows"):
        metrics.retrieval_metrics(x, y, mesh=mesh)
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"1 of 100 reference embedding rows"):
        metrics.retrieval_metrics(x[100:], y[100:], x[:100], y[:100], mesh=mesh)
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"1 of 100 query embedding rows"):
        metrics.retrieval_metrics(x[:100], y[:100], x[100:], y[100:], mesh=mesh)


def test_references_sharded_over_eight_devices_give_the_single_device_metrics():
    report = run_on_eight_devices("retrieval_sharding_check")
    assert len(report) == 10
    for name, case in report.items():
        assert case["sharded"] == case["single"], name  # exactly, every metric
        assert 0 < case["single"]["map@r"] < 1, name  # neither trivial nor degenerate


def test_self_is_excluded_by_index_not_by_value():
    # Two identical vectors of one class: each must find the other, never itself.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    y = np.array([0, 0, 1, 1])
    result = metrics.retrieval_metrics(x, y, ks=(1,))
    assert result["recall@1"] == 1.0 and result["map@r"] == 1.0


@pytest.mark.parametrize("unmatched_queries", ["skip", "miss"])
def test_lone_queries_are_left_out_or_scored_as_misses(unmatched_queries):
    x, y = clustered_data(5, 60, 6, 64, 0.3)
    x[0] = np.random.default_rng(5).normal(size=64)  # a class of its own, away from the others
    y = y.copy()
    y[0] = 99
    result = metrics.retrieval_metrics(x, y, ks=(1, 4), unmatched_queries=unmatched_queries)
    expected = reference_retrieval(x, y, ks=(1, 4), unmatched_queries=unmatched_queries)
    assert_metrics_close(result, expected, queries=60, references=60)
    # Well separated: every scored query is perfect; the lone one is left out, or a miss.
    perfect = 1.0 if unmatched_queries == "skip" else 59 / 60
    for name in ("recall@4", "map@r"):
        assert_close(result[name], perfect, n_terms=60 * 60, scale=1.0, err_msg=name)
    assert metrics.count_unmatched_queries(y) == (1, 60)


def test_large_k_beyond_the_reference_set():
    x, y = clustered_data(6, 50, 5, 4, 3.0)
    result = metrics.retrieval_metrics(x, y, ks=(1, 49, 1000))
    assert result["recall@49"] == 1.0 and result["recall@1000"] == 1.0


def test_known_values_on_a_hand_built_case():
    # Query 0 (label 0): nearest are 1 (label 1), then 2 (label 0), then 3 (label 0).
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.0, 1.0]], np.float32)
    y = np.array([0, 1, 0, 0])
    q = metrics.retrieval_metrics(x[:1], y[:1], x[1:], y[1:], ks=(1, 2))
    assert q["recall@1"] == 0.0 and q["recall@2"] == 1.0
    # R = 2; relevant at positions 2 and 3: only position 2 counts, P@2 = 1/2, MAP@R = (1/2)/2
    # (binary fractions: exact).
    assert q["r_precision"] == 0.5
    assert q["map@r"] == 0.25
    assert q["precision@1"] == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: metrics.retrieval_metrics(x, y, x), "together"),
        (lambda x, y: metrics.retrieval_metrics(x, y[:-1]), "one label per embedding"),
        (lambda x, y: metrics.retrieval_metrics(x, y, x[:, :2], y), "dim"),
        (lambda x, y: metrics.retrieval_metrics(x, y, ks=(0,)), "positive"),
        (lambda x, y: metrics.retrieval_metrics(x[0], y), r"\(num, dim\)"),
        (
            lambda x, y: metrics.retrieval_metrics(x, y, chunk_size=0),
            r"chunk_size must be a positive integer",
        ),
        (lambda x, y: metrics.retrieval_metrics(x, y, chunk_size=-4), r"chunk_size .* got -4"),
        (lambda x, y: metrics.retrieval_metrics(x, y, chunk_size=2.5), r"chunk_size .* got 2.5"),
        (
            lambda x, y: metrics.retrieval_metrics(x, y.astype(str)),
            r"query_labels must be integer .* dtype <U",
        ),
        (lambda x, y: metrics.retrieval_metrics(x, y.astype(np.float32)), r"must be integer .* float32"),
        (
            lambda x, y: metrics.retrieval_metrics(x, y, x, y.astype(object)),
            r"reference_labels must be integer",
        ),
    ],
)
def test_retrieval_errors(call, message):
    x, y = clustered_data(7, 20, 4, 4, 1.0)
    with pytest.raises(ValueError, match=message):
        call(x, y)


def reference_nmi(a, b):
    """NMI from its definition, one cluster pair at a time."""
    n = len(a)
    mi = 0.0
    for u in set(a):
        for v in set(b):
            n_uv = sum(1 for i in range(n) if a[i] == u and b[i] == v)
            if n_uv:
                n_u, n_v = sum(1 for t in a if t == u), sum(1 for t in b if t == v)
                mi += n_uv / n * math.log(n * n_uv / (n_u * n_v))

    def entropy(labels):
        return -sum(c / n * math.log(c / n) for c in (list(labels).count(t) for t in set(labels)))

    return mi / ((entropy(a) + entropy(b)) / 2)


def test_normalized_mutual_info_matches_definition():
    # float64 on both sides: MI sums n_uv/n·log(n·n_uv / (n_u·n_v)) over the 5 × 7 cells, terms of at
    # most 2·log(n²) in all, over a mean entropy above 1 (5 and 7 clusters of 80 points).
    tolerance = {"n_terms": 5 * 7, "scale": 4 * math.log(80)}
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 5, 80), rng.integers(0, 7, 80)
        assert_close(cluster.normalized_mutual_info(a, b), reference_nmi(a.tolist(), b.tolist()), **tolerance)
    a = rng.integers(0, 5, 80)
    assert_close(cluster.normalized_mutual_info(a, (a + 3) * 7), 1.0, **tolerance)


def test_nmi_is_one_for_separated_clusters_and_low_for_noise():
    x, y = clustered_data(8, 400, 10, 32, 0.05)
    # The true partition, up to float64 round-off over 10 × 10 cells of 400 points.
    assert_close(metrics.nmi(x, y, jax.random.PRNGKey(0)), 1.0, n_terms=10 * 10, scale=4 * math.log(400))
    noise = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    assert metrics.nmi(noise, y, jax.random.PRNGKey(0)) < 0.3


def test_kmeans_recovers_well_separated_clusters():
    x, y = clustered_data(10, 600, 12, 8, 0.02)
    x = x * 10
    centroids, assignments = cluster.kmeans(jax.random.PRNGKey(1), x, 12)
    assignments = np.asarray(assignments)
    assert centroids.shape == (12, 8) and assignments.shape == (600,)
    # A bijection between true classes and clusters.
    for label in range(12):
        assert len(set(assignments[y == label])) == 1
    assert len(set(assignments)) == 12
    # Centroids are the cluster means: float32 sums over the 600 points (a segment sum), entries up
    # to max|x|.
    scale = float(np.max(np.abs(x)))
    for k in range(12):
        want = x[assignments == k].astype(np.float64).mean(0)
        assert_close(np.asarray(centroids[k]), want, n_terms=len(x), scale=scale, err_msg=f"cluster {k}")


def test_kmeans_is_deterministic_and_leaves_no_cluster_empty():
    rng = np.random.default_rng(11)
    points = rng.normal(size=(120, 3)).astype(np.float32)
    for seed in range(3):
        a1 = np.asarray(cluster.kmeans(jax.random.PRNGKey(seed), points, 100)[1])
        a2 = np.asarray(cluster.kmeans(jax.random.PRNGKey(seed), points, 100)[1])
        np.testing.assert_array_equal(a1, a2)
        assert np.bincount(a1, minlength=100).min() >= 1
    # Even when all points coincide, every cluster gets one.
    same = np.zeros((20, 3), np.float32)
    assert np.bincount(np.asarray(cluster.kmeans(jax.random.PRNGKey(0), same, 7)[1]), minlength=7).min() == 1


def test_kmeans_objective_is_no_worse_than_its_seeding():
    x, _ = clustered_data(12, 500, 8, 4, 1.0)
    key = jax.random.PRNGKey(3)
    seeds = np.asarray(cluster._kmeans_plus_plus(key, jax.numpy.asarray(x), 8))
    _, final_assign = cluster.kmeans(key, x, 8)
    seeded_cost = ((x[:, None, :] - seeds[None]) ** 2).sum(-1).min(1).sum()
    final_assign = np.asarray(final_assign)
    final_cost = sum(((x[final_assign == k] - x[final_assign == k].mean(0)) ** 2).sum() for k in range(8))
    # Both costs are float32 sums of the 500 × 4 squared differences, in other orders.
    assert final_cost <= seeded_cost + rounding_atol(seeded_cost, x.size, eps=float(np.finfo(np.float32).eps))


def test_kmeans_errors():
    with pytest.raises(ValueError, match="num_clusters"):
        cluster.kmeans(jax.random.PRNGKey(0), np.zeros((5, 2)), 6)
    with pytest.raises(ValueError, match="num_points, dim"):
        cluster.kmeans(jax.random.PRNGKey(0), np.zeros(5), 2)


# ---------------------------------------------------------------------------- non-finite embeddings


def test_all_nan_embeddings_raise_instead_of_scoring_one():
    # NaN similarities compare false with everything: all-NaN embeddings used to score Recall@K = 1.
    _, y = clustered_data(14, 20, 4, 4, 1.0)
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"20 of 20 embedding rows .* diverged"):
        metrics.retrieval_metrics(np.full((20, 4), np.nan, np.float32), y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["self", "query", "reference"])
def test_one_non_finite_row_raises_and_says_how_many(bad, where):
    # Noise embeddings of 10 classes score Recall@1 near 0.1; one NaN row used to lift it to 0.2.
    clean, y = clustered_data(15, 20, 10, 4, 10.0)
    x = clean.copy()
    x[7, 2] = bad
    if where == "self":
        call, match = (lambda: metrics.retrieval_metrics(x, y)), r"1 of 20 embedding rows"
    elif where == "query":
        call, match = (lambda: metrics.retrieval_metrics(x, y, clean, y)), r"1 of 20 query embedding rows"
    else:
        call, match = (lambda: metrics.retrieval_metrics(clean, y, x, y)), r"1 of 20 reference embedding rows"
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=match) as info:
        call()
    assert (info.value.num_non_finite, info.value.num_rows) == (1, 20)
    assert isinstance(info.value, ValueError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.num_non_finite == 1


def test_nmi_and_kmeans_raise_on_non_finite_input():
    x, y = clustered_data(16, 20, 4, 4, 1.0)
    x[3] = np.nan
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"1 of 20 embedding rows"):
        metrics.nmi(x, y, jax.random.PRNGKey(0))
    x[5, 0] = np.inf
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"2 of 20 k-means point rows"):
        cluster.kmeans(jax.random.PRNGKey(0), x, 4)


def test_kmeans_argument_errors():
    points = np.zeros((6, 2), np.float32)
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1, got 0"):
        cluster.kmeans(jax.random.PRNGKey(0), points, 2, block_size=0)
    with pytest.raises(ValueError, match=r"num_iters must be an integer >= 0"):
        cluster.kmeans(jax.random.PRNGKey(0), points, 2, num_iters=-1)
    with pytest.raises(ValueError, match=r"tol must be a number >= 0"):
        cluster.kmeans(jax.random.PRNGKey(0), points, 2, tol=float("nan"))


def test_metrics_refuse_traced_arguments():
    x, y = clustered_data(17, 8, 2, 4, 1.0)
    with pytest.raises(TypeError, match=r"outside jax.jit"):
        jax.jit(lambda a: metrics.retrieval_metrics(a, y))(x)
    with pytest.raises(TypeError, match=r"outside jax.jit"):
        jax.jit(lambda a: metrics.nmi(a, y, jax.random.PRNGKey(0)))(x)


@pytest.mark.parametrize("row", [1, 8])  # a query row, a gallery row
def test_evaluate_embeddings_raises_before_scoring(monkeypatch, row):
    from hdml_jax.data.base import MetricDataset, Split

    def never(*args, **kwargs):
        raise AssertionError("scored non-finite embeddings")

    monkeypatch.setattr(metrics, "retrieval_metrics", never)
    monkeypatch.setattr(metrics, "nmi", never)
    x, y = clustered_data(18, 12, 3, 4, 1.0)
    test = Split(source=[{}] * 12, labels=y)
    is_query = np.arange(12) < 6
    dataset = MetricDataset("tiny", test, test, recall_ks=(1, 2), is_query=is_query, is_gallery=~is_query)
    x[row] = np.nan
    with pytest.raises(metrics.NonFiniteEmbeddingsError, match=r"1 of 12 test embedding rows"):
        evaluate.evaluate_embeddings(dataset, x, nmi_key=jax.random.PRNGKey(0))


def test_huge_embeddings_score_as_their_directions():
    # Rows scaled by powers of two up to 2^120: ‖x‖² overflowed past ~1.8e19 and such rows were
    # normalised to 0. The directions, hence every metric, are exactly those of the unscaled rows.
    x, y = clustered_data(4, 257, 20, 8, 1.0)  # the shape of test_chunk_size_does_not_change_the_result
    scales = 2.0 ** np.random.default_rng(19).choice([0, 64, 100, 120], size=(257, 1))
    huge = metrics.retrieval_metrics(x * scales.astype(np.float32), y, ks=(1, 5))
    assert_metrics_close(huge, metrics.retrieval_metrics(x, y, ks=(1, 5)), queries=257, references=257)
    assert_metrics_close(huge, reference_retrieval(x, y, ks=(1, 5)), queries=257, references=257)
