"""Samplers, transforms and the grain input pipeline on a tiny in-memory data set."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from hdml_jax.data import pipeline, sampling, transforms
from hdml_jax.data.base import Split
from tests.numerics import assert_close

F32 = float(np.finfo(np.float32).eps)
NUM_CLASSES, PER_CLASS, HEIGHT, WIDTH = 10, 7, 30, 40


class TinySource:
    """10 classes × 7 random 30×40 images; every third example has a bbox; coarse label = class // 5."""

    def __init__(self, num_classes: int = NUM_CLASSES, per_class: int = PER_CLASS):
        rng = np.random.default_rng(0)
        n = num_classes * per_class
        self.images = rng.integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)
        self.labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
        self.coarse = self.labels // 5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        example = {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "coarse_label": int(self.coarse[index]),
        }
        if index % 3 == 0:
            example["bbox"] = np.array([0.1, 0.2, 0.9, 0.7], np.float32)
        return example


@pytest.fixture(scope="module")
def split() -> Split:
    source = TinySource()
    return Split(source, source.labels, source.coarse, name="tiny/train")


def make_iterator(
    split, *, seed=0, num_workers=0, process_index=0, process_count=1, batch=12, p=4, k=3, **kw
):
    sampler = sampling.PKSampler(split.labels, classes_per_batch=p, samples_per_class=k, seed=seed)
    transform = transforms.TRANSFORMS["proxy_anchor"](16, crop_to_bbox=True).train
    return pipeline.train_iterator(
        split,
        sampler=sampler,
        transform=transform,
        global_batch_size=batch,
        seed=seed,
        num_workers=num_workers,
        process_index=process_index,
        process_count=process_count,
        **kw,
    )


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------- samplers

UNEVEN = np.repeat(np.arange(9), [7, 7, 7, 7, 7, 7, 2, 3, 1])  # classes 6, 7, 8 have fewer than K=4


def test_pk_batches_have_p_classes_k_each():
    sampler = sampling.PKSampler(UNEVEN, classes_per_batch=4, samples_per_class=4, seed=3)
    counts = np.bincount(UNEVEN)
    for step in range(60):
        indices = sampler.batch_indices(step)
        assert indices.shape == (16,) and indices.dtype == np.int64
        labels = UNEVEN[indices]
        per_class = Counter(labels.tolist())
        assert len(per_class) == 4 and set(per_class.values()) == {4}
        assert all(labels[4 * c : 4 * c + 4].tolist() == [labels[4 * c]] * 4 for c in range(4))  # class-major
        for c in per_class:
            chosen = indices[labels == c]
            if counts[c] >= 4:  # without replacement
                assert len(set(chosen.tolist())) == 4
            else:  # with replacement, balanced: every image, floor/ceil(K/n) times each
                members = Counter(chosen.tolist())
                assert set(members) == set(np.flatnonzero(UNEVEN == c).tolist())
                assert max(members.values()) - min(members.values()) <= 1


def test_pk_epoch_coverage_is_even():
    sampler = sampling.PKSampler(UNEVEN, classes_per_batch=4, samples_per_class=2, seed=0)
    assert sampler.steps_per_epoch == 3  # ceil(9 / 4)
    for epoch in range(5):
        seen = Counter()
        for step in range(epoch * 3, epoch * 3 + 3):
            seen.update(sampler.batch_classes(step).tolist())
        assert set(seen) == set(range(9))  # every class in every epoch
        assert sum(seen.values()) == 12 and max(seen.values()) <= 2  # 3 classes twice (fill)
    exact = sampling.PKSampler(np.repeat(np.arange(8), 3), classes_per_batch=4, samples_per_class=3, seed=5)
    for epoch in range(3):
        classes = np.concatenate([exact.batch_classes(epoch * 2 + b) for b in range(2)])
        assert sorted(classes.tolist()) == list(range(8))


def test_pk_deterministic_random_access_and_seeded():
    a = sampling.PKSampler(UNEVEN, classes_per_batch=3, samples_per_class=4, seed=11)
    sequential = [a.batch_indices(s) for s in range(20)]
    b = sampling.PKSampler(UNEVEN, classes_per_batch=3, samples_per_class=4, seed=11)
    for step in (17, 4, 19, 0):  # any order, fresh caches
        np.testing.assert_array_equal(b.batch_indices(step), sequential[step])
    c = sampling.PKSampler(UNEVEN, classes_per_batch=3, samples_per_class=4, seed=12)
    assert any(not np.array_equal(c.batch_indices(s), sequential[s]) for s in range(20))


def test_pk_errors():
    with pytest.raises(ValueError, match="exceeds the 9 classes"):
        sampling.PKSampler(UNEVEN, classes_per_batch=10, samples_per_class=2)
    with pytest.raises(ValueError, match=r"samples_per_class \(K\) must be >= 1"):
        sampling.PKSampler(UNEVEN, classes_per_batch=2, samples_per_class=0)
    with pytest.raises(ValueError, match=r"classes_per_batch \(P\) must be >= 1"):
        sampling.PKSampler(UNEVEN, classes_per_batch=0, samples_per_class=2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        sampling.PKSampler(UNEVEN, classes_per_batch=2, samples_per_class=2).batch_indices(-1)


def test_shuffle_sampler():
    sampler = sampling.ShuffleSampler(50, batch_size=8, seed=1)
    assert sampler.steps_per_epoch == 6
    for epoch in range(3):
        epoch_indices = np.concatenate([sampler.batch_indices(epoch * 6 + b) for b in range(6)])
        assert len(set(epoch_indices.tolist())) == 48  # no repeats; the 2 left over are dropped
    assert not np.array_equal(sampler.batch_indices(0), sampler.batch_indices(6))  # reshuffled
    np.testing.assert_array_equal(
        sampling.ShuffleSampler(50, batch_size=8, seed=1).batch_indices(13), sampler.batch_indices(13)
    )
    keep = sampling.ShuffleSampler(50, batch_size=8, seed=1, drop_remainder=False)
    assert keep.steps_per_epoch == 7
    epoch = np.concatenate([keep.batch_indices(b) for b in range(7)])
    assert set(epoch.tolist()) == set(range(50)) and len(epoch) == 56
    with pytest.raises(ValueError, match="exceeds the 5 examples"):
        sampling.ShuffleSampler(5, batch_size=8)


def test_unique_class_batches_follow_hiers_sampler():
    """HIER's UniqueClassSampler: P distinct classes drawn afresh per batch, K images each with
    replacement, N // (P·K) batches per epoch, class-major; a pure function of (seed, step)."""
    labels = np.repeat(np.arange(20), np.arange(1, 21))  # class c has c + 1 images (210 in all)
    sampler = sampling.UniqueClassSampler(labels, classes_per_batch=6, samples_per_class=3, seed=4)
    assert (sampler.batch_size, sampler.steps_per_epoch) == (18, 210 // 18)
    seen_classes, repeats = Counter(), 0
    for step in range(400):
        indices = sampler.batch_indices(step)
        classes = labels[indices].reshape(6, 3)
        assert (classes == classes[:, :1]).all()  # class-major, K of one class each
        assert len(set(classes[:, 0].tolist())) == 6  # P distinct classes
        seen_classes.update(classes[:, 0].tolist())
        repeats += sum(len(set(row)) < 3 for row in indices.reshape(6, 3).tolist())
    # Classes uniform over batches (400 · 6 / 20 = 120 each; 5 standard deviations ≈ 50).
    assert set(seen_classes) == set(range(20))
    assert max(abs(n - 120) for n in seen_classes.values()) < 50
    assert repeats > 0  # images drawn with replacement: the one-image class repeats itself
    np.testing.assert_array_equal(
        sampling.UniqueClassSampler(labels, classes_per_batch=6, samples_per_class=3, seed=4).batch_indices(77),
        sampler.batch_indices(77),
    )
    many = sampling.UniqueClassSampler(labels, classes_per_batch=25, samples_per_class=2)
    assert len(many.batch_indices(0)) == 50  # more classes than exist: drawn with replacement


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", sorted(transforms.TRANSFORMS))
def test_transforms_shapes_and_determinism(name):
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pair = transforms.TRANSFORMS[name](24)
    outs = [pair.train(image, np.random.default_rng(s)) for s in (0, 0, 1, 2, 3)]
    for out in outs:
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])
    evaluated = pair.eval(image)
    assert evaluated.shape == (24, 24, 3) and evaluated.dtype == np.uint8
    np.testing.assert_array_equal(evaluated, pair.eval(image, np.random.default_rng(5)))
    for odd in (image[:, :, 0], np.concatenate([image, image[:, :, :1]], axis=2)):  # grey, RGBA
        assert pair.train(odd, np.random.default_rng(0)).shape == (24, 24, 3)
    with pytest.raises(ValueError, match="is random"):
        pair.train(image)


def test_default_sizes_on_a_realistic_image():
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for name, size in (("proxy_anchor", 224), ("cgd", 224), ("mlrc", 227)):
        pair = transforms.TRANSFORMS[name]()
        assert pair.train(image, np.random.default_rng(0)).shape == (size, size, 3)
        assert pair.eval(image).shape == (size, size, 3)


def test_eval_geometry_matches_resize_then_crop():
    # Centre crop of a left/right split image keeps the proportion of the two halves.
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255
    out = transforms.proxy_anchor(32).eval(image).astype(int)
    assert out.shape == (32, 32, 3)
    assert (out[:, :14] == 0).all() and (out[:, 18:] == 255).all()  # boundary in the middle
    square = transforms.cgd(32).eval(image).astype(int)  # squashed: boundary also in the middle
    assert (square[:, :14] == 0).all() and (square[:, 18:] == 255).all()


def test_bbox_crop():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :, 2] = 255  # blue everywhere ...
    image[10:30, 15:45] = (255, 0, 0)  # ... but a red box
    bbox = np.array([10 / 40, 15 / 60, 30 / 40, 45 / 60])
    cropped = transforms.crop_to_bbox(image, bbox)
    assert cropped.shape == (20, 30, 3) and (cropped == (255, 0, 0)).all()
    assert transforms.crop_to_bbox(image, [0.5, 0.5, 0.5, 0.5]).shape == (1, 1, 3)  # never empty
    with_crop = transforms.cgd(16, crop_to_bbox=True)
    assert (with_crop.eval(image, bbox=bbox) == (255, 0, 0)).all()
    assert (with_crop.train(image, np.random.default_rng(0), bbox=bbox) == (255, 0, 0)).all()
    without = transforms.cgd(16).eval(image, bbox=bbox)
    assert (without[..., 2] == 255).any()  # bbox ignored unless requested
    np.testing.assert_array_equal(with_crop.eval(image), without)  # no bbox: nothing to crop


def test_normalize():
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    out = transforms.normalize(images)
    assert out.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    # (255 - 255·mean) / (255·std) in float32: the constants' and the two operations' roundings
    # (k = 8 covers them), on the scale of the subtraction's terms, (1 + mean) / std.
    scale = float(np.max((1 + mean) / std))
    assert_close(out[0, 0, 0], (1 - mean) / std, n_terms=1, scale=scale, eps=F32)


# ----------------------------------------------------------------------------- train pipeline


def test_train_batches_are_pk_and_reproduce_the_transform(split):
    iterator = make_iterator(split, seed=4)
    transform = transforms.proxy_anchor(16, crop_to_bbox=True).train
    sampler = sampling.PKSampler(split.labels, classes_per_batch=4, samples_per_class=3, seed=4)
    for step, batch in enumerate(take(iterator, 4)):
        assert batch["image"].shape == (12, 16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["coarse_label"].dtype == np.int32
        np.testing.assert_array_equal(batch["index"], sampler.batch_indices(step))
        np.testing.assert_array_equal(batch["label"], split.labels[batch["index"]])
        np.testing.assert_array_equal(batch["coarse_label"], split.coarse_labels[batch["index"]])
        for position in (0, 5, 11):
            example = split.source[int(batch["index"][position])]
            expected = transform(
                example["image"], pipeline.augmentation_rng(4, step, position), bbox=example.get("bbox")
            )
            np.testing.assert_array_equal(batch["image"][position], expected)
    iterator.close()


def test_train_deterministic_and_seeded(split):
    a, b, c = (
        make_iterator(split, seed=1),
        make_iterator(split, seed=1, num_threads=3),
        make_iterator(split, seed=2),
    )
    first, second, other = take(a, 4), take(b, 4), take(c, 4)
    assert_batches_equal(first, second)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(first, other, strict=True))


def test_resume_mid_epoch_is_exact(split):
    reference = take(make_iterator(split), 8)  # steps_per_epoch = ceil(10 / 4) = 3: crosses epochs
    interrupted = make_iterator(split)
    take(interrupted, 4)
    state = json.loads(json.dumps(interrupted.get_state()))
    assert state["step"] == 4
    interrupted.close()
    resumed = make_iterator(split)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), reference[4:])
    assert resumed.get_state()["step"] == 8
    resumed.set_state({"step": 1})  # rewinding works as well
    assert_batches_equal(take(resumed, 2), reference[1:3])
    with pytest.raises(ValueError, match="seed=9"):
        resumed.set_state({**state, "seed": 9})


def test_workers_give_the_same_batches_and_resume(split):
    reference = take(make_iterator(split), 6)
    with make_iterator(split, num_workers=2) as uninterrupted:
        assert_batches_equal(take(uninterrupted, 6), reference)
    with make_iterator(split, num_workers=2) as resumed:
        resumed.set_state({"step": 3})
        assert_batches_equal(take(resumed, 3), reference[3:])
    kwargs = dict(transform=transforms.cgd(8).eval, batch_size=16, process_index=0, process_count=1)
    assert_batches_equal(
        list(pipeline.eval_batches(split, num_workers=2, **kwargs)),
        list(pipeline.eval_batches(split, **kwargs)),
    )


def test_process_shards_concatenate_to_the_global_batch(split):
    whole = take(make_iterator(split, batch=24, seed=3), 3)
    shards = [
        take(make_iterator(split, batch=24, seed=3, process_index=p, process_count=2), 3) for p in range(2)
    ]
    for step in range(3):
        assert shards[0][step]["image"].shape[0] == 12
        for key in whole[step]:
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[step][key]
            )


def test_global_batch_of_several_sampler_batches(split):
    batch = next(make_iterator(split, batch=24, p=4, k=3, seed=6))
    sampler = sampling.PKSampler(split.labels, classes_per_batch=4, samples_per_class=3, seed=6)
    np.testing.assert_array_equal(
        batch["index"], np.concatenate([sampler.batch_indices(0), sampler.batch_indices(1)])
    )


def test_shuffle_sampler_pipeline(split):
    sampler = sampling.ShuffleSampler(len(split), batch_size=16, seed=0)
    iterator = pipeline.train_iterator(
        split,
        sampler=sampler,
        transform=transforms.synthetic(8).train,
        global_batch_size=16,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iterator)
    assert batch["image"].shape == (16, 8, 8, 3)
    np.testing.assert_array_equal(batch["index"], sampler.batch_indices(0))


def test_pipeline_errors(split):
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        make_iterator(split, batch=12, process_count=5)
    with pytest.raises(ValueError, match="not a multiple of the sampler's batch size 12"):
        make_iterator(split, batch=16, p=4, k=3, process_count=2)
    with pytest.raises(ValueError, match="process_index 2"):
        make_iterator(split, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.eval_batches(
            split, transform=transforms.cgd(8).eval, batch_size=16, process_index=0, process_count=3
        )


# ----------------------------------------------------------------------------- eval pipeline


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(split, process_count):
    transform = transforms.proxy_anchor(16).eval
    per_process = [
        list(
            pipeline.eval_batches(
                split, transform=transform, batch_size=16, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    assert {len(batches) for batches in per_process} == {5}  # ceil(70 / 16), the same on every process
    indices, masks = [], []
    for step in range(5):
        for p in range(process_count):
            batch = per_process[p][step]
            assert batch["image"].shape == (16 // process_count, 16, 16, 3)
            assert batch["mask"].dtype == bool
            indices.append(batch["index"])
            masks.append(batch["mask"])
            valid = batch["index"][batch["mask"]]
            np.testing.assert_array_equal(batch["label"][batch["mask"]], split.labels[valid])
            assert (batch["label"][~batch["mask"]] == -1).all() and (
                batch["image"][~batch["mask"]] == 0
            ).all()
            if len(valid):
                np.testing.assert_array_equal(
                    batch["image"][0], transform(split.source[int(batch["index"][0])]["image"])
                )
    indices, masks = np.concatenate(indices), np.concatenate(masks)
    assert len(indices) == 80 and masks.sum() == 70
    np.testing.assert_array_equal(indices[masks], np.arange(70))  # in order, exactly once
    assert (indices[~masks] == -1).all()
