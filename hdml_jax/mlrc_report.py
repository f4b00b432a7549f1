"""``python -m hdml_jax.mlrc_report``: the command of ``hdml_jax.protocols.mlrc_report`` (see its docstring)."""

from hdml_jax.protocols.mlrc_report import main

if __name__ == "__main__":
    raise SystemExit(main())
