"""The real-data-set loaders, on tiny fake data in the official layouts (nothing is downloaded).

Without TensorFlow: CUB/Cars/SOP are read from fake *prepared* TFDS data written under their
TFDS names and features (``fake_archives.write_fake_prepared``); In-Shop is prepared end to end
by ``python -m hdml_jax.data.prepare`` from a fake official archive. With TensorFlow installed
(``slow``), the prepare command also turns fake CUB/Cars/SOP archives in the official layouts into
TFDS data through the TFDS catalogue builders, as it would the real ones.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import subprocess
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hdml_jax.data import datasets, folds, inshop, label_features, prepare, transforms
from hdml_jax.data.datasets import (
    DATASETS,
    BadManualFilesError,
    DatasetNotFoundError,
    ManualFilesError,
    load_dataset,
)
from hdml_jax.data.encoded import EncodedImage
from hdml_jax.errors import UserError
from tests import fake_archives as fa

ROOT = Path(__file__).resolve().parents[1]

# Raw (0-based) class → number of images; the counts differ per class so that a split's label
# histogram identifies its classes after the remap to 0..C-1 (which keeps the class order).
CARS_COUNTS = {0: 3, 1: 2, 97: 1, 98: 1, 150: 2, 195: 3}  # 0..97 train
CUB_COUNTS = {0: 1, 5: 2, 99: 3, 100: 2, 199: 1}  # 0..99 train
SOP_ROWS = {  # (class_id, super_class_id), 0-based; TFDS train/test are class-disjoint already
    "train": [(0, 0), (0, 0), (0, 0), (3, 2), (7, 2), (7, 2)],
    "test": [(11318, 0), (11320, 11), (11320, 11), (20000, 5)],
}


def _expand(counts: dict[int, int]) -> dict[str, list[int]]:
    """Spread every class over the TFDS train and test splits (the loader merges them)."""
    labels = [c for c, n in counts.items() for _ in range(n)]
    return {"train": labels[::2], "test": labels[1::2]}


def _load(name, data_dir, **kwargs):
    return load_dataset(name, data_dir=data_dir, check_sizes="ignore", **kwargs)


def _prepare(name, tmp_path, *extra):
    """``python -m hdml_jax.data.prepare`` from ``tmp_path/manual`` into ``tmp_path/data``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*differs from the standard split")
        return prepare.main(
            [name, "--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path / "manual"), *extra]
        )


@pytest.fixture(scope="module")
def cars_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cars")
    fa.write_fake_prepared(
        "cars196", data_dir, fa.fake_classification_examples("cars196", _expand(CARS_COUNTS))
    )
    return data_dir


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cub")
    examples = fa.fake_classification_examples("caltech_birds2011", _expand(CUB_COUNTS))
    fa.write_fake_prepared("caltech_birds2011", data_dir, examples)
    return data_dir


@pytest.fixture(scope="module")
def sop_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("sop")
    fa.write_fake_prepared(
        "stanford_online_products",
        data_dir,
        fa.fake_classification_examples("stanford_online_products", SOP_ROWS),
    )
    return data_dir


@pytest.fixture(scope="module")
def inshop_dir(tmp_path_factory):
    """In-Shop prepared by the prepare command from a fake official archive (nested layout)."""
    root = tmp_path_factory.mktemp("inshop")
    fa.make_inshop_manual_dir(root / "manual", nested=True)
    with pytest.warns(UserWarning, match="differs from the standard split"):  # prepare checks the sizes
        code = prepare.main(
            ["inshop", "--data_dir", str(root / "data"), "--manual_dir", str(root / "manual")]
        )
    assert code == 0
    return root / "data"


def _check_split(split):
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(np.unique(split.labels), np.arange(split.num_classes))
    for i in range(len(split)):
        example = split.source[i]
        assert example["label"] == split.labels[i]
        assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
        assert example["image"].shape[-1] == 3
        if split.coarse_labels is not None:
            assert example["coarse_label"] == split.coarse_labels[i]


def _class_to_coarse(split) -> dict[int, int]:
    pairs = {
        (int(label), int(coarse)) for label, coarse in zip(split.labels, split.coarse_labels, strict=True)
    }
    assert len(pairs) == split.num_classes  # one coarse label per class
    return dict(pairs)


# ----------------------------------------------------------------------------- registry, errors


def test_registry():
    assert set(datasets.NAMES) == {"cub200", "cars196", "sop", "inshop", "synthetic", "synthetic_sop"}
    assert {n: s.tfds_name for n, s in DATASETS.items()} == {
        "cub200": "caltech_birds2011",
        "cars196": "cars196",
        "sop": "stanford_online_products",
        "inshop": "inshop",
    }
    assert DATASETS["cub200"].recall_ks == DATASETS["cars196"].recall_ks == (1, 2, 4, 8)
    assert DATASETS["sop"].recall_ks == (1, 10, 100, 1000)
    assert DATASETS["inshop"].recall_ks == (1, 10, 20, 30, 40, 50)
    assert DATASETS["sop"].has_coarse_labels and not DATASETS["cars196"].has_coarse_labels
    totals = {n: sum(s.expected[k][0] for k in ("train", "test")) for n, s in DATASETS.items()}
    assert totals == {"cub200": 11788, "cars196": 16185, "sop": 120053, "inshop": 52712}
    inshop_sizes = DATASETS["inshop"].expected
    assert inshop_sizes["query"][0] + inshop_sizes["gallery"][0] == inshop_sizes["test"][0]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_data_error_says_what_to_do(name, tmp_path, caplog, capfd):
    caplog.set_level("INFO")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)
    message = str(info.value)
    for file in DATASETS[name].manual_files:
        assert file in message
    manual_dir = tmp_path / "downloads" / "manual"
    assert (
        f"python -m hdml_jax.data.prepare {name} --data_dir {tmp_path} --manual_dir {manual_dir}" in message
    )
    # The README's install command, for the prepare extra (pyproject's [prepare]).
    assert ("pip install -e '.[prepare]'" in message) == DATASETS[name].needs_tensorflow
    assert "pip install tensorflow-cpu" not in message
    # Each fact once: where to put the files, what preparing needs, the one command.
    lines = message.splitlines()
    assert len(lines) == len(set(lines)) and message.count(str(manual_dir)) == 2  # the folder, the command
    assert message.count("Preparing needs") == 1 and message.count("hdml_jax.data.prepare") == 1
    # The error is the only message: no TFDS "Variant folder .../2.1.0 has no dataset_info.json".
    assert not [r for r in caplog.records if "Variant folder" in r.getMessage()]
    assert "Variant folder" not in capfd.readouterr().err


def test_unknown_name():
    with pytest.raises(ValueError, match="cub200"):
        load_dataset("mnist")


def test_synthetic_is_dispatched_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("hdml_jax.data.synthetic")
    fake.SOP_SHAPED = "sop-shaped parameters"
    fake_builder = types.ModuleType("hdml_jax.data.synthetic_builder")
    fake_builder.load_synthetic = lambda **kwargs: calls.append(kwargs) or "dataset"
    monkeypatch.setitem(sys.modules, "hdml_jax.data.synthetic", fake)
    monkeypatch.setitem(sys.modules, "hdml_jax.data.synthetic_builder", fake_builder)
    assert load_dataset("synthetic", data_dir="/x", config={"a": 1}) == "dataset"
    assert load_dataset("synthetic_sop") == "dataset"
    assert calls == [
        {"data_dir": "/x", "config": {"a": 1}},
        {"data_dir": None, "config": "sop-shaped parameters"},
    ]
    for name in ("synthetic", "synthetic_sop"):
        with pytest.raises(ValueError):
            load_dataset(name, crop_to_bbox=True)


# ----------------------------------------------------------------------------- CUB, Cars, SOP


@pytest.mark.parametrize(
    ("name", "counts", "first_test"), [("cars196", CARS_COUNTS, 98), ("cub200", CUB_COUNTS, 100)]
)
def test_class_halves(name, counts, first_test, request):
    data_dir = request.getfixturevalue("cars_dir" if name == "cars196" else "cub_dir")
    dataset = _load(name, data_dir)
    train_counts = [n for c, n in sorted(counts.items()) if c < first_test]
    test_counts = [n for c, n in sorted(counts.items()) if c >= first_test]
    # The remap keeps the class order, so the histograms show which classes each split holds.
    assert np.bincount(dataset.train.labels).tolist() == train_counts
    assert np.bincount(dataset.test.labels).tolist() == test_counts
    assert dataset.recall_ks == (1, 2, 4, 8) and dataset.query is None
    for split in (dataset.train, dataset.test):
        _check_split(split)
        assert split.coarse_labels is None
        assert set(split.source[0]) == {"image", "label", "bbox"}


def test_sop_splits_and_coarse_labels(sop_dir):
    dataset = _load("sop", sop_dir)
    assert dataset.recall_ks == (1, 10, 100, 1000)
    for split, rows in ((dataset.train, SOP_ROWS["train"]), (dataset.test, SOP_ROWS["test"])):
        _check_split(split)
        classes = sorted({c for c, _ in rows})
        assert np.bincount(split.labels).tolist() == [sum(c == k for c, _ in rows) for k in classes]
        assert "bbox" not in split.source[0]
    # Super classes {0, 2, 5, 11} are remapped over both splits together to 0..3, one per class.
    assert _class_to_coarse(dataset.train) == {0: 0, 1: 1, 2: 1}  # classes 0, 3, 7
    assert _class_to_coarse(dataset.test) == {0: 0, 1: 3, 2: 2}  # classes 11318, 11320, 20000
    with pytest.raises(ValueError, match="no bounding boxes"):
        _load("sop", sop_dir, crop_to_bbox=True)


def test_crop_to_bbox_keeps_edges_on_pixel_boundaries():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    crop = transforms.crop_to_bbox(image, np.array([0.2, 0.25, 0.6, 0.5]))
    np.testing.assert_array_equal(crop, image[2:6, 5:10])
    assert transforms.crop_to_bbox(image, np.array([0.5, 0.5, 0.5, 0.5])).shape == (1, 1, 3)  # never empty
    assert transforms.crop_to_bbox(image[:, :, 0], np.array([0.0, 0.0, 1.0, 1.0])).shape == (10, 20)


@pytest.mark.parametrize("name", ["cars196", "cub200"])
def test_crop_to_bbox(name, request):
    data_dir = request.getfixturevalue("cars_dir" if name == "cars196" else "cub_dir")
    full = _load(name, data_dir).train
    cropped = _load(name, data_dir, crop_to_bbox=True).train
    for i in range(len(full)):
        whole, crop = full.source[i], cropped.source[i]
        assert whole["image"].shape == (fa.HEIGHT, fa.WIDTH, 3)
        ymin, xmin, ymax, xmax = whole["bbox"]
        expected = (round((ymax - ymin) * fa.HEIGHT), round((xmax - xmin) * fa.WIDTH), 3)
        assert crop["image"].shape == expected
        np.testing.assert_array_equal(crop["bbox"], [0, 0, 1, 1])
        # The fake box is bright on a dark background (JPEG blurs its edge a little).
        assert whole["image"].mean() < 120 < fa.FOREGROUND - 15 < crop["image"].mean()
        assert crop["label"] == whole["label"]
        # What the input pipeline reads: the same image, still encoded, the bbox crop its region.
        encoded = cropped.source.encoded(i)
        assert isinstance(encoded["image"], EncodedImage) and encoded["label"] == crop["label"]
        np.testing.assert_array_equal(np.asarray(encoded["image"]), crop["image"])
        np.testing.assert_array_equal(encoded["bbox"], crop["bbox"])


def test_sources_pickle(cars_dir):
    """grain sends sources to worker processes."""
    split = _load("cars196", cars_dir, crop_to_bbox=True).test
    clone = pickle.loads(pickle.dumps(split.source))
    np.testing.assert_array_equal(clone[1]["image"], split.source[1]["image"])
    assert clone[1]["label"] == split.source[1]["label"]


def test_size_check(cars_dir):
    with pytest.warns(UserWarning, match="8,054 / 98"):
        load_dataset("cars196", data_dir=cars_dir)
    with pytest.raises(ValueError, match=r"expected 8,131 / 98.*--overwrite"):
        load_dataset("cars196", data_dir=cars_dir, check_sizes="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("cars196", data_dir=cars_dir, check_sizes="ignore")


def test_wrong_file_format(tmp_path):
    """Data prepared as TFRecord (the TFDS default) cannot be read at random: say how to fix it."""
    examples = fa.fake_classification_examples("cars196", _expand(CARS_COUNTS))
    fa.write_fake_prepared("cars196", tmp_path, examples)
    info_path = next(tmp_path.glob("cars196/*/dataset_info.json"))
    info_path.write_text(info_path.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(DatasetNotFoundError, match=r"array_record.*convert_format"):
        load_dataset("cars196", data_dir=tmp_path)


def test_label_cache(tmp_path, monkeypatch):
    data_dir = tmp_path / "cars"
    fa.write_fake_prepared(
        "cars196", data_dir, fa.fake_classification_examples("cars196", _expand(CARS_COUNTS))
    )
    _load("cars196", data_dir, cache_labels=False)
    cache = next(data_dir.glob(f"cars196/*/{label_features.LABELS_CACHE}"), None)
    assert cache is None
    first = _load("cars196", data_dir)
    assert next(data_dir.glob(f"cars196/*/{label_features.LABELS_CACHE}")).exists()

    def fail(*args):
        raise AssertionError("labels read again")

    monkeypatch.setattr(label_features, "_read_features", fail)
    second = _load("cars196", data_dir)
    np.testing.assert_array_equal(first.train.labels, second.train.labels)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)


def test_label_reading_paths_agree(sop_dir):
    """The fast raw-record parse gives what TFDS's own decoding gives."""
    builder = datasets.tfds_builder("sop", sop_dir)
    keys = ("class_id", "super_class_id")
    fast = label_features._read_features_raw(builder, "train+test", keys)
    slow = label_features._read_features_decoded(builder, "train+test", keys, ())
    for key in keys:
        np.testing.assert_array_equal(np.asarray(fast[key]), np.asarray(slow[key]))


def test_mlrc_folds_of_a_prepared_data_set(cars_dir):
    """MLRC's halves and folds over the real loader: the first half of the sorted classes is cut
    into folds that cover it, the second half is the test set, and every example keeps its image."""
    standard = _load("cars196", cars_dir)
    test = folds.test_half(standard, num_folds=3)
    assert len(test.test) == len(standard.test) and test.test.num_classes == 3
    seen = 0
    for k in range(3):
        fold = folds.fold_dataset(standard, k, num_folds=3)
        assert fold.test.num_classes == 1 and fold.train.num_classes == 2
        assert len(fold.train) + len(fold.test) == len(standard.train)
        seen += len(fold.test)
        original = standard.train.source[int(np.flatnonzero(standard.train.labels == k)[0])]["image"]
        np.testing.assert_array_equal(fold.test.source[0]["image"], original)
        np.testing.assert_array_equal(np.asarray(fold.test.source.encoded(0)["image"]), original)
    assert seen == len(standard.train)
    np.testing.assert_array_equal(test.test.source[0]["image"], standard.test.source[0]["image"])


# ----------------------------------------------------------------------------- In-Shop


def test_inshop_partition_parsing(tmp_path):
    entries = fa.make_inshop_manual_dir(tmp_path, nested=False)
    files = inshop.InShopFiles.find(tmp_path)
    assert files.missing == [] and files.bboxes is not None
    parsed = inshop.read_partition(files.partition)
    assert [(e.image_name, e.item_id, e.status) for e in parsed] == entries
    assert parsed[0].category == "WOMEN/Dresses"
    boxes = inshop.read_bboxes(files.bboxes)
    assert boxes[entries[4][0]] == tuple(float(v) for v in fa.box_pixels(4))
    files.partition.write_text(files.partition.read_text().replace(str(len(entries)), "99", 1))
    with pytest.raises(ValueError, match="count line"):
        inshop.read_partition(files.partition)
    assert inshop.InShopFiles.find(tmp_path / "empty").missing == ["img.zip", "list_eval_partition.txt"]
    np.testing.assert_array_equal(inshop.item_labels(["id_9", "id_10", "id_9"]), [1, 0, 1])


def test_inshop_query_gallery(inshop_dir):
    dataset = _load("inshop", inshop_dir)
    assert dataset.recall_ks == (1, 10, 20, 30, 40, 50)
    assert (len(dataset.train), len(dataset.query), len(dataset.gallery), len(dataset.test)) == (6, 3, 6, 9)
    assert np.bincount(dataset.train.labels).tolist() == [2, 2, 2]
    # Query and gallery share one label space: each test item has 1 query and 2 gallery images.
    assert np.bincount(dataset.query.labels).tolist() == [1, 1, 1]
    assert np.bincount(dataset.gallery.labels).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(
        dataset.test.labels, np.concatenate([dataset.query.labels, dataset.gallery.labels])
    )
    for split in (dataset.train, dataset.query, dataset.gallery, dataset.test):
        _check_split(split)
    # Items in sorted id order; categories MEN/Pants=0, WOMEN/Dresses=1 (one per item).
    assert _class_to_coarse(dataset.train) == {0: 1, 1: 0, 2: 1}  # id_02 Dresses, id_05 Pants, id_09 Dresses
    assert _class_to_coarse(dataset.test) == {0: 1, 1: 0, 2: 0}  # id_03 Dresses, id_04 Pants, id_11 Pants
    for i in range(len(dataset.query)):
        np.testing.assert_array_equal(dataset.test.source[i]["image"], dataset.query.source[i]["image"])


def test_inshop_bbox_crop(inshop_dir):
    full = _load("inshop", inshop_dir).gallery
    cropped = _load("inshop", inshop_dir, crop_to_bbox=True).gallery
    for i in range(len(full)):
        ymin, xmin, ymax, xmax = full.source[i]["bbox"]
        crop = cropped.source[i]["image"]
        assert crop.shape == (round((ymax - ymin) * fa.HEIGHT), round((xmax - xmin) * fa.WIDTH), 3)
        assert crop.mean() > fa.FOREGROUND - 15 > 120 > full.source[i]["image"].mean()


def test_inshop_without_boxes_from_extracted_folder(tmp_path):
    """Flat layout, images extracted to ``img/`` instead of ``img.zip``, no box file."""
    fa.make_inshop_manual_dir(tmp_path / "manual", nested=False, with_bbox=False)
    with zipfile.ZipFile(tmp_path / "manual" / "img.zip") as zf:
        zf.extractall(tmp_path / "manual")
    (tmp_path / "manual" / "img.zip").unlink()
    assert _prepare("inshop", tmp_path) == 0
    dataset = _load("inshop", tmp_path / "data")
    assert (len(dataset.train), len(dataset.query), len(dataset.gallery)) == (6, 3, 6)
    assert "bbox" not in dataset.train.source[0]
    with pytest.raises(ValueError, match="no bounding boxes"):
        _load("inshop", tmp_path / "data", crop_to_bbox=True)


# ----------------------------------------------------------------------------- prepare CLI


def _prepare_fails(capsys, argv) -> str:
    """``prepare.main(argv)`` exits with status 2 and one ``error:`` message, the end of stderr
    (before it: TFDS's progress bars, if preparing started); returns the message."""
    with pytest.raises(SystemExit) as info:
        prepare.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    return err[err.index("error: ") :]


def test_prepare_names_missing_files(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cars_train.tgz").write_bytes(b"")
    err = _prepare_fails(
        capsys, ["cars196", "--data_dir", str(tmp_path), "--manual_dir", str(tmp_path / "m")]
    )
    first_line = err.splitlines()[0]
    assert str(tmp_path / "m") in first_line and "cars_train.tgz" not in first_line
    for file in DATASETS["cars196"].manual_files[1:]:
        assert file in first_line
    assert "--skip_checksums" in err  # the instructions (expected layout) follow
    # No manual_dir at all: said so, with the files it must hold.
    err = _prepare_fails(capsys, ["sop", "--data_dir", str(tmp_path), "--manual_dir", str(tmp_path / "none")])
    assert "is not a folder" in err and "Stanford_Online_Products.zip" in err


def test_prepare_asks_for_tensorflow(tmp_path, capsys, monkeypatch):
    fa.make_sop_manual_dir(tmp_path)
    monkeypatch.setattr(prepare, "_module_available", lambda module: module != "tensorflow")
    err = _prepare_fails(capsys, ["sop", "--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path)])
    assert "pip install -e '.[prepare]'" in err and "tensorflow-cpu" in err
    assert len(err.splitlines()) == 1
    assert prepare.missing_modules("inshop") == []


def _break_inshop(manual: Path, how: str) -> str:
    """Damage a flat In-Shop manual dir; returns what the message must name."""
    partition = manual / "list_eval_partition.txt"
    if how == "bad zip":
        (manual / "img.zip").write_bytes(b"not a zip archive")
        return "img.zip is not a zip archive"
    if how == "image missing":
        partition.write_text(partition.read_text().replace("01_1_front.jpg", "99_1_front.jpg", 1))
        return "99_1_front.jpg, listed in list_eval_partition.txt, is not in"
    partition.write_text(partition.read_text() + "img/x.jpg id_1 validation\n")
    return "unexpected line 'img/x.jpg id_1 validation'"


@pytest.mark.parametrize("how", ["bad zip", "image missing", "bad partition line"])
def test_prepare_with_wrong_files_says_which_in_one_message(how, tmp_path, capsys):
    fa.make_inshop_manual_dir(tmp_path / "manual", nested=False)
    expected = _break_inshop(tmp_path / "manual", how)
    err = _prepare_fails(
        capsys, ["inshop", "--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path / "manual")]
    )
    assert expected in err and len(err.strip().splitlines()) == 1


class NonMatchingChecksumError(Exception):
    """Named as TFDS's (``tfds.download.NonMatchingChecksumError``), which needs no import here."""


class ExtractError(Exception):
    """Named as TFDS's extraction error, which wraps the archive module's."""


def _raised_from(error: Exception, cause: Exception) -> Exception:
    try:
        raise error from cause
    except Exception as raised:
        return raised


def test_catalogue_builder_failures_are_explained():
    """What the TFDS builders of CUB, Cars and SOP raise on wrong files (no TensorFlow needed)."""
    explain = functools.partial(prepare.explain_failure, "cars196", "/m")
    cases = [
        (
            NonMatchingChecksumError("Artifact cars_train.tgz has wrong checksum:\n* Expected: ..."),
            BadManualFilesError,
            "--skip_checksums",
        ),
        (
            _raised_from(
                ExtractError("Error while extracting /m/cars_test.tgz"), tarfile.ReadError("not a gzip file")
            ),
            BadManualFilesError,
            "cannot be unpacked",
        ),
        (FileNotFoundError("/dl/extracted/cars_train"), ManualFilesError, "cars_train.tgz  cars_test.tgz"),
        (KeyError("annotations"), ManualFilesError, "'annotations'"),
        (ValueError("Unknown mat file type"), BadManualFilesError, "expected content"),
    ]
    for error, kind, text in cases:
        explained = explain(error)
        assert isinstance(explained, kind) and isinstance(explained, UserError)
        assert text in str(explained) and "/m" in str(explained)
    assert explain(TypeError("a bug")) is None  # not the files' fault: the traceback stays


def test_prepare_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "hdml_jax.data.prepare", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    for spec in DATASETS.values():
        assert all(f in result.stdout for f in spec.manual_files)


# ----------------------------------------------------------------------------- TFDS catalogue builders


def _needs(module: str, reason: str) -> pytest.MarkDecorator:
    """Skip without ``module``, except in CI (``CI`` set, as ``.ci/run``'s runner sets it): there the
    test runs and fails, so a broken install of the ``prepare`` extra cannot silently skip it."""
    in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    return pytest.mark.skipif(importlib.util.find_spec(module) is None and not in_ci, reason=reason)


needs_tf = _needs("tensorflow", "the TFDS catalogue builders need TensorFlow (pip install '.[prepare]')")
needs_cv2 = _needs("cv2", "the TFDS CUB builder needs OpenCV (pip install '.[prepare]')")


@pytest.mark.slow
@needs_tf
def test_prepare_cars196_from_official_layout(tmp_path, capsys):
    classes = fa.make_cars_manual_dir(tmp_path / "manual")
    # The fake archives do not have TFDS's registered checksums, as re-packed mirrors may not.
    with pytest.raises(SystemExit) as info:
        _prepare("cars196", tmp_path)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "checksum" in err and "--skip_checksums" in err and "Traceback" not in err
    assert _prepare("cars196", tmp_path, "--skip_checksums") == 0
    dataset = _load("cars196", tmp_path / "data")
    all_classes = classes["train"] + classes["test"]
    assert len(dataset.train) + len(dataset.test) == len(all_classes)
    assert np.bincount(dataset.train.labels).tolist() == [all_classes.count(c) for c in (1, 2, 98)]
    assert np.bincount(dataset.test.labels).tolist() == [all_classes.count(c) for c in (99, 150, 196)]
    for example in (dataset.train.source[0], dataset.test.source[0]):
        ymin, _, ymax, _ = example["bbox"]
        assert round((ymax - ymin) * fa.HEIGHT) == 10  # box_pixels: always 10 px high
    cropped = _load("cars196", tmp_path / "data", crop_to_bbox=True)
    assert cropped.train.source[0]["image"].mean() > fa.FOREGROUND - 15


@pytest.mark.slow
@needs_tf
def test_prepare_sop_from_official_layout(tmp_path):
    rows = fa.make_sop_manual_dir(tmp_path / "manual")
    assert _prepare("sop", tmp_path, "--skip_checksums") == 0
    dataset = _load("sop", tmp_path / "data")
    assert (len(dataset.train), len(dataset.test)) == (len(rows["train"]), len(rows["test"]))
    assert np.bincount(dataset.train.labels).tolist() == [2, 2, 1]
    # Super classes 1, 3, 12 (bicycle, chair, toaster) → 0, 1, 2; the test split has bicycle and toaster.
    assert sorted(set(dataset.test.coarse_labels.tolist())) == [0, 2]


@pytest.mark.slow
@needs_tf
@needs_cv2
def test_prepare_cub200_from_official_layout(tmp_path):
    images = fa.make_cub_manual_dir(tmp_path / "manual")
    assert _prepare("cub200", tmp_path, "--skip_checksums") == 0
    dataset = _load("cub200", tmp_path / "data")
    assert len(dataset.train) + len(dataset.test) == len(images)
    assert dataset.train.num_classes == dataset.test.num_classes == 3
    cropped = _load("cub200", tmp_path / "data", crop_to_bbox=True)
    for i in range(len(cropped.test)):
        assert cropped.test.source[i]["image"].shape[0] == 10
