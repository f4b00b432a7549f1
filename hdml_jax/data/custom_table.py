"""Your own data set as a table: read from an Open Metric Learning CSV or a folder, and checked.

``read_table`` gives an ``ImageTable`` (one row per image: path, label, split, the query/gallery
flags, category, box); ``check_table`` lists every problem of it at once (missing columns, empty
cells, unknown splits, a class in both splits or with two categories, query/gallery flags that do
not fit together, duplicate paths, bad boxes, classes too small for evaluation or for the loss).
The formats are described in ``hdml_jax.data.custom``, which prepares a checked table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hdml_jax.errors import UserError

REQUIRED_COLUMNS = ("label", "path", "split")


BBOX_COLUMNS = ("x_1", "x_2", "y_1", "y_2")


SPLITS = ("train", "validation")


EVAL_FOLDER_NAMES = ("validation", "val", "test")  # accepted names of the image folder's eval split


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


_TRUE = ("true", "1", "yes", "y", "t")


_FALSE = ("false", "0", "no", "n", "f")


_MAX_LISTED = 8  # examples listed per kind of problem


class CustomDataError(UserError, ValueError):
    """A CSV or image folder that cannot be used; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class ImageTable:
    """A data set as rows, before any check (what a CSV or an image folder says).

    Attributes:
      source: the CSV or folder, for messages.
      root: what relative paths are relative to.
      paths: ``(N,)`` the image paths as written (relative or absolute).
      labels: ``(N,)`` class names.
      splits: ``(N,)`` ``"train"`` / ``"validation"`` (anything else is reported by the checks).
      rows: ``(N,)`` where each row came from (``"line 7"``, a path), for messages.
      is_query, is_gallery: ``(N,)`` bool or None (no such column). Unparseable cells are
        reported in ``problems``.
      categories: ``(N,)`` coarse class names or None.
      boxes: ``(N, 4)`` float64 ``x_1, x_2, y_1, y_2`` pixels, NaN where a row has none; or None.
      problems: what reading found wrong (missing columns, bad cells).
    """

    source: str
    root: Path
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    rows: np.ndarray
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    categories: np.ndarray | None = None
    boxes: np.ndarray | None = None
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def resolved(self, i: int) -> Path:
        """The file of row ``i``: its path if absolute, else under ``root``."""
        path = Path(os.path.expanduser(str(self.paths[i])))
        return path if path.is_absolute() else self.root / path


def listing(kind: str, items: Sequence[str], total: int | None = None) -> str:
    """``kind: a, b, c and 12 more``."""
    total = len(items) if total is None else total
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    return f"{kind}: {shown}{more}"


def _parse_bool(value: str) -> bool | None:
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def read_csv(
    path: str | os.PathLike, root: str | os.PathLike | None = None, *, need_split: bool = True
) -> ImageTable:
    """The rows of an Open Metric Learning CSV (see the module docstring); nothing is checked
    beyond what parsing needs (``check_table`` does the rest).

    ``need_split=False`` (a CSV to evaluate on, ``python -m hdml_jax.evaluate``): a CSV without a
    ``split`` column is read as all validation rows.

    Raises:
      CustomDataError: the file is missing or unreadable, or lacks a required column.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise CustomDataError(
            f"{path}: no such CSV file. Set --config.dataset.path to an Open Metric Learning CSV "
            "(columns label, path, split; see hdml_jax/data/custom.py) or to an image folder."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CustomDataError(f"{path}: cannot read the CSV ({error}).") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in (reader.fieldnames or [])]
    required = [c for c in REQUIRED_COLUMNS if need_split or c != "split"]
    missing = [c for c in required if c not in header]
    if missing:
        raise CustomDataError(
            f"{path}: missing column(s) {', '.join(missing)} (the header is {','.join(header) or 'empty'}). "
            f"An Open Metric Learning CSV needs {', '.join(required)}; optional: is_query, "
            f"is_gallery, category, {', '.join(BBOX_COLUMNS)}."
        )
    reader.fieldnames = header
    records = list(reader)
    problems: list[str] = []
    present_boxes = [c for c in BBOX_COLUMNS if c in header]
    if present_boxes and len(present_boxes) != len(BBOX_COLUMNS):
        absent = [c for c in BBOX_COLUMNS if c not in header]
        problems.append(f"bounding boxes need all of {', '.join(BBOX_COLUMNS)}; missing {', '.join(absent)}")
        present_boxes = []

    def column(name: str) -> np.ndarray:
        return np.array([(r.get(name) or "").strip() for r in records], dtype=object)

    # The header is line 1; a record spanning several lines (quoted newlines) is rare enough.
    rows = np.array([f"line {reader_line}" for reader_line in range(2, len(records) + 2)], dtype=object)
    is_flag: dict[str, np.ndarray | None] = {}
    for name in ("is_query", "is_gallery"):
        if name not in header:
            is_flag[name] = None
            continue
        values = column(name)
        parsed = np.zeros(len(values), bool)
        bad = []
        for i, value in enumerate(values):
            flag = _parse_bool(value)
            if flag is None and (records[i].get("split", "validation") or "").strip() == "validation":
                bad.append(f"{rows[i]} ({value!r})")
            parsed[i] = bool(flag)
        if bad:
            problems.append(listing(f"{name} must be True or False on validation rows", bad))
        is_flag[name] = parsed
    boxes = None
    if present_boxes:
        boxes = np.full((len(records), 4), np.nan)
        bad = []
        for i, record in enumerate(records):
            cells = [(record.get(c) or "").strip() for c in BBOX_COLUMNS]
            if not any(cells):
                continue
            try:
                boxes[i] = [float(c) for c in cells]
            except ValueError:
                bad.append(f"{rows[i]} ({', '.join(cells)})")
        if bad:
            problems.append(listing("bounding boxes must be four numbers or four empty cells", bad))
    return ImageTable(
        source=str(path),
        root=Path(os.path.expanduser(os.fspath(root))) if root else path.parent,
        paths=column("path"),
        labels=column("label"),
        splits=column("split") if "split" in header else np.full(len(records), "validation", dtype=object),
        rows=rows,
        is_query=is_flag["is_query"],
        is_gallery=is_flag["is_gallery"],
        categories=column("category") if "category" in header else None,
        boxes=boxes,
        problems=tuple(problems),
    )


def read_folder(root: str | os.PathLike) -> ImageTable:
    """The rows of an image folder ``root/<split>/[<category>/...]<class>/<image>`` (any number of
    category levels, the same throughout: a taxonomy, coarsest first).

    Raises:
      CustomDataError: no such folder, no split folders, or a layout that mixes depths.
    """
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.is_dir():
        raise CustomDataError(f"{root}: no such folder (dataset.path: a CSV file or an image folder).")
    eval_names = [n for n in EVAL_FOLDER_NAMES if (root / n).is_dir()]
    if not (root / "train").is_dir() or len(eval_names) != 1:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise CustomDataError(
            f"{root}: an image folder needs the subfolders train/ and one of "
            f"{'/, '.join(EVAL_FOLDER_NAMES)}/ (found: {', '.join(found) or 'none'}), each holding "
            "<class>/<image> or <category>/<class>/<image>."
        )
    paths, labels, splits, categories, depths = [], [], [], [], set()
    for split, folder in (("train", "train"), ("validation", eval_names[0])):
        for file in sorted((root / folder).rglob("*")):
            if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            parts = file.relative_to(root / folder).parts
            depths.add(len(parts))
            paths.append(file.relative_to(root).as_posix())
            splits.append(split)
            labels.append("/".join(parts[:-1]))  # category/class: unique even if class names repeat
            categories.append("/".join(parts[:-2]))  # the taxonomy's path, coarsest first
    problems = []
    if depths - set(range(2, 64)) or len(depths) > 1:
        problems.append(
            f"images at mixed or unexpected depths under {root} (levels below the split folder: "
            f"{sorted(depths)}); use <split>/<class>/<image> or <split>/<category>/.../<class>/<image>, "
            "with the same number of category levels throughout"
        )
    nested = len(depths) == 1 and min(depths) >= 3
    return ImageTable(
        source=str(root),
        root=root,
        paths=np.array(paths, dtype=object),
        labels=np.array(labels, dtype=object),
        splits=np.array(splits, dtype=object),
        rows=np.array(paths, dtype=object),
        categories=np.array(categories, dtype=object) if nested else None,
        problems=tuple(problems),
    )


def read_table(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageTable:
    """``read_csv`` for a file, ``read_folder`` for a folder."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        if root:
            raise CustomDataError(f"dataset.root is for CSV files; {path} is a folder (its own root).")
        return read_folder(path)
    return read_csv(path, root)


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What the run needs of the data.

    Attributes:
      pairs_in_train: every training class needs two images (a pair-based loss: triplet).
      boxes: ``crop_to_bbox`` is on, so the table must have bounding boxes.
    """

    pairs_in_train: bool = False
    boxes: bool = False


def eval_mode(table: ImageTable, validation: np.ndarray) -> tuple[str, list[str]]:
    """``"self"`` or ``"query_gallery"``, and the problems of the query/gallery flags."""
    if table.is_query is None and table.is_gallery is None:
        return "self", []
    if (table.is_query is None) != (table.is_gallery is None):
        given = "is_query" if table.is_gallery is None else "is_gallery"
        other = "is_gallery" if given == "is_query" else "is_query"
        return "self", [f"the CSV has {given} but no {other} column; give both or neither"]
    query, gallery = table.is_query[validation], table.is_gallery[validation]
    rows = table.rows[validation]
    problems = []
    neither = ~query & ~gallery
    if neither.any():
        problems.append(listing("validation rows that are neither query nor gallery", list(rows[neither])))
    # Any mix of both, query-only and gallery-only rows is valid (Open Metric Learning's format).
    return ("self" if (query & gallery).all() else "query_gallery"), problems


def _class_problems(
    labels: np.ndarray, splits: np.ndarray, categories: np.ndarray | None, rows: np.ndarray
) -> list[str]:
    problems = []
    split_of: dict[str, set[str]] = defaultdict(set)
    category_of: dict[str, set[str]] = defaultdict(set)
    for i, label in enumerate(labels):
        split_of[label].add(splits[i])
        if categories is not None:
            category_of[label].add(categories[i])
    in_both = sorted(label for label, s in split_of.items() if len(s) > 1)
    if in_both:
        problems.append(
            listing("classes in both train and validation (the splits must hold disjoint classes)", in_both)
        )
    if categories is not None:
        empty = rows[categories == ""]
        if len(empty):
            problems.append(listing("empty category cells", list(empty)))
        mixed = sorted(f"{label} ({', '.join(sorted(c))})" for label, c in category_of.items() if len(c) > 1)
        if mixed:
            problems.append(listing("classes with more than one category (a class under two parents)", mixed))
        problems += taxonomy_problems(categories[categories != ""], rows[categories != ""])
    return problems


CATEGORY_SEPARATOR = "/"


def category_levels(categories: np.ndarray) -> list[np.ndarray]:
    """A ``category`` column of paths (``home/kitchen/kettles``, coarsest first) as its levels,
    finest first: ``[home/kitchen/kettles, home/kitchen, home]`` per row, each level named by its
    whole path prefix (so ``garden/tools`` and ``home/tools`` stay apart). One level for plain
    names. The paths must all have the same depth (``taxonomy_problems``)."""
    parts = [str(c).split(CATEGORY_SEPARATOR) for c in categories]
    depth = len(parts[0]) if parts else 1
    return [
        np.array([CATEGORY_SEPARATOR.join(p[: depth - level]) for p in parts], dtype=object)
        for level in range(depth)
    ]


def taxonomy_problems(categories: np.ndarray, rows: np.ndarray) -> list[str]:
    """A category path with an empty level (``home//kettles``), or paths of different depths."""
    problems = []
    parts = [str(c).split(CATEGORY_SEPARATOR) for c in categories]
    empty = [rows[i] for i, p in enumerate(parts) if str(categories[i]) and "" in p]
    if empty:
        problems.append(listing(f"category paths with an empty level (between '{CATEGORY_SEPARATOR}'s)", empty))
    depths = np.array([len(p) for p in parts])
    if len(depths) and (depths != depths[0]).any():
        common = int(np.bincount(depths).argmax())
        odd = [f"{rows[i]} ({categories[i]!r}: {depths[i]})" for i in np.flatnonzero(depths != common)]
        problems.append(
            listing(
                f"category paths of another depth than the usual {common} levels (a taxonomy must "
                "give every class the same number of levels)",
                odd,
            )
        )
    return problems


def _singletons(labels: np.ndarray) -> list[str]:
    names, counts = np.unique(labels.astype(str), return_counts=True)
    return list(names[counts == 1])


def empty_cells(table: ImageTable, columns: Sequence[str], among: np.ndarray | None = None) -> list[str]:
    """One problem per column of ``columns`` (``label``, ``path``, ``split``) with empty cells,
    listing their rows (only rows where ``among`` is True, when given)."""
    problems = []
    for name in columns:
        values = {"label": table.labels, "path": table.paths, "split": table.splits}[name]
        empty = (values == "") if among is None else among & (values == "")
        if empty.any():
            problems.append(listing(f"empty {name} cells", list(table.rows[empty])))
    return problems


def check_table(table: ImageTable, requirements: Requirements = Requirements()) -> list[str]:
    """Everything wrong with ``table`` that needs no image (the module docstring's list)."""
    problems = list(table.problems)
    if len(table) == 0:
        return [*problems, "no rows"]
    problems += empty_cells(table, ("label", "path", "split"))
    unknown = (table.splits != "") & ~np.isin(table.splits, SPLITS)
    if unknown.any():
        shown = [f"{r} ({s!r})" for r, s in zip(table.rows[unknown], table.splits[unknown], strict=True)]
        problems.append(listing(f"split must be {' or '.join(SPLITS)}", shown))
    train, validation = table.splits == "train", table.splits == "validation"
    for name, mask in (("train", train), ("validation", validation)):
        if not mask.any():
            problems.append(f"the {name} split is empty (no row has split={name})")
    paths, counts = np.unique(table.paths[table.paths != ""].astype(str), return_counts=True)
    if (counts > 1).any():
        problems.append(listing("paths listed more than once", list(paths[counts > 1])))
    problems += _class_problems(table.labels, table.splits, table.categories, table.rows)
    _, flag_problems = eval_mode(table, validation)
    problems += flag_problems
    if requirements.pairs_in_train and train.any():
        single = _singletons(table.labels[train])
        if single:
            problems.append(
                listing("training classes with a single image (the triplet loss needs pairs)", single)
            )
    if requirements.boxes and table.boxes is None:
        problems.append(f"dataset.crop_to_bbox=True but the CSV has no {', '.join(BBOX_COLUMNS)} columns")
    if table.boxes is not None:
        box = table.boxes
        given = ~np.isnan(box).any(axis=1)
        bad = given & (
            (box[:, 0] < 0) | (box[:, 2] < 0) | (box[:, 1] <= box[:, 0]) | (box[:, 3] <= box[:, 2])
        )
        if bad.any():
            problems.append(
                listing("bounding boxes need 0 <= x_1 < x_2 and 0 <= y_1 < y_2", list(table.rows[bad]))
            )
    return problems


def raise_if_problems(problems: Sequence[str], source: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CustomDataError(
            f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was prepared "
            f"or trained:\n{lines}"
        )
