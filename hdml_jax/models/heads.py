"""Embedding heads on a backbone feature map, and the model that joins backbone, head and proxies.

* ``EmbeddingHead``: pooling → Dense → L2 (Proxy-Anchor, Proxy-NCA, HPL), or → ``ToPoincare``
  (a point of the Poincaré ball of curvature c: Hyp, HIER).
* ``CGDHead``: CGD (Jun et al. 2019), an ordered descriptor string such as ``"SG"``::

      for each letter i:  e_i = L2(W_i f_i)          f_i = SPoC/MAC/GeM(x) ∈ R^C, W_i no bias
      embedding = L2(concat_i e_i)                    (or L2(Σ_i e_i) with combine="sum")
      logits    = Dense(BatchNorm(f_1))               (auxiliary classifier, first letter)

  The paper's ablations: ``architecture="A"`` keeps each branch's embedding for a ranking loss
  of its own (``branch_embeddings``); ``architecture="B"`` concatenates the raw descriptors and
  applies one Dense → L2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdml_jax import hyperbolic
from hdml_jax.losses._common import l2_normalize
from hdml_jax.models import pooling
from hdml_jax.models.resnet import BatchNorm

DESCRIPTORS = {"S": "SPoC", "M": "MAC", "G": "GeM"}
COMBINES = ("concat", "sum")
ARCHITECTURES = ("cgd", "A", "B")

# Proxy-Anchor initialises its embedding layer with kaiming_normal_(mode="fan_out"), bias 0
# (Proxy-Anchor-CVPR2020 code/net/resnet.py:192-194).
embedding_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# kernel_init, bias_init(fan_in) of the embedding Dense layer.
EMBEDDING_INITS = {
    "kaiming_fan_out": (embedding_init, lambda fan_in: nn.initializers.zeros),
    # torch.nn.Linear's default (ProxyNCA++ leaves its embedding layer at it, train.py:101):
    # weight kaiming_uniform_(a=√5) = U(±1/√fan_in), bias U(±1/√fan_in).
    # torch.nn.init.orthogonal_ on the weight, bias 0 (hyp_metric model.py, HIER models/model.py:79-83).
    "orthogonal": (nn.initializers.orthogonal(), lambda fan_in: nn.initializers.zeros),
    "torch_default": (
        nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        lambda fan_in: (
            lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                key, shape, dtype, -1.0 / fan_in**0.5, 1.0 / fan_in**0.5
            )
        ),
    ),
}


def parse_descriptors(descriptors: str, embedding_dim: int, combine: str = "concat") -> tuple[str, ...]:
    """Validate a CGD descriptor string; returns its letters. Raises a one-line ValueError."""
    letters = tuple(descriptors.upper()) if isinstance(descriptors, str) else ()
    unknown = sorted(set(letters) - set(DESCRIPTORS))
    if not letters or unknown:
        raise ValueError(
            f"descriptors {descriptors!r}: unknown letters {unknown or '(empty)'}; use an ordered string of "
            "S (SPoC), M (MAC), G (GeM), e.g. 'SG', 'MG', 'GSM'."
        )
    if len(set(letters)) != len(letters):
        raise ValueError(f"descriptors {descriptors!r}: each of S, M, G may appear at most once.")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")
    if combine == "concat" and embedding_dim % len(letters):
        raise ValueError(
            f"embedding_dim {embedding_dim} is not divisible by the {len(letters)} descriptors of "
            f"{descriptors!r}; each branch gets embedding_dim / {len(letters)} dimensions."
        )
    return letters


class EmbeddingHead(nn.Module):
    """``L2(Dense(pool(x)))``, or ``L2(Dense(LN(pool(x))))`` with ``layernorm``; with a
    ``curvature`` c > 0 the last step is ``ToPoincare`` instead of L2: a point of the ball
    ``‖y‖ < 1/√c`` (``hyperbolic.to_poincare``: the features clipped to norm ``clip_r``, mapped
    by expmap₀ and projected; ``riemannian``: the gradient rescaled by (1 − c‖y‖²)²/4, HIER's
    head; hyp_metric's head leaves it).

    ``pooling``: ``gap_gmp`` (Proxy-Anchor), ``mac_layernorm`` (ProxyNCA++), ``spoc``, ``mac``,
    ``gem``, or ``none`` for a backbone that pools itself (the ViT's ``(B, D)`` class token).
    ``layernorm``: a LayerNorm without scale or bias (ε = 1e-5, PyTorch's) before the embedding
    layer, HIER's ``use_lastnorm`` (``nn.LayerNorm(bdim, elementwise_affine=False)``, HIER
    hier/models/model.py). ``embedding_init``: a key of ``EMBEDDING_INITS``.
    """

    embedding_dim: int = 512
    pooling: str = "gap_gmp"
    gem_p: float = 3.0
    normalize: bool = True
    embedding_init: str = "kaiming_fan_out"
    layernorm: bool = False
    curvature: float = 0.0
    clip_r: float | None = 2.3
    riemannian: bool = True

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.pooling not in pooling.POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(pooling.POOLINGS)}, got {self.pooling!r}.")
        if features.ndim == 2 and self.pooling != "none":
            raise ValueError(
                f"the backbone's output is already pooled {features.shape} (a ViT): use "
                f"model.pooling='none', not {self.pooling!r}."
            )
        pooled = (
            pooling.gem(features, self.gem_p)
            if self.pooling == "gem"
            else pooling.POOLINGS[self.pooling](features)
        )
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"embedding_init must be one of {sorted(EMBEDDING_INITS)}, got {self.embedding_init!r}."
            )
        kernel_init, bias_init = EMBEDDING_INITS[self.embedding_init]
        if self.layernorm:
            pooled = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, name="layernorm")(pooled)
        embedding = nn.Dense(
            self.embedding_dim,
            kernel_init=kernel_init,
            bias_init=bias_init(pooled.shape[-1]),
            name="embedding",
        )(pooled)
        if not self.normalize:
            return {"embedding": embedding}
        if self.curvature > 0:
            return {"embedding": hyperbolic.to_poincare(embedding, self.curvature, self.clip_r, self.riemannian)}
        return {"embedding": l2_normalize(embedding)}


class CGDHead(nn.Module):
    """Combination of multiple Global Descriptors.

    Attributes:
      descriptors: ordered letters of S/M/G; the first feeds the auxiliary classifier.
      embedding_dim: total size (1536 in the paper); each of ``n`` branches gets ``dim / n`` with
        ``combine="concat"``, the full ``dim`` with ``"sum"``.
      num_classes: classes of the auxiliary classifier (0: no classifier).
      combine: ``concat`` (the paper) or ``sum``.
      architecture: ``cgd`` (the paper), ``A`` or ``B`` (its ablations).
      gem_p, learnable_gem_p: GeM's ``p`` and whether it trains.
    """

    descriptors: str = "SG"
    embedding_dim: int = 1536
    num_classes: int = 0
    combine: str = "concat"
    architecture: str = "cgd"
    gem_p: float = 3.0
    learnable_gem_p: bool = False

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        letters = parse_descriptors(self.descriptors, self.embedding_dim, self.combine)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        raw = []
        for letter in letters:
            if letter == "S":
                raw.append(pooling.spoc(features))
            elif letter == "M":
                raw.append(pooling.mac(features))
            else:
                raw.append(pooling.GeM(self.gem_p, self.learnable_gem_p, name="gem")(features))

        outputs: dict[str, Any] = {}
        if self.architecture == "B":
            projected = nn.Dense(self.embedding_dim, use_bias=False, name="fc")(jnp.concatenate(raw, axis=-1))
            outputs["embedding"] = l2_normalize(projected)
        else:
            branch_dim = (
                self.embedding_dim // len(letters) if self.combine == "concat" else self.embedding_dim
            )
            branches = [
                l2_normalize(nn.Dense(branch_dim, use_bias=False, name=f"fc_{letter}")(descriptor))
                for letter, descriptor in zip(letters, raw, strict=True)
            ]
            joined = jnp.concatenate(branches, axis=-1) if self.combine == "concat" else sum(branches)
            outputs["embedding"] = l2_normalize(joined)
            outputs["branch_embeddings"] = tuple(branches)
        if self.num_classes:
            normed = BatchNorm(use_running_average=not train, name="auxiliary_bn")(raw[0])
            outputs["logits"] = nn.Dense(self.num_classes, name="auxiliary_fc")(normed)
        return outputs


PROXY_INITS = {
    # pytorch-metric-learning / Proxy-Anchor: kaiming_normal_(mode="fan_out") on a (C, d) tensor,
    # i.e. std = sqrt(2 / C).
    "kaiming_fan_out": lambda key, shape, dtype=jnp.float32: (
        jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / shape[0])
    ),
    # ProxyNCA++: randn / 8.
    "normal_over_8": lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype) / 8.0,
    # pytorch-metric-learning's ProxyNCALoss (>= 0.9.90): torch.nn.init.normal_, N(0, 1).
    "normal": lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype),
    # pytorch-metric-learning's SoftTripleLoss: kaiming_uniform_(a=√5) on its (d, C·K) matrix,
    # i.e. U(±1/√(C·K)) (gain √(1/3) × √(3 / fan_in), fan_in = C·K); ours is its transpose.
    "kaiming_uniform_sqrt5": lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -1.0 / math.sqrt(shape[0]), 1.0 / math.sqrt(shape[0])
    ),
}


class EmbeddingModel(nn.Module):
    """Backbone → head, plus the loss's proxies in the same parameter tree.

    ``apply(variables, images, train=...)`` returns the head's dict (``embedding``, and for CGD
    ``logits`` / ``branch_embeddings``). Proxies live at ``params['proxies']`` ``(C, d)`` and,
    for HPL, ``params['coarse_proxies_1']``, ``..._2`` with ``coarse_groups[l-1]`` rows each.

    Attributes:
      backbone: a ``ResNet`` (or any module mapping images to an NHWC feature map).
      head: an ``EmbeddingHead`` or ``CGDHead``.
      num_proxies: number of fine proxies (classes); 0 for proxy-free losses (CGD).
      proxy_padding: extra fine proxy rows (``params['proxies']`` has ``num_proxies +
        proxy_padding`` rows) so that the proxies split evenly over devices; the losses mask
        them out (``hdml_jax.parallel``).
      coarse_groups: sizes of the coarse proxy levels (HPL), e.g. ``(16,)``.
      proxy_init: key of ``PROXY_INITS``.
      loss_params: a loss's own parameters, ``(name, size, initial value)`` each: a ``(size,)``
        array (a scalar for size 0) at ``params[name]``, e.g. the margin loss's β per class.
      num_lcas: HIER's learnable hierarchical proxies ("LCAs") at ``params['lcas']``
        ``(num_lcas, d)``, drawn N(0, 1) / √d · 0.9 · ``lca_radius`` (HIER hier/losses.py:27-28,
        ``lca_radius`` = its ``clip_r``): inside the clipping radius, so that ``ToPoincare``
        starts them where its gradient is not cut off.
    """

    backbone: nn.Module
    head: nn.Module
    num_proxies: int = 0
    proxy_padding: int = 0
    coarse_groups: Sequence[int] = ()
    proxy_init: str = "kaiming_fan_out"
    loss_params: Sequence[tuple[str, int, float]] = ()
    num_lcas: int = 0
    lca_radius: float = 2.3

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.proxy_init not in PROXY_INITS:
            raise ValueError(f"proxy_init must be one of {sorted(PROXY_INITS)}, got {self.proxy_init!r}.")
        features = self.backbone(images, train=train)
        outputs = dict(self.head(features, train=train))
        dim = outputs["embedding"].shape[-1]
        if self.num_proxies:
            init = PROXY_INITS[self.proxy_init]
            self.param("proxies", init, (self.num_proxies + self.proxy_padding, dim))
            for level, groups in enumerate(self.coarse_groups, start=1):
                self.param(f"coarse_proxies_{level}", init, (groups, dim))
        for name, size, value in self.loss_params:
            shape = (size,) if size else ()
            self.param(name, lambda _, shape=shape, value=value: jnp.full(shape, value, jnp.float32))
        if self.num_lcas:
            scale = 0.9 * self.lca_radius / math.sqrt(dim)
            self.param("lcas", lambda key: scale * jax.random.normal(key, (self.num_lcas, dim), jnp.float32))
        return outputs


def batchnorm_mask(params: Any) -> Any:
    """A pytree of bools, True for BatchNorm scale/bias (to exclude them from training or decay).

    BatchNorm modules are ResNet's ``bn1``..``bn3`` and ``downsample_bn``, CGD's ``auxiliary_bn``
    and BN-Inception's ``<conv>_bn`` (``conv1_7x7_s2_bn``, ``inception_3a_1x1_bn``, ...).
    """

    def is_bn(path, _):
        names = [getattr(key, "key", str(key)) for key in path]
        return any(
            name.startswith("bn") or name.endswith("_bn")
            for name in names[:-1]
        )

    return jax.tree_util.tree_map_with_path(is_bn, params)


def proxy_levels(params: Any) -> tuple[jax.Array, ...]:
    """``(P^0, P^1, ...)`` from a parameter tree made by ``EmbeddingModel``."""
    levels = [params["proxies"]]
    while f"coarse_proxies_{len(levels)}" in params:
        levels.append(params[f"coarse_proxies_{len(levels)}"])
    return tuple(levels)
