"""Stanford Online Products: 11,318 train / 11,316 test classes; Recall@1/10/100/1000.

    python -m hdml_jax.main --config configs/sop.py:method=hpl_pa --workdir runs/sop_hpl_pa
    # HPL with SOP's 12 super-classes as the coarse level instead of k-means:
    python -m hdml_jax.main --config configs/sop.py:method=hpl_pa --config.loss.coarse_from_labels=True

The backbone starts from torchvision's ImageNet ResNet-50 (downloaded once; ``model.pretrained``).

Recipes (sources as in ``configs/cub.py``):

* Proxy-Anchor family: the official command exists for BN-Inception only (PA README.md:123-135):
  batch 180, lr 6e-4, warm 1, bn-freeze 0, lr-decay-step 20, γ 0.25, 60 epochs (default),
  shuffled batches. Applied here to ResNet-50, for which there is no official command.
  Published (BN-Inception): R@1/10/100/1000 79.2/90.7/96.2/98.6 (README.md:139).
  The default network stays ResNet-50 (as for every other data set);
  ``configs/sop.py:method=proxy_anchor,backbone=bn_inception`` runs that command on its own
  network, BN-Inception with Cadene's ImageNet weights.
* ``proxy_nca_pp``: NCA++ config/sop.json: lr 4e-3×6, proxies 4e1×6, batch 192 = 64 classes × 3,
  80 epochs (+5 warm-up) (sop.json:22-25, 43, 46).
* ``cgd``: the CGD-port's schedule (20 epochs, ×0.1 at 12 and 16) and SOP descriptors SG
  (README.md:164-169); the paper gives no SOP schedule.

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for SOP: KevinMusgrave/powerful-benchmarker,
  metric-learning branch, docs/papers/mlrc.md l.35-50 (values and per-row lines in
  ``hdml_jax.methods.baselines.MLRC_BEST``); the pair losses in P×K batches of the same size.

* ViTs (``backbone=vit_s16_dino``, ``vit_s8_dino``, ``vit_b16_dino``, ``vit_b8_dino``,
  ``deit_s16_distilled``, ``vit_s16_augreg``: DINO's, DeiT's and timm's AugReg weights): HIER's
  official command for that backbone on this data set, Euclidean (``--hyp_c 0 --lambda2 0``), for
  every method a ViT runs; each number and its source in ``hdml_jax/config_vit.py``.
"""

from hdml_jax.config import (
    apply_proxy_anchor_command,
    apply_proxynca_pp_config,
    base_config,
    parse_arg,
    use_backbone,
)


def get_config(arg: str | None = None):
    args = parse_arg(arg, keys=("method", "backbone"))
    c = base_config("sop", args.pop("method", "hpl_pa"))
    # PA README.md:123-135 (BN-Inception: no ResNet-50 command exists)
    apply_proxy_anchor_command(
        c, batch_size=180, lr=6e-4, warm=1, bn_freeze=False, lr_decay_step=20, lr_decay_gamma=0.25
    )
    # NCA++ config/sop.json:22-25, 43, 46
    apply_proxynca_pp_config(
        c, lr=4e-3 * 6, proxy_lr=4e1 * 6, classes_per_batch=64, samples_per_class=3, epochs=80 + 5
    )
    if c.method == "cgd":
        c.model.descriptors = "SG"
    use_backbone(c, args.get("backbone", "resnet"), hier_dataset="SOP")  # the command's own network: backbone=bn_inception
    # HPL's number of coarse groups: a guess (no official code; the paper's ablation varies it).
    c.loss.num_coarse_groups = (1000,)
    c.nmi = False  # k-means into 11,316 clusters of 60k points is slow on CPU; enable on accelerators
    return c
