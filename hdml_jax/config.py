"""Configuration: the methods, their published recipes, and up-front validation.

A config file in ``configs/`` calls ``base_config(dataset, method)`` and overrides what its data
set needs. The method is picked on the command line big_vision style::

    python -m hdml_jax.main --config configs/cars.py:method=hpl_pa --config.optimizer.lr=2e-4

Methods and what they set (reference.md §1–2):

=============  =====================================================================
proxy_anchor   GAP+GMP → Dense → L2; Proxy-Anchor (α=32, δ=0.1); AdamW 1e-4, wd 1e-4,
               proxies ×100; warm-up epochs train only head + proxies; bn_freeze;
               grad clip (value) 10; step decay.
proxy_nca      same network and recipe; Proxy-NCA softmax form with σ = 32.
proxy_nca_pp   ProxyNCA++: σ = 9, proxies randn/8, Adam eps 1.0 on the proxies.
hpl_pa         Proxy-Anchor inside HPL: levels (C, num_coarse_groups), w = (1.0, 0.1);
               coarse proxies by k-means after warm-up, assignments refreshed.
hpl_nca        the same around Proxy-NCA (σ = 32).
cgd            ResNet without stage-4 downsampling; CGD head (descriptors, 1536-d);
               CE (τ = 0.5, ε = 0.1) on the first descriptor + batch-hard triplet
               (m = 0.1); Adam 1e-4; P×K batches (32 × 4).
=============  =====================================================================
"""

from __future__ import annotations

import ml_collections

from hdml_jax.models.heads import ARCHITECTURES, COMBINES, parse_descriptors

METHODS = ("proxy_anchor", "proxy_nca", "proxy_nca_pp", "hpl_pa", "hpl_nca", "cgd")
PROXY_METHODS = ("proxy_anchor", "proxy_nca", "proxy_nca_pp", "hpl_pa", "hpl_nca")
HIERARCHICAL_METHODS = ("hpl_pa", "hpl_nca")
DATASET_NAMES = ("synthetic", "cub200", "cars196", "sop", "inshop")
TRANSFORMS = ("proxy_anchor", "cgd", "mlrc", "synthetic")
OPTIMIZERS = ("adamw", "adam", "sgd")
DTYPES = ("float32", "bfloat16")


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"method=hpl_pa,seed=3"`` or just ``"hpl_pa"`` → ``{"method": "hpl_pa", "seed": "3"}``."""
    result: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if sep:
            result[key.strip()] = value.strip()
        else:
            result["method"] = key.strip()
    return result


def base_config(dataset: str, method: str) -> ml_collections.ConfigDict:
    """The defaults shared by every data set, with ``method``'s published recipe applied."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.workdir = ""  # set by --workdir; empty: runs/<dataset>_<method>
    c.eval_only = False
    # Split the fine proxies and their optimizer state over the devices along the class axis
    # (for 10^5-10^6 classes; see hdml_jax.parallel). Off: every device holds all of them.
    c.shard_proxies = False

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = dataset
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.dataset.crop_to_bbox = False
    c.dataset.image_size = 224
    c.dataset.transform = "proxy_anchor"
    c.dataset.num_workers = 0

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50
    c.model.width = 64
    c.model.last_stride = 2
    c.model.frozen_bn = True
    c.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision (params stay fp32)
    c.model.pretrained = ml_collections.FieldReference(None, field_type=str)  # from hdml_jax.models.convert
    c.model.embedding_dim = 512
    c.model.pooling = "gap_gmp"
    c.model.descriptors = "SG"
    c.model.combine = "concat"
    c.model.architecture = "cgd"
    c.model.gem_p = 3.0
    c.model.proxy_init = "kaiming_fan_out"

    c.loss = ml_collections.ConfigDict()
    c.loss.margin = 0.1  # Proxy-Anchor δ
    c.loss.alpha = 32.0  # Proxy-Anchor α
    c.loss.scale = 32.0  # Proxy-NCA σ
    c.loss.level_weights = (1.0, 0.1)
    c.loss.num_coarse_groups = (0,)  # 0: about C / 8 groups, decided when the data set is known
    c.loss.hierarchy_build_epoch = 1  # k-means over the fine proxies at the start of this epoch
    c.loss.hierarchy_refresh_epochs = 5  # 0: never refresh the class → group assignments
    c.loss.coarse_from_labels = False  # use the data set's coarse labels instead of k-means
    c.loss.temperature = 0.5  # CGD classifier τ
    c.loss.label_smoothing = 0.1  # CGD classifier ε
    c.loss.triplet_margin = 0.1  # CGD batch-hard triplet margin
    c.loss.classification_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.eps = 1e-8
    c.optimizer.proxy_lr_multiplier = 100.0
    c.optimizer.proxy_eps = ml_collections.FieldReference(None, field_type=float)  # ProxyNCA++: 1.0
    c.optimizer.head_lr_multiplier = 1.0
    c.optimizer.backbone_lr_multiplier = 1.0
    c.optimizer.warmup_epochs = 1  # backbone frozen: only head and proxies train
    c.optimizer.decay_epochs = (
        10,
    )  # step decay at these epochs (repeating every last-gap epochs if decay_every)
    c.optimizer.decay_every = True  # StepLR: decay at every multiple of decay_epochs[0]
    c.optimizer.decay_factor = 0.5
    c.optimizer.grad_clip_value = 10.0  # element-wise clip (the authors: clip_grad_value_); 0: off

    c.batch_size = 180
    c.sampler = "shuffle"  # or "pk"
    c.classes_per_batch = 32  # P (sampler="pk")
    c.samples_per_class = 4  # K (sampler="pk")
    c.num_epochs = 40
    c.num_steps = 0  # > 0 overrides num_epochs
    c.stop_after_steps = 0  # > 0: save and stop after this many steps of this run (time-limited jobs)

    c.eval_every_epochs = 5
    c.eval_batch_size = 256
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.nmi = True
    c.pictures = True
    c.tsne_max_points = 2000

    apply_method(c, method)
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    """Overwrite ``c`` with ``method``'s recipe (reference.md)."""
    c.method = method  # an unknown name is reported by validate(), after flag parsing, in one line
    if method in ("proxy_nca", "hpl_nca"):
        c.loss.scale = 32.0
    if method == "proxy_nca_pp":
        c.loss.scale = 9.0
        c.model.proxy_init = "normal_over_8"
        c.optimizer.name = "adam"
        c.optimizer.proxy_eps = 1.0
    if method == "cgd":
        c.model.last_stride = 1
        c.model.frozen_bn = False
        c.model.embedding_dim = 1536
        c.model.descriptors = "SG"
        c.dataset.transform = "cgd"
        c.optimizer.name = "adam"
        c.optimizer.weight_decay = 0.0
        c.optimizer.warmup_epochs = 0
        c.optimizer.grad_clip_value = 0.0
        c.optimizer.decay_factor = 0.1
        c.sampler = "pk"
        c.classes_per_batch = 32
        c.samples_per_class = 4
        c.batch_size = 128


def validate(c: ml_collections.ConfigDict) -> None:
    """Check a config before anything is built; one-line errors listing the valid values."""

    def one_of(value, valid, what):
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}.")

    one_of(c.method, METHODS, "method")
    one_of(c.dataset.name, DATASET_NAMES, "dataset")
    one_of(c.dataset.transform, TRANSFORMS, "transform")
    one_of(c.optimizer.name, OPTIMIZERS, "optimizer")
    one_of(c.model.dtype, DTYPES, "model.dtype")
    one_of(c.model.depth, (18, 34, 50, 101), "model.depth")
    one_of(c.model.last_stride, (1, 2), "model.last_stride")
    one_of(c.sampler, ("pk", "shuffle"), "sampler")
    if c.method == "cgd":
        one_of(c.model.combine, COMBINES, "model.combine")
        one_of(c.model.architecture, ARCHITECTURES, "model.architecture")
        parse_descriptors(c.model.descriptors, c.model.embedding_dim, c.model.combine)
    if c.method in HIERARCHICAL_METHODS:
        levels = len(tuple(c.loss.num_coarse_groups)) + 1
        if len(tuple(c.loss.level_weights)) != levels:
            raise ValueError(
                f"loss.level_weights has {len(tuple(c.loss.level_weights))} entries for {levels} proxy levels "
                f"(1 fine + {levels - 1} coarse from loss.num_coarse_groups); give one weight per level."
            )
    if c.sampler == "pk" and c.batch_size != c.classes_per_batch * c.samples_per_class:
        raise ValueError(
            f"batch_size {c.batch_size} must equal classes_per_batch × samples_per_class = "
            f"{c.classes_per_batch} × {c.samples_per_class} with sampler='pk'."
        )
    for name in (
        "batch_size",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        if int(c[name]) < 1:
            raise ValueError(f"{name} must be a positive integer, got {c[name]}.")
    if c.num_steps <= 0 and c.num_epochs <= 0:
        raise ValueError("set num_epochs or num_steps to a positive number.")
    if c.optimizer.lr <= 0:
        raise ValueError(f"optimizer.lr must be positive, got {c.optimizer.lr}.")
