"""Backbones (ResNet, BN-Inception, the Vision Transformer), descriptor heads, and ImageNet weight import.

The weight-import names are loaded on first access (PEP 562 ``__getattr__``): importing
``convert`` here would put it in ``sys.modules`` before ``python -m hdml_jax.models.convert`` runs
it as ``__main__``, which runpy warns about.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hdml_jax.models.bn_inception import BNInception
from hdml_jax.models.heads import (
    CGDHead,
    EmbeddingHead,
    EmbeddingModel,
    batchnorm_mask,
    parse_descriptors,
    proxy_levels,
)
from hdml_jax.models.pooling import GeM, gap_gmp, gem, mac, spoc
from hdml_jax.models.preprocessing import BACKBONES, PREPROCESSING, InputConvention
from hdml_jax.models.resnet import FrozenBatchNorm, ResNet
from hdml_jax.models.vit import VisionTransformer, vit_from_torch

if TYPE_CHECKING:
    from hdml_jax.models.convert import (
        bn_inception_to_flax,
        load_bn_inception,
        load_pretrained,
        load_torchvision_resnet,
        torchvision_resnet_to_flax,
    )
    from hdml_jax.models.weights import WeightsUnavailableError, resolve_pretrained

_LAZY_SUBMODULE = {
    "bn_inception_to_flax": "convert",
    "load_bn_inception": "convert",
    "load_pretrained": "convert",
    "load_torchvision_resnet": "convert",
    "torchvision_resnet_to_flax": "convert",
    "WeightsUnavailableError": "weights",
    "resolve_pretrained": "weights",
}

__all__ = [
    "BACKBONES",
    "PREPROCESSING",
    "BNInception",
    "CGDHead",
    "EmbeddingHead",
    "EmbeddingModel",
    "FrozenBatchNorm",
    "GeM",
    "InputConvention",
    "ResNet",
    "VisionTransformer",
    "WeightsUnavailableError",
    "batchnorm_mask",
    "bn_inception_to_flax",
    "gap_gmp",
    "gem",
    "load_bn_inception",
    "load_pretrained",
    "load_torchvision_resnet",
    "mac",
    "parse_descriptors",
    "proxy_levels",
    "resolve_pretrained",
    "spoc",
    "torchvision_resnet_to_flax",
    "vit_from_torch",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY_SUBMODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
