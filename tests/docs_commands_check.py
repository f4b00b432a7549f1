"""Dry-run the command lines of the guides: each module exists and its flags parse, nothing runs.

Reads a JSON list of argv lists (``["-m", "hdml_jax.embed", "--workdir", "RUN", ...]`` or
``["benchmarks/losses.py", ...]``) on stdin and prints one JSON list of ``null`` (parsed) or the
error message. ``tests/test_docs.py`` runs it in one subprocess (JAX is imported once).

* ``hdml_jax.main``: absl's flag parsing as the CLI does it (``main.parse_flags``: the config
  file, its ``:method=`` option, every ``--config.FIELD`` override), then ``config.validate``
  with the overridden fields, i.e. everything before the data set is opened.
* every other ``hdml_jax`` command, and any script that calls ``parse_args``: run as ``__main__``
  until an ``argparse`` parser's ``parse_args`` returns, then stopped (its error is the failure).
* anything else (``-m pytest``, a script without argparse): it must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StopAfterParseError(Exception):
    """Raised right after a successful ``parse_args``: the command would now start its work."""


def _check_main(args: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    from hdml_jax import config as config_lib
    from hdml_jax import main

    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # the last config file's overrides
        delattr(flags.FLAGS, name)
    sys.argv = ["hdml_jax.main", *args]  # config_flags reads it
    main.parse_flags(sys.argv)
    config = flags.FLAGS.config
    config_lib.validate(config, tuple(config_flags.get_override_values(flags.FLAGS["config"])))


def _source(argv: list[str]) -> tuple[str, str | None]:
    """``(what to run, its source code or None when it does not exist)``."""
    if argv[0] == "-m":
        spec = importlib.util.find_spec(argv[1])
        if spec is None:
            return argv[1], None
        if spec.submodule_search_locations:  # a package: python -m runs its __main__
            spec = importlib.util.find_spec(argv[1] + ".__main__")
        origin = Path(spec.origin) if spec and spec.origin else None
        return argv[1], origin.read_text() if origin and origin.is_file() else ""
    path = ROOT / argv[0]
    return argv[0], path.read_text() if path.is_file() else None


def check(argv: list[str]) -> str | None:
    name, source = _source(argv)
    if source is None:
        return f"{name} does not exist"
    args = argv[2:] if argv[0] == "-m" else argv[1:]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                if name == "hdml_jax.main":
                    _check_main(args)
                elif name.startswith("hdml_jax.") or "parse_args" in source:
                    _check_argparse(argv, name, args)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    return f"exit {exit_.code}: {err.getvalue().strip()[-500:]}"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _check_argparse(argv: list[str], name: str, args: list[str]) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise StopAfterParseError

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [name, *args]
    try:
        if argv[0] == "-m":
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:  # as `python script.py` does: the script's folder first on the path
            sys.path.insert(0, str((ROOT / name).parent))
            runpy.run_path(str(ROOT / name), run_name="__main__")
    except StopAfterParseError:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
        if argv[0] != "-m":
            sys.path.remove(str((ROOT / name).parent))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    commands = json.loads(sys.stdin.read())
    print(json.dumps([check(argv) for argv in commands]))
