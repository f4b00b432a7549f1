"""HIER (Kim, Jeong, Kwak, CVPR 2023): Proxy-Anchor on points of the Poincaré ball plus HIER's
regulariser over learned hierarchical proxies (``hier_pa``).

Source: tjddus9597/HIER-CVPR23 at 3986a74 (paths under ``hier/``). The method's numbers are the
same in all sixteen of its scripts (``scripts/{Resnet50,DINO,Deit,ViT}/hier_<DS>.sh``, lines
4-12) and are set by the recipe; the per-backbone, per-data-set ones (lr, epochs, warm-up, weight
decay, head lr, embedding size, ResNet's decay) by the data-set configs through
``hdml_jax.config_vit`` (``apply_hier_resnet_command``, ``apply_hier_vit_command``), which also
cites the training they share (batches of 90 classes × 2, AdamW ε 1e-4, the ±10 clamp, ...).

    L = λ₁ · PA(direction of z, proxies) + λ₂ · HIER(z, LCAs)      λ₁ = 1, λ₂ = 0.5

``z`` are the head's points (LayerNorm → Linear → ``ToPoincare``, Riemannian gradient); PA is
computed on their directions (``PALoss_Angle``: ``F.linear(F.normalize(X), F.normalize(P))``,
losses.py:210-245, which our ``proxy_anchor_loss`` does by construction); HIER's loss over the
Poincaré distances (``hdml_jax.losses.hier``). Evaluation ranks by the Poincaré distance
(helpers.py:54-59).
"""

from __future__ import annotations

import dataclasses

from hdml_jax.methods.proxy import PROXY_ANCHOR
from hdml_jax.methods.registry import Config


def hier_recipe(c: Config) -> None:
    """The numbers every HIER script passes (train.py flags; file:line in the module's commit)."""
    c.model.curvature = 0.1  # --hyp_c 0.1 (every script)
    c.model.clip_r = 2.3  # --clip_r 2.3 (every script)
    c.model.riemannian = True  # ToPoincare(..., riemannian=True) (models/model.py:108-109)
    c.model.head_layernorm = True  # --use_lastnorm True: LayerNorm(bdim, affine off) (model.py:117)
    c.model.embedding_init = "orthogonal"  # orthogonal_ weight, bias 0 (model.py:79-83)
    c.loss.hier.weight = 0.5  # --lambda2 0.5 (every script; λ₁ --lambda1 1)
    c.loss.hier.num_lcas = 512  # --num_hproxies 512
    c.loss.hier.topk = 20  # --topk 20
    c.loss.hier.margin = 0.1  # --mrg 0.1 (reaches HIERLoss only, train.py:259)
    c.loss.hier.tau = 0.1  # HIERLoss's default; train.py:259 passes none (losses.py:18)
    c.loss.hier.triplets_per_anchor = 50  # t_per_anchor (losses.py:99, 102)
    # PA itself at PALoss_Angle's defaults δ 0.1, α 32 (train.py:263, losses.py:211): the base's.
    # The training every script shares (batches, AdamW, groups, clamp, warm-up); the data-set
    # configs set it with their per-script numbers (hdml_jax.config_vit._apply_hier_training).
    c.sampler = "unique_class"  # UniqueClassSampler, --IPC 2 (sampler.py:60-111, train.py:245)
    c.classes_per_batch, c.samples_per_class = 90, 2  # --batch_size 90 × 2 GPUs / IPC
    c.optimizer.lca_lr_multiplier = 50.0  # "lcas" lr_scale 5e1 (utils.py:760)
    c.optimizer.proxy_lr_multiplier = 1e4  # "proxies" lr_scale 1e4 (utils.py:761)
    c.optimizer.eps = 1e-4  # AdamW eps with --use_fp16 True (train.py:271-273)
    c.optimizer.warmup = "zero_lr"  # the backbone group at lr 0 while warming up (train.py:136-139)
    c.optimizer.lr_reference_batch = 180  # lr × batch / 180 (train.py:132)
    c.optimizer.clip_proxies = True  # clip_gradients_value(model, 10, losses=[...]) (utils.py:212-221)


HIER_PA = dataclasses.replace(
    PROXY_ANCHOR,
    name="hier_pa",
    summary="HIER: Proxy-Anchor on Poincaré-ball points + λ₂ · HIER's LCA-proxy triplet loss (c 0.1, λ₂ 0.5)",
    recipe=hier_recipe,
    family="hier",
    hier=True,
    protocols=(),  # MLRC concatenates unit vectors; these are points of the ball
)
# HPL's coarse levels and HIER's LCAs together: one record (the registry composes the two).
HPL_HIER_PA = dataclasses.replace(
    HIER_PA,
    name="hpl_hier_pa",
    summary="HPL and HIER together: Proxy-Anchor's fine + k-means coarse levels on Poincaré-ball points + λ₂ · HIER",
    hierarchical=True,
)
