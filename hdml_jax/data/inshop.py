"""TFDS builder for the DeepFashion In-Shop Clothes Retrieval benchmark (not in the TFDS catalogue).

Prepared from the official files, which must be downloaded by hand (see ``MANUAL_FILES``)::

    python -m hdml_jax.data.prepare inshop --data_dir ~/tensorflow_datasets --manual_dir ~/inshop

Official layout, under ``manual_dir`` (either the flat or the nested form is accepted)::

    img.zip                   or Img/img.zip    (or the extracted img/ folder)
    list_eval_partition.txt   or Eval/list_eval_partition.txt
    list_bbox_inshop.txt      or Anno/list_bbox_inshop.txt   (optional: bounding boxes)

``list_eval_partition.txt`` is a count line, a header line ``image_name item_id evaluation_status``
and one ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train`` line per image, with
status ``train`` (25,882 images of 3,997 items), ``query`` (14,218) or ``gallery`` (12,612); query
and gallery hold the same 3,985 items. ``list_bbox_inshop.txt`` (count, header ``image_name
clothes_type pose_type x_1 y_1 x_2 y_2``) gives boxes in pixels.

Splits ``train``, ``query``, ``gallery``. Features: ``image`` (the original JPEG bytes),
``image/filename``, ``item_id`` (``"id_00000002"``), ``label`` (item remapped to ``0..C-1`` in
sorted id order: over ``train``, and jointly over ``query`` ∪ ``gallery`` so a query's label
matches its gallery images), ``category`` (``"WOMEN/Dresses"``, from the path) and ``bbox``
(normalized ``[ymin, xmin, ymax, xmax]``; the whole image when no box file was given, which
``info.metadata["has_bbox"]`` records).

Preparing needs no TensorFlow: images are stored as read from the archive, and the files are read
with ``zipfile``/``pathlib`` rather than ``tf.io.gfile``.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hdml_jax.data.errors import BadManualFilesError, ManualFilesError

SPLIT_STATUSES = ("train", "query", "gallery")

MANUAL_FILES = ("img.zip", "list_eval_partition.txt", "list_bbox_inshop.txt")

_IMAGE_ARCHIVES = ("img.zip", "Img/img.zip")
_IMAGE_FOLDERS = ("img", "Img/img")
_PARTITION_FILES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt")
_BBOX_FILES = ("list_bbox_inshop.txt", "Anno/list_bbox_inshop.txt")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the DeepFashion "In-shop Clothes Retrieval Benchmark" (Liu et al., CVPR 2016; link on
https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html, after accepting the
agreement) and put into `manual_dir`:
  img.zip                  (the 256x256 images; the folder Img/img.zip or an extracted img/ works too)
  list_eval_partition.txt  (from Eval/; Eval/list_eval_partition.txt works too)
  list_bbox_inshop.txt     (from Anno/; optional, needed only for bounding-box cropping)
"""


@dataclasses.dataclass(frozen=True)
class PartitionEntry:
    """One line of ``list_eval_partition.txt``."""

    image_name: str
    item_id: str
    status: str

    @property
    def category(self) -> str:
        """``"WOMEN/Dresses"`` for ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``."""
        parts = self.image_name.split("/")
        return "/".join(parts[1:-2]) if len(parts) >= 4 else ""


def _find(manual_dir: Path, candidates: tuple[str, ...]) -> Path | None:
    for name in candidates:
        path = manual_dir / name
        if path.exists():
            return path
    return None


@dataclasses.dataclass(frozen=True)
class InShopFiles:
    """Where the official files are in a ``manual_dir``; ``missing`` names the absent ones."""

    images: Path | None
    partition: Path | None
    bboxes: Path | None

    @classmethod
    def find(cls, manual_dir: str | Path) -> InShopFiles:
        manual_dir = Path(manual_dir).expanduser()
        images = _find(manual_dir, _IMAGE_ARCHIVES) or _find(manual_dir, _IMAGE_FOLDERS)
        return cls(images, _find(manual_dir, _PARTITION_FILES), _find(manual_dir, _BBOX_FILES))

    @property
    def missing(self) -> list[str]:
        missing = []
        if self.images is None:
            missing.append("img.zip")
        if self.partition is None:
            missing.append("list_eval_partition.txt")
        return missing


def _data_lines(text: str, header_start: str) -> Iterator[list[str]]:
    """Whitespace-split lines after the count line and the header line."""
    lines = [line.split() for line in text.splitlines()]
    lines = [line for line in lines if line]
    start = 0
    if lines and len(lines[0]) == 1 and lines[0][0].isdigit():
        start = 1
    if len(lines) > start and lines[start][0] == header_start:
        start += 1
    yield from lines[start:]


def _read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except UnicodeDecodeError as error:
        raise BadManualFilesError(f"{path} is not a text file ({error}); {what}.") from error


_PARTITION_FORMAT = (
    "expected the In-Shop benchmark's Eval/list_eval_partition.txt: a count line, the header "
    "'image_name item_id evaluation_status', then 'img/... id_... train|query|gallery' lines"
)


def read_partition(path: str | Path) -> list[PartitionEntry]:
    """Parse ``list_eval_partition.txt``; checks the count line when there is one.

    Raises:
      BadManualFilesError: the file is not in that format (a ``ValueError``).
    """
    text = _read_text(path, _PARTITION_FORMAT)
    entries = []
    for fields in _data_lines(text, "image_name"):
        if len(fields) != 3 or fields[2] not in SPLIT_STATUSES:
            raise BadManualFilesError(f"{path}: unexpected line {' '.join(fields)!r}; {_PARTITION_FORMAT}.")
        entries.append(PartitionEntry(*fields))
    first = text.split(None, 1)[0] if text.strip() else ""
    if first.isdigit() and int(first) != len(entries):
        raise BadManualFilesError(
            f"{path}: the count line says {first} images, found {len(entries)} (a truncated copy?)."
        )
    if not entries:
        raise BadManualFilesError(f"{path} lists no images; {_PARTITION_FORMAT}.")
    return entries


def read_bboxes(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """Parse ``list_bbox_inshop.txt``: image name → pixel box ``(x_1, y_1, x_2, y_2)``."""
    layout = (
        "expected the In-Shop benchmark's Anno/list_bbox_inshop.txt: a count line, a header, then "
        "'image_name clothes_type pose_type x_1 y_1 x_2 y_2' lines (or leave the file out: it is optional)"
    )
    boxes = {}
    for fields in _data_lines(_read_text(path, layout), "image_name"):
        try:
            if len(fields) != 7:
                raise ValueError(f"{len(fields)} fields")
            boxes[fields[0]] = tuple(float(v) for v in fields[3:7])
        except ValueError:
            raise BadManualFilesError(f"{path}: unexpected line {' '.join(fields)!r}; {layout}.") from None
    return boxes


def item_labels(item_ids: list[str]) -> np.ndarray:
    """Item ids → ``0..C-1`` in sorted id order."""
    _, labels = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_inverse=True)
    return labels.astype(np.int64)


class _ImageReader:
    """Reads image bytes by partition name from ``img.zip`` or an extracted ``img/`` folder."""

    def __init__(self, path: Path):
        self._path = path
        self._zip: zipfile.ZipFile | None = None
        self._names: set[str] = set()

    def __enter__(self) -> _ImageReader:
        if self._path.is_file():
            try:
                self._zip = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as error:
                raise BadManualFilesError(
                    f"{self._path} is not a zip archive ({error}): an incomplete download? Download "
                    "img.zip (from Img/ of the In-Shop benchmark) again, or put the extracted img/ folder there."
                ) from error
            self._names = set(self._zip.namelist())
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()

    def read(self, image_name: str) -> bytes:
        # Names in the list start with "img/"; tolerate archives/folders without that prefix.
        stripped = image_name.split("/", 1)[1] if image_name.startswith("img/") else image_name
        if self._zip is not None:
            for name in (image_name, stripped):
                if name in self._names:
                    return self._zip.read(name)
            raise ManualFilesError(
                f"{image_name}, listed in list_eval_partition.txt, is not in {self._path}: the image "
                "archive and the list must come from the same In-Shop release (img.zip holds img/...)."
            )
        folder_root = self._path.parent  # ".../img" holds "WOMEN/...": image_name is relative to its parent
        for path in (folder_root / image_name, self._path / stripped):
            if path.is_file():
                return path.read_bytes()
        raise ManualFilesError(
            f"{image_name}, listed in list_eval_partition.txt, is not under {self._path}: the extracted "
            "folder must be the img/ folder of img.zip (img/WOMEN/..., img/MEN/...)."
        )


def _normalized_bbox(
    image: bytes, box: tuple[float, float, float, float] | None, image_name: str = "an image"
) -> tfds.features.BBox:
    if box is None:
        return tfds.features.BBox(0.0, 0.0, 1.0, 1.0)
    try:
        with Image.open(io.BytesIO(image)) as pil:  # reads the header only
            width, height = pil.size
    except OSError as error:
        raise BadManualFilesError(
            f"{image_name} is not a readable image ({error}): a damaged img.zip?"
        ) from error
    x1, y1, x2, y2 = box
    ymin, xmin = np.clip([y1 / height, x1 / width], 0.0, 1.0)
    ymax, xmax = np.clip([y2 / height, x2 / width], 0.0, 1.0)
    ymax, xmax = max(ymax, ymin), max(xmax, xmin)
    return tfds.features.BBox(float(ymin), float(xmin), float(ymax), float(xmax))


class InShop(tfds.core.GeneratorBasedBuilder):
    """DeepFashion In-Shop Clothes Retrieval: train / query / gallery."""

    name = "inshop"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012  (a TFDS class attribute)
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="DeepFashion In-Shop Clothes Retrieval benchmark (query/gallery retrieval).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "image/filename": tfds.features.Text(),
                    "item_id": tfds.features.Text(),
                    "label": tfds.features.Scalar(np.int64),
                    "category": tfds.features.Text(),
                    "bbox": tfds.features.BBoxFeature(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = InShopFiles.find(dl_manager.manual_dir)
        if files.missing:
            raise ManualFilesError(
                f"In-Shop files missing from {dl_manager.manual_dir}: {', '.join(files.missing)}.\n"
                + MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        entries = read_partition(files.partition)
        bboxes = read_bboxes(files.bboxes) if files.bboxes is not None else None
        self.info.metadata["has_bbox"] = bboxes is not None

        by_status = {status: [e for e in entries if e.status == status] for status in SPLIT_STATUSES}
        train_labels = item_labels([e.item_id for e in by_status["train"]])
        test_entries = by_status["query"] + by_status["gallery"]
        test_labels = item_labels([e.item_id for e in test_entries])
        num_query = len(by_status["query"])
        labelled = {
            "train": (by_status["train"], train_labels),
            "query": (by_status["query"], test_labels[:num_query]),
            "gallery": (by_status["gallery"], test_labels[num_query:]),
        }
        return {
            split: self._generate_examples(files.images, split_entries, labels, bboxes)
            for split, (split_entries, labels) in labelled.items()
        }

    def _generate_examples(self, images, entries, labels, bboxes):
        with _ImageReader(Path(images)) as reader:
            for entry, label in zip(entries, labels, strict=True):
                image = reader.read(entry.image_name)
                box = None if bboxes is None else bboxes.get(entry.image_name)
                if bboxes is not None and box is None:
                    raise BadManualFilesError(
                        f"{entry.image_name} has no line in list_bbox_inshop.txt: the box list and "
                        "list_eval_partition.txt must come from the same In-Shop release (or leave the "
                        "optional box list out)."
                    )
                yield (
                    entry.image_name,
                    {
                        "image": image,
                        "image/filename": entry.image_name,
                        "item_id": entry.item_id,
                        "label": int(label),
                        "category": entry.category,
                        "bbox": _normalized_bbox(image, box, entry.image_name),
                    },
                )
