"""``python -m hdml_jax.search``: the command of ``hdml_jax.inference.search`` (see its docstring)."""

from hdml_jax.inference.search import main

if __name__ == "__main__":
    raise SystemExit(main())
