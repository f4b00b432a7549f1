"""The pictures: every series visible and labelled, legends off the data, one look per class.

The figures are inspected through their matplotlib artists (Agg backend, nothing compiled: the
t-SNE figure is drawn from given 2-D points).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from hdml_jax import visualize

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


def test_legends_are_outside_the_axes(hpl_curves):
    hpl_curves.canvas.draw()
    for ax in hpl_curves.axes:
        assert ax.get_legend() is not None
        assert _outside(ax.get_legend(), ax)


def test_loss_terms_are_explained(hpl_curves, tmp_path):
    labels = [line.get_label() for line in hpl_curves.axes[0].get_lines()]
    assert labels == ["total Σ_l w_l·L_l (HPL, all levels)", "fine level (HPL L_0, unweighted)"]
    _write_metrics(tmp_path / "cgd.jsonl", {"triplet": 0.1, "classification": 2.0}, resume_from=None)
    fig = visualize.curves_figure(tmp_path / "cgd.jsonl")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)
    assert labels == [
        "total: triplet + w·classification (CGD)",
        "classification (CGD, before its weight)",
        "triplet (CGD ranking term)",
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
