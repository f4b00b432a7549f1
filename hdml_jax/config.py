"""Configuration: the methods and their published recipes (validation: ``config_checks``).

A config file in ``configs/`` calls ``base_config(dataset, method)`` and overrides what its data
set needs. The method is picked on the command line big_vision style::

    python -m hdml_jax.main --config configs/cars.py:method=hpl_pa --config.optimizer.lr=2e-4

Methods and their recipes (each method's record in ``hdml_jax.methods`` cites the official code
line by line; the data-set configs set the per-data-set numbers of the official commands):

=============  =====================================================================
proxy_anchor   GAP+GMP → Dense → L2; Proxy-Anchor (α=32, δ=0.1); AdamW 1e-4, wd 1e-4,
               proxies ×100, clipped too; warm-up trains only head + proxies; bn_freeze
               (statistics frozen all run, affine frozen during warm-up); grad clip
               (value) 10; StepLR per epoch; evaluation after every epoch.
proxy_nca      same network and recipe; Proxy-NCA softmax form with σ = 32, proxies at
               the base lr, N(0, 1) init, not clipped (the Proxy-Anchor repo's baseline).
proxy_nca_pp   ProxyNCA++: MAC + LayerNorm → Dense(2048); σ = 9, proxies randn/8; Adam
               lr 4e-3, ε = 1 on every group, no weight decay, proxies at 400; 5 warm-up
               epochs, then fresh optimizer state; P×K 8 × 4; BN not frozen.
hpl_pa         Proxy-Anchor inside HPL: levels (C, num_coarse_groups), w = (1.0, 0.1);
               coarse proxies by k-means when warm-up ends, assignments refreshed.
hpl_nca        the same around Proxy-NCA (σ = 32).
hyp            Hyp: Linear → ToPoincare (c = 0.1, clip 2.3, no Riemannian rescaling);
               cross-entropy over the Poincaré distances of each class's views (τ 0.2);
               one AdamW group, wd 0.01, global-norm clip 3; P classes × K per batch;
               its README's ViT commands (``hdml_jax.methods.hyp``).
hier_pa        HIER: LayerNorm → Dense → ToPoincare (c = 0.1, clip 2.3); Proxy-Anchor on
               the points' directions + 0.5 · HIER over 512 learned LCA proxies; AdamW
               ε 1e-4, proxies ×1e4, LCAs ×50, ±10 clamp; 90 classes × 2 per batch;
               ranked by the Poincaré distance (``hdml_jax.methods.hier``).
cgd            ResNet without stage-4 downsampling; CGD head (descriptors, 1536-d);
               CE (τ = 0.5, ε = 0.1) on the first descriptor + batch-hard triplet
               (m = 0.1); Adam 1e-4; P×K batches (32 × 4).
baselines      pytorch-metric-learning's pair and classification losses (contrastive,
               triplet_margin, multi_similarity, margin, ntxent, lifted_structure,
               circle, normalized_softmax, cosface, arcface, soft_triple, and HPL around
               the first three classification ones): MLRC's best loss hyper-parameters
               on the Proxy-Anchor recipe (``hdml_jax.methods.baselines``).
=============  =====================================================================
"""

from __future__ import annotations

__all__ = [
    "apply_hier_resnet_command",
    "apply_hier_vit_command",
    "apply_method",
    "apply_proxy_anchor_command",
    "apply_proxynca_pp_config",
    "apply_small_cpu_recipe",
    "base_config",
    "default_loader_threads",
    "parse_arg",
    "unused_overrides",
    "use_backbone",
    "validate",
]

import os

import ml_collections

from hdml_jax import methods
from hdml_jax.config_checks import method_family, one_of, unused_overrides, validate
from hdml_jax.config_vit import (
    apply_hier_resnet_command,
    apply_hier_vit_command,
    apply_hyp_vit_command,
    use_vit_weights,
)
from hdml_jax.errors import ConfigError
from hdml_jax.methods import baselines
from hdml_jax.models.vit_weights import VIT_WEIGHTS

# A data-set config's ``backbone=`` values: the two CNNs and the published ViT weights.
BACKBONE_OPTIONS = ("resnet", "bn_inception", *VIT_WEIGHTS)


def parse_arg(arg: str | None, keys: tuple[str, ...] = ("method",)) -> dict[str, str]:
    """``"method=hpl_pa,seed=3"`` or just ``"hpl_pa"`` → ``{"method": "hpl_pa", "seed": "3"}``.

    ``keys`` are the options the config file understands after its colon; any other key is an
    error (a misspelt ``methd=hpl_pa`` must not silently run the default method).
    """
    result: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if sep:
            result[key.strip()] = value.strip()
        else:
            result["method"] = key.strip()
    unknown = sorted(set(result) - set(keys))
    if unknown:
        raise ConfigError(
            f"unknown option {', '.join(map(repr, unknown))} after the config file's colon; valid: "
            f"{', '.join(keys)} (e.g. configs/cub.py:method=hpl_pa). Other fields are set with "
            "--config.FIELD=VALUE."
        )
    return result


def default_loader_threads() -> int:
    """Half the CPUs this process may run on, from 1 to 8: the other half is left to the
    training step's host work (and, on a CPU, to XLA). One thread prepares about 1,000 CUB-sized
    images a second (``benchmarks/input.py``); more than 8 are worth setting by hand only for
    several accelerators fed by one process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


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
    # What the training transform does besides its crop (hdml_jax.data.transforms.Augmentation):
    # every preset flips horizontally and does nothing else; None crop fields are the preset's
    # own (RandomResizedCrop scale 0.08-1 and ratio 3/4-4/3; MLRC's 0.16-1, 0.75-1.33; the
    # synthetic pad-and-crop's size/8 px).
    c.dataset.augment = ml_collections.ConfigDict()
    c.dataset.augment.horizontal_flip = True  # off for text, digits, logos, arrows
    c.dataset.augment.vertical_flip = False
    c.dataset.augment.crop_scale = ml_collections.config_dict.placeholder(tuple)
    c.dataset.augment.crop_ratio = ml_collections.config_dict.placeholder(tuple)
    c.dataset.augment.crop_padding = ml_collections.config_dict.placeholder(int)
    c.dataset.augment.brightness = 0.0  # ColorJitter's four, 0 = off
    c.dataset.augment.contrast = 0.0
    c.dataset.augment.saturation = 0.0
    c.dataset.augment.hue = 0.0
    c.dataset.augment.grayscale = 0.0  # probability
    c.dataset.augment.rotation = 0.0  # degrees, ±
    # Batches are prepared by num_workers processes, or (num_workers = 0) by num_threads threads
    # of this process; JPEG decode and resize release the GIL, so threads scale with the cores
    # without the processes' start-up and copies (benchmarks/input.py). Same batches either way.
    c.dataset.num_workers = 0
    c.dataset.num_threads = default_loader_threads()

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet"  # "bn_inception" or "vit" (then depth/width/last_stride do not apply)
    c.model.depth = 50
    c.model.width = 64
    c.model.last_stride = 2
    c.model.frozen_bn = True
    # With frozen_bn and no warm-up: do BatchNorm's scale/bias still train? False: Proxy-Anchor's
    # bn_freeze (requires_grad=False); True: PML's freeze_trunk_batchnorm (eval mode only: MLRC).
    c.model.frozen_bn_trains_affine = False
    c.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision (params stay fp32)
    # ImageNet weights: "torchvision" (ResNet) or "bninception" (BN-Inception, Cadene's), each
    # downloaded once into $HDML_JAX_CACHE, converted and reused; a directory written by
    # `python -m hdml_jax.models.convert`; or "none" (train from scratch).
    c.model.pretrained = "torchvision"
    c.model.embedding_dim = 512
    c.model.pooling = "gap_gmp"
    c.model.embedding_init = "kaiming_fan_out"  # "torch_default" (nn.Linear's own), "orthogonal"
    c.model.head_layernorm = False  # LayerNorm (no affine) before the embedding layer: HIER's use_lastnorm
    # The embedding's geometry: 0 the unit sphere (L2, ranked by cosine); c > 0 the Poincaré ball
    # of curvature c (the head ends in ToPoincare, ranked by the Poincaré distance: Hyp, HIER).
    c.model.curvature = 0.0
    c.model.clip_r = 2.3  # ToPoincare's feature clipping radius (Hyp and HIER: 2.3)
    c.model.riemannian = True  # ToPoincare's gradient rescaling (HIER: True; hyp_metric: False)
    c.model.descriptors = "SG"
    c.model.combine = "concat"
    c.model.architecture = "cgd"
    c.model.gem_p = 3.0  # GeM's p: CGD fixes it at 3 (CGD-port model.py:17, 62-67)
    c.model.learnable_gem_p = False  # True: p is a parameter of the head (trains with it)
    c.model.proxy_init = "kaiming_fan_out"
    # The Vision Transformer (model.backbone="vit"; hdml_jax.models.vit). Named ViT weights
    # (model.pretrained="vit_s16_dino", ...: hdml_jax.models.vit_weights) need their own values,
    # which a data-set config's backbone= option sets.
    c.model.vit = ml_collections.ConfigDict()
    c.model.vit.size = "small"  # "tiny" (192 wide, 3 heads), "small" (384, 6), "base" (768, 12)
    c.model.vit.depth = ml_collections.config_dict.placeholder(int)  # blocks; None: the size's 12
    c.model.vit.patch_size = 16
    # The image size the position embeddings are for (the weights': 224); other sizes resize them.
    c.model.vit.position_grid_size = 224
    c.model.vit.distilled = False  # DeiT's distillation token
    c.model.vit.pooling = "cls"  # "cls", "mean" (patch tokens), "cls+dist" or "deit" (DeiT-distilled)
    c.model.vit.final_norm = True  # the ViT's last LayerNorm (every published ViT has it)
    c.model.vit.layer_scale = ml_collections.config_dict.placeholder(float)  # LayerScale's γ₀; None: none
    c.model.vit.drop_path = 0.0  # stochastic depth of the last block (0 in every recipe)
    c.model.vit.position_interpolation = "dino"  # or "timm": how pos_embed is resized off 224 px
    c.model.vit.preprocessing = "vit"  # "vit" (ImageNet mean/std) or "vit_augreg" (0.5/0.5)
    c.model.vit.freeze_patch_embed = False  # the patch embedding never trains (HIER's, Hyp's freeze(body, 0))

    c.loss = ml_collections.ConfigDict()
    c.loss.margin = 0.1  # Proxy-Anchor δ
    c.loss.alpha = 32.0  # Proxy-Anchor α
    c.loss.scale = 32.0  # Proxy-NCA σ
    c.loss.level_weights = (1.0, 0.1)
    c.loss.num_coarse_groups = (0,)  # 0: about C / 8 groups, decided when the data set is known
    # HPL has no official code: when the hierarchy is built and how often the class → group
    # assignments are refreshed are our choices (reference.md §1, unconfirmed).
    # -1: k-means over the fine proxies when warm-up ends (at the earliest after epoch 1: over
    # randomly initialised proxies it would group nothing); >= 1: at the start of that epoch.
    c.loss.hierarchy_build_epoch = -1
    c.loss.hierarchy_refresh_epochs = 5  # 0: never refresh the class → group assignments
    c.loss.coarse_from_labels = False  # use the data set's coarse labels instead of k-means
    # "learned": coarse proxies are parameters initialised at the k-means centroids; "centroids":
    # recomputed at every step as the means of their groups' (normalised) fine proxies.
    c.loss.coarse_proxies = "learned"
    c.loss.kmeans_normalize = True  # k-means and refreshes on L2-normalised proxies (False: raw)
    c.loss.temperature = 0.5  # CGD classifier τ
    c.loss.label_smoothing = 0.1  # CGD classifier ε
    c.loss.triplet_margin = 0.1  # CGD batch-hard triplet margin
    c.loss.classification_weight = 1.0
    # The baselines (hdml_jax.methods.baselines): the loss's keywords under PML's names, a miner for the
    # pair losses and its keywords, and a cross-batch memory of xbm_size embeddings (0: none).
    c.loss.kwargs = ml_collections.ConfigDict()
    c.loss.miner = "none"
    c.loss.miner_kwargs = ml_collections.ConfigDict()
    c.loss.xbm_size = 0
    # HIER (Kim et al., CVPR 2023) around the proxy loss: λ₂ · HIER's LCA triplet loss added.
    c.loss.hier = ml_collections.ConfigDict()
    c.loss.hier.weight = 0.5  # λ₂ (--lambda2)
    c.loss.hier.num_lcas = 512  # --num_hproxies
    c.loss.hier.topk = 20  # --topk: the reciprocal-neighbour candidates
    c.loss.hier.margin = 0.1  # --mrg
    c.loss.hier.tau = 0.1  # the hard Gumbel-softmax's temperature (HIERLoss default)
    c.loss.hier.triplets_per_anchor = 50  # t_per_anchor

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # rmsprop's momentum (sgd: Nesterov 0.9, fixed)
    c.optimizer.proxy_lr_multiplier = 100.0
    c.optimizer.proxy_eps = ml_collections.FieldReference(None, field_type=float)  # ProxyNCA++: 1.0
    # An absolute rate for the proxies (the baselines' class weights), instead of the multiplier.
    c.optimizer.proxy_lr = ml_collections.FieldReference(None, field_type=float)
    # The loss's own parameters (the margin loss's β): absolute rate (None: lr) and weight decay
    # (None: weight_decay).
    c.optimizer.loss_params_lr = ml_collections.FieldReference(None, field_type=float)
    c.optimizer.loss_params_weight_decay = ml_collections.FieldReference(None, field_type=float)
    c.optimizer.lca_lr_multiplier = 50.0  # HIER's LCAs: lr × 50 (the loss_params group)
    c.optimizer.head_lr_multiplier = 1.0
    c.optimizer.backbone_lr_multiplier = 1.0
    c.optimizer.warmup_epochs = 1  # backbone frozen: only head and proxies train (hdml_jax.training.optim)
    # "freeze" (requires_grad=False: no optimizer state moves) or "zero_lr" (HIER: the backbone's
    # group at learning rate 0, its Adam moments accumulating).
    c.optimizer.warmup = "freeze"
    # > 0: lr is for this global batch and scales linearly with batch_size (HIER: 180); 0: as given.
    c.optimizer.lr_reference_batch = 0
    c.optimizer.decay_epochs = (10,)  # ×decay_factor at these epochs (every decay_epochs[0] if decay_every)
    c.optimizer.decay_every = True  # StepLR: decay at every multiple of decay_epochs[0]
    c.optimizer.decay_steps = ()  # absolute steps instead of epochs (CGD: 400, 800)
    c.optimizer.decay_factor = 0.5
    c.optimizer.grad_clip_value = 10.0  # element-wise clip (the authors: clip_grad_value_); 0: off
    c.optimizer.grad_clip_norm = 0.0  # then a global L2-norm clip (clip_grad_norm_, Hyp: 3); 0: off
    c.optimizer.clip_proxies = True  # Proxy-Anchor clips its proxies too; Proxy-NCA(++) does not
    # ProxyNCA++ warms up with an optimizer of its own and then starts a new one: every group's
    # state (moments, step count) starts afresh when warm-up ends.
    c.optimizer.fresh_state_after_warmup = False

    c.batch_size = 180
    c.sampler = "shuffle"  # "pk" (P classes × K images, a pass over the classes) or "unique_class" (HIER's)
    c.classes_per_batch = 32  # P (sampler="pk" or "unique_class")
    c.samples_per_class = 4  # K (sampler="pk" or "unique_class")
    c.num_epochs = 40
    c.num_steps = 0  # > 0 overrides num_epochs
    # > 0: an "epoch" (for num_epochs, schedules, evaluation, patience) is this many steps (MLRC:
    # 100 iterations); 0: one pass over the training set.
    c.steps_per_epoch = 0
    c.stop_after_steps = 0  # > 0: save and stop after this many steps of this run (time-limited jobs)

    c.eval_every_epochs = 1  # the official scripts evaluate after every epoch
    c.eval_at_start = False  # also evaluate the untrained model at step 0 (MLRC does)
    # > 0: stop training once the best evaluation (best_metric) is more than this many epochs
    # older than the latest one (MLRC's patience); 0: train for num_epochs.
    c.early_stopping_patience_epochs = 0
    c.eval_batch_size = 256
    # True: the retrieval metrics split the reference set (gallery) over this process's devices,
    # each holding 1/D of it (galleries too large for one device's memory; the same results,
    # exactly). False: one device holds the whole reference set.
    c.eval_shard_references = False
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2  # the last N checkpoints; the best by best_metric is kept too
    c.best_metric = "recall@1"  # which evaluation is "best" (final_metrics.json's best, kept checkpoint)
    c.nmi = True
    # The MLRC protocol (hdml_jax.protocols.mlrc; configs/mlrc/*.py set it up): 4-fold cross-validation
    # on the first half of the classes, test on the second. fold -1: every fold in turn, then
    # the test; F: only fold F (one job per fold, then python -m hdml_jax.mlrc_report).
    c.mlrc = ml_collections.ConfigDict()
    c.mlrc.enabled = False
    c.mlrc.num_folds = 4
    c.mlrc.fold = -1
    c.pictures = True
    c.tsne_max_points = 2000

    apply_method(c, method)
    return c


def apply_method(c: ml_collections.ConfigDict, method: str) -> None:
    """Overwrite ``c`` with ``method``'s recipe (``Method.recipe``; every number cites its source).

    The base config is Proxy-Anchor's recipe; each method's record changes what differs from it
    (``hdml_jax.methods``). The data-set configs set the per-data-set numbers.
    """
    c.method = method  # an unknown name is reported by validate(), after flag parsing, in one line
    record = methods.find(method)
    if record is not None:
        record.recipe(c)


def apply_small_cpu_recipe(c: ml_collections.ConfigDict, image_size: int) -> None:
    """The generated data sets' shared recipe (``configs/synthetic*.py``): a small ResNet-18 (width
    16) from scratch on ``image_size``-px images, sized for a CPU. Our choices, from no paper.

    Without ImageNet weights BatchNorm must learn its statistics (``frozen_bn=False``) and there
    is no warm-up, so HPL builds its hierarchy after the first epoch.
    """
    c.model.pretrained = "none"  # from scratch: ImageNet features do not fit small rendered shapes
    c.dataset.image_size = image_size
    c.dataset.transform = "synthetic"
    c.model.depth = 18
    c.model.width = 16
    c.model.frozen_bn = False
    record = methods.find(c.method)
    # CGD's descriptors split the embedding: 48 divides among 1, 2 or 3 of them.
    c.model.embedding_dim = 48 if record is not None and record.head == "cgd" else 64
    c.optimizer.warmup_epochs = 0
    c.optimizer.lr = 1e-3
    c.optimizer.decay_every = False
    c.optimizer.grad_clip_value = 0.0
    c.loss.hierarchy_build_epoch = 1  # no warm-up here: k-means after the first epoch
    c.loss.hierarchy_refresh_epochs = 2
    c.batch_size = 64
    baselines.use_pk_batches(c)
    if method_family(c) == "hier":
        # HIER's method (its head, loss, LCAs and its batches of classes × 2) on this recipe's
        # training: lr as given, proxies at Proxy-Anchor's ×100, so that it differs from the
        # Proxy-Anchor family here only by what HIER adds.
        c.classes_per_batch, c.samples_per_class = c.batch_size // 2, 2
        c.optimizer.lr_reference_batch = 0
        c.optimizer.proxy_lr_multiplier = 100.0


def apply_proxy_anchor_command(
    c: ml_collections.ConfigDict,
    *,
    batch_size: int,
    lr: float,
    warm: int,
    bn_freeze: bool,
    lr_decay_step: int,
    lr_decay_gamma: float = 0.5,
    epochs: int = 60,
) -> None:
    """The flags of an official Proxy-Anchor training command, for the methods trained with it.

    Defaults are PA ``train.py``'s (``--lr-decay-gamma`` 0.5, l.72-74; ``--epochs`` 60, l.43-46);
    no README command passes ``--IPC``, so batches are shuffled (l.141-150). Other methods keep
    their own recipe.
    """
    if method_family(c) != "proxy_anchor":
        return
    c.batch_size = batch_size
    c.optimizer.lr = lr
    c.optimizer.warmup_epochs = warm
    c.model.frozen_bn = bn_freeze
    c.optimizer.decay_epochs = (lr_decay_step,)
    c.optimizer.decay_every = True  # StepLR(step_size=lr_decay_step)
    c.optimizer.decay_factor = lr_decay_gamma
    c.num_epochs = epochs
    c.sampler = "shuffle"
    baselines.use_pk_batches(c)  # the pair losses: P×K batches of the same size


def use_backbone(c: ml_collections.ConfigDict, backbone: str, hier_dataset: str | None = None) -> None:
    """A data-set config's ``backbone=`` option: ``resnet`` (ResNet-50, torchvision's weights),
    ``bn_inception`` (BN-Inception, Cadene's weights, what Proxy-Anchor's BN-Inception commands
    train) or one of the published ViT weights (``VIT_WEIGHTS``: ``vit_s16_dino``,
    ``deit_s16_distilled``, ``vit_s16_augreg``, ...; ``use_vit_weights``), which then train with
    HIER's command for ``hier_dataset`` (``config_vit.apply_hier_vit_command``: "CUB", "Cars",
    "SOP", "Inshop"). HIER's own methods (``hier_pa``) take HIER's ResNet-50 command for
    ``hier_dataset`` on ResNet-50 (``config_vit.apply_hier_resnet_command``). CGD and ProxyNCA++
    are defined on ResNet-50 only."""
    one_of(backbone, BACKBONE_OPTIONS, "backbone (after the config file's colon)")
    if hier_dataset is not None and method_family(c) == "hyp" and backbone not in VIT_WEIGHTS:
        raise ConfigError(
            f"method {c.method}: hyp_metric's commands train the ViTs (README.md:31-49); add "
            f"backbone=vit_s16_dino, deit_s16_distilled or vit_s16_augreg, not {backbone}."
        )
    if backbone == "resnet":
        if hier_dataset is not None and method_family(c) == "hier":
            apply_hier_resnet_command(c, hier_dataset)
        return
    family = "vit" if backbone in VIT_WEIGHTS else backbone
    record = methods.find(c.method)
    if record is not None and family not in record.backbones:
        raise ConfigError(
            f"backbone={backbone}: {c.method}'s recipe is defined on ResNet-50 (its last stride, "
            "its pooling); use it with the Proxy-Anchor family or a baseline."
        )
    if family == "vit":
        use_vit_weights(c, backbone)
        if hier_dataset is not None and method_family(c) == "hyp":
            apply_hyp_vit_command(c, hier_dataset, backbone)
        elif hier_dataset is not None:
            apply_hier_vit_command(c, hier_dataset, backbone)
        return
    c.model.backbone = "bn_inception"
    c.model.pretrained = "bninception"


def apply_proxynca_pp_config(
    c: ml_collections.ConfigDict,
    *,
    lr: float,
    proxy_lr: float,
    classes_per_batch: int,
    samples_per_class: int,
    epochs: int,
) -> None:
    """A ProxyNCA++ ``config/<dataset>.json``'s numbers (``epochs`` includes the 5 warm-up epochs)."""
    if method_family(c) != "proxynca_pp":
        return
    c.optimizer.lr = lr
    c.optimizer.proxy_lr_multiplier = proxy_lr / lr
    c.classes_per_batch, c.samples_per_class = classes_per_batch, samples_per_class
    c.batch_size = classes_per_batch * samples_per_class
    c.num_epochs = epochs


