"""Nearest gallery images of query images: ``python -m hdml_jax.search --workdir RUN --gallery emb.npz
--query IMG [--query IMG ...] [-k 10] [--picture out.png]``.

The gallery is an ``.npz`` written by ``python -m hdml_jax.embed``. Each query image is embedded
with the same checkpoint (by default the gallery's step; a different ``--step``, another run's
gallery or one of another embedding width is refused), and its ``k`` most similar gallery
images (cosine similarity, the embeddings are unit vectors; the Poincaré distance, nearest
first, for a run whose head ends in the Poincaré ball) are printed::

    query 1: /data/q.jpg
       rank  similarity  path  [label]
          1      0.9731  /data/gallery/b.jpg  [class_3]

``--picture`` draws every query with its top-k (``visualize.plot_retrieval``): each neighbour
titled with its rank, cosine similarity and label (where the gallery has labels), the query with
its label where known. Neighbours are framed green (same label) or red only where the query's
label is known — the query is itself a labelled gallery image; otherwise every frame is neutral.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdml_jax.errors import UserError
from hdml_jax.inference.cli import CliParser, load_image, run_command
from hdml_jax.inference.errors import StepNotFoundError, UnreadableImageError, UsageError

REQUIRED_KEYS = ("embeddings", "paths", "step", "workdir")


class GalleryError(UserError, ValueError):
    """The gallery file is missing, not an ``embed`` output, or made by another run/step/width."""


def load_gallery(path: str | Path) -> dict[str, Any]:
    """The arrays of an ``embed`` output: ``embeddings (N, d)``, ``paths (N,)``, ``labels (N,)`` or
    None, ``step`` (int), ``workdir`` (str), ``checkpoint_id`` (str or None)."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise GalleryError(
            f"--gallery {path} does not exist; make it with python -m hdml_jax.embed --workdir RUN "
            f"--images DIR --output {path}."
        ) from None
    except (OSError, ValueError) as error:
        raise GalleryError(
            f"--gallery {path} is not an .npz file written by hdml_jax.embed ({error})."
        ) from None
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise GalleryError(
            f"--gallery {path} lacks {', '.join(missing)}: it was not written by python -m hdml_jax.embed."
        )
    embeddings = np.asarray(arrays["embeddings"], np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(arrays["paths"]) or len(embeddings) == 0:
        raise GalleryError(
            f"--gallery {path}: embeddings {embeddings.shape} and {len(arrays['paths'])} paths do not match."
        )
    return {
        "embeddings": embeddings,
        "paths": [str(p) for p in arrays["paths"]],
        "labels": [str(v) for v in arrays["labels"]] if "labels" in arrays else None,
        "step": int(arrays["step"]),
        "workdir": str(arrays["workdir"]),
        "checkpoint_id": str(arrays["checkpoint_id"]) if "checkpoint_id" in arrays else None,
    }


def check_gallery_fits(
    gallery: dict[str, Any], workdir: Path, step: int | None, dim: int, source: str
) -> None:
    """Refuse a gallery the run cannot be compared with: another run, another step, another width.

    ``step``: the ``--step`` asked for (None: the gallery's own).
    """
    if str(gallery["workdir"]) != str(workdir):
        raise GalleryError(
            f"{source} was embedded by the run in {gallery['workdir']}, not by {workdir}: similarities "
            "between two networks' embeddings mean nothing. Re-embed the gallery with this run "
            f"(python -m hdml_jax.embed --workdir {workdir} ...) or pass --workdir {gallery['workdir']}."
        )
    if step is not None and step != gallery["step"]:
        raise GalleryError(
            f"{source} was embedded with the checkpoint of step {gallery['step']}, not step {step}. Leave "
            f"--step out (queries then use step {gallery['step']}) or re-embed the gallery with --step {step}."
        )
    width = gallery["embeddings"].shape[1]
    if width != dim:
        raise GalleryError(
            f"{source} holds {width}-d embeddings but the run in {workdir} makes {dim}-d ones; it was "
            "not written by this run. Re-embed it with python -m hdml_jax.embed."
        )


def nearest(
    queries: np.ndarray, gallery: np.ndarray, k: int, curvature: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices (Q, k), scores (Q, k))`` of the ``k`` nearest gallery rows, best first (ties: the
    lower index first): cosine similarities, or Poincaré distances for a run whose embeddings
    live in the ball of curvature ``curvature`` > 0 (``hdml_jax.evaluation.ranking``)."""
    from hdml_jax.evaluation import ranking

    return ranking.nearest(queries, gallery, k, curvature)


class _Unknown:
    """A label that equals nothing and differs from nothing: ``plot_retrieval`` compares labels
    with ``==`` and draws a neutral frame when the answer is None (as for the query itself)."""

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        return None

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "?"


def _picture_image(embedder, path: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    """The image as the network sees it (eval transform), grey where the file cannot be read."""
    if path not in cache:
        try:
            cache[path] = embedder.preprocess(load_image(path))
        except UnreadableImageError as error:
            print(f"note: {error} (drawn grey)", file=sys.stderr)
            cache[path] = np.full((embedder.image_size, embedder.image_size, 3), 128, np.uint8)
    return cache[path]


def write_picture(
    output: Path,
    embedder,
    query_paths: Sequence[str],
    query_images: Sequence[np.ndarray],
    gallery: dict[str, Any],
    order: np.ndarray,
    similarity: np.ndarray | None = None,
    score_name: str = "cosine",
) -> None:
    """``output`` (PNG, atomic): each query and its top-k (``order``, best first) with their
    scores (``similarity``, as ``nearest`` gives them, named ``score_name``; None: not shown) and
    gallery labels; green/red frames only where the query's label is known (it is a gallery image
    with a label), neutral frames otherwise."""
    from hdml_jax.evaluation import visualize
    from hdml_jax.workdir import atomic_write

    labels = gallery["labels"]
    index = {path: i for i, path in enumerate(gallery["paths"])}
    query_labels, neighbour_labels = [], []
    for row, path in zip(order, query_paths, strict=True):
        known = labels is not None and path in index
        query_labels.append(labels[index[path]] if known else _Unknown())
        neighbour_labels.append([_Unknown() if labels is None else labels[j] for j in row])
    cache: dict[str, np.ndarray] = {}
    neighbours = [[_picture_image(embedder, gallery["paths"][j], cache) for j in row] for row in order]
    scores = {} if similarity is None else {"similarities": np.asarray(similarity), "similarity_name": score_name}
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        output,
        lambda tmp: visualize.plot_retrieval(
            tmp,
            list(query_images),
            np.array(query_labels, dtype=object),
            neighbours,
            np.array(neighbour_labels, dtype=object),
            **scores,
        ),
    )


def build_parser() -> CliParser:
    parser = CliParser(
        prog="hdml_jax.search",
        description="Find the gallery images most similar to query images, with a trained run.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--gallery", required=True, help="an .npz written by python -m hdml_jax.embed")
    parser.add_argument("--query", action="append", required=True, help="a query image (repeat for more)")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--picture", help="also draw the queries and their neighbours into this PNG")
    parser.add_argument(
        "--step", type=int, help="the checkpoint's step (default and only choice: the gallery's)"
    )
    return parser


def run(args) -> int:
    from hdml_jax.inference import embedder as inference
    from hdml_jax.inference import trained_run

    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}.")
    picture = Path(args.picture).expanduser() if args.picture else None
    if picture is not None and picture.is_dir():
        raise UsageError(f"--picture {args.picture} is a folder; name a .png file.")
    workdir = trained_run.resolve_workdir(args.workdir)
    config = trained_run.read_config(workdir)
    gallery = load_gallery(args.gallery)
    source = f"--gallery {args.gallery}"
    check_gallery_fits(gallery, workdir, args.step, int(config.model.embedding_dim), source)
    query_paths = [str(Path(q).expanduser().resolve()) for q in args.query]
    raw = [load_image(path) for path in query_paths]  # unreadable: an error before any work
    try:
        embedder = inference.load_embedder(workdir, gallery["step"])
    except StepNotFoundError:
        raise GalleryError(
            f"{source} was embedded with the checkpoint of step {gallery['step']}, which is no longer "
            f"on disk (on disk: steps {', '.join(map(str, trained_run.available_steps(workdir)))}). "
            "Re-embed the gallery with python -m hdml_jax.embed."
        ) from None
    check_gallery_fits(gallery, workdir, args.step, embedder.embedding_dim, source)
    if gallery["checkpoint_id"] is not None and gallery["checkpoint_id"] != embedder.checkpoint_id:
        raise GalleryError(
            f"{source} was embedded by other weights than the checkpoint of step {embedder.step} now in "
            f"{workdir} (the run was retrained or resumed since). Re-embed the gallery."
        )
    images = np.stack([embedder.preprocess(image) for image in raw])
    queries = embedder.embed(images, pad_to=max(8, 1 << (len(images) - 1).bit_length()))  # few shapes
    from hdml_jax.evaluation import ranking

    curvature = ranking.curvature_of(embedder.config)
    order, similarity = nearest(queries, gallery["embeddings"], args.k, curvature)
    column = "similarity" if curvature <= 0 else "  distance"  # Poincaré: nearest first
    labels = gallery["labels"]
    for q, path in enumerate(query_paths):
        print(f"query {q + 1}: {path}")
        print(f"   rank  {column}  path" + ("  label" if labels is not None else ""))
        for rank, (j, s) in enumerate(zip(order[q], similarity[q], strict=True), start=1):
            label = f"  {labels[j]}" if labels is not None else ""
            print(f"  {rank:5d}  {s:10.4f}  {gallery['paths'][j]}{label}")
    if picture is not None:
        name = ranking.score_name(curvature)
        write_picture(picture, embedder, query_paths, list(images), gallery, order, similarity, name)
        print(f"wrote {picture}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (user mistakes exit 2 via ``SystemExit``)."""
    return run_command(build_parser, run, argv, interrupted="interrupted.")


if __name__ == "__main__":
    sys.exit(main())
