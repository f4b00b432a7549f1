"""The embedded default: HPL-PA on the generated two-level ``synthetic`` data set, on a CPU.

    python -m hdml_jax.main                                   # this config, method hpl_pa
    python -m hdml_jax.main --config configs/synthetic.py:method=proxy_anchor
    python -m hdml_jax.main --config configs/synthetic.py:method=cgd --config.seed=1

A small ResNet-18 (width 16) trained from scratch on the 48-px images for 20 epochs: the whole
run, data generation and compilation included, takes about 2 minutes on 2 CPU cores. Without ImageNet
weights BatchNorm must learn its statistics (``frozen_bn=False``) and there is no warm-up.
Every number below is our own choice for this data set (none comes from a paper): small enough
for a CPU, large enough that the methods separate from an untrained network.

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for CUB (borrowed: MLRC has no numbers for generated data): KevinMusgrave/powerful-benchmarker,
  metric-learning branch, docs/papers/mlrc.md l.35-50 (values and per-row lines in
  ``hdml_jax.methods.baselines.MLRC_BEST``); the pair losses in P×K batches of the same size.
"""

from hdml_jax.config import apply_small_cpu_recipe, base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, keys=("method", "seed"))
    c = base_config("synthetic", args.get("method", "hpl_pa"))
    apply_small_cpu_recipe(c, image_size=48)
    c.optimizer.decay_epochs = (12,)
    c.loss.num_coarse_groups = (16,)
    if c.sampler == "pk":  # cgd, proxy_nca_pp
        c.classes_per_batch, c.samples_per_class = 16, 4
    c.num_epochs = 20
    c.eval_every_epochs = 5
    c.eval_batch_size = 256
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.tsne_max_points = 1000
    c.seed = int(args.get("seed", 0))
    return c
