"""TFDS builder of the generated ``synthetic`` data set: ``hdml_synthetic``.

Written as ``array_record`` (random access, what grain reads) without TensorFlow: the image is a
``tfds.features.Tensor`` (uint8, ZLIB-compressed), not a ``tfds.features.Image`` (PNG encoding
needs TensorFlow). Features::

    image         uint8 (S, S, 3)
    label         int64, 0..C-1 within the split
    coarse_label  ClassLabel over the family names (``synthetic.FAMILY_NAMES``)
    fine_class    ClassLabel, global fine-class id ``family * classes_per_family + k``

The splits ``train`` and ``test`` are already class-disjoint (see ``hdml_jax.data.synthetic``).
Examples are stored in generation order (``disable_shuffling``), class by class, so
``source[i]`` is the ``i``-th row of ``synthetic.generate(config)[split]``.

A builder config carries a whole ``SyntheticConfig``; its name is ``"default"`` for
``SyntheticConfig()`` and otherwise a readable summary plus a hash of every parameter, so each
parameter set gets its own directory ``data_dir/hdml_synthetic/<name>/<version>``. The label
arrays and the parameters are stored in the data set's metadata (``metadata.json``), so loading
never decodes an image to learn the labels.

Bump ``HdmlSynthetic.VERSION`` whenever the renderer's output changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from hdml_jax.data import synthetic
from hdml_jax.data.base import MetricDataset

_LABEL_KEYS = ("label", "coarse_label", "fine_class")


def config_name(config: synthetic.SyntheticConfig) -> str:
    """The TFDS config name of ``config``: ``"default"`` or e.g. ``"f4c4t2n6s32_1a2b3c4d5e"``."""
    if config == synthetic.SyntheticConfig():
        return "default"
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    c = config
    return (
        f"f{c.num_families}c{c.classes_per_family}t{c.train_classes_per_family}"
        f"n{c.images_per_class}s{c.image_size}_{digest}"
    )


@dataclasses.dataclass
class HdmlSyntheticConfig(tfds.core.BuilderConfig):
    """A TFDS builder config holding the generator parameters.

    Attributes:
      synthetic: the ``SyntheticConfig`` to render.
    """

    synthetic: synthetic.SyntheticConfig = dataclasses.field(default_factory=synthetic.SyntheticConfig)


def builder_config(config: synthetic.SyntheticConfig) -> HdmlSyntheticConfig:
    """The builder config of ``config`` (named by ``config_name``)."""
    return HdmlSyntheticConfig(
        name=config_name(config),
        description="hdml_jax synthetic data set (parameters: the synthetic field)",
        synthetic=config,
    )


class HdmlSynthetic(tfds.core.GeneratorBasedBuilder):
    """The generated two-level data set (see ``hdml_jax.data.synthetic``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [builder_config(synthetic.SyntheticConfig())]

    @property
    def synthetic_config(self) -> synthetic.SyntheticConfig:
        """The generator parameters of this builder."""
        return self.builder_config.synthetic

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.synthetic_config
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "label": tfds.features.Scalar(dtype=np.int64, doc="0..C-1 within the split"),
                    "coarse_label": tfds.features.ClassLabel(
                        names=list(synthetic.FAMILY_NAMES[: config.num_families])
                    ),
                    "fine_class": tfds.features.ClassLabel(num_classes=config.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    # TFDS prints "Downloading and preparing dataset ..." (to stdout, on purpose, so a user can
    # cancel a large download) and shows download and shuffling progress bars. Nothing is
    # downloaded here: an offline first run must not read as a download. One line of our own
    # says what happens instead (``load_synthetic`` turns the progress bars off).
    def _log_download_bytes(self) -> None:
        config = self.synthetic_config
        print(
            f"generating the synthetic data set once ({config.num_classes} classes, nothing to "
            f"download) into {self.data_dir} ...",
            file=sys.stderr,
            flush=True,
        )

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # nothing to download
        config = self.synthetic_config
        data = synthetic.generate(config)
        self.info.metadata["config"] = config.to_dict()
        self.info.metadata["labels"] = {
            split: {key: arrays[key].tolist() for key in _LABEL_KEYS} for split, arrays in data.items()
        }
        return {split: self._generate_examples(arrays) for split, arrays in data.items()}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        for i in range(len(arrays["label"])):
            yield i, {key: arrays[key][i] for key in ("image", *_LABEL_KEYS)}


def make_builder(data_dir: str, config: synthetic.SyntheticConfig | None = None) -> HdmlSynthetic:
    """The ``array_record`` builder of ``config`` (default ``SyntheticConfig()``) in ``data_dir``."""
    config = config or synthetic.SyntheticConfig()
    name = config_name(config)
    registered = {c.name for c in HdmlSynthetic.BUILDER_CONFIGS}
    # A registered config is asked for by name; TFDS refuses an equal object under the same name.
    chosen = name if name in registered else builder_config(config)
    return HdmlSynthetic(data_dir=data_dir, config=chosen, file_format="array_record")


def stored_labels(builder: HdmlSynthetic, sources: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The ``label``/``coarse_label``/``fine_class`` arrays of every split, in source order.

    Read from the builder's metadata; when they are missing (a data set written by other code)
    every example of ``sources`` is read once instead.

    Raises:
      ValueError: the stored parameters differ from the builder's, or the stored labels do not
        match the number of examples.
    """
    metadata = builder.info.metadata or {}
    stored_config = metadata.get("config")
    if (
        stored_config is not None
        and synthetic.SyntheticConfig.from_dict(stored_config) != builder.synthetic_config
    ):
        raise ValueError(
            f"{builder.data_dir} holds a data set of {stored_config}, not of {builder.synthetic_config}."
        )
    result = {}
    for split, source in sources.items():
        stored = metadata.get("labels", {}).get(split)
        if stored is None:
            examples = [source[i] for i in range(len(source))]
            arrays = {key: np.array([int(e[key]) for e in examples], np.int64) for key in _LABEL_KEYS}
        else:
            arrays = {key: np.asarray(stored[key], np.int64) for key in _LABEL_KEYS}
        if len(arrays["label"]) != len(source):
            raise ValueError(
                f"{builder.data_dir}: {len(arrays['label'])} stored labels for {len(source)} {split} examples."
            )
        result[split] = arrays
    return result


def load_synthetic(data_dir: str | None = None, config: synthetic.SyntheticConfig | None = None) -> MetricDataset:
    """The data set as TFDS ``array_record`` sources, generated into ``data_dir`` on first use.

    Labels come from the data set's stored metadata (written when it was built), so no image is
    decoded; a data set without them is read once instead.

    Args:
      data_dir: TFDS data directory (default ``default_data_dir()``); the data lands in
        ``data_dir/hdml_synthetic/<config name>/<version>``.
      config: the generator parameters (default ``synthetic.SyntheticConfig()``).
    """
    config = config or synthetic.SyntheticConfig()
    builder = make_builder(data_dir or synthetic.default_data_dir(), config)
    if not (builder.data_path / "dataset_info.json").exists():  # builder.is_prepared() warns
        from tensorflow_datasets.core.utils import tqdm_utils

        shown = tqdm_utils._active  # no public getter; restored below
        tqdm_utils.display_progress_bar(False)
        try:
            builder.download_and_prepare()
        finally:
            tqdm_utils.display_progress_bar(shown)
    sources = builder.as_data_source()
    labels = stored_labels(builder, sources)
    return synthetic.metric_dataset(config, lambda split: sources[split], labels)
