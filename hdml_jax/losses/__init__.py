"""Metric-learning losses as pure, jit/grad/vmap-safe JAX functions.

Every loss takes ``(embeddings (B, d), labels (B,), ...)`` plus keyword hyper-parameters and an
optional ``mask`` (bool, one per row; False rows change neither the value nor any gradient),
computes in float32 whatever the input dtype, and returns a float32 scalar::

    from hdml_jax.losses import proxy_anchor_loss
    loss, grads = jax.value_and_grad(proxy_anchor_loss, argnums=(0, 2))(x, y, proxies)

The pair-based losses of pytorch-metric-learning (``contrastive_loss``, ``triplet_margin_loss``,
``multi_similarity_loss``, ``margin_loss``, ``ntxent_loss``, ``lifted_structure_loss``,
``circle_loss``) keep its keyword names, defaults and reducers; its miners are pure functions
returning masks that the losses take as keywords: ``loss(x, y, **batch_hard_miner(x, y))``
(the triplet miners' ``triplet_mask`` is a ``WindowedTriplets``: ``O(B²)`` numbers for the
``(B, B, B)`` triplet set, which ``.dense()`` builds).
All but ``lifted_structure_loss`` take reference rows (PML's ``ref_emb``), and ``xbm_loss`` runs
them against a cross-batch memory (``xbm_init``, ``xbm_enqueue``; PML's ``CrossBatchMemory``),
a pytree kept in the train state.
Its classification losses (``normalized_softmax_loss``, ``cosface_loss``, ``arcface_loss``,
``soft_triple_loss``) take their weights as a ``(C, d)`` proxy matrix (PML's ``W.T``), so
``proxy_mask`` padding and the trainer's proxy machinery apply.

HIER's regulariser (``hier_loss``: learnable LCA proxies over points of the Poincaré ball of
``hdml_jax.hyperbolic``) takes a PRNG key for its triplets and Gumbel noise; Hyp's loss
(``hyp_loss``) is a cross-entropy over the distances of a class's views.

A NaN or inf in an unmasked embedding row (or a proxy) makes the loss NaN, never a finite number.
A concrete hyperparameter outside its meaningful range (``alpha ≤ 0``, ``margin < 0``,
``scale ≤ 0``, ``temperature ≤ 0``, ...) raises ``LossHyperparameterError``, a
``hdml_jax.errors.ConfigError`` (and ``ValueError``).
"""

from hdml_jax.losses._common import LossHyperparameterError
from hdml_jax.losses._pair_common import WindowedTriplets
from hdml_jax.losses.classification import softmax_cross_entropy
from hdml_jax.losses.hier import hier_draws, hier_loss, hier_loss_with
from hdml_jax.losses.hierarchical import (
    ProxyHierarchy,
    build_hierarchy,
    coarse_centroids,
    hierarchical_proxy_loss,
    hierarchy_from_labels,
    level_labels,
    refresh_assignments,
)
from hdml_jax.losses.hyp import hyp_loss, hyp_pair_loss
from hdml_jax.losses.miners import (
    batch_hard_miner,
    multi_similarity_miner,
    semi_hard_miner,
    triplet_margin_miner,
    triplets_from_pairs,
)
from hdml_jax.losses.normalized_softmax import arcface_loss, cosface_loss, normalized_softmax_loss
from hdml_jax.losses.pair import (
    circle_loss,
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    ntxent_loss,
)
from hdml_jax.losses.proxy_anchor import proxy_anchor_loss
from hdml_jax.losses.proxy_nca import proxy_nca_loss
from hdml_jax.losses.soft_triple import soft_triple_loss
from hdml_jax.losses.triplet import batch_hard_triplet_loss, pairwise_squared_distances
from hdml_jax.losses.triplet_margin import init_margin_beta, margin_loss, triplet_margin_loss
from hdml_jax.losses.xbm import CrossBatchMemory, xbm_enqueue, xbm_init, xbm_loss

__all__ = [
    "CrossBatchMemory",
    "LossHyperparameterError",
    "ProxyHierarchy",
    "WindowedTriplets",
    "arcface_loss",
    "batch_hard_miner",
    "batch_hard_triplet_loss",
    "build_hierarchy",
    "circle_loss",
    "coarse_centroids",
    "contrastive_loss",
    "cosface_loss",
    "generalized_lifted_structure_loss",
    "hier_draws",
    "hier_loss",
    "hier_loss_with",
    "hierarchical_proxy_loss",
    "hierarchy_from_labels",
    "hyp_loss",
    "hyp_pair_loss",
    "init_margin_beta",
    "level_labels",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "multi_similarity_miner",
    "normalized_softmax_loss",
    "ntxent_loss",
    "pairwise_squared_distances",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "refresh_assignments",
    "semi_hard_miner",
    "soft_triple_loss",
    "softmax_cross_entropy",
    "triplet_margin_loss",
    "triplet_margin_miner",
    "triplets_from_pairs",
    "xbm_enqueue",
    "xbm_init",
    "xbm_loss",
]
