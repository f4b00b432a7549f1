"""The pieces of one training step: model, loss, and the step itself.

The optimizer (parameter groups, PyTorch semantics) is ``hdml_jax.training.optim``; which groups train
at a step, and the state changes between phases, are ``hdml_jax.training.phases``.

The step is a pure function ``(state, batch) -> (state, metrics)`` compiled once per phase with ``jax.jit``;
the batch is sharded over the ``'data'`` axis of a device mesh and the state replicated, so the
losses and BatchNorm see the global batch on 1 device or 256 without any hand-written collective.

State (a plain dict pytree, checkpointed as is)::

    step         int32 scalar
    params       {'backbone', 'head', 'proxies', 'coarse_proxies_1', ...}
    batch_stats  BatchNorm statistics
    opt_state    hdml_jax.optim.OptimizerState (global count + per-group optax state)
    hierarchy    {'assignments': (a^0, ...), 'active': float32 scalar} (HPL; empty otherwise)
    rng          PRNG key data (uint32)
    xbm          losses.CrossBatchMemory (pair losses with loss.xbm_size > 0 only): the ring
                 buffer of past embeddings, replicated, checkpointed with the rest (exact resume)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from hdml_jax import hyperbolic, losses, methods, parallel
from hdml_jax.evaluation import ranking
from hdml_jax.methods import baselines
from hdml_jax.models import (
    BNInception,
    CGDHead,
    EmbeddingHead,
    EmbeddingModel,
    ResNet,
    VisionTransformer,
    preprocessing,
    proxy_levels,
)
from hdml_jax.models.vit import SIZES

State = dict[str, Any]


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    coarse_groups: tuple[int, ...] = (),
    num_devices: int = 1,
) -> EmbeddingModel:
    """The ``EmbeddingModel`` a config describes (proxies only for proxy methods).

    ``model.backbone``: ``resnet`` (``model.depth``, ``width``, ``last_stride`` apply),
    ``bn_inception`` or ``vit`` (``model.vit``); a config without the field (a run from before it
    existed) means ``resnet``.

    With ``config.shard_proxies`` the fine proxies are padded so that they split evenly over
    ``num_devices`` (see ``hdml_jax.parallel``); SoftTriple's ``K`` rows per class are padded by
    whole classes.
    """
    method = methods.of(config)
    proxy_method = method.learns_proxies
    rows_per_class = method.rows_per_class(config)
    num_proxies = num_classes * rows_per_class if proxy_method else 0
    padding = 0
    if proxy_method and config.shard_proxies:
        padding = parallel.proxy_padding(
            num_proxies, num_devices * rows_per_class // math.gcd(num_devices, rows_per_class)
        )
    m = config.model
    backbone_name = m.get("backbone", "resnet")
    if backbone_name == "bn_inception":
        backbone = BNInception(frozen_bn=m.frozen_bn, dtype=jnp.dtype(m.dtype))
    elif backbone_name == "vit":
        backbone = vit_backbone(m)
    elif backbone_name == "resnet":
        backbone = ResNet(
            m.depth,
            last_stride=m.last_stride,
            frozen_bn=m.frozen_bn,
            width=m.width,
            dtype=jnp.dtype(m.dtype),
        )
    else:
        raise ValueError(
            f"unknown model.backbone {backbone_name!r}; valid: {', '.join(preprocessing.BACKBONES)}."
        )
    if method.head == "cgd":
        head = CGDHead(
            m.descriptors,
            m.embedding_dim,
            num_classes=num_classes,
            combine=m.combine,
            architecture=m.architecture,
            gem_p=m.gem_p,
            learnable_gem_p=m.learnable_gem_p,
        )
    else:
        head = EmbeddingHead(
            m.embedding_dim,
            pooling=m.pooling,
            gem_p=m.gem_p,
            embedding_init=m.embedding_init,
            # Absent from configs written before they existed: the sphere, as then.
            layernorm=m.get("head_layernorm", False),
            curvature=ranking.curvature_of(config),
            clip_r=m.get("clip_r", 2.3),
            riemannian=m.get("riemannian", True),
        )
    return EmbeddingModel(
        backbone,
        head,
        num_proxies=num_proxies,
        proxy_padding=padding,
        coarse_groups=coarse_groups if method.hierarchical else (),
        proxy_init=m.proxy_init,
        # A loss's own per-class parameters start at their keyword's value (the margin loss's β).
        loss_params=tuple(
            (p.name, num_classes, float(config.loss.kwargs[p.keyword])) for p in method.loss_parameters
        ),
        num_lcas=config.loss.hier.num_lcas if method.hier else 0,
        lca_radius=m.get("clip_r", 2.3) or 1.0,
    )


def vit_backbone(m: ml_collections.ConfigDict) -> VisionTransformer:
    """The ``VisionTransformer`` of ``config.model`` (``model.vit``; ``model.dtype``)."""
    v = m.vit
    dim, depth, heads = SIZES[v.size]
    return VisionTransformer(
        patch_size=v.patch_size,
        embed_dim=dim,
        depth=v.depth if v.get("depth") is not None else depth,
        num_heads=heads,
        pretrain_grid=v.position_grid_size // v.patch_size,
        distilled=v.distilled,
        layer_scale=v.layer_scale,
        pooling=v.pooling,
        final_norm=v.final_norm,
        drop_path=v.drop_path,
        position_interpolation=v.position_interpolation,
        preprocessing=v.preprocessing,
        dtype=jnp.dtype(m.dtype),
    )


def normalize_images(images: jax.Array, backbone: str = "resnet", dtype: Any = jnp.float32) -> jax.Array:
    """uint8 NHWC RGB → float32 (or ``dtype``) in the backbone's input convention (done on device:
    uint8 is 4× less to transfer). ``resnet``: ImageNet mean/std on [0, 1] RGB; ``bn_inception``:
    BGR, 0–255, mean subtracted (``hdml_jax.models.preprocessing.PREPROCESSING``)."""
    return preprocessing.normalize(images, backbone, dtype)


def input_dtype(backbone: Any) -> Any:
    """The dtype images are normalised in for ``backbone``: float32, or its compute dtype where that
    is wider (a float64 model under JAX's x64 mode). bfloat16 models still get float32 inputs,
    which they round once themselves (``images.astype(dtype)``)."""
    return jnp.promote_types(jnp.float32, getattr(backbone, "dtype", None) or jnp.float32)


# ----------------------------------------------------------------------------- loss


# HIER's draws come from the state's key folded with this stream and the step (the dropout
# draws fold the step alone), so a resumed run draws what an uninterrupted one would.
HIER_STREAM = 0x48494552


def compute_loss(
    config: ml_collections.ConfigDict,
    outputs: dict[str, Any],
    labels: jax.Array,
    params: Any,
    hierarchy: dict[str, Any],
    mask: jax.Array,
    num_classes: int | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The method's loss on one (global) batch; returns ``(loss, named parts)``.

    ``num_classes``: the real classes when ``params['proxies']`` has padding rows beyond them
    (sharded proxies); the padding is masked out of the loss. ``key``: the step's random key, for
    a method with HIER (``Method.hier``): ``L = L_method + loss.hier.weight · L_HIER``, with parts
    ``base`` and ``hier``.
    """
    hier = methods.of(config).hier
    if hier and key is None:
        raise ValueError(f"method {config.method!r} adds HIER, which draws its triplets from a key: pass key=.")
    loss, parts = method_loss(config, outputs, labels, params, hierarchy, mask, num_classes)
    if not hier:
        return loss, parts
    regularizer = hier_term(config, outputs["embedding"], labels, params["lcas"], mask, key)
    return loss + config.loss.hier.weight * regularizer, {**parts, "base": loss, "hier": regularizer}


def hier_term(
    config: ml_collections.ConfigDict,
    embeddings: jax.Array,
    labels: jax.Array,
    lcas: jax.Array,
    mask: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """HIER's loss (``losses.hier_loss``) of the batch's points and the LCAs, in the embedding's
    geometry: the LCA parameters through ``ToPoincare`` (Riemannian gradient, HIER
    hier/losses.py:30) on the head's ball; on the sphere (``model.curvature`` 0, whose distance
    ``2 − 2⟨x, y⟩`` is hier/losses.py:32-35) L2-normalised, our choice: the official code maps
    them through ``ToPoincare(c=0)``, which divides by √c."""
    m, h = config.model, config.loss.hier
    c = ranking.curvature_of(config)
    if c > 0:
        points = hyperbolic.to_poincare(lcas, c, m.get("clip_r", 2.3), riemannian=True)
    else:
        points = lcas / jnp.linalg.norm(lcas, axis=-1, keepdims=True)
    return losses.hier_loss(
        embeddings,
        labels,
        points,
        key,
        c=c,
        margin=h.margin,
        tau=h.tau,
        topk=h.topk,
        per_anchor=h.triplets_per_anchor,
        mask=mask,
    )


def method_loss(
    config: ml_collections.ConfigDict,
    outputs: dict[str, Any],
    labels: jax.Array,
    params: Any,
    hierarchy: dict[str, Any],
    mask: jax.Array,
    num_classes: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The method's own loss (``compute_loss`` without HIER)."""
    method, lc = methods.of(config), config.loss
    embeddings = outputs["embedding"]
    if method.form == "pair":
        return pair_loss(config, embeddings, labels, params, mask)[0], {}
    base, kwargs = method.loss_function(), method.keywords(config)
    if method.form == "cgd":
        ranking = base(embeddings, labels, mask=mask, **kwargs)
        if "branch_embeddings" in outputs and config.model.architecture == "A":
            ranking = sum(base(b, labels, mask=mask, **kwargs) for b in outputs["branch_embeddings"])
        classification = losses.softmax_cross_entropy(
            outputs["logits"],
            labels,
            temperature=lc.temperature,
            label_smoothing=lc.label_smoothing,
            mask=mask,
        )
        total = ranking + lc.classification_weight * classification
        return total, {"triplet": ranking, "classification": classification}

    num_proxies = params["proxies"].shape[0]
    proxy_mask = parallel.fine_proxy_mask(num_proxies, num_proxies if num_classes is None else num_classes)
    if not method.hierarchical:
        fine_kwargs = kwargs if proxy_mask is None else {**kwargs, "proxy_mask": proxy_mask}
        return base(embeddings, labels, params["proxies"], mask=mask, **fine_kwargs), {}
    weights = tuple(lc.level_weights)
    levels = hierarchy_levels(config, params, hierarchy, proxy_mask)
    level_weights = (weights[0], *(hierarchy["active"] * w for w in weights[1:]))
    total, level_losses = losses.hierarchical_proxy_loss(
        embeddings,
        labels,
        levels,
        hierarchy["assignments"],
        base_loss=base,
        level_weights=level_weights,
        mask=mask,
        level_proxy_masks=(proxy_mask, *(None,) * (len(levels) - 1)),
        return_levels=True,
        **kwargs,
    )
    parts = {}
    if level_losses[0] is not None:  # the fine level is skipped only with a fine weight of 0
        parts["fine"] = level_losses[0]
    return total, parts


def pair_loss(
    config: ml_collections.ConfigDict,
    embeddings: jax.Array,
    labels: jax.Array,
    params: Any,
    mask: jax.Array,
    memory: losses.CrossBatchMemory | None = None,
) -> tuple[jax.Array, losses.CrossBatchMemory | None]:
    """A pair loss (``Method.form == "pair"``, ``hdml_jax.methods.baselines``) and the cross-batch memory after it.

    Mined if ``loss.miner`` says so. With a ``memory`` (``loss.xbm_size > 0``) the batch is
    written into it first and every anchor of the batch is paired with the memory's rows (PML's
    ``CrossBatchMemory``; ``losses.xbm_loss``); without, pairs are within the batch.
    """
    lc, method = config.loss, methods.of(config)
    loss_fn, kwargs = method.loss_function(), method.keywords(config)
    for parameter in method.loss_parameters:  # the keyword's value was the initial one
        kwargs.pop(parameter.keyword)
        loss_fn = functools.partial(loss_fn, **{parameter.keyword: params[parameter.name]})
    miner = None
    if lc.miner != "none":
        miner_fn = getattr(losses, baselines.MINER_FUNCTIONS[lc.miner])
        miner = functools.partial(miner_fn, **lc.miner_kwargs.to_dict())
    if memory is not None:
        return losses.xbm_loss(
            functools.partial(loss_fn, **kwargs),
            embeddings,
            labels,
            memory,
            mask=mask,
            miner=miner,
            miner_pairs_are_triplets=lc.miner == "batch_hard",
        )
    if miner is not None:
        kwargs.update(miner(jax.lax.stop_gradient(embeddings), labels, mask=mask))
    return loss_fn(embeddings, labels, mask=mask, **kwargs), None


def hierarchy_levels(
    config: ml_collections.ConfigDict,
    params: Any,
    hierarchy: dict[str, Any],
    proxy_mask: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """HPL's proxies of every level ``(P^0, P^1, ...)``: learned, or group means (``loss.coarse_proxies``).

    ``proxy_mask``: False for padding rows of ``params['proxies']`` (they join no group).
    """
    levels = proxy_levels(params)
    if config.loss.coarse_proxies != "centroids":
        return levels
    sizes = tuple(level.shape[0] for level in levels[1:])
    centroids = losses.coarse_centroids(
        levels[0],
        hierarchy["assignments"],
        sizes,
        normalize=config.loss.kmeans_normalize,
        proxy_mask=proxy_mask,
    )
    return (levels[0], *centroids)


# ----------------------------------------------------------------------------- the step


def loss_and_grads(
    params: Any,
    state: State,
    batch: dict[str, jax.Array],
    *,
    model: EmbeddingModel,
    config: ml_collections.ConfigDict,
    backbone_frozen: bool = False,
) -> tuple[tuple[jax.Array, dict[str, jax.Array], Any, Any], Any]:
    """``((loss, loss parts, new batch_stats, new cross-batch memory or None), grads)`` of one batch.

    ``batch``: ``{'image' uint8 (B,H,W,3), 'label' (B,), 'mask'? (B,)}``. With
    ``backbone_frozen`` the backbone's features pass through ``stop_gradient`` (its gradient is
    not even computed).
    """
    images = normalize_images(
        batch["image"], preprocessing.backbone_of(model.backbone), input_dtype(model.backbone)
    )
    labels = batch["label"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(labels.shape, bool))

    def loss_fn(params):
        if backbone_frozen:
            params = {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        # Stochastic depth's draws (the ViT's drop_path): from the state's key and the step, so a
        # resumed run draws what an uninterrupted one would.
        rngs, hier_key = {}, None
        if "rng" in state:
            base_key = jax.random.wrap_key_data(state["rng"])
            rngs["dropout"] = jax.random.fold_in(base_key, state["step"])
            hier_key = jax.random.fold_in(jax.random.fold_in(base_key, HIER_STREAM), state["step"])
        outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
        new_batch_stats = updates.get("batch_stats", state["batch_stats"])
        if "xbm" in state:  # a pair loss against the cross-batch memory
            loss, memory = pair_loss(config, outputs["embedding"], labels, params, mask, state["xbm"])
            return loss, ({}, new_batch_stats, memory)
        loss, parts = compute_loss(
            config, outputs, labels, params, state["hierarchy"], mask, num_classes=model.num_proxies, key=hier_key
        )
        return loss, (parts, new_batch_stats, None)

    (loss, (parts, batch_stats, memory)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return (loss, parts, batch_stats, memory), grads


def train_step(
    state: State,
    batch: dict[str, jax.Array],
    *,
    model: EmbeddingModel,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    backbone_frozen: bool,
) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on a global batch (see ``loss_and_grads``).

    ``optimizer`` is the phase's (``hdml_jax.optim.make_optimizer``): its frozen groups do not
    move. ``backbone_frozen`` (static, the warm-up) also keeps the backbone's gradient from being
    computed at all.
    """
    (loss, parts, batch_stats, memory), grads = loss_and_grads(
        state["params"], state, batch, model=model, config=config, backbone_frozen=backbone_frozen
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # BatchNorm statistics too: NaN running statistics would reach evaluation unseen.
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, batch_stats))])
    )
    new_state = {
        **state,
        "step": state["step"] + 1,
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": opt_state,
    }
    if memory is not None:
        new_state["xbm"] = memory
    metrics = {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads), **parts}
    return new_state, metrics


def compile_train_step(
    model: EmbeddingModel,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    state_sharding: Any,
    batch_sharding: Any,
    backbone_frozen: bool,
) -> Callable[[State, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    """``jax.jit`` of ``train_step`` with the state replicated and the batch sharded; donates the state."""
    step = functools.partial(
        train_step, model=model, config=config, optimizer=optimizer, backbone_frozen=backbone_frozen
    )
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )


def embed_step(variables: Any, images: jax.Array, *, model: EmbeddingModel) -> jax.Array:
    """Eval-mode embeddings of a uint8 RGB batch (float32, L2-normalised by the head)."""
    images = normalize_images(images, preprocessing.backbone_of(model.backbone))
    return model.apply(variables, images, train=False)["embedding"].astype(jnp.float32)


def unfreeze(tree: Any) -> Any:
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
