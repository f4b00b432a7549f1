"""The proxy methods: Proxy-Anchor and Proxy-NCA (the Proxy-Anchor repository's recipe), HPL around
each, and ProxyNCA++ (its own recipe).

Sources (commits read): PA = tjddus9597/Proxy-Anchor-CVPR2020 @51db570; NCA++ =
euwern/proxynca_pp @217233d. The base config (``hdml_jax.config.base_config``) is Proxy-Anchor's
recipe; the recipes here change what differs from it, each number with its source. The data-set
configs (``configs/*.py``) set the per-data-set numbers of the official commands.
"""

from __future__ import annotations

import dataclasses

from hdml_jax.methods.registry import Config, Method


def proxy_anchor_keywords(c: Config) -> dict[str, float]:
    return {"margin": c.loss.margin, "alpha": c.loss.alpha}


def proxy_nca_keywords(c: Config) -> dict[str, float]:
    return {"scale": c.loss.scale}


def proxy_anchor_recipe(c: Config) -> None:
    """The base config as is: AdamW (PA train.py:60-62, 254), lr 1e-4 (l.63-65), wd 1e-4 on every
    group (l.66-68), proxies ×100 (l.241-242), clip_grad_value_ 10 on the model and the proxies
    (l.298-300), 60 epochs (l.43-46), α 32 / δ 0.1 (l.75-80), embedding 512 (l.35-38), GAP+GMP →
    Linear (kaiming fan_out, bias 0) → L2 (net/resnet.py:144-147, 183-194), proxies
    kaiming_normal_ fan_out (losses.py:30-31), StepLR per epoch (train.py:256, 313)."""


def proxy_nca_recipe(c: Config) -> None:
    """PA's Proxy-NCA baseline: PML ProxyNCALoss, softmax_scale 32 (PA losses.py:63, 68); its
    proxies train at the base lr (train.py:243-244) and are not clipped (l.299-300); PML
    initialises them N(0, 1) (pytorch-metric-learning >= 0.9.90, losses/mixins.py:13-14)."""
    c.loss.scale = 32.0
    c.optimizer.proxy_lr_multiplier = 1.0
    c.optimizer.clip_proxies = False
    c.model.proxy_init = "normal"


def proxy_nca_pp_recipe(c: Config) -> None:
    """ProxyNCA++ (NCA++ config/cub.json; the data-set configs scale lr and batch for SOP/In-Shop)."""
    c.loss.scale = 9.0  # scale 3 on both vectors before a squared distance (loss.py:60-65; cub.json:7)
    c.model.proxy_init = "normal_over_8"  # randn / 8 (loss.py:55)
    c.model.embedding_dim = 2048  # sz_embedding (cub.json:24)
    c.model.pooling = "mac_layernorm"  # Feat_resnet50_max_n: max pool + LayerNorm (networks.py:51-53)
    c.model.embedding_init = "torch_default"  # nn.Linear(2048, 2048) left at its init (train.py:101)
    c.model.frozen_bn = False  # no BatchNorm freezing anywhere in the repository
    c.dataset.transform = "proxynca_pp"  # RandomResizedCrop 256; eval Resize 288 + CenterCrop 256
    c.dataset.image_size = 256  # (dataset/config.json:85-92, dataset/utils.py:57-74)
    c.optimizer.name = "adam"  # cub.json:33
    c.optimizer.lr = 4e-3  # base lr (cub.json:46)
    c.optimizer.eps = 1.0  # base eps, inherited by every group (cub.json:47; train.py:287, 311)
    c.optimizer.proxy_eps = None
    c.optimizer.weight_decay = 0.0  # every group (cub.json:35-44)
    c.optimizer.proxy_lr_multiplier = 1e5  # proxies lr 4e2 = 4e-3 × 1e5 (cub.json:43)
    c.optimizer.clip_proxies = False  # clip_grad_value_(model.parameters(), 10) only (train.py:416, 451)
    c.optimizer.warmup_epochs = 5  # warmup_k default (train.py:39), backbone lr 0 (l.263-288)
    c.optimizer.fresh_state_after_warmup = True  # a new Adam after warm-up (train.py:290-312)
    # Train mode picks lr drops by ReduceLROnPlateau on a validation half of the training
    # classes; trainval replays them (train.py:118-124, 329-339). Without that validation run
    # there is no drop (the trainval default lr_steps [1000], train.py:31).
    c.optimizer.decay_epochs = ()
    c.num_epochs = 45  # 5 warm-up epochs + nb_epochs 40 (cub.json:22; warm-up not counted, l.406, 420)
    c.sampler = "pk"  # BalancedBatchSampler, 8 classes × 4 (cub.json:23-27; train.py:226)
    c.classes_per_batch, c.samples_per_class = 8, 4
    c.batch_size = 32


PROXY_ANCHOR_FIELDS = ("loss.margin", "loss.alpha")
PROXY_NCA_FIELDS = ("loss.scale",)

PROXY_ANCHOR = Method(
    name="proxy_anchor",
    summary="Proxy-Anchor (α 32, δ 0.1), GAP+GMP → Dense → L2; the Proxy-Anchor repository's recipe",
    loss="proxy_anchor_loss",
    form="proxy",
    recipe=proxy_anchor_recipe,
    keywords=proxy_anchor_keywords,
    fields=PROXY_ANCHOR_FIELDS,
)
PROXY_NCA = Method(
    name="proxy_nca",
    summary="Proxy-NCA (σ 32), the Proxy-Anchor repository's baseline and recipe",
    loss="proxy_nca_loss",
    form="proxy",
    recipe=proxy_nca_recipe,
    keywords=proxy_nca_keywords,
    fields=PROXY_NCA_FIELDS,
)
PROXY_NCA_PP = Method(
    name="proxy_nca_pp",
    summary="ProxyNCA++ (σ 9), MAC + LayerNorm → Dense(2048); its own recipe (Adam 4e-3, P×K 8 × 4)",
    loss="proxy_nca_loss",
    form="proxy",
    recipe=proxy_nca_pp_recipe,
    family="proxynca_pp",
    keywords=proxy_nca_keywords,
    fields=PROXY_NCA_FIELDS,
    protocols=(),  # its recipe replaces the network and head
    backbones=("resnet",),
)
# HPL around each: the same record with coarse proxy levels (HPL has no recipe of its own).
HPL_PA = dataclasses.replace(
    PROXY_ANCHOR,
    name="hpl_pa",
    summary="HPL around Proxy-Anchor: fine + k-means coarse proxy levels, w = (1.0, 0.1)",
    hierarchical=True,
)
HPL_NCA = dataclasses.replace(
    PROXY_NCA, name="hpl_nca", summary="HPL around Proxy-NCA (σ 32)", hierarchical=True
)
