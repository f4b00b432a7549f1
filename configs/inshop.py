"""In-Shop Clothes Retrieval: 3,997 train items; 14,218 queries vs 12,612 gallery images;
Recall@1/10/20/30/40/50.

    python -m hdml_jax.main --config configs/inshop.py:method=hpl_pa --workdir runs/inshop_hpl_pa \
        --config.model.pretrained=$HOME/weights/resnet50

Prepare once from the official archive: ``python -m hdml_jax.data.prepare inshop --manual_dir ...``.
"""

from hdml_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base_config("inshop", args.get("method", "hpl_pa"))
    c.optimizer.warmup_epochs = 1 if c.method != "cgd" else 0
    c.optimizer.decay_epochs = (10,)
    c.optimizer.decay_factor = 0.25
    c.num_epochs = 60
    c.eval_every_epochs = 10
    c.loss.num_coarse_groups = (400,)
    c.sampler = "pk"
    c.classes_per_batch, c.samples_per_class = (45, 4) if c.method != "cgd" else (32, 4)
    c.batch_size = c.classes_per_batch * c.samples_per_class
    return c
