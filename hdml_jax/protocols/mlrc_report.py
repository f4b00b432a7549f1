"""Test an MLRC run whose folds trained separately: ``python -m hdml_jax.mlrc_report --workdir W``.

Reads ``W/fold0`` … ``W/fold3`` (each trained by ``python -m hdml_jax.main --config
configs/mlrc/<dataset>.py --config.mlrc.fold=F --workdir W``), embeds the test half with every
fold's best checkpoint and writes ``W/mlrc_results.json`` (concatenated and separated MAP@R, P@1,
R-Precision; see ``hdml_jax.protocols.mlrc``). Mistakes end in one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from hdml_jax import interrupts
from hdml_jax.errors import UserError, exit_with_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdml_jax.mlrc_report", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the MLRC run's folder (holding fold0 … fold3)")
    args = parser.parse_args(argv)
    installed = interrupts.install()
    try:
        from hdml_jax.protocols import mlrc

        mlrc.report(args.workdir)
    except interrupts.StopRequestedError:
        print("\nstopped; nothing was written. Rerun the same command.", file=sys.stderr)
        return interrupts.exit_code(interrupts.received())
    except UserError as error:
        exit_with_message(error)
    finally:
        if installed:
            interrupts.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
