"""Cars196: classes 1–98 train, 99–196 test; Recall@1/2/4/8.

    python -m hdml_jax.main --config configs/cars.py:method=proxy_anchor --workdir runs/cars_pa

Cars196's download URL is dead: put the archives in a manual directory and prepare once with
``python -m hdml_jax.data.prepare cars196 --data_dir ... --manual_dir ...`` (it lists the files).
The backbone starts from torchvision's ImageNet ResNet-50 (downloaded once; ``model.pretrained``).

Recipes (sources as in ``configs/cub.py``):

* Proxy-Anchor family: the official ResNet-50 command, PA README.md:101-112 — batch 120, lr 1e-4,
  warm 5, bn-freeze 1, lr-decay-step 10, γ 0.5 (default), 60 epochs (default), shuffled batches.
  Published: R@1/2/4/8 87.7/92.7/95.5/97.3 (README.md:117), best epoch on the test split.
  ``configs/cars.py:method=proxy_anchor,backbone=bn_inception``: the official BN-Inception
  command instead (README.md:86-97: batch 180, warm 1, lr-decay-step 20; Cadene's ImageNet
  weights), published 86.4/91.9/95.0/97.0 (README.md:116).
* ``proxy_nca_pp``: NCA++ config/cars.json (identical to cub.json).
* ``cgd``: the paper gives no Cars schedule; the CGD-port's (20 epochs, ×0.1 at 12 and 16,
  train.py:84, 117) and its Cars descriptors SG (README.md:100-105).

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for Cars: KevinMusgrave/powerful-benchmarker,
  metric-learning branch, docs/papers/mlrc.md l.35-50 (values and per-row lines in
  ``hdml_jax.methods.baselines.MLRC_BEST``); the pair losses in P×K batches of the same size.

* ViTs (``backbone=vit_s16_dino``, ``vit_s8_dino``, ``vit_b16_dino``, ``vit_b8_dino``,
  ``deit_s16_distilled``, ``vit_s16_augreg``: DINO's, DeiT's and timm's AugReg weights): HIER's
  official command for that backbone on this data set, Euclidean (``--hyp_c 0 --lambda2 0``), for
  every method a ViT runs; each number and its source in ``hdml_jax/config_vit.py``.
"""

from hdml_jax.config import apply_proxy_anchor_command, base_config, parse_arg, use_backbone


def get_config(arg: str | None = None):
    args = parse_arg(arg, keys=("method", "backbone"))
    c = base_config("cars196", args.pop("method", "hpl_pa"))
    if args.get("backbone") == "bn_inception":
        # PA README.md:86-97 (BN-Inception)
        apply_proxy_anchor_command(c, batch_size=180, lr=1e-4, warm=1, bn_freeze=True, lr_decay_step=20)
    else:
        # PA README.md:101-112 (ResNet-50)
        apply_proxy_anchor_command(c, batch_size=120, lr=1e-4, warm=5, bn_freeze=True, lr_decay_step=10)
    use_backbone(c, args.get("backbone", "resnet"), hier_dataset="Cars")
    if c.method == "cgd":
        c.model.descriptors = "SG"
    # HPL's number of coarse groups: a guess (no official code; the paper's ablation varies it).
    c.loss.num_coarse_groups = (12,)
    return c
