"""HIER's official training commands: on a ViT, Euclidean, for every method a ViT can run; on
ResNet-50 (and on the ViTs with its hyperbolic part) for HIER's own method, ``hier_pa``.

``configs/<dataset>.py:method=M,backbone=W`` with ``W`` one of the published ViT weights
(``vit_s16_dino``, ``deit_s16_distilled``, ``vit_s16_augreg``, ...) calls ``apply_hier_vit_command``:
HIER's script for that backbone and data set (tjddus9597/HIER-CVPR23 at 3986a74,
``scripts/{DINO,Deit,ViT}/hier_<DS>.sh``, lines 4-12 of each) with its hyperbolic part switched
off (``--hyp_c 0 --lambda2 0``). That leaves Proxy-Anchor trained exactly as HIER trains it, the
pairing HIER's code is built around; every other method allowed on a ViT keeps its own loss and
takes the same training. Citations below are ``file:line`` in that commit.

What the scripts and ``hier/train.py`` do, and where each number is set here:

* **Batches**: ``--batch_size 90`` per GPU × 2 GPUs (``--nproc_per_node=2``, script line 3) with
  ``--IPC 2``: ``UniqueClassSampler`` (sampler.py:60-111, train.py:245) draws 90 classes anew for
  every global batch of 180, 2 images each with replacement; an epoch is ``N // 180`` batches.
  → ``sampler="unique_class"``, P = 90, K = 2.
* **Learning rate**: ``--lr`` scaled as ``args.lr * (batch_size * world_size) / 180.``
  (train.py:132) → ``optimizer.lr_reference_batch = 180``; constant, no decay (no ``--lr_decay``:
  ``step_scheduler(epochs, epochs, ..., gamma=1)``, train.py:290-291) → ``decay_epochs = ()``.
* **Warm-up**: for ``--warmup_epochs`` epochs the ``pretrained_params`` group has lr 0
  (train.py:136-139), a rate of 0 in a live AdamW group, not a frozen one → ``optimizer.warmup
  = "zero_lr"``.
* **Parameter groups** (utils.py:723-761): backbone ×1; the head (``last_layer``) ×
  ``--fc_lr_scale`` → ``head_lr_multiplier``; the loss's proxies ×1e4 → ``proxy_lr_multiplier``;
  every group decays by ``--weight_decay``, none exempt (no bias/norm rule, unlike DINO's).
  The patch embedding does not train (``freeze(body, 0)``, models/model.py:155-163) →
  ``model.vit.freeze_patch_embed``.
* **Optimizer**: ``torch.optim.AdamW(params_groups, eps=1e-4 if args.use_fp16 else 1e-8)``
  (train.py:271-273), every script passes ``--use_fp16 True`` → ε = 1e-4, betas (0.9, 0.999).
* **Clipping**: ``--clip_grad 1.0`` only switches it on: ``clip_gradients_value(model, 10, ...)``
  (train.py:164-177, utils.py:212-221) clamps every gradient element, the proxies' too, to ±10
  → ``grad_clip_value = 10``, ``clip_proxies``. (DINO's per-parameter norm clip,
  ``utils.clip_gradients``, is defined there but never called.)
* **Head**: ``nn.Sequential(LayerNorm(384, elementwise_affine=False), Linear(384, emb), NormLayer)``
  (models/model.py:103-132, ``--use_lastnorm True``; ``NormLayer`` when ``hyp_c`` is 0), the
  Linear orthogonally initialised with bias 0 (model.py:79-83) → ``model.head_layernorm``,
  ``embedding_init = "orthogonal"``; ``--emb`` → ``model.embedding_dim``.
* **Tokens**: the class token (``reset_classifier(0, 'token')``); DeiT-distilled under timm 0.4.12
  (HIER's pin, INSTALL.md:8) trains on the class token and evaluates on (class + dist) / 2 →
  ``model.vit.pooling = "deit"`` for those weights.
* **Crops**: ``RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=BICUBIC)`` + flip for every
  ViT (utils.py:104-118; ``--global_crops_scale`` is parsed but unused); test ``Resize(256,
  BICUBIC)`` + ``CenterCrop(224)`` (helpers.py:79-90). → ``transform="proxy_anchor"`` (resize 256,
  crop 224) with ``augment.crop_scale = (0.2, 1.0)``. **Not matched**: our one resize is Pillow's
  bilinear with antialiasing, HIER's is bicubic.
* **Inputs**: mean/std 0.5 for ``vit_*`` models, ImageNet's for DINO and DeiT (train.py:232-237),
  the weights' own conventions (``hdml_jax.models.vit_weights``).
* **Loss**: ``PALoss_Angle(nb_classes, sz_embed)`` at its defaults, δ = 0.1, α = 32
  (train.py:263, losses.py:211): the base config's.
* **Precision**: HIER trains under ``torch.cuda.amp`` (fp16). Ours is ``model.dtype`` (float32 by
  default; ``bfloat16`` on accelerators), a choice of the run, not the recipe.

Hyp (htdt/hyp_metric) trains differently (one AdamW group at wd 0.01, global-norm clip 3, a pass
over the classes per epoch, batch 900); its commands belong to its own loss (``method=hyp``).
"""

from __future__ import annotations

import ml_collections

from hdml_jax import methods
from hdml_jax.config_checks import one_of
from hdml_jax.models.vit_weights import VIT_WEIGHTS


def _hier_script(lr: float, epochs: int, warmup: int, weight_decay: float, fc_lr_scale: float, emb: int):
    return {
        "lr": lr,
        "epochs": epochs,
        "warmup_epochs": warmup,
        "weight_decay": weight_decay,
        "fc_lr_scale": fc_lr_scale,
        "emb": emb,
    }


# scripts/<folder>/hier_<DS>.sh, lines 4-12: --lr, --epochs, --warmup_epochs, --weight_decay,
# --fc_lr_scale (absent: 1, train.py:68), --emb.
HIER_SCRIPTS: dict[tuple[str, str], dict[str, float]] = {
    ("DINO", "CUB"): _hier_script(5e-6, 100, 1, 1e-2, 1.0, 128),
    ("DINO", "Cars"): _hier_script(5e-6, 100, 1, 1e-2, 1.0, 128),
    ("DINO", "SOP"): _hier_script(5e-6, 150, 5, 1e-4, 1e2, 128),
    ("DINO", "Inshop"): _hier_script(5e-6, 150, 5, 1e-4, 1e2, 128),
    ("Deit", "CUB"): _hier_script(1e-5, 100, 1, 1e-2, 1.0, 128),
    ("Deit", "Cars"): _hier_script(1e-5, 100, 1, 1e-2, 1.0, 128),
    ("Deit", "SOP"): _hier_script(1e-5, 150, 5, 1e-4, 1e2, 128),
    # Deit/hier_Inshop.sh:3 launches train.py rather than hier/train.py; the flags are the others'.
    ("Deit", "Inshop"): _hier_script(1e-5, 150, 5, 1e-4, 1e2, 128),
    ("ViT", "CUB"): _hier_script(1e-5, 100, 1, 1e-2, 1.0, 128),
    ("ViT", "Cars"): _hier_script(1e-5, 100, 1, 1e-2, 1.0, 128),
    ("ViT", "SOP"): _hier_script(1e-5, 150, 5, 1e-4, 1e2, 128),
    ("ViT", "Inshop"): _hier_script(1e-5, 150, 5, 1e-4, 1e2, 512),
}

# scripts/Resnet50/hier_<DS>.sh, lines 4-12: as above plus --lr_decay, --lr_decay_gamma
# (--bn_freeze is passed but always freezes; --fc_lr_scale 1 where given).
HIER_RESNET_SCRIPTS: dict[str, dict[str, float]] = {
    "CUB": {**_hier_script(1e-4, 100, 1, 1e-2, 1.0, 512), "lr_decay": 5, "lr_decay_gamma": 0.5},
    "Cars": {**_hier_script(1e-4, 100, 1, 1e-2, 1.0, 512), "lr_decay": 10, "lr_decay_gamma": 0.5},
    "SOP": {**_hier_script(6e-4, 150, 5, 1e-4, 1.0, 512), "lr_decay": 25, "lr_decay_gamma": 0.3},
    "Inshop": {**_hier_script(6e-4, 150, 5, 1e-4, 1.0, 512), "lr_decay": 20, "lr_decay_gamma": 0.3},
}

# Which script folder's command a weights name runs. HIER has scripts for ViT-S/16 only: the
# /8 and ViT-B DINO weights take the DINO-S/16 command (our extrapolation, not HIER's).
SCRIPT_FOLDER = {
    "vit_s16_dino": "DINO",
    "vit_s8_dino": "DINO",
    "vit_b16_dino": "DINO",
    "vit_b8_dino": "DINO",
    "deit_s16_distilled": "Deit",
    "vit_s16_augreg": "ViT",
}
DATASETS = ("CUB", "Cars", "SOP", "Inshop")

HIER_BATCH = 180  # --batch_size 90 × --nproc_per_node=2
HIER_IPC = 2  # --IPC 2
HIER_ADAMW_EPS = 1e-4  # eps=1e-4 if args.use_fp16 (train.py:272); every script --use_fp16 True
HIER_PROXY_LR_SCALE = 1e4  # "proxies" group lr_scale (utils.py:761)
HIER_LCA_LR_SCALE = 5e1  # "lcas" group lr_scale (utils.py:760)
HIER_CLIP_VALUE = 10.0  # clip_gradients_value(model, 10, ...) (train.py:166, 174)
HIER_CROP_SCALE = (0.2, 1.0)  # MultiTransforms, is_vit (utils.py:106-108)
HIER_RESNET_CROP_SCALE = (0.08, 1.0)  # the same line for a ResNet


def use_vit_weights(c: ml_collections.ConfigDict, name: str) -> None:
    """``model.backbone="vit"`` with the published weights ``name``: ``model.pretrained`` and the
    ``model.vit`` fields those weights need (``hdml_jax.models.vit_weights.VIT_WEIGHTS``), and
    ``model.pooling="none"`` (the ViT pools its own tokens)."""
    c.model.backbone = "vit"
    c.model.pretrained = name
    c.model.pooling = "none"
    for field, value in VIT_WEIGHTS[name].config_fields().items():
        c.model.vit[field] = value


def apply_hier_vit_command(c: ml_collections.ConfigDict, dataset: str, weights: str) -> None:
    """HIER's command for ``weights``'s backbone on ``dataset`` (``DATASETS``), Euclidean unless
    the method is HIER's own (``hier_pa``, whose recipe sets ``--hyp_c 0.1 --lambda2 0.5``); see
    the module docstring for where each number comes from. Call it after
    ``config.use_backbone(c, weights)`` (which checks that the method runs on a ViT and sets the
    weights)."""
    one_of(dataset, DATASETS, "HIER data set")
    one_of(weights, tuple(SCRIPT_FOLDER), "ViT weights")
    script = HIER_SCRIPTS[(SCRIPT_FOLDER[weights], dataset)]
    _apply_hier_training(c, script)
    c.model.vit.freeze_patch_embed = True
    c.model.frozen_bn = False  # no BatchNorm in a ViT; keeps the warm-up rule about BN out of it
    c.optimizer.decay_epochs = ()
    c.dataset.augment.crop_scale = HIER_CROP_SCALE


def apply_hier_resnet_command(c: ml_collections.ConfigDict, dataset: str) -> None:
    """HIER's ResNet-50 command on ``dataset`` (``scripts/Resnet50/hier_<DS>.sh``:4-12,
    ``HIER_RESNET_SCRIPTS``) for HIER's own methods (``hier_pa``); the other methods on ResNet-50
    keep their own papers' commands.

    As for the ViTs (module docstring) but: the torchvision ResNet-50 with GAP + GMP summed
    (hier/models/resnet.py:10-33), its BatchNorm frozen in every script (``--bn_freeze`` is
    ``type=bool``, so ``"False"`` is True too, train.py:81; resnet.py:17-20), crops of scale
    (0.08, 1) (utils.py:106-108, ``is_vit`` False), and a StepLR-like decay ``γ^(epoch //
    --lr_decay)`` (utils.py:281-287, train.py:288-289).
    """
    one_of(dataset, DATASETS, "HIER data set")
    script = HIER_RESNET_SCRIPTS[dataset]
    _apply_hier_training(c, script)
    c.model.pooling = "gap_gmp"
    # BatchNorm statistics frozen (m.eval(), resnet.py:17-20); its scale and bias still train.
    c.model.frozen_bn = True
    c.model.frozen_bn_trains_affine = True
    c.dataset.augment.crop_scale = HIER_RESNET_CROP_SCALE
    c.optimizer.decay_epochs = (int(script["lr_decay"]),)
    c.optimizer.decay_every = True
    c.optimizer.decay_factor = float(script["lr_decay_gamma"])


def _apply_hier_training(c: ml_collections.ConfigDict, script: dict[str, float]) -> None:
    """What every HIER script shares (module docstring), with ``script``'s own numbers."""
    c.batch_size = HIER_BATCH
    c.sampler = "unique_class"
    c.classes_per_batch, c.samples_per_class = HIER_BATCH // HIER_IPC, HIER_IPC
    c.num_epochs = int(script["epochs"])
    c.model.embedding_dim = int(script["emb"])
    c.model.head_layernorm = True
    c.model.embedding_init = "orthogonal"
    o = c.optimizer
    o.name = "adamw"
    o.lr = float(script["lr"])
    o.lr_reference_batch = HIER_BATCH
    o.eps = HIER_ADAMW_EPS
    o.proxy_eps = None
    o.weight_decay = float(script["weight_decay"])
    o.loss_params_weight_decay = None
    o.warmup_epochs = int(script["warmup_epochs"])
    o.warmup = "zero_lr"
    o.fresh_state_after_warmup = False
    o.head_lr_multiplier = float(script["fc_lr_scale"])
    o.backbone_lr_multiplier = 1.0
    o.proxy_lr_multiplier = HIER_PROXY_LR_SCALE
    o.proxy_lr = None  # HIER's group rule for a loss's class vectors, whatever the loss
    o.lca_lr_multiplier = HIER_LCA_LR_SCALE
    o.decay_steps = ()
    o.grad_clip_value = HIER_CLIP_VALUE
    o.clip_proxies = True
    c.dataset.image_size = 224
    c.dataset.transform = "proxy_anchor"  # resize 256, centre crop 224 for evaluation
    record = methods.find(c.method)
    if record is not None and record.hierarchical:
        # HPL builds its hierarchy when the warm-up ends, as with the ResNet recipes.
        c.loss.hierarchy_build_epoch = -1


# htdt/hyp_metric README.md:31-49 (python -m train --ds DS --model M ...): per data set the images
# per class (--num_samples; default 2), the batch (--bs; default 900), the epochs (--ep) and the
# evaluation resize (--resize; default 224); per model the lr (3e-5 ViT and DeiT, 1e-5 DINO).
HYP_COMMANDS: dict[str, dict[str, int]] = {
    "CUB": {"num_samples": 9, "bs": 900, "ep": 50, "resize": 256},  # README.md:31-33
    "Cars": {"num_samples": 9, "bs": 882, "ep": 300, "resize": 224},  # README.md:34-36
    "SOP": {"num_samples": 2, "bs": 900, "ep": 200, "resize": 224},  # README.md:37-39
    "Inshop": {"num_samples": 2, "bs": 900, "ep": 400, "resize": 224},  # README.md:40-42
}
HYP_LR = {"DINO": 1e-5, "Deit": 3e-5, "ViT": 3e-5}
HYP_CROP_SCALE = (0.2, 1.0)  # T.RandomResizedCrop(crop, scale=(0.2, 1.0), BICUBIC) (train.py:87-100)


def apply_hyp_vit_command(c: ml_collections.ConfigDict, dataset: str, weights: str) -> None:
    """hyp_metric's README command for ``weights``'s backbone on ``dataset`` (``method=hyp``; the
    rest of its training is the method's recipe, ``hdml_jax.methods.hyp``). The batches are P
    classes × ``--num_samples``, P = ``--bs`` / ``--num_samples``, a pass over the classes per epoch
    (``sampler="pk"``; the official sampler drops the last incomplete batch, ours fills it with
    other classes). **Not matched**: the evaluation resize is 224 (256 for CUB) there, 256 here
    (``transform="proxy_anchor"``); apex O2 fp16 there, ``model.dtype`` here."""
    one_of(dataset, DATASETS, "Hyp data set")
    one_of(weights, tuple(SCRIPT_FOLDER), "ViT weights")
    command = HYP_COMMANDS[dataset]
    c.samples_per_class = int(command["num_samples"])
    c.classes_per_batch = int(command["bs"]) // c.samples_per_class
    c.batch_size = c.classes_per_batch * c.samples_per_class
    c.num_epochs = int(command["ep"])
    c.optimizer.lr = HYP_LR[SCRIPT_FOLDER[weights]]
    c.model.vit.freeze_patch_embed = True  # --freeze 0: "freeze only patch_embed" (model.py:58-66)
    c.model.frozen_bn = False
    c.dataset.image_size = 224
    c.dataset.transform = "proxy_anchor"
    c.dataset.augment.crop_scale = HYP_CROP_SCALE
