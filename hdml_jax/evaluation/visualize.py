"""Pictures a researcher looks at first: t-SNE of the test embeddings, retrieval results, curves.

t-SNE (van der Maaten & Hinton 2008) is implemented here in JAX (exact, O(N²) per iteration,
fine for the few thousand points that are plotted), so no extra dependency is needed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.data.base import Split
from hdml_jax.evaluation import ranking
from hdml_jax.evaluation.query_gallery import query_gallery_rows
from hdml_jax.workdir import read_log


def _conditional_probabilities(sq_dist: jax.Array, perplexity: float, iters: int = 64) -> jax.Array:
    """Row-wise Gaussian affinities whose entropy matches log(perplexity) (bisection on β = 1/2σ²)."""
    n = sq_dist.shape[0]
    target = jnp.log(perplexity)
    off_diagonal = ~jnp.eye(n, dtype=bool)

    def row_probs(beta):
        logits = jnp.where(off_diagonal, -sq_dist * beta[:, None], -jnp.inf)
        return jax.nn.softmax(logits, axis=1)

    def entropy(p):
        return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)

    def bisect(_, bounds):
        low, high = bounds
        beta = jnp.sqrt(low * high)
        too_flat = entropy(row_probs(beta)) > target  # entropy too high → sharpen (raise β)
        return jnp.where(too_flat, beta, low), jnp.where(too_flat, high, beta)

    low, high = jnp.full((n,), 1e-10), jnp.full((n,), 1e10)
    low, high = jax.lax.fori_loop(0, iters, bisect, (low, high))
    return row_probs(jnp.sqrt(low * high))


@jax.jit(static_argnames=("num_iters",))
def _tsne(key, points, perplexity, num_iters):
    n = points.shape[0]
    sq = jnp.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1)
    sq = sq / jnp.maximum(jnp.mean(sq), 1e-12)
    p = _conditional_probabilities(sq, perplexity)
    p = jnp.maximum((p + p.T) / (2 * n), 1e-12)
    y0 = 1e-4 * jax.random.normal(key, (n, 2))
    off_diagonal = ~jnp.eye(n, dtype=bool)

    def gradient(y, exaggeration):
        diff = y[:, None, :] - y[None, :, :]
        w = jnp.where(off_diagonal, 1.0 / (1.0 + jnp.sum(diff**2, axis=-1)), 0.0)
        q = jnp.maximum(w / jnp.sum(w), 1e-12)
        return 4.0 * jnp.sum(((exaggeration * p - q) * w)[:, :, None] * diff, axis=1)

    def step(i, carry):
        y, velocity, gains = carry
        exaggeration = jnp.where(i < 250, 12.0, 1.0)
        momentum = jnp.where(i < 250, 0.5, 0.8)
        g = gradient(y, exaggeration)
        gains = jnp.where(jnp.sign(g) != jnp.sign(velocity), gains + 0.2, gains * 0.8)
        gains = jnp.maximum(gains, 0.01)
        velocity = momentum * velocity - 200.0 * gains * g
        y = y + velocity
        return y - jnp.mean(y, axis=0), velocity, gains

    y, _, _ = jax.lax.fori_loop(0, num_iters, step, (y0, jnp.zeros_like(y0), jnp.ones_like(y0)))
    return y


def tsne(points: np.ndarray, key: jax.Array, *, perplexity: float = 30.0, num_iters: int = 750) -> np.ndarray:
    """2-D t-SNE of ``(N, d)`` points (exact gradients; keep N to a few thousand)."""
    points = np.asarray(points, np.float32)
    perplexity = float(min(perplexity, max(2.0, (points.shape[0] - 1) / 3)))
    return np.asarray(_tsne(key, jnp.asarray(points), perplexity, num_iters))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- t-SNE

# Ten clearly different colours (matplotlib's tab10) times eight marker shapes: 80 classes can be
# told apart before a colour/marker combination repeats.
CLASS_COLOURS = tuple(f"C{i}" for i in range(10))
CLASS_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_MAX_CLASSES = 20


def class_styles(num_classes: int) -> tuple[list[tuple[str, str]], bool]:
    """``(colour, marker)`` of each of ``num_classes`` classes, and whether combinations repeat.

    Colours come first (the fewest markers that give every class its own combination), so up to
    ten classes are told apart by colour alone; beyond ``len(CLASS_COLOURS) * len(CLASS_MARKERS)``
    classes the combinations repeat.
    """
    num_colours = max(1, min(num_classes, len(CLASS_COLOURS)))
    num_markers = min(max(1, -(-num_classes // num_colours)), len(CLASS_MARKERS))
    styles = [
        (CLASS_COLOURS[i % num_colours], CLASS_MARKERS[(i // num_colours) % num_markers])
        for i in range(num_classes)
    ]
    return styles, num_classes > num_colours * num_markers


def _scatter_by_class(ax, xy: np.ndarray, labels: np.ndarray, kind: str) -> str:
    """One scatter per colour/marker combination; returns the title's note on the classes."""
    classes, index = np.unique(labels, return_inverse=True)
    styles, repeats = class_styles(len(classes))
    combos = sorted(set(styles), key=styles.index)
    with_legend = len(classes) <= LEGEND_MAX_CLASSES
    for combo in combos:
        members = [i for i, style in enumerate(styles) if style == combo]
        chosen = np.isin(index, members)
        colour, marker = combo
        label = f"{kind} {classes[members[0]]}" if with_legend else f"_{colour} {marker}"
        ax.scatter(
            xy[chosen, 0], xy[chosen, 1], c=colour, marker=marker, s=14, linewidths=0, alpha=0.85, label=label
        )
    if with_legend:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=7, markerscale=1.5
        )
    plural = "classes" if kind == "class" else f"{kind}s"
    if repeats:
        return f"colours repeat: {len(classes)} {plural}, {len(combos)} colour/marker combinations"
    return f"{len(classes)} {plural}, each its own colour/marker"


def embedding_count(drawn: int, total: int | None = None) -> str:
    """``"1,000 of 1,920 test embeddings"`` for a sample, ``"1,920 test embeddings"`` for all."""
    if total is None or total <= drawn:
        return f"{drawn:,} test embeddings"
    return f"{drawn:,} of {total:,} test embeddings"


def tsne_figure(
    xy: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray | None = None,
    total: int | None = None,
):
    """The figure of ``tsne.png`` from 2-D points: one panel by class, one by coarse group if given.

    Every class gets its own colour/marker combination (``class_styles``) while there are enough;
    past that the title says that they repeat. With at most ``LEGEND_MAX_CLASSES`` classes (or
    groups) a legend, outside the panel, names them. The coarse panel is drawn the same way.
    ``total``: how many test embeddings there were when ``xy`` is a sample of them (the title then
    says "N of total"); None or ``len(xy)``: all of them were drawn.
    """
    panels = [("class", np.asarray(labels))]
    if coarse_labels is not None:
        panels.append(("group", np.asarray(coarse_labels)))
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.5 * len(panels), 6.5), squeeze=False, layout="constrained"
    )
    for ax, (kind, values) in zip(axes[0], panels, strict=True):
        note = _scatter_by_class(ax, xy, values, kind)
        what = "class" if kind == "class" else "coarse group"
        ax.set_title(f"t-SNE of {embedding_count(len(xy), total)}, by {what}\n({note})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_tsne(
    path: str | Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray | None,
    key: jax.Array,
    *,
    max_points: int = 2000,
) -> None:
    """``tsne.png``: t-SNE of up to ``max_points`` embeddings, a seeded uniform sample of them when
    there are more (the title says how many of how many; see ``tsne_figure``)."""
    rng = np.random.default_rng(0)
    index = np.sort(rng.permutation(len(embeddings))[:max_points])
    xy = tsne(embeddings[index], key)
    coarse = None if coarse_labels is None else np.asarray(coarse_labels)[index]
    fig = tsne_figure(xy, np.asarray(labels)[index], coarse, total=len(embeddings))
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- retrieval

FRAME_CORRECT, FRAME_WRONG, FRAME_NEUTRAL = "limegreen", "red", "black"
RETRIEVAL_FONTSIZE = 8.5


def _known(label: Any) -> bool:
    """False for None and for a label that compares as unknown (``label == label`` gives None:
    how ``hdml_jax.search`` marks a query whose label it does not know)."""
    return label is not None and (label == label) is not None


def label_text(label: Any, max_chars: int = 18) -> str | None:
    """How a retrieval tile names a class: ``"class 3"`` for an integer label, a name as it is
    (shortened to ``max_chars`` with "…"); None for an unknown label (``_known``)."""
    if not _known(label):
        return None
    text = f"class {int(label)}" if isinstance(label, int | np.integer) else str(label)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _same_class(neighbour: Any, query: Any) -> bool | None:
    """Whether a neighbour has the query's class; None where either label is unknown."""
    if not (_known(neighbour) and _known(query)):
        return None
    same = neighbour == query
    return None if same is None else bool(same)


def retrieval_figure(
    query_images: Sequence[np.ndarray],
    query_labels: Sequence[Any],
    neighbour_images: Sequence[Sequence[np.ndarray]],
    neighbour_labels: Sequence[Sequence[Any]],
    similarities: np.ndarray | None = None,
    *,
    similarity_name: str = "cosine",
):
    """The figure of ``retrieval.png``: each row a query and its top-k, best first.

    Each neighbour's title gives its rank and ``similarities[r][j]`` (the score the ranking used,
    ``similarity_name``) above its class (``label_text``); the query's gives its class. A neighbour
    is framed green when its label equals the query's, red when it differs, and neutral (thin,
    black) when either label is unknown (None, or ``==`` gives None).
    """
    plt = _pyplot()
    rows, k = len(query_images), len(neighbour_images[0])
    fig, axes = plt.subplots(
        rows, k + 1, figsize=(1.75 * (k + 1), 2.0 * rows + 0.45), squeeze=False, layout="constrained"
    )
    judged = False
    for r in range(rows):
        query_class = label_text(query_labels[r])
        cells = [(query_images[r], "query" + (f"\n{query_class}" if query_class else ""), None)]
        for j in range(k):
            score = "" if similarities is None else f" · {similarity_name} {float(similarities[r][j]):.3f}"
            neighbour_class = label_text(neighbour_labels[r][j])
            title = f"#{j + 1}{score}" + (f"\n{neighbour_class}" if neighbour_class else "")
            correct = _same_class(neighbour_labels[r][j], query_labels[r])
            judged |= correct is not None
            cells.append((neighbour_images[r][j], title, correct))
        for c, (image, title, correct) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=RETRIEVAL_FONTSIZE, linespacing=1.15)
            colour = FRAME_NEUTRAL if correct is None else (FRAME_CORRECT if correct else FRAME_WRONG)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if correct is None else 4)
    notes = [f"top-{k} of each query, best first"]
    if similarities is not None:
        notes.append(f"{similarity_name} to the query: the ranking's score")
    if judged:
        notes.append("frame green: the query's class, red: another")
    # Wrapped to the figure's width (about 14 characters an inch at this size).
    width = max(20, int(14 * fig.get_figwidth()))
    fig.suptitle(textwrap.fill("; ".join(notes), width), fontsize=RETRIEVAL_FONTSIZE)
    return fig


def plot_retrieval(
    path: str | Path,
    query_images: Sequence[np.ndarray],
    query_labels: Sequence[Any],
    neighbour_images: Sequence[Sequence[np.ndarray]],
    neighbour_labels: Sequence[Sequence[Any]],
    similarities: np.ndarray | None = None,
    *,
    similarity_name: str = "cosine",
) -> None:
    """``retrieval.png``: each row a query and its top-k with their similarities and classes,
    correct ones framed green, wrong red (``retrieval_figure``)."""
    fig = retrieval_figure(
        query_images,
        query_labels,
        neighbour_images,
        neighbour_labels,
        similarities,
        similarity_name=similarity_name,
    )
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- curves

# Train-record keys that are not loss terms.
_NOT_LOSS_TERMS = frozenset({"step", "loss", "kind", "epoch", "images_per_second", "grad_norm", "lr"})
_NOT_METRICS = frozenset({"step", "kind", "epoch"})

# What each logged loss term is (``steps.compute_loss``): HPL's total is Σ_l w_l·L_l over the
# fine level (the per-class proxies, L_0) and the coarse levels; CGD's is triplet + w·classification.
# Short legend labels; subscripts in matplotlib mathtext ($...$).
LOSS_TERM_LABELS = {
    "fine": r"fine level $L_0$ (unweighted)",
    "triplet": "triplet term",
    "classification": "classification (unweighted)",
}
HPL_TOTAL_LABEL = r"weighted total $\Sigma_l\, w_l L_l$"
CGD_TOTAL_LABEL = "total: triplet + w·classification"

# Evaluation series: colour, line style and marker each cycle, so every series has its own
# combination and series that coincide stay visible (hollow markers, some lines dashed or absent).
_SERIES_LINESTYLES = ("-", "--", ":", "-.", "none")
_SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def read_metrics(metrics_jsonl: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train records, eval records)`` of ``metrics.jsonl``, each sorted by step.

    A resumed run appends to the file, so a step can appear twice: the last record of each
    ``(kind, step)`` wins. Blank and unreadable lines (a write cut off by a crash) are skipped.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for record in read_log(metrics_jsonl):  # local or remote (a Path() would mangle gs://)
        kind = "eval" if record.get("kind") == "eval" else "train"
        latest.pop((kind, record["step"]), None)
        latest[(kind, record["step"])] = record
    by_step = sorted(latest.items(), key=lambda item: item[0][1])
    train = [record for (kind, _), record in by_step if kind == "train"]
    evals = [record for (kind, _), record in by_step if kind == "eval"]
    return train, evals


def _total_loss_label(terms: list[str]) -> str:
    if "fine" in terms:
        return HPL_TOTAL_LABEL
    if "triplet" in terms or "classification" in terms:
        return CGD_TOTAL_LABEL
    return "loss"


def _series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    steps = [r["step"] for r in records if isinstance(r.get(key), int | float)]
    values = [scale * r[key] for r in records if isinstance(r.get(key), int | float)]
    return steps, values


def _same(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    """Two series at the same steps whose values agree to float rounding (in %)."""
    return a[0] == b[0] and np.allclose(a[1], b[1], rtol=0.0, atol=1e-6)


def _legend_below(ax, entries: int, max_columns: int = 4) -> None:
    """A compact legend under the axes, below the tick labels and the x label (off the data, and
    the plot keeps the figure's width): up to ``max_columns`` entries a row."""
    from matplotlib.transforms import offset_copy

    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=offset_copy(ax.transAxes, fig=ax.figure, y=-34, units="points"),
        ncol=max(1, min(entries, max_columns)),
        fontsize=8.5,
        frameon=False,
        handlelength=2.6,
        columnspacing=1.6,
    )


def curves_figure(metrics_jsonl: str | Path):
    """The figure of ``curves.png``: the training loss (and its terms) and every evaluation metric.

    Each evaluation metric has its own colour, line style and marker; a metric whose values
    equal an earlier one's (precision@1 and recall@1 whenever every query has a match) is drawn
    with markers only and labelled ``(= that metric)``, so neither hides the other. Compact
    legends sit under the panels, off the data (the plots get the figure's width).
    """
    train, evals = read_metrics(metrics_jsonl)
    plt = _pyplot()
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(14, 5.2), layout="constrained")

    terms = sorted({k for r in train for k in r} - _NOT_LOSS_TERMS)
    if train:
        ax_loss.plot(*_series(train, "loss"), color="black", linewidth=1.6, label=_total_loss_label(terms))
        for i, term in enumerate(terms):
            ax_loss.plot(
                *_series(train, term),
                color=f"C{i}",
                linestyle=("--", ":", "-.")[i % 3],
                linewidth=1.3,
                label=LOSS_TERM_LABELS.get(term, term),
            )
        _legend_below(ax_loss, 1 + len(terms))
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")

    names = list(dict.fromkeys(k for r in evals for k in r if k not in _NOT_METRICS))
    names = [n for n in names if _series(evals, n)[0]]
    drawn: dict[str, tuple[list[int], list[float]]] = {}
    for i, name in enumerate(names):
        steps, values = _series(evals, name, 100.0)
        same_as = next((other for other, series in drawn.items() if _same(series, (steps, values))), None)
        style = {
            "color": f"C{i % 10}",
            "linestyle": _SERIES_LINESTYLES[i % len(_SERIES_LINESTYLES)],
            "marker": _SERIES_MARKERS[i % len(_SERIES_MARKERS)],
            "markerfacecolor": "none",
            "markersize": 6,
        }
        label = name
        if same_as is not None:
            style.update(linestyle="none", marker="x", markersize=9, markeredgewidth=1.5)
            label = f"{name} (= {same_as})"
        ax_eval.plot(steps, values, label=label, **style)
        drawn[name] = (steps, values)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("test metrics (%)")
    if names:
        _legend_below(ax_eval, len(names))
    return fig


def plot_curves(path: str | Path, metrics_jsonl: str | Path) -> None:
    """``curves.png``: the figure of ``curves_figure``."""
    fig = curves_figure(metrics_jsonl)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_retrieval_examples(
    path: Path,
    split: Split,
    embeddings: np.ndarray,
    is_query: np.ndarray,
    is_gallery: np.ndarray,
    *,
    seed: int,
    num_queries: int = 6,
    k: int = 5,
    curvature: float = 0.0,
) -> None:
    """A few queries (drawn with ``seed``) of ``split`` and their ``k`` nearest gallery images, the
    query's own row excluded; ``embeddings`` are the split's rows, in its order: unit vectors
    ranked by cosine, or points of the Poincaré ball of ``curvature`` > 0 ranked by distance."""
    query_rows, gallery_rows, self_column = query_gallery_rows(len(split), is_query, is_gallery)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(query_rows), size=min(num_queries, len(query_rows)), replace=False))
    similarity = ranking.scores(embeddings[query_rows[chosen]], embeddings[gallery_rows], curvature)
    itself = self_column[chosen]
    similarity[np.flatnonzero(itself >= 0), itself[itself >= 0]] = ranking.excluded(curvature)
    neighbours = ranking.best_first(similarity, curvature)[:, :k]
    labels, source = split.labels, split.source
    plot_retrieval(
        path,
        [source[int(i)]["image"] for i in query_rows[chosen]],
        labels[query_rows[chosen]],
        [[source[int(gallery_rows[j])]["image"] for j in row] for row in neighbours],
        labels[gallery_rows[neighbours]],
        np.take_along_axis(similarity, neighbours, axis=1),
        similarity_name=ranking.score_name(curvature),
    )
