"""``metadata.json`` of ``python -m hdml_jax.export`` states the artifact's input convention truly.

The exported function takes uint8 RGB images with their 0-255 pixel values and normalises them
itself; the metadata must say so in one scale: the input's value range, and the mean and std of
the normalisation inside, on that same scale. Each test reads the convention from the metadata
only, builds images (and their normalisation) by it, and checks them against what the network
does. A one-convolution backbone stands in for ResNet / BN-Inception (the same conventions, by
its ``preprocessing`` attribute), so exporting it takes well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hdml_jax.data import transforms
from hdml_jax.inference import embedder as inference
from hdml_jax.inference import export
from hdml_jax.models import EmbeddingHead, EmbeddingModel, preprocessing
from hdml_jax.training import steps

SIZE, DIM = 16, 8


class _TinyBackbone(nn.Module):
    """Images → an NHWC feature map with one convolution (any ``preprocessing`` convention)."""

    preprocessing: ClassVar[str] = "resnet"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        return nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), name="conv")(images))


class _ResNetLike(_TinyBackbone):
    preprocessing: ClassVar[str] = "resnet"


class _BNInceptionLike(_TinyBackbone):
    preprocessing: ClassVar[str] = "bn_inception"


BACKBONES = {"resnet": _ResNetLike, "bn_inception": _BNInceptionLike}


def _embedder(backbone: str) -> inference.Embedder:
    """An ``Embedder`` (what ``load_embedder`` returns) of a tiny network with random weights
    (drawn on the host from the parameter shapes: nothing is compiled)."""
    model = EmbeddingModel(BACKBONES[backbone](), EmbeddingHead(DIM))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(leaf.dtype), shapes)
    return inference.Embedder(
        workdir=Path("run"),
        step=1,
        checkpoint_id="x",
        config=ml_collections.ConfigDict(
            {"method": "proxy_anchor", "dataset": {"name": "custom"}, "model": {}}
        ),
        model=model,
        variables=variables,
        image_size=SIZE,
        embedding_dim=DIM,
        transform=transforms.TRANSFORMS["proxy_anchor"](SIZE).eval,
        _embed=None,  # type: ignore[arg-type]  # not used: only inference_function() is
        _batch_sharding=None,  # type: ignore[arg-type]
    )


def _images_by_metadata(meta: dict[str, Any], count: int) -> np.ndarray:
    """Random images of the shape, dtype and value range the metadata's ``input`` states."""
    spec = meta["input"]
    low, high = spec["value_range"]
    shape = [count if side == "B" else side for side in spec["shape"]]
    rng = np.random.default_rng(0)
    images = rng.integers(low, high, shape, endpoint=True).astype(spec["dtype"])
    images[0, 0, 0] = [low, high, low]  # both ends of the range, in every image batch
    return images


def _normalise_by_metadata(meta: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """The normalisation the metadata says the artifact applies, read from the metadata alone."""
    norm = meta["normalization"]
    x = images.astype(np.float64)  # the input's own values: no rescaling is stated
    if meta["input"]["channel_order"] != norm["channel_order"]:
        x = x[..., ::-1]
    return ((x - np.array(norm["mean"])) / np.array(norm["std"])).astype(np.float32)


def _check_consistent(meta: dict[str, Any]) -> None:
    """The input's and the normalisation's fields agree with each other and with uint8."""
    spec, norm = meta["input"], meta["normalization"]
    assert spec["dtype"] == "uint8" and spec["channel_order"] == "RGB"
    info = np.iinfo(spec["dtype"])
    assert spec["value_range"] == norm["value_range"] == [info.min, info.max] == [0, 255]
    assert "0-255" in spec["layout"] and "0-255" in norm["where"]
    assert len(norm["mean"]) == len(norm["std"]) == 3
    low, high = norm["value_range"]
    assert all(low < m < high for m in norm["mean"])  # a mean on the scale of the range
    assert all(0 < s <= high for s in norm["std"])


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_metadata_states_one_scale_and_matches_the_normalisation(backbone):
    meta = export.metadata(_embedder(backbone), None, ["cpu"], None)
    _check_consistent(meta)
    assert meta["normalization"]["backbone"] == backbone
    images = _images_by_metadata(meta, 2)
    np.testing.assert_allclose(
        _normalise_by_metadata(meta, images),
        np.asarray(preprocessing.normalize(images, backbone)),  # what embed_step applies
        rtol=0,
        atol=1e-5,
    )
    if backbone == "resnet":  # the usual 0-1 recipe, given as an equivalent, not as the range
        np.testing.assert_allclose(meta["normalization"]["mean"], [123.675, 116.28, 103.53], atol=1e-4)
        assert "x / 255" in meta["normalization"]["equivalent"]
        assert "0.485" in meta["normalization"]["equivalent"]
    else:
        assert meta["normalization"]["mean"] == [104.0, 117.0, 128.0]
        assert "equivalent" not in meta["normalization"]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_artifact_fed_by_the_metadata_gives_the_models_embedding(backbone):
    embedder = _embedder(backbone)
    exported, platforms, note = export.export_embedder(embedder, None, ("cpu",))
    meta = export.metadata(embedder, None, platforms, note)
    _check_consistent(meta)
    artifact = jax.export.deserialize(bytearray(exported.serialize()))
    images = _images_by_metadata(meta, 3)
    got = np.asarray(artifact.call(images))
    # The model's embedding of the same images, normalised as the metadata says.
    apply = jax.jit(embedder.model.apply, static_argnames="train")
    want = apply(embedder.variables, _normalise_by_metadata(meta, images), train=False)
    np.testing.assert_allclose(got, np.asarray(want["embedding"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        got, np.asarray(steps.embed_step(embedder.variables, images, model=embedder.model)), rtol=0, atol=1e-6
    )
