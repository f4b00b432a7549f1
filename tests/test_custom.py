"""Custom data sets: Open Metric Learning CSVs and image folders (hdml_jax/data/custom.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from hdml_jax.data import custom
from tests.custom_data import save_image, tiny_csv_dataset, write_csv
from tests.numerics import assert_close
from tests.tiny_data import tiny_split


def _solid(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


def _leftovers(cache) -> list[str]:
    """Everything under the cache's ``custom/`` folder (prepared or temporary)."""
    folder = cache / "custom"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("csv data")
    path, rows = tiny_csv_dataset(folder, num_train_classes=4, num_test_classes=3, per_class=4)
    return path, rows


def test_csv_becomes_class_disjoint_splits_with_rgb_images_and_categories(csv_dataset, tmp_path):
    path, rows = csv_dataset
    dataset = custom.load_custom(path, cache_dir=tmp_path)
    assert (len(dataset.train), len(dataset.test)) == (16, 12)
    assert dataset.query is None and dataset.name == "custom:items.csv"
    # classes numbered in sorted name order within each split; categories train-first, dense
    np.testing.assert_array_equal(dataset.train.labels, np.repeat(np.arange(4), 4))
    np.testing.assert_array_equal(dataset.test.labels, np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(dataset.train.coarse_labels, np.repeat([0, 0, 1, 1], 4))
    np.testing.assert_array_equal(dataset.test.coarse_labels, np.repeat([0, 0, 1], 4))
    original = tiny_split(0, 4, 4, 32)
    for i in range(4):  # RGB, L, RGBA, P rows: each arrives as uint8 (H, W, 3) equal to PIL's RGB
        image = dataset.train.source[i]["image"]
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        expected = np.asarray(Image.open(path.parent / rows[i]["path"]).convert("RGB"))
        np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(dataset.train.source[0]["image"], original.source[0]["image"])
    np.testing.assert_array_equal(
        dataset.train.source[2]["image"], original.source[2]["image"]
    )  # RGBA: alpha dropped
    copy = pickle.loads(pickle.dumps(dataset.test.source))  # grain workers get pickled sources
    np.testing.assert_array_equal(copy[5]["image"], dataset.test.source[5]["image"])
    assert copy[5]["label"] == 1 and copy[5]["coarse_label"] == 0


def test_prepared_once_then_again_after_the_csv_or_an_image_changes(csv_dataset, tmp_path):
    path, rows = csv_dataset
    calls = []
    first = custom.prepare(custom.read_csv(path), tmp_path, progress=lambda *a: calls.append(a))
    again = custom.prepare(custom.read_csv(path), tmp_path, progress=lambda *a: calls.append(a))
    assert first == again and len(calls) == 1  # the second call scanned nothing
    edited = write_csv(path.parent / "edited.csv", rows[:-1])
    assert custom.prepare(custom.read_csv(edited), tmp_path, progress=None) != first
    image = path.parent / rows[0]["path"]
    original = image.read_bytes()
    try:
        save_image(image, _solid(32, 32, (1, 2, 3)))
        changed = custom.prepare(custom.read_csv(path), tmp_path, progress=None)
        assert changed != first
        np.testing.assert_array_equal(
            custom.load_prepared(changed).train.source[0]["image"], _solid(32, 32, (1, 2, 3))
        )
    finally:
        image.write_bytes(original)


def test_query_gallery_flags_give_a_query_gallery_evaluation(tmp_path):
    path, _ = tiny_csv_dataset(
        tmp_path, num_train_classes=2, num_test_classes=3, per_class=4, query_gallery=True
    )
    dataset = custom.load_custom(path, cache_dir=tmp_path / "cache")
    assert (len(dataset.query), len(dataset.gallery), len(dataset.test)) == (6, 6, 12)
    np.testing.assert_array_equal(dataset.query.labels, np.repeat(np.arange(3), 2))
    np.testing.assert_array_equal(dataset.gallery.labels, np.repeat(np.arange(3), 2))
    # ``test`` keeps the CSV's order; the flags say which of its rows are queries.
    is_query, is_gallery = dataset.roles()
    np.testing.assert_array_equal(dataset.test.labels, np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(is_query, ~is_gallery)
    np.testing.assert_array_equal(dataset.test.labels[is_query], dataset.query.labels)


def test_bounding_boxes_in_pixels_crop_the_image(tmp_path):
    image = _solid(40, 60, (200, 10, 10))
    image[10:30, 20:50] = (10, 200, 10)  # the box: x 20..50, y 10..30
    rows = []
    for i, split in enumerate(["train", "train", "validation", "validation"]):
        save_image(tmp_path / f"{i}.png", image)
        box = (
            {"x_1": 20, "x_2": 50, "y_1": 10, "y_2": 30}
            if i != 1
            else {"x_1": "", "x_2": "", "y_1": "", "y_2": ""}
        )
        rows.append({"label": split, "path": f"{i}.png", "split": split, **box})
    path = write_csv(tmp_path / "boxes.csv", rows)
    dataset = custom.load_custom(path, cache_dir=tmp_path / "cache", crop_to_bbox=True)
    np.testing.assert_array_equal(dataset.train.source[0]["image"], _solid(20, 30, (10, 200, 10)))
    np.testing.assert_array_equal(dataset.train.source[1]["image"], image)  # no box: the whole image
    uncropped = custom.load_custom(path, cache_dir=tmp_path / "cache")
    # Float64 quotients rounded once to float32: at most u = ε/2 of each value (k = 2 for margin).
    expected = [10 / 40, 20 / 60, 30 / 40, 50 / 60]
    f32 = float(np.finfo(np.float32).eps)
    assert_close(uncropped.train.source[0]["bbox"], expected, n_terms=1, k=2.0, eps=f32)


def test_every_problem_is_listed_at_once_and_nothing_is_kept(tmp_path):
    good = _solid(8, 8, (90, 90, 90))
    for name in ("a1", "a2", "b1", "b2", "c1", "d1"):
        save_image(tmp_path / f"{name}.png", good)
    save_image(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "t.png").write_bytes((tmp_path / "t.png").read_bytes()[:2000])  # truncated
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    rows = [
        ("a", "a1.png", "train"),
        ("a", "a2.png", "train"),
        ("a", "t.png", "train"),
        ("b", "b1.png", "validation"),
        ("b", "b2.png", "validation"),
        ("a", "c1.png", "validation"),  # class a in both splits
        ("d", "d1.png", "validation"),  # one image: nothing to retrieve, left out of the scores
        ("e", "gone dir/e1.png", "validation"),
        ("e", "junk.jpg", "validation"),
        ("f", "b1.png", "validation"),
        ("f", "", "validation"),
        ("g", "x.png", "test"),
    ]
    path = write_csv(tmp_path / "bad.csv", [{"label": a, "path": b, "split": c} for a, b, c in rows])
    with pytest.raises(custom.CustomDataError) as caught:
        custom.load_custom(path, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    for expected in (
        "bad.csv: 6 problems; nothing was prepared or trained",
        "empty path cells: line 12",
        "split must be train or validation: line 13 ('test')",
        "paths listed more than once: b1.png",
        "classes in both train and validation (the splits must hold disjoint classes): a",
        f"missing files (under {tmp_path}): gone dir/e1.png, x.png",
        "unreadable or truncated images: t.png (",
        "junk.jpg (not an image format Pillow reads)",
    ):
        assert expected in message, message
    assert "single image" not in message  # a query with nothing to find is no error (OML's semantics)
    assert _leftovers(tmp_path / "cache") == []


def test_missing_columns_empty_split_and_pair_requirements(tmp_path):
    save_image(tmp_path / "a.png", _solid(4, 4, (1, 1, 1)))
    no_split = write_csv(tmp_path / "cols.csv", [{"label": "a", "path": "a.png"}])
    with pytest.raises(
        custom.CustomDataError, match=r"cols.csv: missing column\(s\) split \(the header is label,path\)"
    ):
        custom.read_csv(no_split)
    with pytest.raises(custom.CustomDataError, match="no such CSV file"):
        custom.read_csv(tmp_path / "nope.csv")
    only_train = custom.read_csv(
        write_csv(tmp_path / "t.csv", [{"label": "a", "path": "a.png", "split": "train"}])
    )
    problems = custom.check_table(only_train, custom.Requirements(pairs_in_train=True, boxes=True))
    assert "the validation split is empty (no row has split=validation)" in problems
    assert "training classes with a single image (the triplet loss needs pairs): a" in problems
    assert any(
        "dataset.crop_to_bbox=True but the CSV has no x_1, x_2, y_1, y_2 columns" in p for p in problems
    )
    flags = custom.read_csv(
        write_csv(
            tmp_path / "q.csv",
            [
                {
                    "label": "v",
                    "path": "a.png",
                    "split": "validation",
                    "is_query": "True",
                    "is_gallery": "True",
                },
                {"label": "v", "path": "b.png", "split": "validation", "is_query": "yes", "is_gallery": "0"},
                {"label": "w", "path": "c.png", "split": "validation", "is_query": "1", "is_gallery": "no"},
                {
                    "label": "v",
                    "path": "d.png",
                    "split": "validation",
                    "is_query": "maybe",
                    "is_gallery": "0",
                },
            ],
        )
    )
    problems = custom.check_table(flags)
    assert "is_query must be True or False on validation rows: line 5 ('maybe')" in problems
    # Both-rows next to query-only ones, and a query class with no gallery row: valid (OML's format).
    assert "is_query must be True or False on validation rows: line 5 ('maybe')" in problems
    # (line 5's unparsed flag also makes it neither query nor gallery)
    assert [p for p in problems if "gallery" in p] == [
        "validation rows that are neither query nor gallery: line 5"
    ]


def test_image_folders_with_and_without_categories(tmp_path):
    for split, category, label, n in [
        ("train", "cats", "tabby", 2),
        ("train", "dogs", "pug", 2),
        ("val", "cats", "lynx", 2),
    ]:
        for i in range(n):
            save_image(
                tmp_path / "nested" / split / category / label / f"{i}.jpg", _solid(6, 6, (i * 50, 0, 0)), "L"
            )
    dataset = custom.load_custom(tmp_path / "nested", cache_dir=tmp_path / "cache")
    assert (len(dataset.train), len(dataset.test), dataset.train.num_classes) == (4, 2, 2)
    np.testing.assert_array_equal(dataset.train.coarse_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(dataset.test.coarse_labels, [0, 0])  # "cats" in both splits
    save_image(tmp_path / "flat" / "train" / "x.png", _solid(4, 4, (0, 0, 0)))
    with pytest.raises(
        custom.CustomDataError,
        match=r"needs the subfolders train/ and one of validation/, val/, test/ \(found: train\)",
    ):
        custom.load_custom(tmp_path / "flat", cache_dir=tmp_path / "cache")
    save_image(tmp_path / "flat" / "test" / "c" / "y.png", _solid(4, 4, (0, 0, 0)))
    with pytest.raises(custom.CustomDataError, match=r"mixed or unexpected depths .* \[1, 2\]"):
        custom.load_custom(tmp_path / "flat", cache_dir=tmp_path / "cache")


def test_sixteen_bit_grayscale_and_interrupted_preparation(tmp_path):
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pixels = custom.load_rgb(tmp_path / "deep.png")
    assert pixels.shape == (3, 4, 3) and pixels[2, 3, 0] == round(55000 * 255 / 65535)
    with pytest.raises(custom.CustomDataError, match="no such image file"):
        custom.load_rgb(tmp_path / "nope.png")

    path, _ = tiny_csv_dataset(tmp_path / "data", num_train_classes=2, num_test_classes=2, per_class=2)

    def interrupt(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        custom.prepare(custom.read_csv(path), tmp_path / "cache", progress=interrupt)
    assert _leftovers(tmp_path / "cache") == []


def test_check_command_prints_a_summary_or_one_error(csv_dataset, tmp_path, capsys):
    path, _ = csv_dataset
    assert custom.main([str(path), "--cache_dir", str(tmp_path)]) == 0
    assert (
        "items.csv: ok — train 16 images / 4 classes, test 12 images / 3 classes" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as exit_info:
        custom.main([str(tmp_path / "missing.csv"), "--cache_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.csv: no such CSV file" in err and "Traceback" not in err


def _taxonomy_rows(paths: dict[str, str]) -> list[dict[str, str]]:
    """Two images per class; ``paths`` maps a class to its category path (coarsest first)."""
    split = {"kettle": "train", "toaster": "train", "rake": "train", "hoe": "train"}
    return [
        {
            "label": label,
            "path": f"{label}{i}.png",
            "split": split.get(label, "validation"),
            "category": category,
        }
        for label, category in paths.items()
        for i in range(2)
    ]


def test_a_category_path_is_a_taxonomy_of_any_depth(tmp_path):
    paths = {
        "kettle": "home/kitchen/small appliances",
        "toaster": "home/kitchen/small appliances",
        "rake": "garden/tools/hand tools",
        "hoe": "garden/tools/long tools",
        "pan": "home/kitchen/cookware",
        "spade": "garden/tools/long tools",
    }
    rows = _taxonomy_rows(paths)
    for row in rows:
        save_image(tmp_path / row["path"], _solid(8, 8, (len(row["label"]) * 20, 0, 0)))
    dataset = custom.load_custom(write_csv(tmp_path / "items.csv", rows), cache_dir=tmp_path / "cache")
    train, test = dataset.train, dataset.test
    assert len(train.coarse_levels) == len(test.coarse_levels) == 3  # three levels above the classes
    # Finest first; ids dense over the training split (its categories numbered first).
    names = {label: i for i, label in enumerate(sorted(["hoe", "kettle", "rake", "toaster"]))}
    by_class = {
        int(c): tuple(int(level[i]) for level in train.coarse_levels) for i, c in enumerate(train.labels)
    }
    assert by_class[names["kettle"]] == by_class[names["toaster"]]
    assert (
        by_class[names["rake"]][1:] == by_class[names["hoe"]][1:]
        and by_class[names["rake"]][0] != by_class[names["hoe"]][0]
    )
    assert by_class[names["kettle"]][2] != by_class[names["rake"]][2]  # home vs garden
    for level in train.coarse_levels:
        assert set(level.tolist()) == set(range(level.max() + 1))
    # "garden/tools/long tools" is the same group in both splits, at every level.
    spade = int(np.flatnonzero(test.labels == test.labels[-1])[0])
    hoe = int(np.flatnonzero(train.labels == names["hoe"])[0])
    assert [int(level[spade]) for level in test.coarse_levels] == [
        int(level[hoe]) for level in train.coarse_levels
    ]
    # The HPL levels from it: class → shelf → aisle → department.
    from hdml_jax.training import setup

    maps = setup.taxonomy_maps(train)
    assert [m.shape[0] for m in maps] == [4, 3, 2]
    for finer, coarser, mapping in zip(
        (train.labels, *train.coarse_levels[:-1]), train.coarse_levels, maps, strict=True
    ):
        np.testing.assert_array_equal(mapping[finer], coarser)


def test_taxonomy_mistakes_list_their_rows(tmp_path):
    for row in _taxonomy_rows({"kettle": "a", "toaster": "b", "rake": "c", "hoe": "d", "pan": "e"}):
        save_image(tmp_path / row["path"], _solid(4, 4, (1, 2, 3)))
    rows = _taxonomy_rows(
        {
            "kettle": "home/kitchen",
            "toaster": "home/kitchen",
            "rake": "garden",
            "hoe": "garden//tools",
            "pan": "home/x",
        }
    )
    rows[1]["category"] = "home/bath"  # the second kettle: a class under two parents
    problems = custom.check_table(custom.read_csv(write_csv(tmp_path / "bad.csv", rows)))
    assert (
        "classes with more than one category (a class under two parents): kettle (home/bath, home/kitchen)"
        in problems
    )
    assert "category paths with an empty level (between '/'s): line 8, line 9" in problems
    assert any(
        p.startswith("category paths of another depth than the usual 2 levels")
        and "line 6 ('garden': 1)" in p
        for p in problems
    ), problems


def test_image_folders_of_any_depth_and_hpl_levels_from_them(tmp_path):
    import ml_collections

    from hdml_jax.errors import ConfigError
    from hdml_jax.training import setup

    for split, path, n in [
        ("train", "home/kitchen/kettle", 2),
        ("train", "home/bath/towel", 2),
        ("train", "garden/tools/rake", 2),
        ("validation", "garden/tools/hoe", 2),
    ]:
        for i in range(n):
            save_image(tmp_path / "tree" / split / path / f"{i}.png", _solid(6, 6, (i * 60, 0, 0)))
    dataset = custom.load_custom(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert [len(np.unique(level)) for level in dataset.train.coarse_levels] == [3, 2]  # aisles, departments
    config = ml_collections.ConfigDict(
        {
            "method": "hpl_pa",
            "loss": {"coarse_from_labels": True, "level_weights": (1.0, 0.1), "num_coarse_groups": (0,)},
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"level_weights has 2 entries, .* gives 3 levels .*level_weights='\(1.0, 0.1, 0.1\)'",
    ):
        setup.coarse_group_sizes(config, dataset)
    config.loss.level_weights = (1.0, 0.1, 0.05)
    assert setup.coarse_group_sizes(config, dataset) == (3, 2)
