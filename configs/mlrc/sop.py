"""MLRC protocol on Stanford Online Products (HPL's tables): 4 folds of the first 11,317 classes,
test on the last 11,317 (the pooled, sorted classes; ``hdml_jax.data.folds``).

    python -m hdml_jax.main --config configs/mlrc/sop.py:method=hpl_pa --workdir runs/mlrc_sop_hpl_pa

As ``configs/mlrc/cub.py`` but validation every 20 epochs, patience 39 (``hdml_jax.protocols.mlrc``).

Published (HPL, WACV 2022, MLRC protocol, MAP@R / P@1 / R-Precision, concatenated; second-hand,
unconfirmed — reference.md §4): Proxy-Anchor 47.88 / 76.12 / 50.82, HPL-PA 49.07 / 76.97 / 51.97.
"""

from hdml_jax.protocols.mlrc import mlrc_config


def get_config(arg: str | None = None):
    return mlrc_config("sop", "sop", arg, coarse_groups=1000)  # as configs/sop.py
