"""MLRC protocol on CUB-200-2011 (HPL's tables): 4 folds of classes 1–100, test on 101–200.

    python -m hdml_jax.main --config configs/mlrc/cub.py:method=hpl_pa --workdir runs/mlrc_cub_hpl_pa
    python -m hdml_jax.main --config configs/mlrc/cub.py:method=proxy_anchor --workdir runs/mlrc_cub_pa

BN-Inception (ImageNet weights, frozen BatchNorm) → 128-d, batch 32 = 8 classes × 4, RMSprop
1e-6, 100-iteration epochs, validation MAP@R every 2 epochs, patience 9 (every number and its
source: ``hdml_jax.mlrc.apply_protocol``); the 4 fold models are tested concatenated (512-d) and
separated (128-d). Methods: the Proxy-Anchor family and every baseline (not cgd, proxy_nca_pp).

Published (HPL, WACV 2022, MLRC protocol, MAP@R / P@1 / R-Precision, concatenated; second-hand,
unconfirmed — reference.md §4): Proxy-Anchor 26.47 / 67.64 / 37.29, HPL-PA 26.72 / 68.25 / 37.57.
"""

from hdml_jax.protocols.mlrc import mlrc_config


def get_config(arg: str | None = None):
    return mlrc_config("cub200", "cub", arg, coarse_groups=12)  # as configs/cub.py
