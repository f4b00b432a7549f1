"""``python -m hdml_jax.export``: the command of ``hdml_jax.inference.export`` (see its docstring)."""

from hdml_jax.inference.export import main

if __name__ == "__main__":
    raise SystemExit(main())
