"""The embedded default: HPL-PA on the generated two-level ``synthetic`` data set, on a CPU.

    python -m hdml_jax.main                                   # this config, method hpl_pa
    python -m hdml_jax.main --config configs/synthetic.py:method=proxy_anchor
    python -m hdml_jax.main --config configs/synthetic.py:method=cgd --config.seed=1

A small ResNet-18 (width 16) trained from scratch on the 48-px images for 20 epochs: the whole
run, data generation and compilation included, takes about 2 minutes on 2 CPU cores. Without ImageNet
weights BatchNorm must learn its statistics (``frozen_bn=False``) and there is no warm-up.
Every number below is our own choice for this data set (none comes from a paper): small enough
for a CPU, large enough that the methods separate from an untrained network.
"""

from hdml_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, keys=("method", "seed"))
    c = base_config("synthetic", args.get("method", "hpl_pa"))
    c.model.pretrained = "none"  # from scratch: ImageNet features do not fit 48-px shapes
    c.dataset.image_size = 48
    c.dataset.transform = "synthetic"
    c.model.depth = 18
    c.model.width = 16
    c.model.last_stride = 1 if c.method == "cgd" else 2
    c.model.frozen_bn = False
    c.model.embedding_dim = 48 if c.method == "cgd" else 64
    c.optimizer.warmup_epochs = 0
    c.optimizer.lr = 1e-3
    c.optimizer.decay_epochs = (12,)
    c.optimizer.decay_every = False
    c.optimizer.grad_clip_value = 0.0
    c.loss.num_coarse_groups = (16,)
    c.loss.hierarchy_build_epoch = 1  # no warm-up here: k-means after the first epoch
    c.loss.hierarchy_refresh_epochs = 2
    c.batch_size = 64
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
