"""Every config a user can name, resolved: the record that a refactor changes no recipe.

For each config file (``configs/*.py``, ``configs/mlrc/*.py``), each method the project knows and
each backbone option (none, ``resnet``, ``bn_inception`` and the three ViT weights HIER's
scripts train: ``vit_s16_dino``, ``deit_s16_distilled``, ``vit_s16_augreg``), the file's ``get_config`` is called as
``main`` calls it and the result validated; the record is the resolved config as a plain dict, or
the one-line error a user would get. ``tests/data/resolved_configs.json`` holds the record;
``test_config.py`` compares against it.

An intended recipe change rewrites it (and the diff is the review)::

    .venv/bin/python -m tests.resolved_configs --write
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "resolved_configs.json"
BACKBONE_OPTIONS = (None, "resnet", "bn_inception", "vit_s16_dino", "deit_s16_distilled", "vit_s16_augreg")
# default_loader_threads() depends on the CPUs of the machine: fixed while resolving.
LOADER_THREADS = 4


def config_files() -> list[Path]:
    return sorted([*ROOT.glob("configs/*.py"), *ROOT.glob("configs/mlrc/*.py")])


def _load(path: Path):
    name = "resolved_" + "_".join(path.relative_to(ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_all(methods: tuple[str, ...]) -> dict[str, object]:
    """``{"configs/cub.py:method=hpl_pa,backbone=resnet": {...} | "error: ..."}`` for every combination."""
    from hdml_jax import config as config_lib
    from hdml_jax.errors import ConfigError

    record: dict[str, object] = {}
    with mock.patch.object(config_lib, "default_loader_threads", return_value=LOADER_THREADS):
        for path in config_files():
            module = _load(path)
            for method in methods:
                for backbone in BACKBONE_OPTIONS:
                    arg = f"method={method}" + (f",backbone={backbone}" if backbone else "")
                    key = f"{path.relative_to(ROOT).as_posix()}:{arg}"
                    try:
                        c = module.get_config(arg)
                        if c.dataset.name == "custom" and not c.dataset.get("path"):
                            c.dataset.path = "items.csv"  # what every custom run must set
                        config_lib.validate(c)
                    except ConfigError as error:
                        record[key] = f"error: {error}"
                        continue
                    record[key] = json.loads(json.dumps(c.to_dict(), sort_keys=True))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {FIXTURE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    from hdml_jax import methods

    record = resolve_all(methods.names())
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        # One line per combination: a recipe change shows as the lines of the configs it changed.
        lines = [f"  {json.dumps(key)}: {json.dumps(record[key], sort_keys=True)}" for key in sorted(record)]
        FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"wrote {len(record)} resolved configs to {FIXTURE.relative_to(ROOT)}")
    else:
        json.dump(record, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
