"""The one native part of hdml_jax: an optional C kernel for the input pipeline's resize.

Everything else is in ``pyproject.toml``. The extension is ``optional``: without a C compiler (or
if it fails to build) the install still succeeds and ``hdml_jax.data.resample`` falls back to
Pillow, with the same pixels; that resize is about 3× slower (``benchmarks/input.py`` prints
which it timed).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hdml_jax.data._resample",
            ["hdml_jax/data/_resample.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
