"""Your own data set: an Open Metric Learning CSV or a folder of images, checked and prepared once.

**CSV** (Open Metric Learning's format; one row per image, any column order, extra columns
ignored)::

    label,path,split,is_query,is_gallery,category,x_1,x_2,y_1,y_2
    shoe_0013,images/shoe 0013/a.jpg,train,,,shoes,,,,
    bag_0102,images/bag_0102/front.png,validation,True,False,bags,12,230,40,300

=============  ========  ====================================================================
column         required  meaning
=============  ========  ====================================================================
label          yes       the class (any text); a class lives in one split only
path           yes       image file, relative to ``root`` (default: the CSV's folder) or
                         absolute; spaces allowed; any format PIL reads; grayscale, palette
                         and RGBA images become RGB (alpha dropped)
split          yes       ``train`` or ``validation``
is_query,      no        validation rows: ``True``/``False`` (also 1/0, yes/no), any mix of
is_gallery               query-only, gallery-only and both (Open Metric Learning's semantics):
                         a query is searched among the gallery rows other than its own row.
                         Every row both (or no columns): self-retrieval. A query whose class
                         has no other gallery row is left out of the scores, with a note.
category       no        the coarse class of the row's class (one per class), or a path of
                         them, coarsest first (``home/kitchen/kettles``: a taxonomy of any
                         depth, the same for every class): HPL's coarse levels with
                         ``loss.coarse_from_labels`` and one ``coarse_recall@1`` per level
x_1 x_2        no        a bounding box in pixels (left, right, top, bottom; OML's
y_1 y_2                  convention), all four or none, per row; empty cells: the whole
                         image. Used with ``dataset.crop_to_bbox=True``.
=============  ========  ====================================================================

**Folder**: ``root/<split>/<class>/<image>`` or ``root/<split>/<category>/<class>/<image>``, with
split folders ``train`` and ``validation`` (``val`` or ``test`` are accepted for the latter) and
image suffixes ``IMAGE_SUFFIXES``; it becomes the same table as a CSV (self-retrieval).

**Checks** (``check_table`` and the image scan), all reported at once before anything is written:
missing columns, empty cells, unknown split values, an empty split, a class in both splits, a
class with two categories, rows that are neither query nor gallery, duplicate paths, malformed or
out-of-image boxes, training classes with a single image when the loss needs pairs, missing
files, unreadable or truncated images. (Evaluation queries with nothing to find are no error:
they are left out of the scores, and the trainer says how many; only when no query can be scored
does it stop, before training.)

**Prepared form**: every image's file bytes in one ``images.array_record`` (random access, what
grain reads; no per-image file opens at training time, which matters on network file systems)
and an ``index.npz`` of labels, splits, flags, boxes and image sizes, in
``<cache>/custom/<name>-<fingerprint>/``. The fingerprint covers the table's content and every
image file's size and modification time, so editing the CSV or replacing an image prepares
again; anything else reuses the prepared copy. Preparation writes into a temporary folder renamed
into place when complete: an error or Ctrl-C leaves nothing half-written.

Labels: each split's classes are numbered ``0..C-1`` in sorted order of their names (numerically
when every name is an integer); categories are numbered with the training categories first, so
the training split's coarse labels are ``0..G-1`` with no gap.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdml_jax.data.base import MetricDataset, Split, SubsetSource
from hdml_jax.data.custom_table import (
    BBOX_COLUMNS,
    EVAL_FOLDER_NAMES,
    IMAGE_SUFFIXES,
    REQUIRED_COLUMNS,
    SPLITS,
    CustomDataError,
    ImageTable,
    Requirements,
    category_levels,
    check_table,
    eval_mode,
    listing,
    raise_if_problems,
    read_csv,
    read_folder,
    read_table,
)
from hdml_jax.errors import UserError

__all__ = [
    "BBOX_COLUMNS",
    "EVAL_FOLDER_NAMES",
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "CustomDataError",
    "ImageTable",
    "PreparedImages",
    "Requirements",
    "check_table",
    "decode_rgb",
    "default_cache_dir",
    "fingerprint",
    "load_custom",
    "load_prepared",
    "load_rgb",
    "main",
    "prepare",
    "read_csv",
    "read_folder",
    "read_table",
]

FORMAT_VERSION = 2  # bump when the prepared form changes (2: a taxonomy's levels)


# ----------------------------------------------------------------------------- images


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as ``uint8 (H, W, 3)`` (grayscale, palette, CMYK, 16-bit and RGBA become RGB).

    Raises:
      CustomDataError: missing, unreadable or truncated file.
    """
    try:
        return decode_rgb(Path(path).read_bytes())
    except FileNotFoundError:
        raise CustomDataError(f"{path}: no such image file.") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise CustomDataError(f"{path}: not a readable image ({error}).") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes → ``uint8 (H, W, 3)``; decodes every pixel, so a truncated file fails
    here (``OSError``) rather than half-way through a training step."""
    from hdml_jax.data.encoded import EncodedImage

    return EncodedImage(data).decode()  # 16/32-bit greyscale scaled to 8 bits (encoded.pil_to_rgb)


def _scan_image(file: Path) -> tuple[bytes | None, tuple[int, int], str | None, str]:
    """``(bytes, (height, width), problem kind, detail)`` of one image file (kind None: fine)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None, (0, 0), "missing", ""
    except OSError as error:
        return None, (0, 0), "unreadable", str(error.strerror or error)
    try:
        pixels = decode_rgb(data)
    except Exception as error:  # PIL raises many types for bad, truncated or foreign files
        from PIL import UnidentifiedImageError

        if isinstance(error, UnidentifiedImageError):
            return None, (0, 0), "unreadable or truncated", "not an image format Pillow reads"
        return None, (0, 0), "unreadable or truncated", str(error) or type(error).__name__
    return data, pixels.shape[:2], None, ""


# ----------------------------------------------------------------------------- preparation


def default_cache_dir() -> Path:
    """``$HDML_JAX_CACHE/datasets`` (default ``~/.cache/hdml_jax/datasets``)."""
    return Path(os.environ.get("HDML_JAX_CACHE") or "~/.cache/hdml_jax").expanduser() / "datasets"


def fingerprint(table: ImageTable) -> str:
    """A hash of the table's content and of every image file's size and modification time."""
    digest = hashlib.sha256(f"hdml_jax custom v{FORMAT_VERSION}\n{table.root.resolve()}\n".encode())
    columns = [table.paths, table.labels, table.splits]
    columns += [c for c in (table.is_query, table.is_gallery, table.categories) if c is not None]
    for values in columns:
        digest.update(json.dumps([str(v) for v in values]).encode())
    if table.boxes is not None:
        digest.update(np.ascontiguousarray(table.boxes).tobytes())
    for i in range(len(table)):
        try:
            stat = table.resolved(i).stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
        except OSError:
            digest.update(b"missing;")
    return digest.hexdigest()[:16]


def _progress(done: int, total: int, started: float, what: str) -> None:
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    end = "\n" if done == total else "\r"
    print(
        f"{what}: {done}/{total} images, {rate:.0f} img/s, ETA {eta:.0f} s",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _dense_ids(names: np.ndarray) -> np.ndarray:
    """Names → ``0..C-1`` in sorted order (numeric when every name is an integer)."""
    unique = sorted(set(names.tolist()))
    if all(_is_int(name) for name in unique):
        unique = sorted(unique, key=int)
    index = {name: i for i, name in enumerate(unique)}
    return np.array([index[name] for name in names], np.int64)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _coarse_ids(categories: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Category names → ids, the training split's categories first (dense ``0..G-1`` there)."""
    train_names = sorted(set(categories[train].tolist()))
    other = sorted(set(categories[~train].tolist()) - set(train_names))
    index = {name: i for i, name in enumerate([*train_names, *other])}
    return np.array([index[c] for c in categories], np.int64)


def prepare(
    table: ImageTable,
    cache_dir: str | os.PathLike | None = None,
    requirements: Requirements | None = None,
    num_threads: int | None = None,
    progress: Callable[[int, int, float, str], None] | None = _progress,
) -> Path:
    """Check ``table`` and its images, and write the prepared form (once; see the module docstring).

    Returns the prepared folder. The table's problems and its images' are reported together, in
    one ``CustomDataError``, and then nothing is kept on disk. ``requirements``: what the method
    needs of the table (default: nothing beyond a valid table).
    """
    problems = check_table(table, requirements or Requirements())
    cache_dir = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else default_cache_dir()
    name = Path(table.source).stem.replace(" ", "_") or "data"
    target = cache_dir / "custom" / f"{name}-{fingerprint(table)}"
    if not problems and (target / "index.npz").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CustomDataError(
            f"cannot create {target.parent} to prepare {table.source} into ({error.strerror or error}); "
            "set --config.dataset.data_dir (or $HDML_JAX_CACHE) to a writable folder."
        ) from None
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sizes, image_problems = _write_records(table, tmp / "images.array_record", num_threads, progress)
        raise_if_problems(problems + image_problems, table.source)
        _write_index(table, tmp / "index.npz", sizes)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "index.npz").is_file():  # not another process's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_records(
    table: ImageTable, path: Path, num_threads: int | None, progress: Callable[..., None] | None
) -> tuple[np.ndarray, list[str]]:
    """Scan every image and write its bytes: ``(N, 2)`` heights/widths and the images' problems.

    Rows without a path are skipped (``check_table`` reports them). Once anything is wrong the
    scan goes on, to list every bad file, but writes nothing more.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    from hdml_jax import interrupts

    sizes = np.zeros((len(table), 2), np.int64)
    problems: dict[str, list[str]] = defaultdict(list)
    started = time.perf_counter()
    writer = ArrayRecordWriter(str(path), "group_size:1")
    threads = num_threads or min(8, os.cpu_count() or 1)
    chunk = 64 * threads  # bounded memory: only one chunk's file bytes are held at a time
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(table), chunk):
                interrupts.stop_point()  # Ctrl-C under the trainer: stop here, keep nothing
                rows = [i for i in range(start, min(start + chunk, len(table))) if table.paths[i]]
                for i, (data, size, kind, detail) in zip(
                    rows, pool.map(_scan_image, [table.resolved(i) for i in rows]), strict=True
                ):
                    if kind is not None:
                        problems[kind].append(
                            f"{table.paths[i]} ({detail})" if detail else str(table.paths[i])
                        )
                    elif not problems:
                        writer.write(data)
                    sizes[i] = size
                if progress is not None:
                    done = min(start + chunk, len(table))
                    progress(done, len(table), started, f"checking and preparing {table.source}")
    finally:
        writer.close()
    listed = [
        listing(f"missing files (under {table.root})" if kind == "missing" else f"{kind} images", items)
        for kind, items in problems.items()
    ]
    if table.boxes is not None:
        box = table.boxes
        outside = ~np.isnan(box).any(axis=1) & ((box[:, 1] > sizes[:, 1]) | (box[:, 3] > sizes[:, 0]))
        outside &= sizes[:, 0] > 0
        if outside.any():
            listed.append(
                listing(
                    "bounding boxes outside their image (x_2 > width or y_2 > height)",
                    [f"{r} ({p})" for r, p in zip(table.rows[outside], table.paths[outside], strict=True)],
                )
            )
    return sizes, listed


def _write_index(table: ImageTable, path: Path, sizes: np.ndarray) -> None:
    train = table.splits == "train"
    labels = np.zeros(len(table), np.int64)
    labels[train] = _dense_ids(table.labels[train])
    labels[~train] = _dense_ids(table.labels[~train])
    arrays: dict[str, np.ndarray] = {
        "paths": table.paths.astype(str),
        "class_names": table.labels.astype(str),
        "labels": labels,
        "train": train,
        "sizes": sizes,
    }
    mode, _ = eval_mode(table, ~train)
    if mode == "query_gallery":
        arrays["is_query"] = table.is_query & ~train
        arrays["is_gallery"] = table.is_gallery & ~train
    if table.categories is not None:
        levels = category_levels(table.categories)
        arrays["coarse_labels"] = _coarse_ids(levels[0], train)
        arrays["category_names"] = table.categories.astype(str)
        if len(levels) > 1:  # the levels above: (L - 1, N), finest first
            arrays["coarser_labels"] = np.stack([_coarse_ids(level, train) for level in levels[1:]])
    if table.boxes is not None:
        # pixels (x_1, x_2, y_1, y_2) → [ymin, xmin, ymax, xmax] in [0, 1]; no box: the whole image
        height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
        box = table.boxes
        normalized = np.stack(
            [box[:, 2] / height, box[:, 0] / width, box[:, 3] / height, box[:, 1] / width], 1
        )
        whole = np.isnan(normalized).any(axis=1)
        normalized[whole] = [0.0, 0.0, 1.0, 1.0]
        arrays["bbox"] = normalized.astype(np.float32)
    arrays["source"] = np.asarray(table.source)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


# ----------------------------------------------------------------------------- reading


class PreparedImages:
    """Random access to a prepared folder's images: ``source[i] -> {"image", ["bbox"]}``.

    Picklable (grain sends sources to worker processes): the reader opens on first use.
    """

    def __init__(self, folder: Path, bboxes: np.ndarray | None = None):
        self._path = Path(folder) / "images.array_record"
        self._bboxes = bboxes
        self._reader = None
        self._length = len(np.load(Path(folder) / "index.npz")["labels"])

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._example(index, encoded=False)

    def encoded(self, index: int) -> dict[str, Any]:
        """``self[index]`` with the image a ``encoded.EncodedImage`` (the file's bytes)."""
        return self._example(index, encoded=True)

    def _example(self, index: int, encoded: bool) -> dict[str, Any]:
        from hdml_jax.data.encoded import EncodedImage

        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource([str(self._path)])
        data = self._reader[int(index)]
        example: dict[str, Any] = {"image": EncodedImage(data) if encoded else decode_rgb(data)}
        if self._bboxes is not None:
            example["bbox"] = self._bboxes[int(index)]
        return example

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __repr__(self) -> str:
        return f"PreparedImages({self._path}, {len(self)})"


def load_prepared(
    folder: str | os.PathLike, *, crop_to_bbox: bool = False, recall_ks: Sequence[int] = (1, 2, 4, 8)
) -> MetricDataset:
    """The ``MetricDataset`` of a prepared folder (``prepare``'s result)."""
    from hdml_jax.data.datasets import ToExample

    folder = Path(folder)
    with np.load(folder / "index.npz", allow_pickle=False) as npz:
        index = {k: npz[k] for k in npz.files}
    bboxes = index.get("bbox")
    if crop_to_bbox and bboxes is None:
        raise CustomDataError(f"dataset.crop_to_bbox=True but {index['source']} has no bounding boxes.")
    images = PreparedImages(folder, bboxes)
    transform = ToExample(crop_to_bbox=crop_to_bbox, keep_bbox=bboxes is not None)
    coarse = index.get("coarse_labels")
    coarser = index.get("coarser_labels", np.zeros((0, len(index["labels"])), np.int64))
    name = f"custom:{Path(str(index['source'])).name}"

    def split(rows: np.ndarray, what: str) -> Split:
        labels = index["labels"][rows]
        coarse_rows = None if coarse is None else coarse[rows]
        return Split(
            source=SubsetSource(images, rows, labels, coarse_rows, transform),
            labels=labels,
            coarse_labels=coarse_rows,
            name=f"{name}/{what}",
            coarser_labels=tuple(level[rows] for level in coarser),
        )

    train_rows = np.flatnonzero(index["train"])
    test_rows = np.flatnonzero(~index["train"])
    roles = {}
    if "is_query" in index:
        roles = {"is_query": index["is_query"][test_rows], "is_gallery": index["is_gallery"][test_rows]}
    return MetricDataset(
        name=name,
        train=split(train_rows, "train"),
        test=split(test_rows, "validation"),
        recall_ks=tuple(int(k) for k in recall_ks),
        **roles,
    )


def load_custom(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    crop_to_bbox: bool = False,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    requirements: Requirements | None = None,
) -> MetricDataset:
    """Read, check, prepare (once) and load a CSV or image folder (the module docstring).

    Raises:
      CustomDataError: every problem of the table and its images, in one message.
    """
    table = read_table(path, root)
    requirements = requirements or Requirements(boxes=crop_to_bbox)
    folder = prepare(table, cache_dir, requirements)
    return load_prepared(folder, crop_to_bbox=crop_to_bbox, recall_ks=recall_ks)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m hdml_jax.data.custom PATH [--root DIR] [--cache_dir DIR]``: check and prepare."""
    import argparse

    from hdml_jax.errors import exit_with_message

    parser = argparse.ArgumentParser(
        prog="python -m hdml_jax.data.custom",
        description="Check an Open Metric Learning CSV or an image folder and prepare it for training.",
    )
    parser.add_argument("path", help="the CSV file or the image folder")
    parser.add_argument(
        "--root", default=None, help="what the CSV's paths are relative to (default: its folder)"
    )
    parser.add_argument("--cache_dir", default=None, help=f"where to prepare (default {default_cache_dir()})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        dataset = load_custom(args.path, root=args.root, cache_dir=args.cache_dir)
    except UserError as error:
        exit_with_message(error)
    except KeyboardInterrupt:
        print("interrupted; nothing was kept.", file=sys.stderr)
        return 130
    summary = {
        s: (len(getattr(dataset, s)), getattr(dataset, s).num_classes)
        for s in ("train", "test", "query", "gallery")
        if getattr(dataset, s) is not None
    }
    print(f"{args.path}: ok — " + ", ".join(f"{s} {n} images / {c} classes" for s, (n, c) in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
