"""The main job: ``python -m hdml_jax.main [--config configs/<dataset>.py[:method=...]] [--workdir DIR]``.

Without ``--config`` it runs the embedded default, ``configs/synthetic.py`` (HPL-PA on the
generated synthetic data set). Any field can be overridden: ``--config.optimizer.lr=2e-4``.
Rerunning the same command resumes from the workdir's last checkpoint; ``--config.eval_only=True``
evaluates the latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.py"

config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "A configs/*.py file, optionally with :method=..."
)
flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and pictures go (default: runs/<dataset>_<method>)."
)
flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def _multi_process() -> bool:
    """Explicit flags, a multi-task SLURM step, or a multi-host TPU VM slice."""
    if FLAGS.coordinator_address:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Libraries (orbax above all) log every checkpoint step at INFO through absl; keep the screen
    # for the progress line and the evaluation summaries. --verbosity=0 brings them back.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    if _multi_process():
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    from hdml_jax import train
    from hdml_jax.config import validate
    from hdml_jax.models.weights import WeightsUnavailableError

    config = FLAGS.config
    try:
        validate(config)
    except ValueError as error:
        sys.exit(f"config error: {error}")
    workdir = FLAGS.workdir or config.workdir or f"runs/{config.dataset.name}_{config.method}"
    try:
        final = train.train_and_evaluate(config, workdir)
    except train.TrainingInterruptedError as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 0
    except WeightsUnavailableError as error:  # offline: the message says how to get the weights
        sys.exit(f"error: {error}")
    if jax.process_index() == 0:
        print(f"done: recall@1 {100 * final['recall@1']:.2f} — results in {Path(workdir).resolve()}")
    return 0


if __name__ == "__main__":
    app.run(main)
