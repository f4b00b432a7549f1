"""Pictures a researcher looks at first: t-SNE of the test embeddings, retrieval results, curves.

t-SNE (van der Maaten & Hinton 2008) is implemented here in JAX (exact, O(N²) per iteration,
fine for the few thousand points that are plotted), so no extra dependency is needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


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


def plot_tsne(
    path: str | Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray | None,
    key: jax.Array,
    *,
    max_points: int = 2000,
) -> None:
    """``tsne.png``: one panel coloured by class, one by coarse group (when there are groups)."""
    rng = np.random.default_rng(0)
    index = np.sort(rng.permutation(len(embeddings))[:max_points])
    xy = tsne(embeddings[index], key)
    panels = [("class", labels[index])]
    if coarse_labels is not None:
        panels.append(("coarse group", coarse_labels[index]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for ax, (title, colour) in zip(axes[0], panels, strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], c=colour % 20, cmap="tab20", s=6, linewidths=0)
        ax.set_title(f"t-SNE of {len(index)} test embeddings, coloured by {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrieval(
    path: str | Path,
    query_images: Sequence[np.ndarray],
    query_labels: np.ndarray,
    neighbour_images: Sequence[Sequence[np.ndarray]],
    neighbour_labels: np.ndarray,
) -> None:
    """``retrieval.png``: each row a query and its top-k, correct ones framed green, wrong red."""
    plt = _pyplot()
    rows, k = len(query_images), len(neighbour_images[0])
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.7 * rows), squeeze=False)
    for r in range(rows):
        cells = [(query_images[r], "query", None)] + [
            (neighbour_images[r][j], f"#{j + 1}", neighbour_labels[r][j] == query_labels[r]) for j in range(k)
        ]
        for c, (image, title, correct) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
            colour = "black" if correct is None else ("limegreen" if correct else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if correct is None else 4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: str | Path, metrics_jsonl: str | Path) -> None:
    """``curves.png``: training loss and every evaluation metric against the step."""
    train, evals = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        (evals if record.get("kind") == "eval" else train).append(record)
    plt = _pyplot()
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
        for part in sorted(
            {k for r in train for k in r}
            - {"step", "loss", "kind", "epoch", "images_per_second", "grad_norm", "lr"}
        ):
            ax_loss.plot(
                [r["step"] for r in train if part in r], [r[part] for r in train if part in r], label=part
            )
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    names = [k for k in (evals[0] if evals else {}) if k not in ("step", "kind", "epoch")]
    for name in names:
        ax_eval.plot([r["step"] for r in evals], [100 * r[name] for r in evals], marker="o", label=name)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("test metrics (%)")
    if names:
        ax_eval.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
