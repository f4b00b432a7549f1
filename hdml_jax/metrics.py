"""``hdml_jax.metrics``, the retrieval metrics' import path: the module ``hdml_jax.evaluation.metrics``
itself (this name is an alias of it, so a patch of one is a patch of the other)."""

import sys

from hdml_jax.evaluation import metrics

sys.modules[__name__] = metrics
