"""Backbones, descriptor heads, and torchvision weight import."""

from hdml_jax.models.convert import load_pretrained, load_torchvision_resnet, torchvision_resnet_to_flax
from hdml_jax.models.heads import (
    CGDHead,
    EmbeddingHead,
    EmbeddingModel,
    batchnorm_mask,
    parse_descriptors,
    proxy_levels,
)
from hdml_jax.models.pooling import GeM, gap_gmp, gem, mac, spoc
from hdml_jax.models.resnet import FrozenBatchNorm, ResNet

__all__ = [
    "CGDHead",
    "EmbeddingHead",
    "EmbeddingModel",
    "FrozenBatchNorm",
    "GeM",
    "ResNet",
    "batchnorm_mask",
    "gap_gmp",
    "gem",
    "load_pretrained",
    "load_torchvision_resnet",
    "mac",
    "parse_descriptors",
    "proxy_levels",
    "spoc",
    "torchvision_resnet_to_flax",
]
