"""Embed images with a trained run: ``python -m hdml_jax.embed --workdir RUN --images DIR --output emb.npz``.

Input, one of:

* ``--images DIR``: every image under ``DIR`` (recursively; .jpg .jpeg .png .bmp .webp .gif, any
  case), in sorted path order;
* ``--csv FILE``: a CSV with a header and a ``path`` column (relative to the CSV's folder, or to
  ``--root``) and optionally a ``label`` column.

Each image is loaded as RGB, passed through the run's eval transform and embedded by the
checkpoint that ``hdml_jax.inference.embedder`` selects (the best by Recall@1; ``--step N`` for another).
A progress line on stderr shows images done, images/s and the time left.

The output ``.npz`` (written atomically: after Ctrl-C or an error nothing is left half-written)::

    embeddings     float32 (N, d), L2-normalised rows
    paths          str (N,), absolute paths of the images
    labels         str (N,), only with a CSV that has a label column
    step           int, the checkpoint's step
    workdir        str, the run's folder (absolute)
    checkpoint_id  str, hash of the checkpoint's fingerprint (``search`` checks it)
    image_size     int, S

Exit codes: 0 done, 2 a mistake (one ``error:`` line), 130 Ctrl-C (nothing written).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hdml_jax.errors import UserError
from hdml_jax.inference.cli import IMAGE_EXTENSIONS, CliParser, run_command
from hdml_jax.inference.errors import UsageError


class ImageListError(UserError, ValueError):
    """No images found, or a CSV without a ``path`` column."""


def list_images(directory: str | Path) -> list[Path]:
    """The image files under ``directory`` (recursively, by extension), sorted by path."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        if not root.exists():
            hint = " (nothing exists there)."
        elif root.suffix.lower() in (".csv", ".tsv"):
            hint = f": it is a file. To embed the images a CSV lists, use --csv {directory}."
        else:
            hint = ": it is a file. --images takes a folder of images, --csv a CSV with a 'path' column."
        raise ImageListError(f"--images {directory} is not a folder{hint}")
    found = sorted(
        path.resolve()
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    if not found:
        raise ImageListError(
            f"no images under {directory} (looked for {', '.join(IMAGE_EXTENSIONS)}, in subfolders too)."
        )
    return found


def read_csv(csv_path: str | Path, root: str | Path | None = None) -> tuple[list[Path], list[str] | None]:
    """``(paths, labels or None)`` from a CSV with a ``path`` column and an optional ``label`` one.

    Relative paths are taken from the CSV's folder, or from ``root`` when given.
    """
    csv_path = Path(csv_path).expanduser()
    base = Path(root).expanduser() if root is not None else csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns:
                raise ImageListError(
                    f"{csv_path} has no 'path' column (its header: {', '.join(columns) or 'none'}). "
                    "The first line must name the columns, e.g. 'path,label'."
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise ImageListError(f"--csv {csv_path} does not exist.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ImageListError(f"--csv {csv_path} cannot be read ({error}).") from None
    rows = [row for row in rows if row.get("path")]
    if not rows:
        raise ImageListError(f"{csv_path} lists no images (no row has a path).")
    paths = [(base / row["path"]).resolve() for row in rows]
    labels = [row.get("label", "") for row in rows] if "label" in columns else None
    return paths, labels


def write_npz(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` to ``output`` atomically (the folder is created if needed)."""
    from hdml_jax.workdir import atomic_write

    output.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(output, write)


def build_parser() -> CliParser:
    parser = CliParser(
        prog="hdml_jax.embed",
        description="Embed images with a trained run's checkpoint and save them as .npz.",
        epilog="Output arrays: embeddings (N, d) float32, paths, labels (CSV with a label column), "
        "step, workdir, checkpoint_id. Ctrl-C exits 130 and writes nothing.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a folder of images (searched recursively)")
    source.add_argument("--csv", metavar="FILE", help="a CSV with a 'path' and optionally a 'label' column")
    parser.add_argument(
        "--root", help="with --csv: the folder its relative paths start from (default: the CSV's)"
    )
    parser.add_argument("--output", required=True, help="the .npz file to write")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the best by Recall@1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    return parser


def run(args) -> int:
    from hdml_jax.inference import embedder as inference

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.root is not None and args.csv is None:
        raise UsageError("--root goes with --csv only.")
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise UsageError(
            f"--output {args.output} is a folder; name a file, e.g. {output / 'embeddings.npz'}."
        )
    if args.images is not None:
        paths, labels = list_images(args.images), None
    else:
        paths, labels = read_csv(args.csv, args.root)
    embedder = inference.load_embedder(args.workdir, args.step)
    print(
        f"embedding {len(paths)} images with {embedder.workdir} step {embedder.step} "
        f"({embedder.embedding_dim}-d, {embedder.image_size} px, {embedder.num_devices} device(s))",
        file=sys.stderr,
    )
    embeddings = inference.embed_files(embedder, paths, args.batch_size)
    arrays = {
        "embeddings": embeddings.astype(np.float32),
        "paths": np.array([str(p) for p in paths], dtype=str),
        "step": np.array(embedder.step),
        "workdir": np.array(str(embedder.workdir)),
        "checkpoint_id": np.array(embedder.checkpoint_id),
        "image_size": np.array(embedder.image_size),
    }
    if labels is not None:
        arrays["labels"] = np.array(labels, dtype=str)
    write_npz(output, arrays)
    print(f"wrote {output} ({len(paths)} × {embedder.embedding_dim})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (user mistakes exit 2 via ``SystemExit``)."""
    return run_command(build_parser, run, argv, interrupted="interrupted; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
