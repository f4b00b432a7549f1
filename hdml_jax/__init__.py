"""hdml_jax: deep metric learning in JAX/Flax (HPL, CGD and proxy losses)."""

__version__ = "0.1.0"
