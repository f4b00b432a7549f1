"""Tiny fake data in the official layouts, for the data set tests (no download, no TensorFlow).

Two kinds:

* ``make_*_manual_dir``: the archives a user downloads, in the real file layout, with a handful
  of small JPEGs. ``prepare`` turns them into TFDS data exactly as it would the real ones.
* ``write_fake_prepared``: prepared TFDS ``array_record`` data of a TFDS catalogue builder (same
  name, version and features), written by a subclass whose generator yields fake examples. This
  needs no TensorFlow (images are given as JPEG/PNG bytes), so the loaders are tested without it.

Every image is dark (value 20) with its bounding box filled with a bright value (200 + 0..9), so
a crop to the box is uniformly bright; ``box_pixels`` gives the box in pixels.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

HEIGHT, WIDTH = 24, 32
BACKGROUND, FOREGROUND = 20, 200


def box_pixels(index: int) -> tuple[int, int, int, int]:
    """A per-image box ``(x1, y1, x2, y2)`` in pixels, exclusive ends, inside ``WIDTH × HEIGHT``."""
    x1, y1 = 2 + index % 5, 3 + index % 4
    return x1, y1, x1 + 12 + index % 3, y1 + 10


def image_array(index: int) -> np.ndarray:
    x1, y1, x2, y2 = box_pixels(index)
    image = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    image[y1:y2, x1:x2] = FOREGROUND + index % 10
    return image


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def jpeg(index: int) -> bytes:
    return encode(image_array(index))


def normalized_box(index: int) -> tuple[float, float, float, float]:
    """``[ymin, xmin, ymax, xmax]`` in [0, 1] of ``box_pixels(index)``."""
    x1, y1, x2, y2 = box_pixels(index)
    return y1 / HEIGHT, x1 / WIDTH, y2 / HEIGHT, x2 / WIDTH


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- In-Shop


def inshop_entries() -> list[tuple[str, str, str]]:
    """``(image_name, item_id, status)``: 3 train items (2 images each), 3 test items (1 query,
    2 gallery images each), in two categories; item ids interleave train and test."""
    entries = []
    layout = [
        ("WOMEN/Dresses", "id_00000002", "train", 2),
        ("MEN/Pants", "id_00000005", "train", 2),
        ("WOMEN/Dresses", "id_00000009", "train", 2),
        ("WOMEN/Dresses", "id_00000003", "test", 3),
        ("MEN/Pants", "id_00000004", "test", 3),
        ("MEN/Pants", "id_00000011", "test", 3),
    ]
    views = ("1_front", "2_side", "3_back")
    for category, item, kind, count in layout:
        for i in range(count):
            status = "train" if kind == "train" else ("query" if i == 0 else "gallery")
            entries.append((f"img/{category}/{item}/01_{views[i]}.jpg", item, status))
    return entries


def make_inshop_manual_dir(
    root: Path, *, nested: bool = True, with_bbox: bool = True
) -> list[tuple[str, str, str]]:
    """Write the official In-Shop files under ``root``; returns ``inshop_entries()``."""
    entries = inshop_entries()
    root.mkdir(parents=True, exist_ok=True)
    img_zip = root / ("Img/img.zip" if nested else "img.zip")
    partition = root / ("Eval/list_eval_partition.txt" if nested else "list_eval_partition.txt")
    bbox_file = root / ("Anno/list_bbox_inshop.txt" if nested else "list_bbox_inshop.txt")
    for path in (img_zip, partition, bbox_file):
        path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(img_zip, "w") as zf:
        for i, (name, _, _) in enumerate(entries):
            zf.writestr(name, jpeg(i))
    lines = [str(len(entries)), "image_name item_id evaluation_status"]
    lines += [f"{name:<60s}{item:<20s}{status}" for name, item, status in entries]
    partition.write_text("\n".join(lines) + "\n")
    if with_bbox:
        lines = [str(len(entries)), "image_name clothes_type pose_type x_1 y_1 x_2 y_2"]
        lines += [
            f"{name}  1  1  {' '.join(map(str, box_pixels(i)))}" for i, (name, _, _) in enumerate(entries)
        ]
        bbox_file.write_text("\n".join(lines) + "\n")
    return entries


# ----------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = (1, 2, 100, 101, 150, 200)  # 1-based; the first three train


def make_cub_manual_dir(root: Path, per_class: int = 2) -> list[tuple[str, int]]:
    """``CUB_200_2011.tgz`` and ``segmentations.tgz``; returns ``(image path, 1-based class)``."""
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for c in CUB_CLASSES:
        for j in range(per_class):
            images.append((f"{c:03d}.Bird_{c}/Bird_{c}_{j:04d}_{c * 10 + j}.jpg", c))
    with (
        tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as tar,
        tarfile.open(root / "segmentations.tgz", "w:gz") as seg,
    ):
        lines, split, boxes = [], [], []
        for i, (name, _) in enumerate(images, start=1):
            lines.append(f"{i} {name}")
            split.append(f"{i} {i % 2}")  # the official train/test flag, irrelevant to our split
            x1, y1, x2, y2 = box_pixels(i - 1)
            boxes.append(f"{i} {x1}.0 {y1}.0 {x2 - x1}.0 {y2 - y1}.0")  # x, y, width, height
            _add_bytes(tar, f"CUB_200_2011/images/{name}", jpeg(i - 1))
            mask = np.zeros((HEIGHT, WIDTH, 1), np.uint8)
            _add_bytes(seg, f"segmentations/{name[:-4]}.png", encode(mask, "PNG"))
        _add_bytes(tar, "CUB_200_2011/images.txt", ("\n".join(lines) + "\n").encode())
        _add_bytes(tar, "CUB_200_2011/train_test_split.txt", ("\n".join(split) + "\n").encode())
        _add_bytes(tar, "CUB_200_2011/bounding_boxes.txt", ("\n".join(boxes) + "\n").encode())
    return images


# ----------------------------------------------------------------------------- Cars196

CARS_CLASSES = (1, 2, 98, 99, 150, 196)  # 1-based; the first three train


def _cars_annotations(path: Path, names: list[str], classes: list[int], first_index: int) -> None:
    import scipy.io

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.zeros((1, len(names)), dtype=[(f, object) for f in fields])
    for k, (name, c) in enumerate(zip(names, classes, strict=True)):
        x1, y1, x2, y2 = box_pixels(first_index + k)
        for field, value in zip(fields[:5], (x1, y1, x2, y2, c), strict=True):
            records[0, k][field] = np.array([[value]], np.uint16 if field != "class" else np.uint8)
        records[0, k]["fname"] = np.array([name])
    scipy.io.savemat(path, {"annotations": records})


def make_cars_manual_dir(root: Path, per_class: int = 2) -> dict[str, list[int]]:
    """The four Cars196 files; returns the 1-based class of every train/test image."""
    root.mkdir(parents=True, exist_ok=True)
    classes = {"train": [], "test": []}
    index = 0
    for split in ("train", "test"):
        names = []
        with tarfile.open(root / f"cars_{split}.tgz", "w:gz") as tar:
            for c in CARS_CLASSES:
                for _ in range(per_class // 2 + (split == "train")):
                    name = f"{len(names) + 1:05d}.jpg"
                    _add_bytes(tar, f"cars_{split}/{name}", jpeg(index + len(names)))
                    names.append(name)
                    classes[split].append(c)
        if split == "train":
            devkit = root / "_devkit"
            devkit.mkdir()
            _cars_annotations(devkit / "cars_train_annos.mat", names, classes[split], index)
            with tarfile.open(root / "car_devkit.tgz", "w:gz") as tar:
                tar.add(devkit / "cars_train_annos.mat", "devkit/cars_train_annos.mat")
            (devkit / "cars_train_annos.mat").unlink()
            devkit.rmdir()
        else:
            _cars_annotations(root / "cars_test_annos_withlabels.mat", names, classes[split], index)
        index += len(names)
    return classes


# ----------------------------------------------------------------------------- SOP


def make_sop_manual_dir(root: Path) -> dict[str, list[tuple[int, int]]]:
    """``Stanford_Online_Products.zip``; returns ``(class_id, super_class_id)`` (1-based) per split."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        "train": [(1, 1), (1, 1), (2, 3), (2, 3), (5, 3)],
        "test": [(11319, 1), (11319, 1), (11320, 12), (22634, 12)],
    }
    supers = [
        "bicycle",
        "cabinet",
        "chair",
        "coffee_maker",
        "fan",
        "kettle",
        "lamp",
        "mug",
        "sofa",
        "stapler",
        "table",
        "toaster",
    ]
    index = 0
    with zipfile.ZipFile(root / "Stanford_Online_Products.zip", "w") as zf:
        for split, split_rows in rows.items():
            lines = ["image_id class_id super_class_id path"]
            for class_id, super_id in split_rows:
                path = f"{supers[super_id - 1]}_final/{class_id}_{index}.JPG"
                zf.writestr(f"Stanford_Online_Products/{path}", jpeg(index))
                lines.append(f"{index + 1} {class_id} {super_id} {path}")
                index += 1
            zf.writestr(f"Stanford_Online_Products/Ebay_{split}.txt", "\n".join(lines) + "\n")
    return rows


# ----------------------------------------------------------------------------- prepared data without TF


def write_fake_prepared(tfds_name: str, data_dir: Path, examples: dict[str, list[dict]]) -> None:
    """Prepared ``array_record`` data of the TFDS builder ``tfds_name`` holding ``examples``.

    The examples must match the builder's features (images as encoded bytes).
    """
    official = tfds.builder_cls(tfds_name)

    class FakeBuilder(official, skip_registration=True):
        name = official.name

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in examples.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    builder = FakeBuilder(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def fake_classification_examples(tfds_name: str, classes: dict[str, list[int]]) -> dict[str, list[dict]]:
    """Examples for ``cars196``/``caltech_birds2011`` (0-based labels) or ``stanford_online_products``
    (``classes`` of ``(class_id, super_class_id)``, 0-based)."""
    examples: dict[str, list[dict]] = {}
    index = 0
    for split, labels in classes.items():
        rows = []
        for label in labels:
            ymin, xmin, ymax, xmax = normalized_box(index)
            if tfds_name == "stanford_online_products":
                class_id, super_id = label
                row = {
                    "image": jpeg(index),
                    "class_id": class_id,
                    "super_class_id": super_id,
                    "super_class_id/num": super_id,
                }
            else:
                row = {
                    "image": jpeg(index),
                    "label": label,
                    "bbox": tfds.features.BBox(ymin, xmin, ymax, xmax),
                }
            if tfds_name == "cars196":
                row["id"] = f"{index:05d}"
            if tfds_name == "caltech_birds2011":
                mask = encode(np.zeros((HEIGHT, WIDTH, 1), np.uint8), "PNG")
                row.update(
                    {
                        "image/filename": f"{index}.jpg",
                        "label_name": f"bird_{label}",
                        "segmentation_mask": mask,
                    }
                )
            rows.append(row)
            index += 1
        examples[split] = rows
    return examples
