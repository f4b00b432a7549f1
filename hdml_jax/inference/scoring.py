"""Score a trained run on any labelled set: ``python -m hdml_jax.evaluate --workdir RUN --csv FILE``.

Input, one of:

* ``--csv FILE``: an Open Metric Learning CSV (``hdml_jax.data.custom``'s format: ``label``,
  ``path``, optionally ``split``, ``is_query``, ``is_gallery``, ``category``). Its validation rows
  are scored (``--all-rows``: every row; a CSV without a ``split`` column is all validation rows).
  The flags may mix query-only, gallery-only and both rows; without them every row is both
  (self-retrieval).
* ``--images DIR``: ``DIR/<class>/<image>`` or ``DIR/<category>/.../<class>/<image>`` (category
  folders of any depth, the same throughout), every image both query and gallery.

The images are embedded by the checkpoint ``hdml_jax.inference.embedder`` selects (the best by
the run's ``best_metric``; ``--step N`` for another), with the run's eval transform, a progress
line on stderr. Then the retrieval metrics with Open Metric Learning's semantics
(``hdml_jax.evaluation.query_gallery``: a query is searched among the gallery rows other than its
own): Recall@K for the run's Ks (``--ks`` for others), precision@1, R-Precision, MAP@R, NMI, and
``coarse_recall@1`` where the rows have categories (with a category path ``a/b/c``, one per
level: ``coarse_recall@1``, ``coarse2_recall@1``, ``coarse3_recall@1``). Queries with no other gallery image of their
class are left out of the scores, with a one-line note.

Written atomically (nothing half-written after Ctrl-C or an error), by default to
``<workdir>/evaluations/<csv or folder name>-step<N>.json``::

    {"metrics": {"recall@1": ..., ...}, "queries": Q, "gallery": G, "unmatched_queries": U,
     "images": N, "classes": C, "step": N, "checkpoint_id": ..., "workdir": ..., "source": ...}

``--picture FILE.png`` adds a picture of a few queries and their nearest gallery images.
Exit codes: 0 done, 2 a mistake (one ``error:`` line), 130 Ctrl-C (nothing written).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdml_jax.errors import UserError
from hdml_jax.inference.cli import IMAGE_EXTENSIONS, CliParser, load_image, run_command
from hdml_jax.inference.errors import UsageError


class EvaluationSetError(UserError, ValueError):
    """The CSV or folder to score holds nothing that can be scored, or is malformed."""


class LabelledImages:
    """The rows to score: absolute paths, integer labels, flags and optional coarse labels."""

    def __init__(
        self,
        source: str,
        paths: list[Path],
        class_names: np.ndarray,
        is_query: np.ndarray,
        is_gallery: np.ndarray,
        categories: np.ndarray | None,
    ):
        self.source, self.paths = source, paths
        _, self.labels = np.unique(class_names.astype(str), return_inverse=True)
        self.is_query, self.is_gallery = is_query, is_gallery
        # The taxonomy's levels, finest first (a category path ``a/b/c`` gives three).
        self.coarse_levels: tuple[np.ndarray, ...] = ()
        if categories is not None:
            from hdml_jax.data.custom_table import category_levels

            self.coarse_levels = tuple(
                np.unique(level.astype(str), return_inverse=True)[1] for level in category_levels(categories)
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:  # the split contract, for the picture
        return {"image": load_image(self.paths[index]), "label": int(self.labels[index])}


def read_csv_rows(csv: str | Path, root: str | Path | None, all_rows: bool) -> LabelledImages:
    """The rows of ``csv`` to score (its validation rows, or all of them), checked."""
    from hdml_jax.data.custom_table import empty_cells, eval_mode, read_csv

    table = read_csv(csv, root, need_split=False)
    chosen = np.ones(len(table), bool) if all_rows else table.splits == "validation"
    problems = [*table.problems, *empty_cells(table, ("label", "path"), among=chosen)]
    if not chosen.any():
        splits = sorted(set(table.splits.tolist()))
        problems.append(
            f"no row has split=validation (the splits are {', '.join(splits)}); pass --all-rows to score every row"
        )
    _, flag_problems = eval_mode(table, chosen)
    problems += flag_problems
    if len(problems) == 1:
        raise EvaluationSetError(f"{table.source}: {problems[0]}; nothing was scored.")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise EvaluationSetError(f"{table.source}: {len(problems)} problems; nothing was scored:\n{listed}")
    rows = np.flatnonzero(chosen)
    every = np.ones(rows.size, bool)
    is_query = every if table.is_query is None else table.is_query[rows]
    is_gallery = every if table.is_gallery is None else table.is_gallery[rows]
    categories = None if table.categories is None else table.categories[rows]
    if categories is not None:
        from hdml_jax.data.custom_table import taxonomy_problems

        if np.any(categories == ""):
            categories = None  # some rows have no category: no coarse level
        elif problems := taxonomy_problems(categories, table.rows[rows]):
            raise EvaluationSetError(f"{table.source}: {problems[0]}; nothing was scored.")
    paths = [table.resolved(int(i)).resolve() for i in rows]
    return LabelledImages(str(table.source), paths, table.labels[rows], is_query, is_gallery, categories)


def read_folder_rows(folder: str | Path) -> LabelledImages:
    """``folder/<class>/<image>`` or ``folder/<category>/<class>/<image>``: every image both."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvaluationSetError(f"--images {folder} is not a folder.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    depths = {len(p.relative_to(root).parts) for p in files}
    if not files or min(depths) < 2 or len(depths) > 1:
        raise EvaluationSetError(
            f"--images {folder}: expected <class>/<image> or <category>/.../<class>/<image> throughout "
            f"(image suffixes {', '.join(IMAGE_EXTENSIONS)}); found "
            + (f"images at depths {sorted(depths)}." if files else "no images.")
        )
    parts = [p.relative_to(root).parts for p in files]
    names = np.array(["/".join(q[:-1]) for q in parts], dtype=object)
    categories = np.array(["/".join(q[:-2]) for q in parts], dtype=object) if min(depths) >= 3 else None
    every = np.ones(len(files), bool)
    return LabelledImages(str(root), [p.resolve() for p in files], names, every, every, categories)


def score(
    rows: LabelledImages,
    embeddings: np.ndarray,
    ks: Sequence[int],
    seed: int = 0,
    ranking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics of ``embeddings`` (one row per image) and the counts behind them; ``ranking``:
    the run's geometry (``evaluate.ranking_of``; None: cosine)."""
    import jax

    from hdml_jax.evaluation import metrics
    from hdml_jax.evaluation.evaluate import coarse_recall_name

    flags = {"is_query": rows.is_query, "is_gallery": rows.is_gallery}
    ranked = {**flags, **(ranking or {})}
    result = metrics.retrieval_metrics(embeddings, rows.labels, ks=tuple(ks), **ranked)
    result["nmi"] = metrics.nmi(embeddings, rows.labels, jax.random.PRNGKey(seed))
    for level, coarse_labels in enumerate(rows.coarse_levels, start=1):
        coarse = metrics.retrieval_metrics(embeddings, coarse_labels, ks=(1,), **ranked)
        result[coarse_recall_name(level)] = coarse["recall@1"]
    unmatched, queries = metrics.count_unmatched_queries(rows.labels, **flags)
    return {
        "metrics": result,
        "images": len(rows),
        "classes": int(rows.labels.max()) + 1,
        "queries": queries,
        "gallery": int(rows.is_gallery.sum()),
        "unmatched_queries": unmatched,
    }


def build_parser() -> CliParser:
    parser = CliParser(
        prog="hdml_jax.evaluate",
        description="Score a trained run on a labelled CSV or image folder (Recall@K, MAP@R, ...).",
        epilog="Queries and gallery follow Open Metric Learning's is_query / is_gallery columns; "
        "Ctrl-C exits 130 and writes nothing.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="an Open Metric Learning CSV (label, path, ...)")
    source.add_argument(
        "--images", metavar="DIR", help="DIR/<class>/<image> (or DIR/<category>/<class>/<image>)"
    )
    parser.add_argument(
        "--root", help="with --csv: the folder its relative paths start from (default: the CSV's)"
    )
    parser.add_argument(
        "--all-rows", action="store_true", help="with --csv: score every row, not only validation"
    )
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the best one)")
    parser.add_argument("--ks", type=int, nargs="+", help="the K of Recall@K (default: the run's)")
    parser.add_argument("--output", help="the JSON file to write (default: <workdir>/evaluations/...)")
    parser.add_argument(
        "--picture", metavar="PNG", help="also draw a few queries and their nearest gallery images"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    return parser


def run(args) -> int:
    from hdml_jax.inference import embedder as inference
    from hdml_jax.workdir import atomic_write, atomic_write_text

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.ks is not None and min(args.ks) < 1:
        raise UsageError(f"--ks must be positive integers, got {' '.join(map(str, args.ks))}.")
    if args.csv is None and (args.root is not None or args.all_rows):
        raise UsageError("--root and --all-rows go with --csv only.")
    if args.picture is not None and Path(args.picture).expanduser().suffix.lower() != ".png":
        raise UsageError(f"--picture {args.picture}: name a .png file.")
    rows = read_csv_rows(args.csv, args.root, args.all_rows) if args.csv else read_folder_rows(args.images)
    unmatched, queries = _counts(rows)
    if unmatched == queries:
        raise EvaluationSetError(
            f"{rows.source}: none of the {queries} queries has another gallery image of its class, so "
            "nothing can be scored: give each class at least 2 images (or mark some rows is_gallery)."
        )
    embedder = inference.load_embedder(args.workdir, args.step)
    ks = tuple(args.ks) if args.ks else tuple(int(k) for k in embedder.config.dataset.recall_ks)
    name = Path(rows.source).stem if args.csv else Path(rows.source).name
    output = (
        Path(args.output).expanduser()
        if args.output
        else Path(embedder.workdir) / "evaluations" / f"{name}-step{embedder.step}.json"
    )
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name a .json file.")
    print(
        f"scoring {len(rows)} images ({queries} queries, {int(rows.is_gallery.sum())} gallery) with "
        f"{embedder.workdir} step {embedder.step}",
        file=sys.stderr,
    )
    embeddings = inference.embed_files(embedder, rows.paths, args.batch_size)
    from hdml_jax.evaluation.evaluate import ranking_of
    from hdml_jax.evaluation.ranking import curvature_of

    record = score(rows, embeddings, ks, seed=int(embedder.config.seed), ranking=ranking_of(embedder.config))
    record |= {
        "step": embedder.step,
        "checkpoint_id": embedder.checkpoint_id,
        "workdir": str(embedder.workdir),
        "source": rows.source,
    }
    from hdml_jax.evaluation.query_gallery import unmatched_note

    note = unmatched_note(record["unmatched_queries"], record["queries"])
    if note:
        print(note, file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(record, indent=2) + "\n")
    if args.picture is not None:
        from hdml_jax.data.base import Split
        from hdml_jax.evaluation import visualize

        picture = Path(args.picture).expanduser()
        picture.parent.mkdir(parents=True, exist_ok=True)
        split = Split(rows, rows.labels, name=rows.source)
        atomic_write(
            picture,
            lambda tmp: visualize.plot_retrieval_examples(
                tmp,
                split,
                embeddings,
                rows.is_query,
                rows.is_gallery,
                seed=int(embedder.config.seed),
                curvature=curvature_of(embedder.config),
            ),
        )
    for metric, value in record["metrics"].items():
        print(f"{metric:>16}  {100 * value:6.2f}")
    print(f"wrote {output}", file=sys.stderr)
    return 0


def _counts(rows: LabelledImages) -> tuple[int, int]:
    from hdml_jax.evaluation.query_gallery import count_unmatched_queries

    return count_unmatched_queries(rows.labels, rows.is_query, rows.is_gallery)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (user mistakes exit 2 via ``SystemExit``)."""
    return run_command(build_parser, run, argv, interrupted="interrupted; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
