"""The comparison methods of HPL's tables: moved to ``hdml_jax.methods.baselines`` (kept importable)."""

from hdml_jax.methods.baselines import *  # noqa: F403
from hdml_jax.methods.baselines import (  # noqa: F401 — the names users and tests import
    BASELINE_METHODS,
    CLASSIFICATION_METHODS,
    HPL_CLASSIFICATION_METHODS,
    LOSS_FUNCTIONS,
    MINER_FUNCTIONS,
    MINERS,
    MLRC_BEST,
    MLRC_DATASET,
    PAIR_METHODS,
    PAPER_DEFAULTS,
    SAMPLES_PER_CLASS,
    WEIGHT_INITS,
    apply_baseline_recipe,
    centers_per_class,
    use_pk_batches,
)
