"""Stanford Online Products: 11,318 train / 11,316 test classes; Recall@1/10/100/1000.

    python -m hdml_jax.main --config configs/sop.py:method=hpl_pa --workdir runs/sop_hpl_pa \
        --config.model.pretrained=$HOME/weights/resnet50
    # HPL with SOP's 12 super-classes as the coarse level instead of k-means:
    python -m hdml_jax.main --config configs/sop.py:method=hpl_pa --config.loss.coarse_from_labels=True

SOP is where HPL gains most (large, strongly hierarchical).
"""

from hdml_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base_config("sop", args.get("method", "hpl_pa"))
    c.optimizer.warmup_epochs = 1 if c.method != "cgd" else 0
    c.optimizer.decay_epochs = (10,)
    c.optimizer.decay_factor = 0.25
    c.num_epochs = 60
    c.eval_every_epochs = 10
    c.loss.num_coarse_groups = (1000,)
    c.sampler = "pk"
    c.classes_per_batch, c.samples_per_class = (45, 4) if c.method != "cgd" else (32, 4)
    c.batch_size = c.classes_per_batch * c.samples_per_class
    c.nmi = False  # k-means into 11,316 clusters of 60k points is slow on CPU; enable on accelerators
    return c
