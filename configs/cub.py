"""CUB-200-2011: classes 1–100 train, 101–200 test; Recall@1/2/4/8.

    python -m hdml_jax.main --config configs/cub.py:method=proxy_anchor --workdir runs/cub_pa
    python -m hdml_jax.main --config configs/cub.py:method=cgd

Prepare the data once: ``python -m hdml_jax.data.prepare cub200 --data_dir ~/tensorflow_datasets``.
The backbone starts from torchvision's ImageNet ResNet-50 (downloaded once; ``model.pretrained``).

Recipes, with their sources (commits in ``hdml_jax.methods``; PA =
Proxy-Anchor-CVPR2020, NCA++ = proxynca_pp, CGD-port = leftthomas/CGD):

* Proxy-Anchor family (``proxy_anchor``, ``proxy_nca``, ``hpl_pa``, ``hpl_nca``): the official
  ResNet-50 command, PA README.md:64-75 — batch 120, lr 1e-4, warm 5, bn-freeze 1,
  lr-decay-step 5, γ 0.5 (train.py:72-74 default), 60 epochs (train.py:43-46 default), shuffled
  batches (train.py:141-150). Published: R@1/2/4/8 69.9/79.6/86.6/91.4 (README.md:80), the
  best epoch on the test split — ``final_metrics.json`` ``best``.
  ``configs/cub.py:method=proxy_anchor,backbone=bn_inception``: the official BN-Inception
  command instead (README.md:49-60: batch 180, warm 1, lr-decay-step 10; Cadene's ImageNet
  weights), published 69.1/78.9/86.1/91.2 (README.md:79).
* ``proxy_nca_pp``: NCA++ config/cub.json as is (the method's recipe).
* ``cgd``: the CGD paper's CUB schedule, 1,500 iterations with ×0.1 at 400 and 800 (reference.md
  §2); descriptors MG, the CGD-port's CUB row (README.md:132-137).

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for CUB: KevinMusgrave/powerful-benchmarker,
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
    c = base_config("cub200", args.pop("method", "hpl_pa"))
    if args.get("backbone") == "bn_inception":
        # PA README.md:49-60 (BN-Inception)
        apply_proxy_anchor_command(c, batch_size=180, lr=1e-4, warm=1, bn_freeze=True, lr_decay_step=10)
    else:
        # PA README.md:64-75 (ResNet-50)
        apply_proxy_anchor_command(c, batch_size=120, lr=1e-4, warm=5, bn_freeze=True, lr_decay_step=5)
    use_backbone(c, args.get("backbone", "resnet"), hier_dataset="CUB")
    if c.method == "cgd":
        c.model.descriptors = "MG"
        c.num_steps = 1500
        c.optimizer.decay_steps = (400, 800)
    # HPL's number of coarse groups: a guess (no official code; the paper's ablation varies it).
    c.loss.num_coarse_groups = (12,)
    return c
