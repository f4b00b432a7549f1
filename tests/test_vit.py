"""``hdml_jax.models.vit`` against an independent PyTorch ViT (``tests/torch_vit.py``) loading the
same state dict: features equal to float32 round-off at the weights' size and at interpolated
ones, for every pooling, DeiT's distillation token and LayerScale; parameter counts equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax.models import vit
from hdml_jax.models.errors import WeightsMismatchError
from tests.torch_vit import TorchViT, randomized

PATCH, DIM, DEPTH, HEADS, GRID = 4, 32, 2, 4, 8  # tiny: 32-px images are the weights' 8 × 8 grid


def _pair(seed: int = 0, **options):
    torch_model = randomized(TorchViT(PATCH, DIM, DEPTH, HEADS, GRID, **options), seed)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    flax_model = vit.VisionTransformer(
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        pretrain_grid=GRID,
        distilled=options.get("distilled", False),
        layer_scale=options.get("layer_scale"),
        pooling=options.get("pooling", "cls"),
        final_norm=options.get("final_norm", True),
        position_interpolation=options.get("position_interpolation", "dino"),
    )
    return torch_model, flax_model, {"params": vit.vit_from_torch(state, DEPTH)}


def _features(torch_model, flax_model, variables, height: int, width: int, seed: int = 1):
    images = np.random.default_rng(seed).normal(size=(3, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(flax_model.apply(variables, jnp.asarray(images)))
    return ours, theirs


def assert_features_equal(ours, theirs):
    """≤ 1e-5 of the largest feature: float32 products over D = 32 inputs, 2 blocks of attention,
    MLP and LayerNorm, the order of summation differing (error ~ ε·√D per layer, ε = 1.2e-7)."""
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


FEATURE_OPTIONS = {
    "cls": {},
    "mean-no-norm": {"pooling": "mean", "final_norm": False},
    "deit-distilled": {"distilled": True, "pooling": "cls+dist"},
    "distilled-cls": {"distilled": True, "pooling": "cls"},
    "layer-scale": {"layer_scale": 0.5},
    "timm-resample": {"position_interpolation": "timm"},
}
FEATURE_SIZES = {"32x32": (32, 32), "40x48": (40, 48), "24x24": (24, 24), "28x36": (28, 36)}
# Every option on the non-square grid (the position embeddings interpolated on both axes); every
# size for the two position interpolations, which are what a size changes (the tokens' and
# blocks' code is the same at any size).
FEATURE_CASES = [(o, "40x48") for o in FEATURE_OPTIONS] + [
    (o, size) for o in ("cls", "timm-resample") for size in FEATURE_SIZES if size != "40x48"
]


@pytest.mark.parametrize(
    ("options", "size"),
    [(FEATURE_OPTIONS[o], FEATURE_SIZES[size]) for o, size in FEATURE_CASES],
    ids=[f"{size}-{o}" for o, size in FEATURE_CASES],
)
def test_features_match_pytorch(options, size):
    torch_model, flax_model, variables = _pair(**options)
    assert_features_equal(*_features(torch_model, flax_model, variables, *size))


def test_parameter_counts_match():
    for options in ({}, {"distilled": True}, {"layer_scale": 0.1}):
        torch_model, _, variables = _pair(**options)
        ours = sum(int(np.size(x)) for x in jax.tree.leaves(variables))
        assert ours == sum(p.numel() for p in torch_model.parameters())


def test_interpolation_is_pytorchs_bicubic_by_scale_factor():
    # One axis at a time against torch's own interpolate, including the scale DINO passes.
    rng = np.random.default_rng(3)
    for side, out in ((8, 10), (8, 6), (14, 16), (14, 37)):
        values = rng.normal(size=(1, 1, side, 1)).astype(np.float64)
        scale = (out + 0.1) / side
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(values), scale_factor=(scale, 1.0), mode="bicubic"
        ).numpy()[0, 0, :, 0]
        ours = vit.bicubic_matrix(side, out, scale) @ values[0, 0, :, 0]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_timm_resampling_is_pytorchs_antialiased_bicubic_by_size():
    # Growing and shrinking (where antialiasing widens the kernel), against torch's own.
    rng = np.random.default_rng(5)
    for side, out in ((8, 10), (8, 6), (14, 16), (14, 37), (14, 5), (7, 3)):
        # Three columns kept at three (the identity): torch's antialiased path mishandles width 1.
        values = rng.normal(size=(1, 1, side, 3)).astype(np.float64)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(values), size=(out, 3), mode="bicubic", antialias=True
        ).numpy()[0, 0, :, 0]
        ours = vit.antialiased_bicubic_matrix(side, out) @ values[0, 0, :, 0]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    table = jnp.ones((1, 1 + 64, 2))
    assert vit.resample_position_embedding(table, 1, (8, 8)) is table


def test_same_grid_keeps_the_embedding_and_sizes_check():
    table = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)[:1]
    assert vit.interpolate_position_embedding(table, 1, (4, 4)) is table
    with pytest.raises(ValueError, match="not a square grid"):
        vit.interpolate_position_embedding(table[:, :-1], 1, (4, 4))
    _, flax_model, variables = _pair()
    with pytest.raises(ValueError, match="do not split into 4×4 patches"):
        flax_model.apply(variables, jnp.zeros((1, 30, 32, 3)))


def test_bfloat16_computes_close_to_float32():
    _, flax_model, variables = _pair()
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    full = np.asarray(flax_model.apply(variables, images))
    half = flax_model.clone(dtype=jnp.bfloat16).apply(variables, images)
    assert half.dtype == jnp.bfloat16
    # bf16 keeps 8 bits: relative error ~2^-8 per rounding, a few dozen roundings deep.
    np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=0, atol=0.1 * np.abs(full).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_attention_equals_dot_product_attention(dtype):
    """The CPU path (``heads_first_attention``) against ``jax.nn.dot_product_attention``, which
    accelerators run: the same float32 softmax, the products' summation order apart."""
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 3, 8)), dtype) for _ in range(3))
    fused = jax.nn.dot_product_attention(q, k, v, scale=8**-0.5)
    heads_first = vit.heads_first_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v))).transpose(
        0, 2, 1, 3
    )
    assert heads_first.dtype == fused.dtype == dtype
    # float32: sums of 8 and 17 terms, ~ε·√17 relative; bf16: both round the weights to 8 bits.
    atol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(heads_first, np.float32), np.asarray(fused, np.float32), atol=atol)


def test_stochastic_depth_only_in_training():
    _, flax_model, variables = _pair()
    model = flax_model.clone(drop_path=0.5)
    images = jnp.asarray(np.random.default_rng(4).normal(size=(4, 32, 32, 3)), jnp.float32)
    np.testing.assert_array_equal(model.apply(variables, images), flax_model.apply(variables, images))
    trained = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(trained, flax_model.apply(variables, images))


def test_state_dict_mismatches_are_named():
    torch_model, _, _ = _pair()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    with pytest.raises(
        WeightsMismatchError, match=r"entries a 1-block VisionTransformer does not have: blocks\.1"
    ):
        vit.vit_from_torch(state, 1)
    with pytest.raises(WeightsMismatchError, match=r"has no blocks\.2\.norm1\.weight"):
        vit.vit_from_torch(state, 3)
    prefixed = {f"module.backbone.{k}": v for k, v in state.items()} | {"head.weight": np.zeros((10, DIM))}
    assert jax.tree.map(np.shape, vit.vit_from_torch(prefixed, DEPTH)) == jax.tree.map(
        np.shape, vit.vit_from_torch(state, DEPTH)
    )
