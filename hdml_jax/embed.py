"""``python -m hdml_jax.embed``: the command of ``hdml_jax.inference.embed`` (see its docstring)."""

from hdml_jax.inference.embed import main

if __name__ == "__main__":
    raise SystemExit(main())
