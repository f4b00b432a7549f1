"""``python -m hdml_jax.evaluate``: the command of ``hdml_jax.inference.scoring`` (see its docstring)."""

from hdml_jax.inference.scoring import main

if __name__ == "__main__":
    raise SystemExit(main())
