"""The real data sets: names, class-disjoint splits, manual downloads, ``load_dataset``.

==========  ==========================  ============================  ====================
name        TFDS builder                split rule                    Recall@K
==========  ==========================  ============================  ====================
cub200      ``caltech_birds2011``       classes 1–100 / 101–200       1, 2, 4, 8
cars196     ``cars196``                 classes 1–98 / 99–196         1, 2, 4, 8
sop         ``stanford_online_products``  TFDS train / test           1, 10, 100, 1000
inshop      ``inshop`` (ours)           train / query + gallery       1, 10, 20, 30, 40, 50
synthetic   generated (synthetic.py)    its own                       1, 2, 4, 8
synthetic_  generated (``SOP_SHAPED``)  its own (SOP-shaped)          1, 10, 100
sop
==========  ==========================  ============================  ====================

CUB and Cars merge the TFDS ``train`` and ``test`` splits and re-split by class (the first half of
the classes trains); every split's labels are remapped to ``0..C-1``. SOP's super classes and
In-Shop's garment categories are the ``coarse_labels``.

Data are read with ``tfds.data_source`` from ``array_record`` files prepared once, by
``python -m hdml_jax.data.prepare NAME --data_dir ... --manual_dir ...`` (no data set can be
downloaded automatically). Reading needs no TensorFlow (images are decoded with PIL); preparing the
TFDS catalogue builders does. The labels are read once without decoding any image and cached in
``hdml_jax_labels.npz`` next to the prepared files, so samplers get them instantly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from hdml_jax.data.base import MetricDataset, Split, SubsetSource, remap_labels
from hdml_jax.data.encoded import EncodedImage
from hdml_jax.data.errors import (  # noqa: F401 — the two manual-files errors are re-exported
    BadManualFilesError,
    DatasetNotFoundError,
    ManualFilesError,
)
from hdml_jax.data.label_features import read_label_features
from hdml_jax.data.transforms import as_rgb, crop_to_bbox

_CUB_INSTRUCTIONS = """\
Download CUB_200_2011.tgz (images, labels, boxes) and segmentations.tgz (masks; the TFDS builder
stores them) from https://www.vision.caltech.edu/datasets/cub_200_2011/ (data.caltech.edu) and
put both, unextracted, into `manual_dir`. Preparing needs TensorFlow and OpenCV.
"""

_CARS_INSTRUCTIONS = """\
The original Stanford Cars URLs are dead. From a mirror that keeps the original files (Krause et
al., 3dRR 2013), put into `manual_dir`, unextracted and with exactly these names:
  cars_train.tgz  cars_test.tgz  car_devkit.tgz  cars_test_annos_withlabels.mat
(car_devkit.tgz holds devkit/cars_train_annos.mat; cars_test_annos_withlabels.mat is the test
annotation file with labels). Mirrors often re-pack the archives: if the checksums differ, add
--skip_checksums. Preparing needs TensorFlow and SciPy.
"""

_SOP_INSTRUCTIONS = """\
Download Stanford_Online_Products.zip (the Stanford Online Products data set of Song et al.,
CVPR 2016, https://cvgl.stanford.edu/projects/lifted_struct/) and put it, unextracted, into
`manual_dir`. Preparing needs TensorFlow.
"""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What ``load_dataset`` and ``prepare`` know about one data set.

    Attributes:
      name: our name (``load_dataset(name)``).
      tfds_name: the TFDS builder name.
      split_rule: ``"class_halves"`` (merge TFDS train+test, classes ``< num_train_classes``
        train), ``"tfds_splits"`` (TFDS train/test, already class-disjoint) or
        ``"query_gallery"`` (train; test = query ∪ gallery).
      recall_ks: the published Recall@K values.
      label_key: the TFDS feature that holds the class.
      coarse_key: the TFDS feature of the coarse label, or None.
      has_bbox: the TFDS data has a ``bbox`` feature (``crop_to_bbox`` allowed).
      num_train_classes: for ``class_halves``: raw (0-based) labels below it train.
      expected: split → (images, classes or None) of the standard data; checked on load.
      manual_files: the files to put into ``manual_dir``.
      instructions: where to get them.
      needs_tensorflow: preparing needs TensorFlow (the TFDS catalogue builders do).
      skip_features: features never needed (not decoded when read).
    """

    name: str
    tfds_name: str
    split_rule: Literal["class_halves", "tfds_splits", "query_gallery"]
    recall_ks: tuple[int, ...]
    label_key: str
    coarse_key: str | None
    has_bbox: bool
    num_train_classes: int | None
    expected: Mapping[str, tuple[int, int | None]]
    manual_files: tuple[str, ...]
    instructions: str
    needs_tensorflow: bool = True
    skip_features: tuple[str, ...] = ()

    @property
    def has_coarse_labels(self) -> bool:
        return self.coarse_key is not None


def _inshop_instructions() -> str:
    # Not importing inshop.py (it registers a TFDS builder) just to print a message.
    return """\
Download the DeepFashion "In-shop Clothes Retrieval Benchmark" (Liu et al., CVPR 2016; link on
https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html, after accepting the
agreement) and put into `manual_dir`: img.zip (from Img/; an extracted img/ folder works too),
list_eval_partition.txt (from Eval/) and list_bbox_inshop.txt (from Anno/; optional, needed only
for bounding-box cropping). The nested layout Img/img.zip, Eval/..., Anno/... works too.
Preparing needs no TensorFlow.
"""


DATASETS: dict[str, DatasetSpec] = {
    "cub200": DatasetSpec(
        name="cub200",
        tfds_name="caltech_birds2011",
        split_rule="class_halves",
        recall_ks=(1, 2, 4, 8),
        label_key="label",
        coarse_key=None,
        has_bbox=True,
        num_train_classes=100,
        expected={"train": (5864, 100), "test": (5924, 100)},
        manual_files=("CUB_200_2011.tgz", "segmentations.tgz"),
        instructions=_CUB_INSTRUCTIONS,
        skip_features=("segmentation_mask",),
    ),
    "cars196": DatasetSpec(
        name="cars196",
        tfds_name="cars196",
        split_rule="class_halves",
        recall_ks=(1, 2, 4, 8),
        label_key="label",
        coarse_key=None,
        has_bbox=True,
        num_train_classes=98,
        expected={"train": (8054, 98), "test": (8131, 98)},
        manual_files=("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat"),
        instructions=_CARS_INSTRUCTIONS,
    ),
    "sop": DatasetSpec(
        name="sop",
        tfds_name="stanford_online_products",
        split_rule="tfds_splits",
        recall_ks=(1, 10, 100, 1000),
        label_key="class_id",
        coarse_key="super_class_id",
        has_bbox=False,
        num_train_classes=None,
        expected={"train": (59551, 11318), "test": (60502, 11316)},
        manual_files=("Stanford_Online_Products.zip",),
        instructions=_SOP_INSTRUCTIONS,
    ),
    "inshop": DatasetSpec(
        name="inshop",
        tfds_name="inshop",
        split_rule="query_gallery",
        recall_ks=(1, 10, 20, 30, 40, 50),
        label_key="label",
        coarse_key="category",
        has_bbox=True,
        num_train_classes=None,
        expected={
            "train": (25882, 3997),
            "test": (26830, 3985),
            "query": (14218, None),
            "gallery": (12612, None),
        },
        manual_files=("img.zip", "list_eval_partition.txt", "list_bbox_inshop.txt"),
        instructions=_inshop_instructions(),
        needs_tensorflow=False,
    ),
}

NAMES = (*DATASETS, "synthetic", "synthetic_sop")


# What installs everything that preparing needs (pyproject's ``prepare`` extra), as the README says.
PREPARE_INSTALL = "pip install -e '.[prepare]'"
PREPARE_PACKAGES = "tensorflow-cpu, opencv-python-headless, scipy"


def default_data_dir() -> str:
    """TFDS's default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare_command(
    name: str, data_dir: str | os.PathLike | None = None, manual_dir: str | None = None
) -> str:
    """The one command that prepares ``name`` from the files in ``manual_dir``."""
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
    return f"python -m hdml_jax.data.prepare {name} --data_dir {data_dir} --manual_dir {manual_dir}"


def missing_data_message(name: str, data_dir: str | os.PathLike | None, where: str) -> str:
    """What is missing, which files to obtain and where to put them, and the one command that
    prepares them; each fact once."""
    spec = DATASETS[name]
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    install = (
        f"Install that first: {PREPARE_INSTALL} in the hdml_jax checkout ({PREPARE_PACKAGES}; "
        "reading needs none of them).\n"
        if spec.needs_tensorflow
        else ""
    )
    return (
        f"{name} is not prepared (no {spec.tfds_name} TFDS data in array_record format at {where}) "
        "and cannot be downloaded automatically.\n"
        f"{spec.instructions.replace('`manual_dir`', manual_dir)}"
        f"{install}"
        f"Then prepare it once:\n  {prepare_command(name, data_dir, manual_dir)}\n"
        "(To try the trainer first, python -m hdml_jax.main runs on generated data; nothing to download.)"
    )


# ----------------------------------------------------------------------------- builders


def tfds_builder(name: str, data_dir: str | os.PathLike | None = None):
    """The TFDS builder of ``name`` (registers our In-Shop builder first when needed)."""
    import tensorflow_datasets as tfds

    spec = DATASETS[name]
    if spec.tfds_name == "inshop":
        from hdml_jax.data import inshop  # noqa: F401  (registers the builder)
    return tfds.builder(spec.tfds_name, data_dir=os.fspath(data_dir) if data_dir is not None else None)


def is_prepared(builder) -> bool:
    """Whether ``builder``'s version folder holds prepared data (its ``dataset_info.json``).

    What ``builder.is_prepared()`` checks, without its warning (``Variant folder ... has no
    dataset_info.json``) about a data set that simply has not been prepared yet.
    """
    return (builder.data_path / "dataset_info.json").exists()


def _prepared_builder(name: str, data_dir: str | os.PathLike | None):
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir)
    if not is_prepared(builder):
        raise DatasetNotFoundError(missing_data_message(name, data_dir, os.fspath(builder.data_path)))
    file_format = builder.info.file_format
    if file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        raise DatasetNotFoundError(
            f"{name}: the data at {builder.data_path} was prepared as {file_format}, but random access "
            f"needs array_record. Convert it (tfds convert_format --dataset_version_dir "
            f"{builder.data_path} --out_file_format array_record) or prepare it again:\n"
            f"  {prepare_command(name, data_dir)} --overwrite"
        )
    return builder


# ----------------------------------------------------------------------------- examples


_FULL_BOX = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class ToExample:
    """TFDS example → the contract of ``base.py`` (``image`` RGB uint8, ``bbox``), optionally cropped.

    The TFDS source leaves the image encoded (``SkipDecoding``): ``__call__`` decodes it with PIL,
    ``encoded`` (``SubsetSource.encoded``, which the input pipeline reads) keeps it an
    ``EncodedImage`` for the transform to decode, the bbox crop recorded as its region. Images
    that are already pixels (other sources) are taken as they are. A picklable class (not a
    closure) so grain can send sources to worker processes. ``label`` and ``coarse_label`` are
    set afterwards by ``SubsetSource``.
    """

    crop_to_bbox: bool = False
    keep_bbox: bool = True

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        return self._convert(example, encoded=False)

    def encoded(self, example: dict[str, Any]) -> dict[str, Any]:
        """The example with its image an ``EncodedImage`` when it came encoded."""
        return self._convert(example, encoded=True)

    def _convert(self, example: dict[str, Any], encoded: bool) -> dict[str, Any]:
        image = example["image"]
        if isinstance(image, (bytes, np.bytes_)):
            image = EncodedImage(bytes(image))
        if isinstance(image, EncodedImage):
            if not encoded:
                image = image.decode()
        else:
            image = as_rgb(image)
        out: dict[str, Any] = {}
        bbox = example.get("bbox") if self.keep_bbox else None
        if bbox is not None:
            bbox = np.asarray(bbox, np.float32)
            if self.crop_to_bbox:
                image, bbox = crop_to_bbox(image, bbox), _FULL_BOX.copy()
            out["bbox"] = bbox
        out["image"] = image if isinstance(image, EncodedImage) else np.ascontiguousarray(image)
        return out


# ----------------------------------------------------------------------------- splits


def class_consistent(labels: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Give every example its class's most frequent coarse label (ties: the smallest)."""
    labels, coarse = np.asarray(labels, np.int64), np.asarray(coarse, np.int64)
    pairs, counts = np.unique(np.stack([labels, coarse], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # by class, then most frequent
    pairs = pairs[order]
    first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]])
    mapping = np.zeros(labels.max() + 1 if len(labels) else 0, np.int64)
    mapping[pairs[first, 0]] = pairs[first, 1]
    return mapping[labels]


def _make_split(
    source, indices: np.ndarray, raw_labels: np.ndarray, coarse: np.ndarray | None, transform, name: str
) -> Split:
    labels = remap_labels(raw_labels[indices]) if len(indices) else np.zeros(0, np.int64)
    coarse_split = None if coarse is None else coarse[indices]
    return Split(
        source=SubsetSource(source, indices, labels, coarse_split, transform),
        labels=labels,
        coarse_labels=coarse_split,
        name=name,
    )


def _check_sizes(dataset: MetricDataset, spec: DatasetSpec, data_dir, where: str, mode: str) -> None:
    if mode == "ignore":
        return
    splits = {
        "train": dataset.train,
        "test": dataset.test,
        "query": dataset.query,
        "gallery": dataset.gallery,
    }
    problems = []
    for split_name, (images, classes) in spec.expected.items():
        split = splits[split_name]
        if split is None:
            continue
        got_classes = len(np.unique(split.labels))
        if len(split) != images or (classes is not None and got_classes != classes):
            expected = f"{images:,}" + ("" if classes is None else f" / {classes:,}")
            problems.append(
                f"{split_name}: {len(split):,} images / {got_classes:,} classes, expected {expected}"
            )
    if problems:
        message = (
            f"{spec.name}: the prepared data at {where} differs from the standard split "
            f"({'; '.join(problems)}). Incomplete or modified archives? Re-prepare with "
            f"`{prepare_command(spec.name, data_dir)} --overwrite`, or pass check_sizes='ignore'."
        )
        if mode == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    crop_to_bbox: bool = False,
    check_sizes: Literal["warn", "raise", "ignore"] = "warn",
    cache_labels: bool = True,
    **synthetic_kwargs: Any,
) -> MetricDataset:
    """Load a data set as class-disjoint train/test splits (see the module docstring).

    Args:
      name: one of ``NAMES``.
      data_dir: where the prepared TFDS data are (default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); for ``synthetic``, passed on to ``load_synthetic``.
      crop_to_bbox: crop every image to its bounding box (CUB, Cars, In-Shop with boxes); the
        example's ``bbox`` becomes the whole image.
      check_sizes: what to do when the full standard split does not have the published sizes.
      cache_labels: cache the labels next to the prepared data (only disabled if not writable).
      **synthetic_kwargs: passed to ``load_synthetic`` (e.g. ``config=``); not allowed otherwise.

    Raises:
      DatasetNotFoundError: the prepared data is not in ``data_dir``; the message names the
        archives, the ``manual_dir`` and the ``prepare`` command.
    """
    if name in ("synthetic", "synthetic_sop"):
        from hdml_jax.data.synthetic import SOP_SHAPED
        from hdml_jax.data.synthetic_builder import load_synthetic

        if crop_to_bbox:
            raise ValueError(f"{name}: crop_to_bbox is not supported.")
        if name == "synthetic_sop":
            synthetic_kwargs = {"config": SOP_SHAPED, **synthetic_kwargs}
        return load_synthetic(data_dir=None if data_dir is None else os.fspath(data_dir), **synthetic_kwargs)
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known: {', '.join(NAMES)}.")
    if synthetic_kwargs:
        raise TypeError(f"Unexpected arguments for {name}: {sorted(synthetic_kwargs)}.")
    spec = DATASETS[name]
    builder = _prepared_builder(name, data_dir)
    where = os.fspath(builder.data_path)
    features = builder.info.features
    metadata = builder.info.metadata or {}  # In-Shop records whether it was prepared with boxes
    has_bbox = spec.has_bbox and "bbox" in features and metadata.get("has_bbox", True) is not False
    if crop_to_bbox and not has_bbox:
        raise ValueError(f"{name}: crop_to_bbox=True but the prepared data has no bounding boxes ({where}).")

    import tensorflow_datasets as tfds

    split_expr = {
        "class_halves": "train+test",
        "tfds_splits": "train+test",
        "query_gallery": "train+query+gallery",
    }[spec.split_rule]
    skip = tuple(k for k in spec.skip_features if k in features)
    keys = (spec.label_key,) + ((spec.coarse_key,) if spec.coarse_key else ())
    values = read_label_features(builder, split_expr, keys, skip, cache=cache_labels)
    raw = values[spec.label_key]
    coarse = None
    if spec.coarse_key is not None:
        coarse = remap_labels(values[spec.coarse_key])

    # Images stay encoded in the source: ToExample decodes them, or hands them to the transform.
    decoders = {k: tfds.decode.SkipDecoding() for k in ("image", *skip)}
    source = builder.as_data_source(split=split_expr, decoders=decoders)
    transform = ToExample(crop_to_bbox=crop_to_bbox, keep_bbox=has_bbox)
    sizes = {s: builder.info.splits[s].num_examples for s in split_expr.split("+")}
    offsets = np.cumsum([0, *sizes.values()])
    ranges = {s: np.arange(offsets[i], offsets[i + 1]) for i, s in enumerate(sizes)}

    if spec.split_rule == "class_halves":
        is_train = raw < spec.num_train_classes
        train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    elif spec.split_rule == "tfds_splits":
        train_idx, test_idx = ranges["train"], ranges["test"]
    else:
        train_idx = ranges["train"]
        # Item labels were remapped by the builder: train alone, query ∪ gallery jointly.
        test_idx = np.concatenate([ranges["query"], ranges["gallery"]])
        if coarse is not None:
            # Garment categories come from the image paths; make them a function of the item.
            items = raw.copy()
            items[test_idx] += raw[train_idx].max() + 1 if len(train_idx) else 0
            coarse = class_consistent(items, coarse)

    test_name = f"{name}/test"
    make = functools.partial(_make_split, source, raw_labels=raw, coarse=coarse, transform=transform)
    train = make(train_idx, name=f"{name}/train")
    test = make(test_idx, name=test_name)
    roles = {}
    if spec.split_rule == "query_gallery":
        # ``test`` is the queries, then the gallery: one label space, disjoint roles.
        roles["is_query"] = np.arange(len(test_idx)) < sizes["query"]
        roles["is_gallery"] = ~roles["is_query"]
    dataset = MetricDataset(name=name, train=train, test=test, recall_ks=spec.recall_ks, **roles)
    _check_sizes(dataset, spec, data_dir, where, check_sizes)
    return dataset

