"""Embeddings must be finite before anything is scored or clustered: the shared check.

``hdml_jax.metrics`` (every retrieval metric) and ``hdml_jax.evaluation.cluster`` (k-means, NMI) call
``check_finite``; both re-export it with its error, ``NonFiniteEmbeddingsError``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.losses._common import is_concrete


class NonFiniteEmbeddingsError(ValueError):
    """Embeddings with NaN or inf rows were given to a metric: there is no score to report.

    Attributes:
      num_non_finite: rows holding at least one NaN or inf.
      num_rows: rows in total.
      name: which rows, as in the message (``"embedding"``, ``"query embedding"`` ...).
    """

    def __init__(self, num_non_finite: int, num_rows: int, name: str = "embedding") -> None:
        self.num_non_finite, self.num_rows, self.name = int(num_non_finite), int(num_rows), name
        super().__init__(
            f"{self.num_non_finite} of {self.num_rows} {name} rows are not finite (NaN or inf), so no "
            "metric of them means anything; training likely diverged (lower the learning rate or "
            "clip gradients, and evaluate an earlier checkpoint)."
        )

    def __reduce__(self):
        return type(self), (self.num_non_finite, self.num_rows, self.name)


@jax.jit
def _count_non_finite_rows(x: jax.Array) -> jax.Array:
    """``Σ_i [row i holds a NaN or inf]`` of a ``(N, d)`` array, as int32."""
    return jnp.sum(~jnp.all(jnp.isfinite(x), axis=1), dtype=jnp.int32)


def check_finite(embeddings, name: str = "embedding") -> None:
    """Raise ``NonFiniteEmbeddingsError`` if a concrete ``(N, d)`` array has a NaN or inf row.

    NumPy arrays are checked on the host, JAX arrays on their device (no transfer). A traced
    array cannot be checked here and passes (the losses and normalisation propagate NaN).
    """
    if not is_concrete(embeddings) or np.size(embeddings) == 0:
        return
    if isinstance(embeddings, jax.Array):
        bad = int(_count_non_finite_rows(embeddings.reshape(embeddings.shape[0], -1)))
    else:
        values = np.asarray(embeddings)
        if not np.issubdtype(values.dtype, np.floating):
            return  # integers cannot be NaN; other dtypes are the caller's error
        bad = int(np.sum(~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)))
    if bad:
        raise NonFiniteEmbeddingsError(bad, np.shape(embeddings)[0], name)
