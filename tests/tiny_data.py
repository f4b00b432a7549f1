"""A tiny in-memory metric-learning data set for trainer tests (coloured noise, two levels)."""

from __future__ import annotations

import ml_collections
import numpy as np

from hdml_jax.data.base import MetricDataset, Split


class ArraySource:
    """Random-access examples backed by NumPy arrays (picklable, so grain workers can use it)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, coarse: np.ndarray):
        self.images, self.labels, self.coarse = images, labels, coarse

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index]), "coarse_label": int(self.coarse[index])}


def tiny_split(seed: int, num_classes: int, per_class: int, size: int = 32, name: str = "tiny") -> Split:
    """Class ``c`` is a colour plus noise; classes ``2g`` and ``2g+1`` share coarse group ``g``."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (num_classes, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 30, (len(labels), size, size, 3))
    images = (colours[labels][:, None, None, :] + noise).clip(0, 255).astype(np.uint8)
    coarse = labels // 2
    return Split(ArraySource(images, labels, coarse), labels, coarse, name=name)


def tiny_dataset(num_train_classes: int = 8, num_test_classes: int = 6, per_class: int = 8) -> MetricDataset:
    return MetricDataset(
        "tiny",
        tiny_split(0, num_train_classes, per_class, name="tiny/train"),
        tiny_split(1, num_test_classes, per_class, name="tiny/test"),
    )


def shrink(c: ml_collections.ConfigDict, num_epochs: int = 4, eval_every_epochs: int = 2) -> None:
    """A config's network and schedule made test-sized: ResNet-18 width 4, 16-d, batch 16, P×K 4×4,
    3 coarse groups built after epoch 1 and refreshed every epoch, no pictures, no NMI."""
    c.model.width = 4
    c.model.embedding_dim = 16
    c.batch_size = 16
    if c.sampler == "pk":
        c.classes_per_batch, c.samples_per_class = 4, 4
    elif c.sampler == "unique_class":  # HIER's batches: classes × 2
        c.classes_per_batch, c.samples_per_class = 8, 2
    c.loss.hier.num_lcas = 16  # HIER's LCAs (its methods only): 512 · 50 proxy triplets otherwise
    c.num_epochs = num_epochs
    c.eval_every_epochs = eval_every_epochs
    c.eval_batch_size = 16
    c.log_every_steps = 2
    c.checkpoint_every_steps = 100
    c.loss.num_coarse_groups = (3,)
    c.loss.hierarchy_build_epoch = 1
    c.loss.hierarchy_refresh_epochs = 1
    c.pictures = False
    c.nmi = False
