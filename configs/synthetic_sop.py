"""HPL's home ground in miniature: the SOP-shaped generated data set (``synthetic_sop``), on a CPU.

    python -m hdml_jax.main --config configs/synthetic_sop.py                    # HPL-PA
    python -m hdml_jax.main --config configs/synthetic_sop.py:method=proxy_anchor,seed=3

2,400 fine classes of 2–12 images (mean about 5.3) in 12 families, 32 px, half the classes of
every family on each side (``hdml_jax.data.synthetic.SOP_SHAPED``): the regime in which the HPL
paper reports its largest gains (many classes, few images each, a strong implicit hierarchy).
Recall@1/10/100 and MAP@R as for SOP. The network is the one of ``configs/synthetic.py``
(ResNet-18 of width 16, from scratch); the study in ``docs/hpl_study.md`` runs this config.
Every number below is our own choice for a CPU budget of a few minutes per run; none comes
from a paper. The batch is shuffled (as the Proxy-Anchor family's SOP command), so with about 5
images per class most batches hold no second image of a class: proxies carry the signal.

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for SOP (borrowed): KevinMusgrave/powerful-benchmarker,
  metric-learning branch, docs/papers/mlrc.md l.35-50 (values and per-row lines in
  ``hdml_jax.methods.baselines.MLRC_BEST``); the pair losses in P×K batches of the same size.
"""

from hdml_jax.config import apply_small_cpu_recipe, base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, keys=("method", "seed"))
    c = base_config("synthetic_sop", args.get("method", "hpl_pa"))
    apply_small_cpu_recipe(c, image_size=32)  # the network and optimizer of configs/synthetic.py
    c.optimizer.decay_epochs = (8,)
    c.loss.num_coarse_groups = (12,)  # the number of families; the study varies it
    if c.sampler == "pk":  # cgd, proxy_nca_pp, pair losses: 2 images per class (every class has at least 2)
        c.classes_per_batch, c.samples_per_class = 32, 2
    c.num_epochs = 10
    c.eval_every_epochs = 5
    c.eval_batch_size = 512
    c.log_every_steps = 25
    c.checkpoint_every_steps = 500
    c.nmi = False  # k-means into 1,200 clusters at every evaluation: slow on CPU, not used here
    c.tsne_max_points = 1000
    c.seed = int(args.get("seed", 0))
    return c
