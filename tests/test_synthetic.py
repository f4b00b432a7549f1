"""The generated ``synthetic`` data set: determinism, the split contract, TFDS round trip, speed."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from hdml_jax.data import synthetic as sy
from hdml_jax.data import synthetic_preview
from hdml_jax.data.base import MetricDataset, Split

SMALL = sy.SyntheticConfig(
    num_families=4, classes_per_family=4, train_classes_per_family=2, images_per_class=6, image_size=32
)


@pytest.fixture(scope="module")
def small_data():
    return sy.generate(SMALL)


def test_determinism(small_data):
    again = sy.generate(SMALL)
    for split in ("train", "test"):
        for key, value in small_data[split].items():
            assert value.tobytes() == again[split][key].tobytes(), (split, key)
    other = sy.generate(
        sy.SyntheticConfig(**{**SMALL.to_dict(), "seed": 1, "scale_range": SMALL.scale_range})
    )
    assert small_data["train"]["image"].tobytes() != other["train"]["image"].tobytes()


def test_shapes_and_dtypes(small_data):
    size = SMALL.image_size
    per_split = {"train": SMALL.train_classes_per_family, "test": 2}
    for split, arrays in small_data.items():
        n = SMALL.num_families * per_split[split] * SMALL.images_per_class
        assert arrays["image"].shape == (n, size, size, 3) and arrays["image"].dtype == np.uint8
        for key in ("label", "coarse_label", "fine_class"):
            assert arrays[key].shape == (n,) and arrays[key].dtype == np.int64


def test_images_vary_within_a_class():
    images = sy.render_class(SMALL, 0, 0).astype(np.int32)
    assert np.array_equal(images, sy.render_class(SMALL, 0, 0))
    differences = np.abs(images[:, None] - images[None, :]).mean(axis=(2, 3, 4))
    assert differences[~np.eye(len(images), dtype=bool)].min() > 5


def test_split_is_class_disjoint_and_labels_are_remapped(small_data):
    train, test = small_data["train"], small_data["test"]
    assert not set(train["fine_class"]) & set(test["fine_class"])
    assert set(train["fine_class"]) | set(test["fine_class"]) == set(range(SMALL.num_classes))
    for arrays in (train, test):
        # every family on both sides; coarse label = family of the fine class
        assert set(arrays["coarse_label"]) == set(range(SMALL.num_families))
        np.testing.assert_array_equal(
            arrays["coarse_label"], arrays["fine_class"] // SMALL.classes_per_family
        )
        # labels 0..C-1, one per fine class, in fine-class order
        classes = np.unique(arrays["fine_class"])
        np.testing.assert_array_equal(np.unique(arrays["label"]), np.arange(len(classes)))
        np.testing.assert_array_equal(classes[arrays["label"]], arrays["fine_class"])
        assert np.all(np.bincount(arrays["label"]) == SMALL.images_per_class)
    labels = sy.split_labels(SMALL)
    for split in ("train", "test"):
        for key, value in labels[split].items():
            np.testing.assert_array_equal(value, small_data[split][key])


def test_default_split_sizes():
    labels = sy.split_labels(sy.SyntheticConfig())
    assert len(labels["train"]["label"]) == 16 * 5 * 40 and labels["train"]["label"].max() == 79
    assert len(labels["test"]["label"]) == 16 * 3 * 40 and labels["test"]["label"].max() == 47
    for split in ("train", "test"):
        assert set(labels[split]["coarse_label"]) == set(range(16))


def _check_contract(dataset: MetricDataset):
    assert dataset.name == "synthetic" and tuple(dataset.recall_ks) == (1, 2, 4, 8)
    for split in (dataset.train, dataset.test):
        assert isinstance(split, Split) and len(split.labels) == len(split.source)
        assert split.labels.dtype == np.int64 and split.coarse_labels.dtype == np.int64
        assert split.num_classes == len(np.unique(split.labels))
        assert split.num_coarse_classes == SMALL.num_families
        for i in range(len(split)):
            example = split.source[i]
            assert example["label"] == split.labels[i]
            assert example["coarse_label"] == split.coarse_labels[i]
            assert example["image"].shape == (SMALL.image_size,) * 2 + (3,)
            assert example["image"].dtype == np.uint8


def test_in_memory_dataset_contract():
    _check_contract(sy.synthetic_in_memory(SMALL))


def test_tfds_round_trip_equals_in_memory(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from hdml_jax.data import synthetic_builder

    loaded = synthetic_builder.load_synthetic(str(tmp_path), SMALL)
    _check_contract(loaded)
    memory = sy.synthetic_in_memory(SMALL)
    for name in ("train", "test"):
        a, b = getattr(loaded, name), getattr(memory, name)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.coarse_labels, b.coarse_labels)
        for i in range(len(a)):
            x, y = a.source[i], b.source[i]
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}[{i}][{key}]")
    name = synthetic_builder.config_name(SMALL)
    assert (tmp_path / "hdml_synthetic" / name).is_dir()

    # Prepared data is reused; without stored labels they are read from the source.
    builder = synthetic_builder.make_builder(str(tmp_path), SMALL)
    assert builder.is_prepared()
    sources = builder.as_data_source()
    builder.info.metadata.pop("labels")
    read = synthetic_builder.stored_labels(builder, sources)
    np.testing.assert_array_equal(read["test"]["label"], memory.test.labels)
    np.testing.assert_array_equal(read["train"]["fine_class"], sy.split_labels(SMALL)["train"]["fine_class"])


def test_config_names():
    pytest.importorskip("tensorflow_datasets")
    from hdml_jax.data.synthetic_builder import config_name

    assert config_name(sy.SyntheticConfig()) == "default"
    assert config_name(SMALL) != config_name(dataclasses.replace(SMALL, noise=0.0))
    assert sy.SyntheticConfig.from_dict(SMALL.to_dict()) == SMALL


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/some/where")
    assert sy.default_data_dir() == "/some/where"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sy.default_data_dir().endswith("tensorflow_datasets")


@pytest.mark.parametrize(
    "bad",
    [
        {"num_families": 17},
        {"classes_per_family": 9},
        {"train_classes_per_family": 4},
        {"images_per_class": 1},
        {"image_size": 8},
        {"noise": -0.1},
        {"scale_range": (0.3, 0.2)},
        {"texture_contrast": 0.0},
        {"fine_identity": "random"},
        {"images_per_class_mean": 2.0},
        {"images_per_class_mean": 6.5},  # above images_per_class, the maximum
    ],
)
def test_invalid_configs(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL, **bad)


def test_save_preview(tmp_path):
    from PIL import Image

    path = tmp_path / "preview.png"
    synthetic_preview.save_preview(path, SMALL, zoom=1)
    with Image.open(path) as image:
        width, height = image.size
    assert width > SMALL.classes_per_family * SMALL.image_size
    assert height > SMALL.num_families * SMALL.image_size


def test_default_generation_time():
    start = time.perf_counter()
    data = sy.generate(sy.SyntheticConfig())
    elapsed = time.perf_counter() - start
    assert data["train"]["image"].shape == (3200, 48, 48, 3)
    assert data["test"]["image"].shape == (1920, 48, 48, 3)
    assert elapsed < 60, f"generating the default data set took {elapsed:.1f} s"


# ---------------------------------------------------------------------------- SOP-shaped layout

SMALL_SOP = dataclasses.replace(sy.SOP_SHAPED, num_families=3, classes_per_family=20, train_classes_per_family=10)


def test_sop_shaped_statistics():
    """``SOP_SHAPED`` follows SOP's published shape (reference.md §3), scaled down; no rendering."""
    config = sy.SOP_SHAPED
    assert (config.num_families, config.image_size) == (12, 32)
    labels = sy.split_labels(config)
    train, test = labels["train"], labels["test"]
    assert not set(train["fine_class"]) & set(test["fine_class"])
    assert len(set(train["fine_class"]) | set(test["fine_class"])) == 2400
    for arrays in (train, test):
        per_class = np.bincount(arrays["label"])
        assert len(per_class) == 1200
        assert per_class.min() == 2 and per_class.max() <= 12
        assert 5.0 <= per_class.mean() <= 5.6  # SOP: 5.26 (train) and 5.35 (test) images per class
        assert per_class.std() > 1.5 and np.mean(per_class == 2) > 0.02  # a spread, not a constant
        classes_per_family = np.bincount(
            arrays["coarse_label"][np.r_[0, np.flatnonzero(np.diff(arrays["label"])) + 1]]
        )
        np.testing.assert_array_equal(classes_per_family, np.full(12, 100))  # every family on both sides
        np.testing.assert_array_equal(
            arrays["coarse_label"], arrays["fine_class"] // config.classes_per_family
        )
    assert sy.recall_ks(config) == (1, 10, 100) and sy.dataset_name(config) == "synthetic_sop"
    assert (
        sy.recall_ks(sy.SyntheticConfig()) == (1, 2, 4, 8)
        and sy.dataset_name(sy.SyntheticConfig()) == "synthetic"
    )


def test_sop_shaped_layout_is_deterministic_and_consistent():
    data = sy.generate(SMALL_SOP)
    again = sy.generate(SMALL_SOP)
    sizes = sy.class_sizes(SMALL_SOP)
    for split in ("train", "test"):
        for key, value in data[split].items():
            assert value.tobytes() == again[split][key].tobytes(), (split, key)
        counts = np.bincount(data[split]["fine_class"], minlength=SMALL_SOP.num_classes)
        present = counts > 0
        np.testing.assert_array_equal(counts[present], sizes.reshape(-1)[present])
    assert len(data["train"]["image"]) + len(data["test"]["image"]) == sizes.sum()
    # Class identities: drawn per class, all different, hue anywhere on the circle.
    identities = [sy.class_identity(SMALL_SOP, f, k) for f in range(3) for k in range(20)]
    assert len({i.hue for i in identities}) == 60
    assert all(0.7 <= i.aspect <= 1.0 and 0.0 <= i.proportion <= 1.0 for i in identities)
    assert {i.texture for i in identities} == {0, 1}
    assert sy.class_identity(SMALL_SOP, 1, 3) == identities[23]


def test_in_memory_sop_shaped_dataset():
    dataset = sy.synthetic_in_memory(SMALL_SOP)
    assert dataset.name == "synthetic" and dataset.recall_ks == (1, 10, 100)
    assert dataset.train.num_classes == 30 and dataset.train.num_coarse_classes == 3
