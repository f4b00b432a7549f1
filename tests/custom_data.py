"""Write small custom data sets (Open Metric Learning CSVs, image folders) from generated images."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tests.tiny_data import tiny_split

# Pillow modes the rows cycle through: the loader must turn each into RGB.
MODES = ("RGB", "L", "RGBA", "P")


def save_image(path: Path, pixels: np.ndarray, mode: str = "RGB") -> None:
    """``uint8 (H, W, 3)`` → an image file in ``mode`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "P" else image.quantize(64)
    image.save(path)


def write_csv(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> Path:
    """``rows`` as a CSV with ``columns`` (default: the first row's keys)."""
    columns = list(columns or rows[0])
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_csv_dataset(
    folder: Path,
    *,
    num_train_classes: int = 8,
    num_test_classes: int = 6,
    per_class: int = 8,
    size: int = 32,
    query_gallery: bool = False,
    mixed_flags: bool = False,
    taxonomy: bool = False,
) -> tuple[Path, list[dict[str, object]]]:
    """``tests.tiny_data``'s images as files (PNG, modes cycling through ``MODES``, a space in every
    folder name) and the CSV that lists them: ``(csv_path, rows)``. Classes ``2g, 2g+1`` share
    category ``g``. ``query_gallery``: the first half of each validation class's images are queries.
    ``mixed_flags``: Open Metric Learning's mix, validation images in turn both, query-only and
    gallery-only, except the last validation class, all queries (they have nothing to find).
    ``taxonomy``: a three-level taxonomy, ``category = "dept {label // 4}/aisle {label // 2}"``
    (department → aisle → class).
    """
    rows: list[dict[str, object]] = []
    for split, seed, num_classes in (("train", 0, num_train_classes), ("validation", 1, num_test_classes)):
        data = tiny_split(seed, num_classes, per_class, size)
        for i in range(len(data)):
            label = int(data.labels[i])
            name = f"{split[:3]}_{label}"
            relative = f"images of {split}/class {name}/{i:03d}.png"
            save_image(folder / relative, data.source[i]["image"], MODES[i % len(MODES)])
            row: dict[str, object] = {
                "label": name,
                "path": relative,
                "split": split,
                "category": f"dept {label // 4}/aisle {label // 2}" if taxonomy else f"group {label // 2}",
            }
            if query_gallery:
                query = split == "validation" and i % per_class < per_class // 2
                row["is_query"] = query if split == "validation" else ""
                row["is_gallery"] = (not query) if split == "validation" else ""
            if mixed_flags:
                role = "query" if label == num_classes - 1 else ("both", "query", "gallery")[i % 3]
                row["is_query"] = role != "gallery" if split == "validation" else ""
                row["is_gallery"] = role != "query" if split == "validation" else ""
            rows.append(row)
    return write_csv(folder / "items.csv", rows), rows
