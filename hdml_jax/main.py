"""The main job: ``python -m hdml_jax.main [--config configs/<dataset>.py[:method=...]] [--workdir DIR]``.

Without ``--config`` it runs the embedded default, ``configs/synthetic.py`` (HPL-PA on the
generated synthetic data set). Any field can be overridden: ``--config.optimizer.lr=2e-4``.
Rerunning the same command resumes from the workdir's last checkpoint (a finished run says so
and stops); ``--config.eval_only=True`` evaluates the latest checkpoint again.

Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step and exits (130 after Ctrl-C, 0
after SIGTERM); a second one exits at once. Mistakes end in one ``error:`` line and exit 2;
``HDML_JAX_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from hdml_jax import interrupts, storage
from hdml_jax.errors import ConfigError, UserError, debug_enabled, exit_with_message

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "synthetic.py"
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")

# No default here: ml_collections would load the default file (and apply sys.argv's overrides)
# at import, outside any error handling. parse_flags supplies configs/synthetic.py instead.
config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :method=...")
flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and pictures go: a folder or a bucket, gs://BUCKET/RUN "
    "(default: runs/<dataset>_<method>).",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def _config_files() -> list[Path]:
    return sorted((ROOT / "configs").glob("*.py"))


def usage() -> str:
    """``--help``: the command, the config files, the methods and where every field is documented."""
    from hdml_jax import methods

    configs = []
    for path in _config_files():
        doc = path.read_text().split('"""')
        first = doc[1].strip().splitlines()[0] if len(doc) > 2 else ""
        configs.append(f"  configs/{path.name:<14} {first}")
    return "\n".join(
        [
            "usage: python -m hdml_jax.main [--config FILE[:method=NAME]] [--workdir DIR] [--config.FIELD=VALUE ...]",
            "",
            "Train a deep-metric-learning model, evaluate it (Recall@K, MAP@R, R-Precision, NMI) and",
            "write checkpoints, metrics and pictures to the workdir. Rerun the same command to resume.",
            "",
            "configs (default: configs/synthetic.py, generated data, no download):",
            *configs,
            "",
            "methods (FILE:method=NAME; each recipe and its sources: hdml_jax/methods/):",
            *(f"  {m.name:<23} {m.summary}" for m in methods.registered()),
            "",
            "flags:",
            "  --workdir DIR              checkpoints, metrics.jsonl, final_metrics.json, pictures",
            "                             (default: runs/<dataset>_<method>); or a bucket, gs://BUCKET/RUN",
            "  --config.FIELD=VALUE       any config field, e.g. --config.optimizer.lr=2e-4,",
            "                             --config.eval_only=True; every field is listed with a comment",
            "                             in hdml_jax/config.py base_config()",
            "  --coordinator_address, --num_processes, --process_id   multi-host without auto-detection",
            "",
            "Ctrl-C or SIGTERM: checkpoint at the next step and exit (130 / 0); twice: exit at once.",
            "HDML_JAX_DEBUG=1 shows tracebacks of user errors.  More: README.md and its guides in docs/",
        ]
    )


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes/contexts, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _last_exception_line(text: str) -> str:
    """``pkg.SomeError: message`` → ``message``: the last line of a traceback formatted as text
    (ml_collections puts a config file's traceback into its own error's message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^[\w.]+(Error|Exception|Exit):\s*", "", last)


def describe_flag_error(error: BaseException, argv: list[str]) -> str:
    """One line for a command line that absl or ml_collections could not parse."""
    chain = _chain(error)
    for candidate in reversed(chain):  # the innermost: ml_collections re-raises with a traceback as text
        if isinstance(candidate, UserError):
            return _last_exception_line(str(candidate))
    if isinstance(error, flags.IllegalFlagValueError):  # names the flag and the value
        return str(error).splitlines()[0]
    if isinstance(error, flags.UnrecognizedFlagError):
        return (
            f"unknown flag --{error.flagname}.{misspelt_flag_hint(error.flagname)} "
            "python -m hdml_jax.main --help lists the flags."
        )
    for candidate in chain:
        if isinstance(candidate, (AttributeError, KeyError)):  # an unknown --config.FIELD
            text = str(candidate).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
            key, _, hint = text.partition("\n")
            key = key.strip("'\"")
            flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
            hint = f" {hint.strip()}" if hint.strip() else ""
            return f"unknown config field in {flag}.{hint} Every field is listed in hdml_jax/config.py base_config()."
    text = str(chain[-1])
    if "Traceback (most recent call last)" in str(error):
        text = _last_exception_line(str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[-2:]) if lines else type(chain[-1]).__name__


# The flags of this command that take a value (absl's own, such as --verbosity, are left to absl).
VALUE_FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id")


def _check_flag_values(argv: list[str]) -> None:
    """``--workdir`` as the last argument, or followed by another flag: absl would consume the next
    flag as the value or fail deep inside ml_collections; say which flag lacks its value."""
    for index, arg in enumerate(argv[1:], start=1):
        name = arg[2:] if arg.startswith("--") else None
        if name not in VALUE_FLAGS:
            continue
        following = argv[index + 1] if index + 1 < len(argv) else None
        if following is None or following.startswith("--"):
            example = {"config": "configs/cub.py", "workdir": "runs/my_run"}.get(name, "VALUE")
            raise ConfigError(f"--{name} needs a value: --{name}={example} (or --{name} {example}).")


def known_flag_names() -> list[str]:
    """Every flag this command accepts, as typed: ``workdir``, ``config``, ``verbosity``, ..."""
    return sorted(FLAGS)


def misspelt_flag_hint(name: str) -> str:
    """`` Did you mean --config.seed?`` for ``confg.seed``; empty when nothing is close."""
    import difflib

    head, dot, rest = name.partition(".")
    if dot and difflib.get_close_matches(head, ["config"], n=1, cutoff=0.6):
        return f" Did you mean --config.{rest}?"
    close = difflib.get_close_matches(name, known_flag_names(), n=1, cutoff=0.75)
    return f" Did you mean --{close[0]}?" if close else ""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with ``--help`` that exits 0 and errors in one line."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        _check_flag_values(argv)
    except ConfigError as error:
        exit_with_message(error)
    argv = _resolve_config_file(argv)
    try:
        remaining = FLAGS(argv)
        FLAGS.config.method  # noqa: B018 — ml_collections defers a config file's errors until here
        return remaining
    except Exception as error:
        if debug_enabled():
            raise
        exit_with_message(ConfigError(describe_flag_error(error, argv)))
        raise  # unreachable: exit_with_message exits


def find_config_file(path: str) -> Path | None:
    """A ``--config`` file: as given (relative to the working directory), else relative to the
    repository (``configs/cub.py`` from anywhere), else in its ``configs/`` (``cub.py``)."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [given, ROOT / given, ROOT / "configs" / given]
    return next((candidate.resolve() for candidate in candidates if candidate.is_file()), None)


def _resolve_config_file(argv: list[str]) -> list[str]:
    """``argv`` with the ``--config`` file's path made absolute (``find_config_file``); a missing
    file ends in one line that names the folders searched and the configs there."""
    resolved = list(argv)
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            position, value, form = index + 1, argv[index + 1], "{}"
        elif arg.startswith("--config="):
            position, value, form = index, arg.split("=", 1)[1], "--config={}"
        else:
            continue
        path, colon, method_arg = value.partition(":")
        found = find_config_file(path)
        if found is None:
            available = ", ".join(f"configs/{p.name}" for p in _config_files())
            exit_with_message(
                ConfigError(
                    f"config file {path} not found in the working directory ({Path.cwd()}) or in "
                    f"{ROOT}; the repository's configs: {available}."
                )
            )
        resolved[position] = form.format(f"{found}{colon}{method_arg}")
    return resolved


def _multi_process() -> bool:
    """Explicit flags, a multi-task SLURM step, or a multi-host TPU VM slice."""
    if FLAGS.coordinator_address:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        exit_with_message(ConfigError(f"unexpected arguments {argv[1:]}; flags look like --workdir=DIR."))
    # Libraries (orbax above all) log every checkpoint step at INFO through absl; keep the screen
    # for the progress line and the evaluation summaries. --verbosity=0 brings them back.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    import jax

    if _multi_process():
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    from hdml_jax.training import train

    config = FLAGS.config
    overridden = tuple(config_flags.get_override_values(FLAGS["config"]))
    workdir = FLAGS.workdir or config.workdir or f"runs/{config.dataset.name}_{config.method}"
    try:
        if config.mlrc.enabled:
            from hdml_jax.protocols import mlrc

            results = mlrc.run(config, workdir, overridden=overridden)
            if results is not None and jax.process_index() == 0:
                print(
                    f"done: MLRC concatenated MAP@R {results['concatenated']['map@r']:.2f} — results in "
                    f"{storage.display(storage.as_path(workdir) / mlrc.RESULTS_FILE)}"
                )
            return 0
        final = train.train_and_evaluate(config, workdir, overridden=overridden)
    except train.TrainingInterruptedError as stop:
        print(f"\n{stop}", file=sys.stderr)
        return interrupts.exit_code(stop.signum)
    except UserError as error:
        exit_with_message(error)
    except train.TrainingDivergedError as error:
        exit_with_message(error)
    if jax.process_index() == 0:
        results = storage.as_path(workdir) / "final_metrics.json"
        print(
            f"done: recall@1 {100 * final['recall@1']:.2f} % — results in {storage.display(workdir)}; "
            f"{storage.display(results)} holds the metrics as fractions ({final['recall@1']:.4f})"
        )
    return 0


def run() -> None:
    # Ctrl-C from the very start: before JAX is imported, during flag parsing and start-up.
    interrupts.install()
    try:
        app.run(main, flags_parser=parse_flags)
    finally:
        interrupts.uninstall()


if __name__ == "__main__":
    run()
