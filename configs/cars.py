"""Cars196: classes 1–98 train, 99–196 test; Recall@1/2/4/8.

    python -m hdml_jax.main --config configs/cars.py:method=hpl_pa --workdir runs/cars_hpl_pa \
        --config.model.pretrained=$HOME/weights/resnet50

Cars196's download URL is dead: put the archives in a manual directory and prepare once with
``python -m hdml_jax.data.prepare cars196 --data_dir ... --manual_dir ...`` (it lists the files).
"""

from hdml_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base_config("cars196", args.get("method", "hpl_pa"))
    c.optimizer.warmup_epochs = 5 if c.method != "cgd" else 0
    c.optimizer.decay_epochs = (10,)
    c.num_epochs = 60
    c.loss.num_coarse_groups = (12,)
    if c.method == "cgd":
        c.num_steps = 1500
        c.num_epochs = 0
        c.optimizer.decay_every = False
        c.optimizer.decay_epochs = (6, 12)
    return c
