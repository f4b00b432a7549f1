"""The published ViT weights ``model.pretrained`` can name, and their conversion.

Each entry is one file and the architecture it was trained with; ``use_vit_weights`` (config)
sets ``model.vit`` from it, so a recipe names only the weights:

======================  ======  =====  ===========  ==========  ======================================
name                    size    patch  tokens       inputs      file
======================  ======  =====  ===========  ==========  ======================================
``vit_s16_dino``        small   16     class        ImageNet    DINO, dino_deitsmall16_pretrain.pth
``vit_s8_dino``         small   8      class        ImageNet    DINO, dino_deitsmall8_pretrain.pth
``vit_b16_dino``        base    16     class        ImageNet    DINO, dino_vitbase16_pretrain.pth
``vit_b8_dino``         base    8      class        ImageNet    DINO, dino_vitbase8_pretrain.pth
``deit_s16_distilled``  small   16     deit         ImageNet    DeiT, deit_small_distilled_patch16_224
``vit_s16_augreg``      small   16     class        0.5 / 0.5   timm, vit_small_patch16_224.augreg_in21k_ft_in1k
======================  ======  =====  ===========  ==========  ======================================

"deit" pools the class token in training and the mean of the class and distillation tokens in
evaluation (``VisionTransformer``'s ``pooling``). "ImageNet" inputs are torchvision's mean/std (DINO's and DeiT's transforms); AugReg's are
``(x - 0.5) / 0.5`` (timm's ``pretrained_cfg`` for the Google-trained weights, the
``IMAGENET_INCEPTION_MEAN``/``STD``). DINO's and DeiT's weights resize their position
embeddings with ``interpolate_pos_encoding``, timm's with ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hdml_jax.models.errors import WeightsMismatchError
from hdml_jax.models.state_dicts import read_state_dict
from hdml_jax.models.vit import SIZES, VisionTransformer, vit_from_torch


@dataclasses.dataclass(frozen=True)
class ViTWeights:
    """One published ViT weights file and the architecture it belongs to.

    Attributes:
      url: where it is published.
      filename: its name in the cache (the URL's own, or a unique one for Hugging Face's
        ``model.safetensors``).
      sha256_prefix: the start of its SHA-256 where the publisher states it (torch.hub's
        ``NAME-<hash>.pth`` names), else None: then the conversion's check of every tensor's name
        and shape is what stands between a wrong file and a run, and the SHA-256 is printed.
      size, patch_size, distilled, pooling, preprocessing, position_interpolation: the
        ``VisionTransformer`` fields these weights need.
      source: where the URL and the input convention are stated.
    """

    url: str
    filename: str
    sha256_prefix: str | None
    size: str
    patch_size: int
    distilled: bool
    pooling: str
    preprocessing: str
    position_interpolation: str
    source: str

    def config_fields(self) -> dict[str, Any]:
        """The ``config.model.vit`` values these weights need (``config.use_vit_weights`` sets them)."""
        return {
            "size": self.size,
            "depth": None,
            "patch_size": self.patch_size,
            "position_grid_size": 224,
            "distilled": self.distilled,
            "pooling": self.pooling,
            "layer_scale": None,
            "position_interpolation": self.position_interpolation,
            "preprocessing": self.preprocessing,
        }

    def module(self, **overrides: Any) -> VisionTransformer:
        """The ``VisionTransformer`` these weights fit (``overrides``: e.g. ``dtype``, ``drop_path``)."""
        dim, depth, heads = SIZES[self.size]
        fields = dict(
            patch_size=self.patch_size,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            pretrain_grid=224 // self.patch_size,
            distilled=self.distilled,
            pooling=self.pooling,
            preprocessing=self.preprocessing,
            position_interpolation=self.position_interpolation,
        )
        return VisionTransformer(**(fields | overrides))


_DINO = "https://dl.fbaipublicfiles.com/dino"


def _dino(folder: str, size: str, patch_size: int, source: str) -> ViTWeights:
    """DINO's backbone-only files: ``<_DINO>/<folder>/<folder>.pth``, no published hash."""
    return ViTWeights(
        url=f"{_DINO}/{folder}/{folder}.pth",
        filename=f"{folder}.pth",
        sha256_prefix=None,
        size=size,
        patch_size=patch_size,
        distilled=False,
        pooling="cls",
        preprocessing="vit",
        position_interpolation="dino",
        source=source,
    )


VIT_WEIGHTS: dict[str, ViTWeights] = {
    "vit_s16_dino": _dino("dino_deitsmall16_pretrain", "small", 16, "facebookresearch/dino hubconf.py:22-33"),
    "vit_s8_dino": _dino(
        "dino_deitsmall8_pretrain", "small", 8, "facebookresearch/dino hubconf.py (dino_vits8)"
    ),
    "vit_b16_dino": _dino("dino_vitbase16_pretrain", "base", 16, "facebookresearch/dino hubconf.py:52-63"),
    "vit_b8_dino": _dino(
        "dino_vitbase8_pretrain", "base", 8, "facebookresearch/dino hubconf.py (dino_vitb8)"
    ),
    "deit_s16_distilled": ViTWeights(
        url="https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth",
        filename="deit_small_distilled_patch16_224-649709d9.pth",
        # DeiT loads it with torch.hub's check_hash=True: 649709d9 is its SHA-256 prefix.
        sha256_prefix="649709d9",
        size="small",
        patch_size=16,
        distilled=True,
        pooling="deit",
        preprocessing="vit",
        position_interpolation="dino",
        source="facebookresearch/deit models.py:123-133 (check_hash=True, checkpoint['model'])",
    ),
    "vit_s16_augreg": ViTWeights(
        url="https://huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k/resolve/main/model.safetensors",
        filename="vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors",
        sha256_prefix=None,
        size="small",
        patch_size=16,
        distilled=False,
        pooling="cls",
        preprocessing="vit_augreg",
        position_interpolation="timm",
        # The same weights as timm 0.4.12's vit_small_patch16_224 (HIER's pin), which loads the
        # AugReg S_16 i21k → in1k .npz from Google's bucket; timm now serves them from the hub.
        source="huggingface/pytorch-image-models timm/models/vision_transformer.py:1841-1844 "
        "(hf_hub_id 'timm/'), _cfg 1799-1814 (IMAGENET_INCEPTION_MEAN/STD = 0.5)",
    ),
}


def depth_of(state_dict: Mapping[str, Any]) -> int:
    """The number of blocks of a ViT state dict (``blocks.<i>.`` keys, any ``module.`` prefix)."""
    indices = {int(m.group(1)) for key in state_dict if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", key))}
    if not indices:
        raise WeightsMismatchError(
            "the state dict has no blocks.<i>. entries: not a ViT (DINO, DeiT or timm) state dict."
        )
    return max(indices) + 1


def vit_variables(state_dict: Mapping[str, Any], expected: VisionTransformer | None = None) -> dict[str, Any]:
    """``{"params": ...}`` from a ViT state dict; with ``expected`` every array's shape is checked
    against that module's (a wrong file, size or patch is named, not found later in a run)."""
    params = vit_from_torch(state_dict, expected.depth if expected is not None else depth_of(state_dict))
    if expected is not None:
        grid = expected.pretrain_grid * expected.patch_size
        shapes = jax.eval_shape(
            expected.init, jax.random.key(0), jax.ShapeDtypeStruct((1, grid, grid, 3), np.float32)
        )["params"]
        want = {_path(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
        have = {_path(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(params)}
        wrong = [
            f"{name} {have.get(name, 'missing')} (expected {shape})"
            for name, shape in want.items()
            if have.get(name) != shape
        ] + [f"{name} (not expected)" for name in have if name not in want]
        if wrong:
            raise WeightsMismatchError(
                "the ViT weights do not fit the configured VisionTransformer "
                f"(embed_dim {expected.embed_dim}, patch {expected.patch_size}, "
                f"{'distilled' if expected.distilled else 'no distillation token'}): {'; '.join(wrong[:4])}"
                f"{' ...' if len(wrong) > 4 else ''}."
            )
    return {"params": params}


def load_vit(path: str | Path, expected: VisionTransformer | None = None) -> dict[str, Any]:
    """Read a ViT weights file (``.pth``, ``.safetensors``, ``.npz``) and convert it."""
    return vit_variables(read_state_dict(path), expected)


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)
