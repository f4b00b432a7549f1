"""Hyp (Ermolov, Mirvakhabova, Khrulkov, Sebe, Oseledets, CVPR 2022): a cross-entropy over the
Poincaré distances between the views of each class in a batch (``method=hyp``).

Source: htdt/hyp_metric at c89de04 (``train.py``, ``model.py``, ``sampler.py``, ``README.md``).
The recipe sets what every README command shares; the per-data-set numbers (lr, epochs, images
per class, batch) are ``hdml_jax.config_vit.apply_hyp_vit_command``'s, from README.md:31-49.

    L = Σ_{a ≠ b} mean_p CE([−d_c(x_p^a, x_q^b)/τ]_q ++ [−d_c(x_p^a, x_q^a)/τ]_{q ≠ p}, target p)

over the ``K`` images ``a, b`` of the ``P`` classes of a batch (``losses.hyp_loss``), on the
head's points: Linear → ``ToPoincare`` without the Riemannian rescaling (model.py:14-16).
"""

from __future__ import annotations

from typing import Any

from hdml_jax.methods.registry import Config, Method


def hyp_keywords(c: Config) -> dict[str, Any]:
    return {
        "samples_per_class": int(c.samples_per_class),
        "tau": float(c.loss.kwargs.tau),
        "c": float(c.model.curvature),
    }


def hyp_recipe(c: Config) -> None:
    """What every hyp_metric command shares (Tap defaults, train.py:29-47, unless cited)."""
    c.model.curvature = 0.1  # --hyp_c 0.1 (its sphere version: --hyp_c 0 --t 0.1, README.md:47)
    c.model.clip_r = 2.3  # --clip_r 2.3
    c.model.riemannian = False  # ToPoincare(..., riemannian=False) (model.py:15)
    c.model.head_layernorm = False  # head = Linear → ToPoincare (model.py:18)
    c.model.embedding_init = "orthogonal"  # orthogonal_ weight, bias 0 (model.py:19-20)
    c.model.embedding_dim = 128  # --emb 128
    c.loss.kwargs.tau = 0.2  # --t 0.2
    c.sampler = "pk"  # UniqueClassSempler: a pass over the classes per epoch (sampler.py:27-55)
    c.samples_per_class = 2  # --num_samples 2 (CUB and Cars: 9, README.md:31-36)
    c.classes_per_batch = 450  # --bs 900 / 2
    c.batch_size = 900
    o = c.optimizer
    o.name = "adamw"  # optim.AdamW(model.parameters(), lr=cfg.lr) (train.py:118): one group
    o.lr = 1e-5  # --lr (DINO; ViT and DeiT 3e-5, README.md:31-46)
    o.weight_decay = 0.01  # AdamW's default, on every parameter
    o.eps = 1e-8  # AdamW's default
    o.head_lr_multiplier = o.backbone_lr_multiplier = 1.0
    o.lr_reference_batch = 0  # no scaling by the batch
    o.warmup_epochs = 0  # no warm-up, no schedule (train.py:118-122)
    o.decay_epochs = ()
    o.decay_steps = ()
    o.grad_clip_value = 0.0
    o.grad_clip_norm = 3.0  # clip_grad_norm_(amp.master_params(optimizer), 3) (train.py:166)


HYP = Method(
    name="hyp",
    summary="Hyp: cross-entropy over Poincaré distances of each class's views (c 0.1, τ 0.2), Linear → ToPoincare",
    loss="hyp_pair_loss",
    form="pair",
    recipe=hyp_recipe,
    family="hyp",
    keywords=hyp_keywords,
    fields=("loss.kwargs",),
    protocols=(),  # MLRC concatenates unit vectors; these are points of the ball
)
