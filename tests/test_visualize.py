"""The pictures: every series visible and labelled, legends off the data, one look per class,
counts and scores written out.

The figures are inspected through their matplotlib artists (Agg backend, nothing compiled: the
t-SNE figure is drawn from given 2-D points).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import pytest
from PIL import Image

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.evaluation import visualize
from hdml_jax.inference import search
from hdml_jax.training import outputs

METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r", "nmi")


def _write_metrics(path: Path, terms: dict[str, float], resume_from: int | None = 60) -> None:
    """Train records every 10 steps, evaluations every 40; a resume from ``resume_from`` writes
    the later steps again with other values (the ones to keep)."""
    records = []

    def run(steps, shift):
        for step in steps:
            loss = 2.0 / (1 + step / 50) + shift
            records.append(
                {"kind": "train", "step": step, "epoch": step / 40, "loss": loss, "lr": 0.1, "grad_norm": 1.0}
                | {name: scale * loss for name, scale in terms.items()}
            )
            if step % 40 == 0:
                r1 = 0.3 + step / 400 + shift
                values = {"recall@1": r1, "recall@2": r1 + 0.05, "recall@4": r1 + 0.1, "recall@8": r1 + 0.15}
                values |= {"precision@1": r1, "r_precision": r1 - 0.2, "map@r": r1 - 0.25, "nmi": 0.5 + shift}
                records.append({"kind": "eval", "step": step, "epoch": step / 40, **values})

    run(range(10, 110, 10), 0.0)
    if resume_from is not None:
        run(range(resume_from + 10, 170, 10), 0.01)
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st'
    )  # torn last line


@pytest.fixture
def hpl_curves(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", {"fine": 0.9})
    fig = visualize.curves_figure(tmp_path / "metrics.jsonl")
    yield fig
    plt.close(fig)


def _style(line) -> tuple:
    return (matplotlib.colors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker())


def _outside(legend, ax) -> bool:
    """The legend's box does not overlap the axes' box (after the figure was drawn)."""
    box, frame = legend.get_window_extent(), ax.get_window_extent()
    return box.x0 >= frame.x1 or box.x1 <= frame.x0 or box.y0 >= frame.y1 or box.y1 <= frame.y0


def test_every_metric_is_drawn_in_its_own_style(hpl_curves):
    _, ax_eval = hpl_curves.axes
    lines = {line.get_label(): line for line in ax_eval.get_lines()}
    assert set(lines) == {*METRICS[:4], "precision@1 (= recall@1)", *METRICS[5:]}
    assert len({_style(line) for line in lines.values()}) == len(lines)
    # precision@1 equals recall@1 here: markers only, so the recall@1 line under it stays visible.
    duplicate, original = lines["precision@1 (= recall@1)"], lines["recall@1"]
    assert duplicate.get_linestyle() == "None" and original.get_linestyle() == "-"
    np.testing.assert_allclose(duplicate.get_ydata(), original.get_ydata())
    assert duplicate.get_marker() != original.get_marker()


def test_legends_are_compact_and_under_the_axes(hpl_curves):
    """Off the data, under each panel (below its x label), so the two plots get the width."""
    hpl_curves.canvas.draw()
    width = hpl_curves.get_window_extent().width
    for ax in hpl_curves.axes:
        legend, frame = ax.get_legend(), ax.get_window_extent()
        assert legend is not None and _outside(legend, ax)
        box = legend.get_window_extent()
        assert box.y1 <= ax.xaxis.label.get_window_extent().y0 and box.y1 <= frame.y0
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1  # within the panel's width
        assert box.height < 0.2 * hpl_curves.get_window_extent().height  # two rows at most
    assert sum(ax.get_window_extent().width for ax in hpl_curves.axes) > 0.85 * width


def _math_free(label: str) -> str:
    """``label`` without its mathtext (``$...$``) parts: what matplotlib prints as plain text."""
    return re.sub(r"\$[^$]*\$", "", label)


def test_loss_terms_are_explained(hpl_curves, tmp_path):
    labels = [line.get_label() for line in hpl_curves.axes[0].get_lines()]
    assert labels == [visualize.HPL_TOTAL_LABEL, visualize.LOSS_TERM_LABELS["fine"]]
    assert _math_free(labels[0]).strip() == "weighted total" and "Sigma_l" in labels[0]
    assert _math_free(labels[1]) == "fine level  (unweighted)" and "$L_0$" in labels[1]
    hpl_curves.canvas.draw()  # mathtext that does not parse raises here
    texts = [t.get_text() for t in hpl_curves.axes[0].get_legend().get_texts()]
    assert texts == labels and not any("_" in _math_free(t) for t in texts)  # no raw formulae
    _write_metrics(tmp_path / "cgd.jsonl", {"triplet": 0.1, "classification": 2.0}, resume_from=None)
    fig = visualize.curves_figure(tmp_path / "cgd.jsonl")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    fig.canvas.draw()
    plt.close(fig)
    assert labels == [
        "total: triplet + w·classification",
        "classification (unweighted)",
        "triplet term",
    ]
    _write_metrics(tmp_path / "plain.jsonl", {}, resume_from=None)
    fig = visualize.curves_figure(tmp_path / "plain.jsonl")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss"]
    plt.close(fig)


def test_repeated_steps_keep_the_last_record_and_never_double_back(hpl_curves):
    for ax in hpl_curves.axes:
        for line in ax.get_lines():
            steps = np.asarray(line.get_xdata())
            assert np.all(np.diff(steps) > 0), line.get_label()
    total = hpl_curves.axes[0].get_lines()[0]
    steps, losses = np.asarray(total.get_xdata()), np.asarray(total.get_ydata())
    assert steps.tolist() == list(range(10, 170, 10))
    np.testing.assert_allclose(losses[steps == 80], 2.0 / (1 + 80 / 50) + 0.01)  # the resumed run's value
    recall = next(line for line in hpl_curves.axes[1].get_lines() if line.get_label() == "recall@1")
    assert np.asarray(recall.get_xdata()).tolist() == [40, 80, 120, 160]


# ----------------------------------------------------------------------------- t-SNE


def _tsne(num_classes: int, coarse: bool = False):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), 2)
    xy = rng.normal(size=(len(labels), 2))
    return visualize.tsne_figure(xy, labels, labels % 4 if coarse else None)


def _looks(ax) -> list[tuple]:
    """(face colour, marker outline) of every scatter in ``ax``."""
    return [
        (tuple(np.round(c.get_facecolor()[0], 4)), c.get_paths()[0].vertices.round(4).tobytes())
        for c in ax.collections
    ]


@pytest.mark.parametrize("num_classes", [20, 48])
def test_every_class_has_its_own_colour_and_marker(num_classes):
    fig = _tsne(num_classes)
    ax = fig.axes[0]
    looks = _looks(ax)
    assert len(looks) == num_classes and len(set(looks)) == num_classes
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2 * num_classes
    assert "repeat" not in ax.get_title()
    legend = ax.get_legend()
    if num_classes <= visualize.LEGEND_MAX_CLASSES:
        assert [t.get_text() for t in legend.get_texts()] == [f"class {i}" for i in range(num_classes)]
        fig.canvas.draw()
        assert _outside(legend, ax)
    else:
        assert legend is None
    plt.close(fig)


def test_too_many_classes_say_that_colours_repeat():
    fig = _tsne(100)
    ax = fig.axes[0]
    combos = len(visualize.CLASS_COLOURS) * len(visualize.CLASS_MARKERS)
    assert f"colours repeat: 100 classes, {combos} colour/marker combinations" in ax.get_title()
    assert len(ax.collections) == len(set(_looks(ax))) == combos
    assert sum(len(c.get_offsets()) for c in ax.collections) == 200
    plt.close(fig)
    styles, repeats = visualize.class_styles(combos)
    assert len(set(styles)) == combos and not repeats
    assert visualize.class_styles(combos + 1)[1]


def test_coarse_groups_are_drawn_like_the_classes():
    fig = _tsne(12, coarse=True)
    ax_class, ax_coarse = fig.axes[:2]
    assert "coarse group" in ax_coarse.get_title()
    assert _looks(ax_coarse) == _looks(ax_class)[:4]  # the same colour/marker sequence
    assert [t.get_text() for t in ax_coarse.get_legend().get_texts()] == [f"group {i}" for i in range(4)]
    plt.close(fig)


def test_title_counts_a_sample_out_of_all_the_embeddings(monkeypatch):
    fig = visualize.tsne_figure(np.zeros((1000, 2)), np.arange(1000) % 5, total=1920)
    assert fig.axes[0].get_title().startswith("t-SNE of 1,000 of 1,920 test embeddings, by class")
    plt.close(fig)
    assert visualize.embedding_count(1920, 1920) == visualize.embedding_count(1920) == "1,920 test embeddings"
    # plot_tsne passes the full count: "12 of 30" for a sample, "30" when it draws all.
    titles = []
    figure = visualize.tsne_figure

    def tsne_figure(*args, **kwargs):
        fig = figure(*args, **kwargs)
        titles.append([ax.get_title() for ax in fig.axes if ax.get_title()])
        return fig

    monkeypatch.setattr(visualize, "tsne_figure", tsne_figure)
    monkeypatch.setattr(visualize, "tsne", lambda points, key: points[:, :2])  # nothing compiled
    embeddings = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    labels = np.arange(30) % 3
    for max_points, count in ((12, "12 of 30"), (30, "30"), (2000, "30")):
        visualize.plot_tsne(Path("/dev/null"), embeddings, labels, labels % 2, None, max_points=max_points)
        assert all(t.startswith(f"t-SNE of {count} test embeddings, by ") for t in titles[-1]), titles[-1]
        assert len(titles[-1]) == 2


# ----------------------------------------------------------------------------- retrieval


def _tile(colour: int) -> np.ndarray:
    return np.full((12, 12, 3), colour, np.uint8)


def _retrieval(labels, neighbour_labels, similarities):
    rows, k = len(labels), len(neighbour_labels[0])
    return visualize.retrieval_figure(
        [_tile(40 * r) for r in range(rows)],
        labels,
        [[_tile(20 * j) for j in range(k)] for _ in range(rows)],
        neighbour_labels,
        similarities,
    )


def _frame(ax) -> tuple[str, float]:
    spine = ax.spines["top"]
    return matplotlib.colors.to_hex(spine.get_edgecolor()), spine.get_linewidth()


GREEN, RED, NEUTRAL = (matplotlib.colors.to_hex(c) for c in ("limegreen", "red", "black"))


def test_retrieval_tiles_show_similarity_and_class_and_stay_readable():
    similarities = np.array([[0.9731, 0.5, 0.25], [0.8, -0.125, -0.5]])
    fig = _retrieval(np.array([3, 7]), np.array([[3, 5, 3], [7, 7, 2]]), similarities)
    axes = np.array(fig.axes).reshape(2, 4)
    titles = [[ax.get_title() for ax in row] for row in axes]
    assert titles[0] == [
        "query\nclass 3",
        "#1 · cosine 0.973\nclass 3",
        "#2 · cosine 0.500\nclass 5",
        "#3 · cosine 0.250\nclass 3",
    ]
    assert titles[1][2] == "#2 · cosine -0.125\nclass 7" and titles[1][3].endswith("\nclass 2")
    frames = [[_frame(ax)[0] for ax in row[1:]] for row in axes]
    assert frames == [[GREEN, RED, GREEN], [GREEN, GREEN, RED]]
    assert _frame(axes[0][0]) == (NEUTRAL, 1)
    assert "cosine to the query" in fig.get_suptitle() and "green" in fig.get_suptitle()
    # Readable at the saved size (dpi 100): no smaller than 8 pt, no title running into its
    # neighbour's or into the row above.
    fig.canvas.draw()
    for r, row in enumerate(axes):
        boxes = [ax.title.get_window_extent() for ax in row]
        assert all(ax.title.get_fontsize() >= 8 for ax in row)
        assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), r
        if r:
            assert max(box.y1 for box in boxes) < min(ax.get_window_extent().y0 for ax in axes[r - 1])
    plt.close(fig)


def test_retrieval_names_and_unknown_labels():
    unknown = search._Unknown()
    long_name = "a_very_long_product_name_123"
    fig = _retrieval(
        np.array([unknown, "shoe"], dtype=object),
        np.array([["shoe", unknown], [long_name, "shoe"]], dtype=object),
        np.array([[0.5, 0.4], [0.3, 0.2]]),
    )
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["query", "#1 · cosine 0.500\nshoe", "#2 · cosine 0.400"]
    assert axes[1][1].get_title() == "#1 · cosine 0.300\na_very_long_produ…"
    assert [_frame(ax) for ax in axes[0][1:]] == [(NEUTRAL, 1), (NEUTRAL, 1)]  # the query's class unknown
    assert [_frame(ax)[0] for ax in axes[1][1:]] == [RED, GREEN]
    fig.canvas.draw()  # a narrow figure (k = 2): the explanation is wrapped, not cut off
    (suptitle,) = [text for text in fig.texts if text.get_text() == fig.get_suptitle()]
    title, whole = suptitle.get_window_extent(), fig.get_window_extent()
    assert whole.x0 <= title.x0 and title.x1 <= whole.x1 and "\n" in fig.get_suptitle()
    plt.close(fig)
    # Without scores (and no label known): rank only, and the title explains no frames.
    fig = _retrieval([None], [[None, None]], None)
    assert [ax.get_title() for ax in fig.axes] == ["query", "#1", "#2"]
    assert fig.get_suptitle() == "top-2 of each query, best first"
    plt.close(fig)


def _capture_retrieval(monkeypatch) -> list[tuple[tuple, dict]]:
    calls: list[tuple[tuple, dict]] = []

    def plot_retrieval(path, *args, **kwargs):
        calls.append((args, kwargs))
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(visualize, "plot_retrieval", plot_retrieval)
    return calls


def test_training_picture_gets_the_rankings_cosine_similarities(monkeypatch, tmp_path):
    calls = _capture_retrieval(monkeypatch)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(10, 4)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    test = Split(source=[{"image": _tile(i)} for i in range(10)], labels=np.arange(10) % 3)
    dataset = MetricDataset("tiny", test, test)  # self-retrieval: every row query and gallery
    config = ml_collections.ConfigDict({"seed": 0, "model": {"curvature": 0.0}})
    outputs.write_retrieval_picture(tmp_path / "r.png", dataset, {"test": embeddings}, config)
    (_, query_labels, _, neighbour_labels, similarities), keywords = calls[-1]
    assert similarities.shape == neighbour_labels.shape == (6, 5) and keywords["similarity_name"] == "cosine"
    assert np.all(np.diff(similarities, axis=1) <= 0)  # best first
    full = embeddings @ embeddings.T
    np.fill_diagonal(full, -np.inf)  # a query is not its own neighbour
    chosen = np.sort(np.random.default_rng(0).choice(10, size=6, replace=False))  # the seeded queries
    np.testing.assert_allclose(similarities, -np.sort(-full[chosen], axis=1)[:, :5], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(query_labels, test.labels[chosen])
    # A run in the Poincaré ball (c = 0.5): its points ranked by distance, nearest first.
    points = embeddings * rng.uniform(0.1, 1.3, (10, 1))
    config.model.curvature = 0.5
    outputs.write_retrieval_picture(tmp_path / "r.png", dataset, {"test": points}, config)
    (_, _, _, _, distances), keywords = calls[-1]
    assert keywords["similarity_name"] == "distance" and np.all(np.diff(distances, axis=1) >= 0)
    x2 = np.sum(points.astype(np.float64) ** 2, 1)
    xy = points.astype(np.float64) @ points.T.astype(np.float64)
    # ‖(−x) ⊕ y‖² in closed form (the textbook Möbius addition), then d = 2/√c artanh(√c ‖·‖).
    c = 0.5
    num = (1 - 2 * c * xy + c * x2[None]) ** 2 * x2[:, None] - 2 * (1 - 2 * c * xy + c * x2[None]) * (
        1 - c * x2[:, None]
    ) * xy + (1 - c * x2[:, None]) ** 2 * x2[None]
    den = 1 - 2 * c * xy + c**2 * x2[:, None] * x2[None]
    full = 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * np.sqrt(np.maximum(num, 0)) / den)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(distances, np.sort(full[chosen], axis=1)[:, :5], rtol=1e-4, atol=1e-4)


def test_search_picture_gets_similarities_and_gallery_labels(monkeypatch, tmp_path):
    calls = _capture_retrieval(monkeypatch)
    fake = SimpleNamespace(image_size=4, preprocess=lambda image: image)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(_tile(i)).save(paths[-1])
    gallery = {"paths": paths, "labels": ["a", "b", "a"]}
    order, similarity = search.nearest(np.eye(3)[[0, 1]] + 0.1, np.eye(3), 3)
    queries = [paths[0], str(tmp_path / "elsewhere.png")]  # a labelled gallery image, an outsider
    search.write_picture(tmp_path / "p.png", fake, queries, [_tile(0), _tile(1)], gallery, order, similarity)
    (_, query_labels, _, neighbour_labels), kwargs = calls[-1]
    np.testing.assert_array_equal(kwargs["similarities"], similarity)
    assert query_labels[0] == "a" and visualize.label_text(query_labels[1]) is None
    assert neighbour_labels.tolist()[1] == [gallery["labels"][j] for j in order[1]]  # shown, not judged
    fig = visualize.retrieval_figure([_tile(0)] * 2, query_labels, [[_tile(1)] * 3] * 2, neighbour_labels,
                                     kwargs["similarities"])  # fmt: skip
    axes = np.array(fig.axes).reshape(2, 4)
    assert [_frame(ax)[0] for ax in axes[1][1:]] == [NEUTRAL] * 3
    assert axes[1][1].get_title() == f"#1 · cosine {similarity[1][0]:.3f}\nb"
    plt.close(fig)
