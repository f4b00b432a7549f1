"""The main job's loop: train, evaluate, save, stop and finish a ``Run`` (``hdml_jax.training.run``:
the run's state, prepared or restored; ``hdml_jax.training.setup``: what a run starts from).

``train_and_evaluate(config, workdir)`` is all ``main.py`` calls. One batch goes
``data.pipeline`` → ``steps.train_step`` (jit, sharded) → optax; every ``eval_every_epochs`` the
test split is embedded and scored (``evaluate``); orbax checkpoints hold the whole state plus the
data iterator position (``hdml_jax.training.checkpoints``), so rerunning the same command resumes exactly
where it stopped, and a finished run says so and does nothing.

Nothing is lost when the user interrupts or errs: SIGINT and SIGTERM stop at the next safe point
with a checkpoint (``hdml_jax.interrupts``); a hard kill leaves the last complete checkpoint;
a damaged checkpoint falls back to the newest intact one; the workdir is locked against a
second run; a full disk or a mistake ends in one message, and a run that fails before its first
step leaves no workdir behind (``hdml_jax.workdir``).

Workdir layout::

    config.json          the resolved config (written once a resume is validated)
    metrics.jsonl        one JSON record per log step and per evaluation
    events.*             TensorBoard (tensorboardX)
    checkpoints/         orbax: the last ``keep_checkpoints`` and the best by ``best_metric``
    final_metrics.json   the last evaluation, and the best one under "best"; marks the run complete
    test_embeddings.npy  test_labels.npy (and query/gallery for In-Shop)
    tsne.png  retrieval.png  curves.png
    .lock                held by the running process

The workdir may be object storage (``--workdir gs://bucket/run``, ``hdml_jax.storage``): orbax
writes the checkpoints there itself, every other file is uploaded whole, the logs are mirrored
from a local staging folder before each checkpoint (``hdml_jax.training.reporting``), and there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from hdml_jax import interrupts, storage
from hdml_jax.config_checks import validate
from hdml_jax.data import fits
from hdml_jax.data.base import MetricDataset
from hdml_jax.errors import UserError
from hdml_jax.training import checkpoints, optim
from hdml_jax.training.outputs import write_outputs
from hdml_jax.training.run import (
    Run,
    TrainingDivergedError,
    _last_good,
    _with_evaluation,
    prepare,
)
from hdml_jax.training.setup import (
    load_data,
)
from hdml_jax.workdir import (
    WorkdirLock,
    first_missing_ancestor,
    remove_stub,
)


class TrainingInterruptedError(Exception):
    """SIGINT, SIGTERM or ``stop_after_steps``: the message says what was saved and how to go on.

    ``step``: the step of the checkpoint saved on the way out (None: stopped during start-up);
    ``signum``: the signal, or None for ``stop_after_steps``.
    """

    def __init__(self, message: str, *, step: int | None, signum: int | None):
        super().__init__(message)
        self.step, self.signum = step, signum


class NoCheckpointError(UserError, FileNotFoundError):
    """``eval_only`` with no checkpoint to evaluate."""


# ----------------------------------------------------------------------------- run control


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a stop request"


def _stop_agreed(step: int, every: int) -> bool:
    """Whether to stop after ``step``. With several processes all must stop at the same step (the
    save is collective): the flag is all-gathered every ``every`` steps only (a collective)."""
    requested = interrupts.received() is not None
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.array([requested]))))


def _completed(workdir: storage.AnyPath, num_steps: int) -> dict[str, Any] | None:
    """``final_metrics.json`` of a run that already reached ``num_steps``, else None."""
    path = workdir / "final_metrics.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("step", -1) >= num_steps or summary.get("stopped_early") else None


# ----------------------------------------------------------------------------- train_and_evaluate


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    dataset: MetricDataset | None = None,
    overridden: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train (or, with ``eval_only``, just evaluate) and return the final metrics.

    ``workdir``: a local folder or a bucket (``gs://bucket/run``; ``hdml_jax.storage``).
    ``dataset`` replaces the one named by ``config.dataset.name`` (train on your own data).
    ``overridden``: the dotted fields set on the command line (checked against the method).

    Raises ``UserError`` subclasses for what the user can fix (bad config, missing data or
    checkpoint, workdir in use, full disk), ``TrainingInterruptedError`` after SIGINT/SIGTERM or
    ``stop_after_steps`` (a checkpoint is saved where there was anything to save) and
    ``TrainingDivergedError``. A run that fails before its first step leaves no workdir behind.
    """
    validate(config, overridden)
    workdir = storage.as_path(workdir)
    storage.check_remote(workdir, "--workdir")
    primary = jax.process_index() == 0
    created = first_missing_ancestor(workdir) if primary else None
    installed = interrupts.install()
    started = False
    try:
        if config.eval_only and not checkpoints.steps_in(workdir / "checkpoints"):
            raise NoCheckpointError(
                f"eval_only=True but {workdir / 'checkpoints'} holds no checkpoint; train first "
                "(the same command without --config.eval_only) or point --workdir at a trained run."
            )
        dataset = load_data(config) if dataset is None else dataset
        note = fits.check_dataset_fits(config, dataset, jax.device_count())
        if note and primary:
            print(note, file=sys.stderr)
        steps_per_epoch = optim.steps_per_epoch(config, len(dataset.train))
        num_steps = optim.total_steps(config, steps_per_epoch)
        interrupts.stop_point()
        storage.makedirs(workdir)
        with WorkdirLock(workdir) if primary else contextlib.nullcontext():
            complete = None if config.eval_only else _completed(workdir, num_steps)
            if complete is not None:
                if primary:
                    print(
                        f"{workdir} holds a complete run (step {complete['step']}, recall@1 "
                        f"{100 * complete['recall@1']:.2f}); nothing to do. --config.eval_only=True "
                        "evaluates it again; a larger num_epochs continues it.",
                        file=sys.stderr,
                    )
                return {k: v for k, v in complete.items() if not isinstance(v, dict)}
            run = prepare(config, workdir, dataset, steps_per_epoch, num_steps)
            started = True
            return _train_and_finish(run)
    except interrupts.StopRequestedError:
        signum = interrupts.received()
        if primary:
            remove_stub(workdir, created)
        where = "resume" if checkpoints.steps_in(workdir / "checkpoints") else "start"
        raise TrainingInterruptedError(
            f"stopped by {_signal_name(signum)} during start-up; nothing new to save. "
            f"Rerun the same command to {where}.",
            step=None,
            signum=signum,
        ) from None
    except BaseException:
        if not started and primary:
            remove_stub(workdir, created)
        raise
    finally:
        if installed:
            interrupts.uninstall()


def patience_exhausted(evaluations: list[dict[str, Any]], metric: str, patience_epochs: float) -> bool:
    """Whether the latest evaluation comes more than ``patience_epochs`` epochs after the best one.

    PML's ``HookContainer.patience_remaining`` (MLRC's runs): ``epoch - best_epoch > patience``,
    where the best is the first evaluation with the highest ``metric`` (strict ``>``). Off when
    ``patience_epochs <= 0`` or nothing was evaluated yet.
    """
    best = checkpoints.best_evaluation(evaluations, metric)
    if patience_epochs <= 0 or best is None:
        return False
    latest = max(evaluations, key=lambda e: e["step"])
    return latest["epoch"] - best["epoch"] > patience_epochs + 1e-9


def _train_and_finish(run: Run) -> dict[str, Any]:
    """The loop, the final evaluation and the outputs; stops cleanly on SIGINT/SIGTERM."""
    try:
        if not run.config.eval_only:
            _train_loop(run)
        reused = run.stopping_evaluation is not None and run.stopping_evaluation[0] == run.step
        if reused:  # already evaluated, logged and recorded when training stopped
            _, final, embeddings = run.stopping_evaluation
        else:
            final, embeddings = run.evaluate()
        step = run.step
        if run.config.eval_only:
            run.reporter.eval(step, step / run.steps_per_epoch, final)
            evaluations = _with_evaluation(run.evaluations, step, step / run.steps_per_epoch, final)
        else:
            if not reused:
                run.record_evaluation(final)
            checkpoints.prune(
                run.manager, run.evaluations, run.config.keep_checkpoints, run.config.best_metric
            )
            evaluations = run.evaluations
        if jax.process_index() == 0:
            run.reporter.sync()  # curves.png reads the workdir's metrics.jsonl
            stopped_early = step < run.num_steps and not run.config.eval_only
            write_outputs(
                run.workdir, run.config, run.dataset, final, embeddings, step, evaluations, stopped_early
            )
        return final
    except interrupts.StopRequestedError:
        signum = interrupts.received()
        raise TrainingInterruptedError(
            f"stopped by {_signal_name(signum)} during the final evaluation; training is complete "
            f"and saved (step {run.step} in {run.manager.directory}). Rerun the same command to "
            "evaluate and write the results.",
            step=run.step,
            signum=signum,
        ) from None
    finally:
        run.reporter.close()
        run.manager.close()


def _train_loop(run: Run) -> None:
    """Steps from the state's step to ``num_steps``: log, evaluate, checkpoint, stop on request."""
    config, reporter, phases = run.config, run.reporter, run.phases
    steps_per_epoch, num_steps = run.steps_per_epoch, run.num_steps
    schedule = optim.learning_rate_schedule(config, steps_per_epoch)
    eval_steps = config.eval_every_epochs * steps_per_epoch
    step = start_step = run.step
    saved = step if run.manager.latest_step() == step else None

    def stop(message: str) -> TrainingInterruptedError:
        signum = interrupts.received()
        return TrainingInterruptedError(
            f"stopped at step {run.step} ({message}); checkpoint saved in "
            f"{run.manager.directory / str(run.step)}. Rerun the same command to resume.",
            step=run.step,
            signum=signum,
        )

    if run.evaluate_first and step < num_steps:  # a stop cut this step's evaluation short
        try:
            result, _ = run.evaluate()
        except interrupts.StopRequestedError:
            raise stop(_signal_name(interrupts.received())) from None
        run.record_evaluation(result)
        run.evaluate_first = False
    if config.eval_at_start and step == 0 and num_steps > 0 and not run.evaluations:
        try:
            result, _ = run.evaluate()
        except interrupts.StopRequestedError:
            raise stop(_signal_name(interrupts.received())) from None
        run.record_evaluation(result)
        run.save()  # the untrained model may stay the best: keep its checkpoint
        saved = 0
    patience = config.early_stopping_patience_epochs

    def out_of_patience() -> bool:
        if not patience_exhausted(run.evaluations, config.best_metric, patience):
            return False
        best = checkpoints.best_evaluation(run.evaluations, config.best_metric)
        print(
            f"early stop at step {run.step}: no better {config.best_metric} in more than {patience} "
            f"epochs since the best (step {best['step']}, {100 * best[config.best_metric]:.2f})",
            file=sys.stderr,
        )
        return True

    if out_of_patience():  # resumed after the stop: nothing left to train
        return
    while step < num_steps:
        state = phases.begin_step(run.state, step)
        step_fn = phases.step_function(step)
        local = next(run.train_iter)
        batch = {
            key: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(local[key]))
            for key in ("image", "label")
        }
        run.state, metrics = step_fn(state, batch)
        step += 1
        log_now = step % config.log_every_steps == 0 or step == num_steps
        signalled = _stop_agreed(step, config.log_every_steps)
        requested = (
            config.stop_after_steps > 0 and step - start_step >= config.stop_after_steps and step < num_steps
        )
        stop_now = signalled or requested
        checkpoint_now = step % config.checkpoint_every_steps == 0 or stop_now
        eval_now = eval_steps > 0 and step % eval_steps == 0 and step < num_steps
        if log_now or checkpoint_now or eval_now:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not values.pop("finite"):
                raise TrainingDivergedError(
                    f"loss, parameters or BatchNorm statistics became NaN/Inf at step {step} (loss "
                    f"{values['loss']}){_last_good(run.manager)}. Lower optimizer.lr, or raise grad clipping."
                )
            values["lr"] = float(schedule(step - 1))  # the rate this step used
            if log_now:
                reporter.train(step, step / steps_per_epoch, values)
        if eval_now and not stop_now:
            try:
                result, embeddings = run.evaluate()
            except (
                interrupts.StopRequestedError
            ):  # save now; the evaluation of this step runs first on resume
                run.save(evaluate_first=True)
                raise stop(_signal_name(interrupts.received())) from None
            run.record_evaluation(result)
        if checkpoint_now or eval_now:
            run.save(evaluate_first=eval_now and stop_now)
            saved = step
            reporter.restart_clock(step)
        if eval_now and not stop_now and out_of_patience():
            run.stopping_evaluation = (step, result, embeddings)
            return
        if stop_now:
            raise stop(
                _signal_name(interrupts.received())
                if signalled
                else f"stop_after_steps={config.stop_after_steps}"
            )
    if saved != step:
        run.save()
