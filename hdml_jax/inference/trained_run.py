"""A trained run's workdir, read back: its resolved config, its checkpoints, and which one to use.

``select_step`` picks by default the best checkpoint by the run's ``best_metric`` among those kept
(``best_step``: ``final_metrics.json``'s ``best.step`` for a finished run, else the best of the
evaluations stored in the newest checkpoint); if that checkpoint is not on disk, the newest one,
with a note saying why. ``--step N`` picks exactly that one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from hdml_jax import storage
from hdml_jax.inference.errors import ConfigNotFoundError, StepNotFoundError, WorkdirNotFoundError
from hdml_jax.training import checkpoints


def resolve_workdir(workdir: str | Path) -> storage.AnyPath:
    """``workdir`` as an absolute path (or a bucket URL, ``hdml_jax.storage``);
    ``WorkdirNotFoundError`` if it is not a folder."""
    path = storage.resolve(os.path.expanduser(os.fspath(workdir)))
    if not path.is_dir():
        raise WorkdirNotFoundError(
            f"workdir {workdir} does not exist. Pass --workdir the folder a training run wrote "
            "(python -m hdml_jax.main --workdir DIR; default runs/<dataset>_<method>)."
        )
    return path.resolve()


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's resolved config from ``<workdir>/config.json``."""
    workdir = resolve_workdir(workdir)
    path = workdir / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigNotFoundError(
            f"{workdir} has no config.json, so it is not a training run's workdir (or the run stopped "
            "before its first checkpoint). Point --workdir at a trained run, or train one first: "
            f"python -m hdml_jax.main --workdir {workdir}."
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigNotFoundError(
            f"{path} cannot be read ({error}). Training writes it when a run starts: rerun the run's "
            "python -m hdml_jax.main command with the same --workdir to write it again."
        ) from None
    return ml_collections.ConfigDict(values)


def available_steps(workdir: str | Path) -> list[int]:
    """The checkpoint steps on disk, oldest first."""
    return checkpoints.steps_in(storage.as_path(workdir) / "checkpoints")


def best_step(workdir: Path, evaluations: Sequence[dict[str, Any]], metric: str) -> int | None:
    """The step of the run's best evaluation by ``metric`` (None: no evaluation yet).

    The candidates are ``evaluations`` (those stored in the newest checkpoint: every evaluation
    up to it) and ``final_metrics.json``'s last and best evaluations (the final evaluation comes
    after the last save, so only that file has it). Ties go to the earlier step, as in training.
    """
    records = {int(e["step"]): e for e in evaluations if isinstance(e, dict) and "step" in e}
    try:
        summary = json.loads((workdir / "final_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict):
        last = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        for record in (summary.get("best"), last):
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.setdefault(int(record["step"]), record)
    best = checkpoints.best_evaluation([records[step] for step in sorted(records)], metric)
    return None if best is None else int(best["step"])


def select_step(
    available: Sequence[int], best: int | None, requested: int | None = None
) -> tuple[int, str | None]:
    """``(step, note)``: ``requested`` if given (``StepNotFoundError`` if absent), else ``best``
    if on disk, else the newest of ``available`` with a note saying why."""
    available = sorted(available)
    listing = ", ".join(map(str, available))
    if requested is not None:
        if requested not in available:
            raise StepNotFoundError(
                f"no checkpoint of step {requested}; the checkpoints on disk are steps {listing}. "
                "Pass one of them to --step, or leave --step out for the best."
            )
        return requested, None
    newest = available[-1]
    if best is None:
        return newest, f"note: no evaluation recorded yet; using the newest checkpoint, step {newest}."
    if best not in available:
        return newest, (
            f"note: the best checkpoint (step {best}) is no longer on disk; using the newest, step "
            f"{newest} (on disk: {listing})."
        )
    return best, None
