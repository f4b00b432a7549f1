"""Optimizers with PyTorch's parameter-group semantics, as the official training scripts use them.

Every parameter carries a group label (``parameter_groups``):

==================  ========================================================================
``backbone``        the ResNet's convolutions (everything of the backbone but BatchNorm)
``backbone_bn``     the backbone's BatchNorm scale/bias
``backbone_fixed``  backbone parameters that never train (the ViT's patch embedding with
                    ``model.vit.freeze_patch_embed``: HIER's and Hyp's ``freeze(body, 0)``)
``head``            the embedding layer(s), CGD's descriptor projections and classifier
``proxies``         the fine proxies (one per class)
``coarse_proxies``  HPL's coarse proxies (``coarse_proxies_1``, ...)
``loss_params``     a loss's own parameters other than class vectors (``margin_beta``)
==================  ========================================================================

A **phase** is the set of groups that are frozen for a while (``frozen_groups``): during
warm-up the backbone; with ``bn_freeze`` and no warm-up the BatchNorm affine parameters for the
whole run; HPL's coarse proxies until the hierarchy exists. ``optimizer.warmup="zero_lr"``
warms up as HIER does instead (HIER hier/train.py:136-139): the backbone's group keeps its
optimizer, at learning rate 0, so its moments and step count move while its weights do not. PyTorch gives a parameter with
``requires_grad=False`` no gradient, so ``torch.optim.Adam``/``AdamW`` skip it: its step count and
moments do not exist until it first trains, and its weight decay is not applied. Here a frozen
group's optimizer state is passed through untouched and its update is exactly zero, so when it
unfreezes its state is what a fresh PyTorch optimizer would create (step 0, zero moments).

The learning rate is a function of the **global** step (``learning_rate_schedule``), like
``torch.optim.lr_scheduler.StepLR`` stepped once per epoch, not of a group's own step count;
each group scales it by its multiplier. Per group, with ``g`` the (clipped) gradient, ``p`` the
parameter, ``η = lr(step) · multiplier``::

    adamw:  p ← p − η (m̂ / (√v̂ + ε) + λ p)            torch.optim.AdamW (decoupled decay)
    adam:   g ← g + λ p;  p ← p − η m̂ / (√v̂ + ε)       torch.optim.Adam (L2 in the gradient)
    sgd:    g ← g + λ p;  b ← 0.9 b + g;  p ← p − η (g + 0.9 b)    SGD, momentum 0.9, Nesterov
    rmsprop: g ← g + λ p;  v ← α v + (1−α) g²;  b ← μ b + g / (√v + ε);  p ← p − η b
                                                      torch.optim.RMSprop (α 0.99, μ = momentum)

Gradient clipping is element-wise (``torch.nn.utils.clip_grad_value_``) before any of this; the
proxies are clipped only where the official code clips them (``optimizer.clip_proxies``). With
``optimizer.grad_clip_norm`` > 0 the gradients are then scaled together to that global L2 norm
(``torch.nn.utils.clip_grad_norm_``, hyp_metric's), over the groups that train.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from hdml_jax import methods
from hdml_jax.models import batchnorm_mask

GROUPS = ("backbone", "backbone_bn", "backbone_fixed", "head", "proxies", "coarse_proxies", "loss_params")
BACKBONE_GROUPS = ("backbone", "backbone_bn")
WARMUPS = ("freeze", "zero_lr")
PROXY_GROUPS = ("proxies", "coarse_proxies")
LCAS = "lcas"  # HIER's learned hierarchical proxies (params['lcas']): in the loss_params group


class OptimizerState(NamedTuple):
    """``count``: updates applied so far (the global step); ``groups``: per-group optax state."""

    count: jax.Array
    groups: Any


def parameter_groups(params: Any, fixed: Iterable[str] = ()) -> Any:
    """A pytree of group labels (``GROUPS``) with the structure of ``params``.

    ``fixed``: names of the backbone's top-level modules that never train (``backbone_fixed``).
    """
    is_bn = batchnorm_mask(params)
    loss_params = methods.loss_parameter_names()  # top-level params that belong to the loss
    fixed = frozenset(fixed)

    def label(path, _, bn: bool) -> str:
        top = path[0].key
        if top == "proxies":
            return "proxies"
        if top.startswith("coarse_proxies"):
            return "coarse_proxies"
        if top in loss_params or top == LCAS:  # the loss's own learned arrays
            return "loss_params"
        if top == "backbone":
            if len(path) > 1 and path[1].key in fixed:
                return "backbone_fixed"
            return "backbone_bn" if bn else "backbone"
        return "head"

    return jax.tree_util.tree_map_with_path(label, params, is_bn)


# ----------------------------------------------------------------------------- phases


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.optimizer.warmup_epochs) * steps_per_epoch


def warmup_mode(config: ml_collections.ConfigDict) -> str:
    """``"freeze"`` (Proxy-Anchor: ``requires_grad=False``) or ``"zero_lr"`` (HIER: the backbone's
    group at learning rate 0); configs written before the field existed mean ``"freeze"``."""
    return config.optimizer.get("warmup", "freeze")


def fixed_backbone_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The backbone modules that never train (``backbone_fixed``): the ViT's patch embedding with
    ``model.vit.freeze_patch_embed``."""
    m = config.model
    if m.get("backbone", "resnet") == "vit" and m.vit.get("freeze_patch_embed", False):
        return ("patch_embed",)
    return ()


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``optimizer.lr``, scaled by ``batch_size / lr_reference_batch`` when that is set (HIER:
    ``lr = args.lr * (batch_size * world_size) / 180.``, hier/train.py:132)."""
    o = config.optimizer
    reference = int(o.get("lr_reference_batch", 0) or 0)
    return float(o.lr) * (config.batch_size / reference if reference else 1.0)


def frozen_groups(
    config: ml_collections.ConfigDict, step: int, steps_per_epoch: int, hierarchy_active: bool = True
) -> frozenset[str]:
    """The groups that do not train at ``step`` (a Python int: each phase compiles its own step).

    * ``backbone_fixed`` always, where the config has such parameters (``requires_grad=False``
      for the whole run).
    * ``step < warm-up``: ``backbone`` and ``backbone_bn`` (the official ``train.py`` sets
      ``requires_grad=False`` on every parameter but the embedding layer and the proxies); not
      with ``optimizer.warmup="zero_lr"``, whose backbone trains at rate 0 (``make_optimizer``).
    * ``model.frozen_bn`` (``bn_freeze``) and no warm-up at all: ``backbone_bn`` for the whole run.
      The official model freezes BatchNorm's weight/bias at construction, and only the warm-up's
      end (``epoch == warm``, inside ``if args.warm > 0``) sets ``requires_grad=True`` on them
      again; with a warm-up they train from its end on, like every other parameter. Not with
      ``model.frozen_bn_trains_affine`` (PML's ``freeze_trunk_batchnorm``, MLRC's runs: BatchNorm
      in eval mode, its weight/bias trained by the trunk's optimizer).
    * HPL: ``coarse_proxies`` until the hierarchy is built (they do not exist before).
    """
    frozen = {"backbone_fixed"} if fixed_backbone_modules(config) else set()
    warm = warmup_steps(config, steps_per_epoch)
    if step < warm and warmup_mode(config) == "freeze":
        frozen |= set(BACKBONE_GROUPS)
    elif config.model.frozen_bn and warm == 0 and not config.model.get("frozen_bn_trains_affine", False):
        frozen.add("backbone_bn")
    if methods.of(config).hierarchical and not hierarchy_active:
        frozen.add("coarse_proxies")
    return frozenset(frozen)


# ----------------------------------------------------------------------------- schedule


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """Steps of one "epoch": ``config.steps_per_epoch`` when set (MLRC's 100 iterations), else one
    pass over the training set (at least 1)."""
    if getattr(config, "steps_per_epoch", 0) > 0:
        return int(config.steps_per_epoch)
    return max(1, num_train_examples // config.batch_size)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.num_steps) if config.num_steps > 0 else int(config.num_epochs) * steps_per_epoch


def decay_boundaries(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """Global steps after which the learning rate is multiplied by ``decay_factor``.

    ``optimizer.decay_steps`` (absolute steps, e.g. CGD's 400 and 800) wins over
    ``decay_epochs``; ``decay_every`` repeats ``decay_epochs[0]`` (StepLR) up to the last epoch.
    """
    o = config.optimizer
    steps = sorted(int(s) for s in o.decay_steps if int(s) > 0)
    if steps:
        return steps
    epochs = sorted(int(e) for e in o.decay_epochs if int(e) > 0)
    total_epochs = max(1, -(-total_steps(config, steps_per_epoch) // steps_per_epoch))
    if o.decay_every and epochs:
        epochs = list(range(epochs[0], total_epochs + 1, epochs[0]))
    return [epoch * steps_per_epoch for epoch in epochs]


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Base learning rate at a global step: ``lr · decay_factor^(boundaries passed)``.

    StepLR(step_size=k) stepped once per epoch gives epoch ``e`` the rate ``lr · γ^⌊e/k⌋``: the
    boundaries are the first steps of epochs ``k, 2k, ...``.
    """
    o = config.optimizer
    boundaries = {step: o.decay_factor for step in decay_boundaries(config, steps_per_epoch)}
    return optax.piecewise_constant_schedule(base_learning_rate(config), boundaries)


# ----------------------------------------------------------------------------- the optimizer


def _direction(config: ml_collections.ConfigDict, setting: GroupSetting) -> optax.GradientTransformation:
    """A group's update direction before ``−lr · multiplier`` (PyTorch formulas, module docstring)."""
    name, eps, decay = config.optimizer.name, setting.eps, setting.weight_decay
    if name == "adamw":
        return optax.chain(optax.scale_by_adam(eps=eps), optax.add_decayed_weights(decay))
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(decay), optax.scale_by_adam(eps=eps))
    if name == "rmsprop":
        # torch.optim.RMSprop: the square average starts at 0 with no bias correction, ε is added
        # outside the square root, and the momentum buffer accumulates the scaled gradient.
        return optax.chain(
            optax.add_decayed_weights(decay),
            optax.scale_by_rms(decay=RMSPROP_ALPHA, eps=eps, initial_scale=0.0, eps_in_sqrt=False),
            optax.trace(decay=config.optimizer.momentum, nesterov=False),
        )
    return optax.chain(optax.add_decayed_weights(decay), optax.trace(decay=0.9, nesterov=True))


# torch.optim.RMSprop's default smoothing constant α (MLRC's runs leave it at the default).
RMSPROP_ALPHA = 0.99


def _frozen(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``'s state layout, but updates are zero and the state does not move."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(jnp.zeros_like, updates), state

    return optax.GradientTransformation(inner.init, update)


class GroupSetting(NamedTuple):
    lr_multiplier: float  # of the scheduled base rate
    eps: float  # Adam's ε
    weight_decay: float


def group_settings(config: ml_collections.ConfigDict) -> dict[str, GroupSetting]:
    """Every group's ``GroupSetting``.

    ``optimizer.proxy_lr`` / ``loss_params_lr`` (absolute rates, the baselines' MLRC values) become
    multipliers of ``lr``, so they follow the schedule's decays like every other group. HIER's
    LCAs, a method's only loss parameters, train at ``optimizer.lca_lr_multiplier`` × lr.
    """
    o = config.optimizer
    proxy_eps = o.proxy_eps if o.proxy_eps is not None else o.eps
    proxy_multiplier = o.proxy_lr / o.lr if o.get("proxy_lr") is not None else o.proxy_lr_multiplier
    loss_multiplier = 1.0
    if o.get("loss_params_lr") is not None:
        loss_multiplier = o.loss_params_lr / o.lr
    elif methods.of(config).hier:
        loss_multiplier = o.lca_lr_multiplier
    loss_decay = o.get("loss_params_weight_decay")
    decay = o.weight_decay
    return {
        "backbone": GroupSetting(o.backbone_lr_multiplier, o.eps, decay),
        "backbone_bn": GroupSetting(o.backbone_lr_multiplier, o.eps, decay),
        "backbone_fixed": GroupSetting(0.0, o.eps, decay),
        "head": GroupSetting(o.head_lr_multiplier, o.eps, decay),
        "proxies": GroupSetting(proxy_multiplier, proxy_eps, decay),
        "coarse_proxies": GroupSetting(proxy_multiplier, proxy_eps, decay),
        "loss_params": GroupSetting(loss_multiplier, o.eps, decay if loss_decay is None else loss_decay),
    }


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    steps_per_epoch: int,
    frozen: Iterable[str] = (),
) -> optax.GradientTransformation:
    """The optimizer of one phase (``frozen`` groups do not move; see ``frozen_groups``).

    Every phase's optimizer has the same state layout (``OptimizerState``), so the state carries
    over from one phase to the next; only a frozen group's part of it stays as ``init`` made it.
    ``params`` gives the tree structure (shapes suffice).
    """
    o = config.optimizer
    frozen = frozenset(frozen)
    unknown = frozen - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; valid: {', '.join(GROUPS)}.")
    labels = parameter_groups(params, fixed_backbone_modules(config))
    settings = group_settings(config)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    # HIER's warm-up: the backbone's rate is 0 before this step, its optimizer state moves.
    zero_lr_until = warmup_steps(config, steps_per_epoch) if warmup_mode(config) == "zero_lr" else 0
    directions = optax.multi_transform(
        {
            group: _frozen(_direction(config, setting)) if group in frozen else _direction(config, setting)
            for group, setting in settings.items()
        },
        labels,
    )
    clip = float(o.grad_clip_value)
    max_norm = float(o.get("grad_clip_norm", 0.0) or 0.0)

    def clip_gradient(gradient, label):
        if clip and (o.clip_proxies or label not in PROXY_GROUPS):
            return jnp.clip(gradient, -clip, clip)
        return gradient

    def init(params):
        return OptimizerState(jnp.zeros((), jnp.int32), directions.init(params))

    def update(grads, state, params=None):
        grads = jax.tree.map(clip_gradient, grads, labels)
        if max_norm:
            grads = clip_by_global_norm(grads, labels, max_norm, frozen)
        direction, groups = directions.update(grads, state.groups, params)
        lr = schedule(state.count)
        backbone_lr = jnp.where(state.count < zero_lr_until, 0.0, lr) if zero_lr_until else lr

        def step_of(d, label):
            rate = backbone_lr if label in BACKBONE_GROUPS else lr
            return (-rate * settings[label].lr_multiplier * d).astype(d.dtype)

        updates = jax.tree.map(step_of, direction, labels)
        return updates, OptimizerState(state.count + 1, groups)

    return optax.GradientTransformation(init, update)


def clip_by_global_norm(grads: Any, labels: Any, max_norm: float, frozen: Iterable[str] = ()) -> Any:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (hyp_metric train.py:166): every
    gradient × min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the L2 norm of the gradients of the training
    parameters together. The groups that do not train (``frozen``, ``backbone_fixed``) have no
    gradient in PyTorch: they count for nothing in the norm."""
    not_training = frozenset(frozen) | {"backbone_fixed"}

    def square(g, label):
        return jnp.zeros((), jnp.float32) if label in not_training else jnp.sum(jnp.square(g.astype(jnp.float32)))

    total = jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(square, grads, labels))))
    scale = jnp.minimum(1.0, max_norm / (total + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def reset_groups(
    optimizer: optax.GradientTransformation, state: OptimizerState, params: Any, groups: Iterable[str]
) -> OptimizerState:
    """``state`` with ``groups`` made fresh (zero moments, step 0), as a new PyTorch optimizer's.

    Used where the official code starts a new optimizer (ProxyNCA++ after its warm-up) and when
    HPL's coarse proxies are (re)built from k-means: their old moments belong to other vectors.
    """
    fresh = optimizer.init(params).groups
    inner = dict(state.groups.inner_states)
    for group in groups:
        inner[group] = fresh.inner_states[group]
    return OptimizerState(state.count, state.groups._replace(inner_states=inner))
