"""CUB-200-2011: classes 1–100 train, 101–200 test; Recall@1/2/4/8.

    python -m hdml_jax.main --config configs/cub.py:method=hpl_pa --workdir runs/cub_hpl_pa \
        --config.model.pretrained=$HOME/weights/resnet50
    python -m hdml_jax.main --config configs/cub.py:method=cgd --config.model.descriptors=MG

Prepare the data once: ``python -m hdml_jax.data.prepare cub200 --data_dir ~/tensorflow_datasets``.
ImageNet weights: ``python -m hdml_jax.models.convert resnet50.pth --depth 50 --output ~/weights/resnet50``.
Proxy-Anchor recipe: 40 epochs, batch 180, AdamW 1e-4 (proxies ×100), lr ×0.5 every 5 epochs,
warm-up 5 epochs for ResNet-50 (1 for BN-Inception). CGD: 1.5k iterations, ×0.1 at 400 and 800.
"""

from hdml_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base_config("cub200", args.get("method", "hpl_pa"))
    c.dataset.crop_to_bbox = False
    c.optimizer.warmup_epochs = 5 if c.method != "cgd" else 0
    c.optimizer.decay_epochs = (5,)
    c.num_epochs = 40
    c.loss.num_coarse_groups = (12,)
    if c.method == "cgd":
        c.num_steps = 1500
        c.optimizer.decay_every = False
        c.optimizer.decay_epochs = (9, 17)  # ≈ iterations 400 and 800 at 128 images / 5,864
        c.num_epochs = 0
    return c
