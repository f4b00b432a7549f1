"""Up-front validation of a resolved config: every field checked before any data is read.

``validate(c, overridden)`` raises one ``ConfigError`` naming the field, its value and what would
fit (a method's keywords against its loss function's signature, choices against their lists,
ranges, the data set's and backbone's constraints); ``unused_overrides`` lists overridden fields
that the chosen method or sampler never reads, so a typo'd or misplaced flag is not silently
ignored. Both ask the method's record (``hdml_jax.methods``), not a list of names.
"""

from __future__ import annotations

import inspect

import ml_collections

from hdml_jax import methods
from hdml_jax.errors import ConfigError
from hdml_jax.methods import baselines
from hdml_jax.methods.registry import GROUP_FIELDS
from hdml_jax.models import vit
from hdml_jax.models.heads import (
    ARCHITECTURES,
    COMBINES,
    EMBEDDING_INITS,
    PROXY_INITS,
    parse_descriptors,
)
from hdml_jax.models.pooling import POOLINGS
from hdml_jax.models.preprocessing import BACKBONES, check_named_weights
from hdml_jax.models.vit_weights import VIT_WEIGHTS
from hdml_jax.training.optim import WARMUPS

DATASET_NAMES = ("synthetic", "synthetic_sop", "cub200", "cars196", "sop", "inshop", "custom")


TRANSFORMS = ("proxy_anchor", "proxynca_pp", "cgd", "mlrc", "synthetic")


OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")


DTYPES = ("float32", "bfloat16")


# Higher is better for each; the kept "best" checkpoint and final_metrics.json's "best" use one.
BEST_METRICS = ("recall@1", "map@r", "r_precision")


COARSE_PROXIES = ("learned", "centroids")  # HPL: how the coarse proxies are obtained


def method_family(c: ml_collections.ConfigDict) -> str | None:
    """Whose official commands set ``c``'s method's per-data-set numbers (None: unknown method)."""
    record = methods.find(c.method)
    return None if record is None else record.family


_PK_FIELDS = ("classes_per_batch", "samples_per_class")
_CLASS_SAMPLERS = ("pk", "unique_class")  # the samplers that read _PK_FIELDS


_RESNET_FIELDS = ("model.depth", "model.width", "model.last_stride")


def unused_overrides(c: ml_collections.ConfigDict, overridden: list[str] | tuple[str, ...]) -> list[str]:
    """Messages for the overridden fields (dotted names) that ``c``'s method or sampler never reads."""
    messages = []
    specific = methods.method_specific_fields()
    record = methods.get(c.method)
    for name in overridden:
        group = name.rsplit(".", 1)[0]
        field = group if group in GROUP_FIELDS else name
        if field in specific and field not in record.config_fields():
            users = methods.users_of(field)
            messages.append(f"{name} has no effect with method {c.method} (used by: {', '.join(users)})")
        if name in _PK_FIELDS and c.sampler not in _CLASS_SAMPLERS:
            messages.append(
                f"{name} has no effect with sampler={c.sampler!r} (used by sampler='pk' and 'unique_class')"
            )
        if name.startswith("model.vit.") and c.model.backbone != "vit":
            messages.append(f"{name} has no effect with model.backbone={c.model.backbone!r} (ViT only)")
        if name in _RESNET_FIELDS and c.model.backbone != "resnet":
            messages.append(f"{name} has no effect with model.backbone={c.model.backbone!r} (ResNet only)")
        if name == "model.gem_p" and record.head != "cgd" and c.model.pooling != "gem":
            messages.append(
                f"model.gem_p has no effect with model.pooling={c.model.pooling!r} (used by cgd and 'gem')"
            )
    return messages


def _validate_backbone_weights(m: ml_collections.ConfigDict) -> None:
    """The named ImageNet weights exist for one backbone each (a directory is checked when loaded)."""
    check_named_weights(str(m.pretrained or "").strip().lower(), m.backbone)


def _validate_vit(c: ml_collections.ConfigDict) -> None:
    """``model.vit``: known choices, a patch that tiles the image, and the fields named weights need."""
    v = c.model.vit
    one_of(v.size, tuple(vit.SIZES), "model.vit.size")
    one_of(v.pooling, vit.POOLINGS, "model.vit.pooling")
    one_of(v.position_interpolation, vit.POSITION_INTERPOLATIONS, "model.vit.position_interpolation")
    one_of(v.preprocessing, ("vit", "vit_augreg"), "model.vit.preprocessing")
    if c.model.pooling != "none":
        raise ConfigError(
            f"model.pooling={c.model.pooling!r} with model.backbone='vit': the ViT pools its own tokens "
            "(model.vit.pooling); set model.pooling='none'."
        )
    for size, what in ((c.dataset.image_size, "dataset.image_size"), (v.position_grid_size, "model.vit.position_grid_size")):
        if size % v.patch_size:
            raise ConfigError(f"{what}={size} is not a multiple of model.vit.patch_size={v.patch_size}.")
    name = str(c.model.pretrained or "").strip().lower()
    if name in VIT_WEIGHTS:
        wrong = [
            f"model.vit.{field}={v.get(field)!r} (they need {value!r})"
            for field, value in VIT_WEIGHTS[name].config_fields().items()
            if v.get(field) != value
        ]
        if wrong:
            raise ConfigError(
                f"model.pretrained={name!r} does not fit {', '.join(wrong)}: choose the weights with the "
                f"data-set config's backbone option (e.g. configs/cub.py:method=proxy_anchor,backbone={name}), "
                "which sets these fields."
            )


def _validate_custom_dataset(d: ml_collections.ConfigDict) -> None:
    """``configs/custom.py``'s fields: a path to read, sensible Recall@K."""
    if not d.get("path"):
        raise ConfigError(
            "dataset.path is empty: set --config.dataset.path=/path/to/items.csv (an Open Metric "
            "Learning CSV: label, path, split) or an image folder (<split>/<class>/<image>)."
        )
    ks = tuple(d.get("recall_ks", (1,)))
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"dataset.recall_ks must be positive integers, got {ks}.")


def _check_keywords(given, function, what: str, fixed: tuple[str, ...]) -> None:
    """``given``'s names must be keyword parameters of ``function`` (other than ``fixed``)."""
    positional = ("embeddings", "labels", "weights")  # the arrays the trainer passes
    accepted = [name for name in inspect.signature(function).parameters if name not in (*positional, *fixed)]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{what} has no keyword {', '.join(map(repr, unknown))}; it takes: {', '.join(accepted)}."
        )


def _validate_loss_keywords(c: ml_collections.ConfigDict, record: methods.Method) -> None:
    """``loss.kwargs`` (methods that read it), the miner's keywords and the cross-batch memory size
    (pair losses), the absolute rates of the loss's own parameters."""
    from hdml_jax import losses  # here, not at the top: the configs stay importable without JAX

    fixed = ("mask", "proxy_mask", "pos_mask", "neg_mask", "triplet_mask", "num_classes")
    if "loss.kwargs" in record.config_fields():
        loss_name = record.loss_name()
        _check_keywords(c.loss.kwargs.to_dict(), record.loss_function(), f"loss.kwargs ({loss_name})", fixed)
    if record.form == "pair":
        one_of(c.loss.miner, baselines.MINERS, "loss.miner")
        if c.loss.miner != "none":
            miner = baselines.MINER_FUNCTIONS[c.loss.miner]
            _check_keywords(
                c.loss.miner_kwargs.to_dict(), getattr(losses, miner), f"loss.miner_kwargs ({miner})", fixed
            )
        elif c.loss.miner_kwargs.to_dict():
            raise ConfigError("loss.miner_kwargs is set but loss.miner is 'none'; pick a miner or drop them.")
        xbm = int(c.loss.xbm_size)
        if xbm < 0 or (xbm and xbm < c.batch_size):
            raise ConfigError(
                f"loss.xbm_size must be 0 (no cross-batch memory) or at least batch_size {c.batch_size}, got {xbm}."
            )
        if xbm and (record.loss_name() == "lifted_structure_loss" or c.loss.kwargs.get("swap", False)):
            what = (
                c.method if record.loss_name() == "lifted_structure_loss" else "triplet_margin with swap=True"
            )
            raise ConfigError(
                f"loss.xbm_size: {what} has no cross-batch form (its terms pair two batch rows "
                "with each other); pick another pair loss or set loss.xbm_size=0."
            )
    for name in ("proxy_lr", "loss_params_lr"):
        value = c.optimizer.get(name)
        if value is not None and not value > 0:
            raise ConfigError(f"optimizer.{name} must be positive (or None), got {value}.")


def _validate_augment(d: ml_collections.ConfigDict) -> None:
    """``dataset.augment``: each field in range, and no crop field the transform does not have."""
    from hdml_jax.data import transforms

    try:
        transforms.preset(d.transform, d.image_size, augment=d.augment)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


def one_of(value, valid, what):
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}.")


def _validate_geometry(c: ml_collections.ConfigDict, record: methods.Method) -> None:
    """``model.curvature`` (the Poincaré ball's c, 0: the sphere) and HIER's ``loss.hier``."""
    m = c.model
    if float(m.curvature) < 0:
        raise ConfigError(f"model.curvature must be 0 (the unit sphere) or the Poincaré ball's c > 0, got {m.curvature}.")
    if m.clip_r is not None and float(m.clip_r) <= 0:
        raise ConfigError(f"model.clip_r must be a radius > 0, or None for no feature clipping, got {m.clip_r}.")
    if record.family == "hyp":
        if c.sampler != "pk" or c.loss.miner != "none" or int(c.loss.get("xbm_size", 0)) > 0:
            raise ConfigError(
                f"method {c.method} pairs each class's views by position: it needs sampler='pk' "
                f"(got {c.sampler!r}), loss.miner='none' and loss.xbm_size=0."
            )
        if int(c.samples_per_class) < 2:
            raise ConfigError(f"method {c.method} needs samples_per_class >= 2, got {c.samples_per_class}.")
    if not record.hier:
        return
    h = c.loss.hier
    if float(h.weight) < 0 or float(h.margin) < 0 or float(h.tau) <= 0:
        raise ConfigError(
            f"loss.hier: weight ({h.weight}) and margin ({h.margin}) must be >= 0 and tau ({h.tau}) > 0."
        )
    for name in ("num_lcas", "triplets_per_anchor"):
        if int(h[name]) < 1:
            raise ConfigError(f"loss.hier.{name} must be a positive integer, got {h[name]}.")
    if int(h.topk) < 2:
        raise ConfigError(
            f"loss.hier.topk must be >= 2 (a row's neighbours include itself; HIER's scripts use 20), got {h.topk}."
        )
    if int(c.loss.get("xbm_size", 0)) > 0:
        raise ConfigError(f"method {c.method} adds HIER, which needs the batch's own points: set loss.xbm_size=0.")


def validate(c: ml_collections.ConfigDict, overridden: tuple[str, ...] = ()) -> None:
    """Check a config before anything is built; one-line ``ConfigError`` listing the valid values.

    ``overridden``: the dotted names set on the command line; one the method ignores is an error.
    """

    one_of(c.method, methods.names(), "method")
    record = methods.get(c.method)
    unused = unused_overrides(c, overridden)
    if unused:
        raise ConfigError("; ".join(unused) + ". Remove the override or pick a method that uses it.")
    one_of(c.dataset.name, DATASET_NAMES, "dataset")
    if c.dataset.name == "custom":
        _validate_custom_dataset(c.dataset)
    one_of(c.dataset.transform, TRANSFORMS, "transform")
    _validate_augment(c.dataset)
    one_of(c.optimizer.name, OPTIMIZERS, "optimizer")
    one_of(c.model.dtype, DTYPES, "model.dtype")
    one_of(c.model.backbone, BACKBONES, "model.backbone")
    _validate_backbone_weights(c.model)
    one_of(c.model.depth, (18, 34, 50, 101), "model.depth")
    one_of(c.model.last_stride, (1, 2), "model.last_stride")
    if c.model.backbone == "vit":
        _validate_vit(c)
    one_of(c.sampler, ("pk", "shuffle", "unique_class"), "sampler")
    one_of(c.optimizer.get("warmup", "freeze"), WARMUPS, "optimizer.warmup")
    if int(c.optimizer.get("lr_reference_batch", 0)) < 0:
        raise ConfigError(
            f"optimizer.lr_reference_batch must be 0 (lr as given) or a batch size, got {c.optimizer.lr_reference_batch}."
        )
    one_of(c.model.pooling, tuple(POOLINGS), "model.pooling")
    one_of(c.model.embedding_init, tuple(EMBEDDING_INITS), "model.embedding_init")
    one_of(c.model.proxy_init, tuple(PROXY_INITS), "model.proxy_init")
    if record.head == "cgd":
        one_of(c.model.combine, COMBINES, "model.combine")
        one_of(c.model.architecture, ARCHITECTURES, "model.architecture")
        parse_descriptors(c.model.descriptors, c.model.embedding_dim, c.model.combine)
    if record.hierarchical:
        one_of(c.loss.coarse_proxies, COARSE_PROXIES, "loss.coarse_proxies")
        levels = len(tuple(c.loss.num_coarse_groups)) + 1
        # With coarse_from_labels the taxonomy's depth sets the levels: checked once it is read.
        if not c.loss.coarse_from_labels and len(tuple(c.loss.level_weights)) != levels:
            raise ConfigError(
                f"loss.level_weights has {len(tuple(c.loss.level_weights))} entries for {levels} proxy levels "
                f"(1 fine + {levels - 1} coarse from loss.num_coarse_groups); give one weight per level."
            )
    _validate_loss_keywords(c, record)
    _validate_geometry(c, record)
    if c.sampler in _CLASS_SAMPLERS and c.batch_size != c.classes_per_batch * c.samples_per_class:
        raise ConfigError(
            f"batch_size {c.batch_size} must equal classes_per_batch × samples_per_class = "
            f"{c.classes_per_batch} × {c.samples_per_class} with sampler={c.sampler!r}."
        )
    for name in (
        "batch_size",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        if int(c[name]) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {c[name]}.")
    for name in ("num_workers", "num_threads"):
        if int(c.dataset[name]) < 0:
            raise ConfigError(f"dataset.{name} must be 0 or more, got {c.dataset[name]}.")
    if c.num_steps <= 0 and c.num_epochs <= 0:
        raise ConfigError("set num_epochs or num_steps to a positive number.")
    if c.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {c.optimizer.lr}.")
    one_of(c.best_metric, BEST_METRICS, "best_metric")
    if c.mlrc.enabled:
        if "mlrc" not in record.protocols:
            taking_part = [m.name for m in methods.registered() if "mlrc" in m.protocols]
            raise ConfigError(
                f"method {c.method!r} is not part of the MLRC comparison (its recipe replaces the "
                f"network and head); MLRC configs take the other methods: {', '.join(taking_part)}."
            )
        if c.mlrc.num_folds < 2 or not -1 <= c.mlrc.fold < c.mlrc.num_folds:
            raise ConfigError(
                f"mlrc.num_folds must be >= 2 and mlrc.fold in [-1, {c.mlrc.num_folds}) (-1: all folds), "
                f"got num_folds {c.mlrc.num_folds}, fold {c.mlrc.fold}."
            )
    if c.steps_per_epoch < 0 or c.early_stopping_patience_epochs < 0:
        raise ConfigError(
            f"steps_per_epoch ({c.steps_per_epoch}) and early_stopping_patience_epochs "
            f"({c.early_stopping_patience_epochs}) must be >= 0 (0: off)."
        )
    if c.early_stopping_patience_epochs and not c.eval_every_epochs:
        raise ConfigError(
            "early_stopping_patience_epochs needs evaluations during training: set eval_every_epochs > 0."
        )
    if c.eval_every_epochs < 0:
        raise ConfigError(f"eval_every_epochs must be >= 0 (0: only at the end), got {c.eval_every_epochs}.")
