"""The MLRC protocol end to end on the generated ``synthetic`` data set, sized for a CPU.

    python -m hdml_jax.main --config configs/mlrc/synthetic.py:method=hpl_pa --workdir runs/mlrc_synthetic

MLRC's folds, early stopping, model selection and concatenated/separated test (``hdml_jax.protocols.mlrc``)
with the small network of ``configs/synthetic.py`` instead of BN-Inception (no ImageNet weights
here, and 227-px images are beyond a CPU): ResNet-18 width 16 from scratch on 48-px images,
RMSprop at 1e-3 (MLRC's 1e-6 fine-tunes pretrained weights; from scratch it would not move),
30-step epochs, validation every epoch, patience 3, at most 15 epochs per fold. Our choices for
this data set, from no paper; CUB's MLRC loss hyper-parameters (borrowed, ``hdml_jax.methods.baselines``).
"""

from hdml_jax.config import apply_small_cpu_recipe
from hdml_jax.protocols.mlrc import mlrc_config


def get_config(arg: str | None = None):
    c = mlrc_config("synthetic", "cub", arg, coarse_groups=16)  # as configs/synthetic.py
    batch = c.batch_size, c.sampler, c.classes_per_batch, c.samples_per_class  # MLRC's P×K, kept
    apply_small_cpu_recipe(c, image_size=48)
    c.model.backbone = "resnet"
    c.model.embedding_dim = 32
    c.model.pooling = "gap_gmp"
    c.batch_size, c.sampler, c.classes_per_batch, c.samples_per_class = batch
    c.optimizer.lr = 1e-3
    c.steps_per_epoch = 30
    c.num_epochs = 15
    c.eval_every_epochs = 1
    c.early_stopping_patience_epochs = 3
    c.eval_batch_size = 256
    c.log_every_steps = 10
    c.checkpoint_every_steps = 300
    c.tsne_max_points = 1000
    return c
