"""MLRC protocol on Cars196 (HPL's tables): 4 folds of classes 1–98, test on 99–196.

    python -m hdml_jax.main --config configs/mlrc/cars.py:method=hpl_pa --workdir runs/mlrc_cars_hpl_pa

As ``configs/mlrc/cub.py`` but validation every 5 epochs, patience 14 (``hdml_jax.protocols.mlrc``).

Published (HPL, WACV 2022, MLRC protocol, MAP@R / P@1 / R-Precision, concatenated; second-hand,
unconfirmed — reference.md §4): Proxy-Anchor 27.77 / 86.38 / 37.53, HPL-PA 28.67 / 86.84 / 38.36.
"""

from hdml_jax.protocols.mlrc import mlrc_config


def get_config(arg: str | None = None):
    return mlrc_config("cars196", "cars", arg, coarse_groups=12)  # as configs/cars.py
