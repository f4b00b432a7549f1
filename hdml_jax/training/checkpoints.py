"""Checkpoints that survive hard kills, full disks and damaged files.

Each checkpoint (``<workdir>/checkpoints/<step>/``, orbax) holds two items:

* ``state``: the whole training state (parameters, BatchNorm statistics, optimizer, hierarchy, rng);
* ``data``: JSON — the input iterator's position, the evaluations of the run so far (which
  checkpoint is the best), whether the evaluation of this step is still due (a stop during it),
  and a fingerprint of ``state``.

Orbax makes a checkpoint visible only by an atomic rename once complete, so a kill mid-save
leaves the previous ones as they were. What orbax does not notice is a file damaged later (a
truncated copy, a flipped bit): the fingerprint — two wrap-around sums of every leaf's bits,
exact under any sharding — is checked after every restore, and ``restore_latest_intact`` falls
back to the newest checkpoint that passes, moving the damaged ones to
``<workdir>/damaged_checkpoints/`` (never deleting them, never silently starting afresh).

Retention (``prune``): the last ``keep`` checkpoints plus the best by the configured metric
among the evaluated ones, the final evaluation included.

A remote workdir (``gs://``; ``hdml_jax.storage``) goes to orbax as an ``epath.Path``. On GCS
orbax has no atomic rename: it writes into ``<step>/`` directly and marks it complete with a
``commit_success.txt`` written last, ignoring and cleaning up folders without one; ``steps_in``
counts a remote checkpoint only with that file.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from hdml_jax import storage
from hdml_jax.errors import UserError

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished checkpoint on object storage


class NoIntactCheckpointError(UserError):
    """Every checkpoint in the workdir failed to restore (damaged, or written by another config)."""


class DamagedCheckpointError(Exception):
    """A restored checkpoint does not match the fingerprint saved with it."""


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax logs (through absl) every step of a save and each failed read's stack: keep them
    off the screen while we save and restore; our own messages say what matters."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def manager(directory: storage.AnyPath | str) -> ocp.CheckpointManager:
    """Synchronous orbax manager that keeps everything (``prune`` decides) and removes the
    temporary folders of saves a kill interrupted. ``directory`` may be remote (``gs://``)."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, cleanup_tmp_directories=True)
    with quiet_orbax():
        return ocp.CheckpointManager(storage.resolve(directory), options=options)


def steps_in(directory: storage.AnyPath | str) -> list[int]:
    """The committed checkpoint steps in ``directory`` (without opening orbax).

    Remote: only folders with orbax's ``commit_success.txt`` (a save cut short has none).
    """
    directory = storage.as_path(directory)
    if not directory.is_dir():
        return []
    if storage.is_remote(directory):
        return sorted(
            int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / COMMIT_FILE).exists()
        )
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def discard_partial_saves(manager: ocp.CheckpointManager) -> None:
    """After a failed save (a full disk): remove its temporary folder at once, to give the space
    back, and mute the complaints of orbax's write tasks that died with it."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "exception was never retrieved"
    if jax.process_index() == 0:
        directory = storage.as_path(manager.directory)
        for path in directory.glob("*.orbax-checkpoint-tmp*"):
            if storage.is_remote(path):
                with contextlib.suppress(FileNotFoundError):
                    path.rmtree()
            else:
                shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- fingerprint


@jax.jit
def _fingerprint(tree: Any) -> jax.Array:
    """``(num_leaves, 2)`` uint32: Σ bits and Σ bits·(i·2654435761 + 1), both mod 2³²."""

    def leaf(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        bits = (
            x.astype(jnp.uint8)
            if x.dtype == jnp.bool_
            else jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
        )
        bits = bits.ravel().astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits), jnp.sum(bits * weights)])

    leaves = jax.tree.leaves(tree)
    return jnp.stack([leaf(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(state: Any) -> list[list[int]]:
    """A checksum of every leaf of ``state`` (order of ``jax.tree.leaves``), as JSON-able ints."""
    return np.asarray(jax.device_get(_fingerprint(state))).astype(np.int64).tolist()


# ----------------------------------------------------------------------------- save / restore


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    iterator_state: Any,
    evaluations: Sequence[dict[str, Any]],
    evaluate_first: bool = False,
) -> None:
    """Write ``state`` at its step (collective with several processes)."""
    step = int(jax.device_get(state["step"]))
    data = {
        "iterator": iterator_state,
        "evaluations": list(evaluations),
        "evaluate_first": evaluate_first,
        "fingerprint": fingerprint(state),
    }
    with quiet_orbax():
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            force=True,
        )
        manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """``(state, data)`` of ``step``; ``DamagedCheckpointError`` if it fails its fingerprint."""
    with quiet_orbax():
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
    state, data = restored["state"], restored["data"]
    if not isinstance(data, dict) or "iterator" not in data:  # written before fingerprints existed
        return state, {"iterator": data, "evaluations": [], "evaluate_first": False}
    if fingerprint(state) != data["fingerprint"]:
        raise DamagedCheckpointError("its arrays do not match the checksum saved with them")
    return state, data


def _reason(error: BaseException) -> str:
    """The first line of the innermost message, shortened."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def restore_latest_intact(
    manager: ocp.CheckpointManager, abstract_state: Any, workdir: storage.AnyPath
) -> tuple[Any, dict[str, Any], int] | None:
    """The newest checkpoint that restores and passes its fingerprint, or None if there is none.

    Newer checkpoints that fail move to ``<workdir>/damaged_checkpoints/`` (process 0), each with
    a line on stderr. If every checkpoint fails, ``NoIntactCheckpointError`` says why — usually
    a config that builds other shapes than the one that wrote them.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data = restore(manager, abstract_state, step)
        except Exception as error:  # damaged files surface as many exception types
            failures.append((step, _reason(error)))
            continue
        if failures:
            _set_aside(manager, workdir, [s for s, _ in failures])
            for bad, reason in failures:
                print(
                    f"checkpoint step {bad} is damaged ({reason}); moved to "
                    f"{workdir / 'damaged_checkpoints'}.",
                    file=sys.stderr,
                )
            print(f"resuming from the newest intact checkpoint, step {step}.", file=sys.stderr)
        return state, data, step
    if failures:
        details = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise NoIntactCheckpointError(
            f"no checkpoint in {manager.directory} can be restored ({details}). If the config changed "
            "(model, method, data set), use a new --workdir or the original config; if the files are "
            "damaged, move the checkpoints folder away to start afresh."
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, workdir: storage.AnyPath, bad_steps: list[int]) -> None:
    """Move ``bad_steps`` to ``<workdir>/damaged_checkpoints`` (remote: copied, then deleted)."""
    if jax.process_index() == 0:
        target = workdir / "damaged_checkpoints"
        if not storage.is_remote(target):
            target.mkdir(exist_ok=True)
        for step in bad_steps:
            destination = target / str(step)
            suffix = 1
            while destination.exists():
                destination, suffix = target / f"{step}.{suffix}", suffix + 1
            source = storage.as_path(manager.directory) / str(step)
            if storage.is_remote(source):
                storage.move_tree(source, destination)
            else:
                shutil.move(str(source), destination)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("hdml_jax: damaged checkpoints set aside")
    manager.reload()


# ----------------------------------------------------------------------------- retention


def best_evaluation(evaluations: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The evaluation with the highest ``metric``; ties go to the earlier one (the official
    scripts' strict ``<``); NaN never wins."""
    best = None
    for record in evaluations:
        value = record.get(metric)
        if value is None or not np.isfinite(value):
            continue
        if best is None or value > best[metric]:
            best = record
    return best


def steps_to_keep(
    steps: Sequence[int], evaluations: Sequence[dict[str, Any]], keep: int, metric: str
) -> set[int]:
    """The last ``keep`` of ``steps`` and the best evaluated step among them."""
    steps = sorted(steps)
    kept = set(steps[-keep:]) if keep > 0 else set()
    best = best_evaluation([e for e in evaluations if e["step"] in set(steps)], metric)
    if best is not None:
        kept.add(best["step"])
    return kept


def prune(
    manager: ocp.CheckpointManager, evaluations: Sequence[dict[str, Any]], keep: int, metric: str
) -> None:
    """Delete every checkpoint but ``steps_to_keep`` (collective: every process decides alike)."""
    steps = list(manager.all_steps())
    kept = steps_to_keep(steps, evaluations, keep, metric)
    with quiet_orbax():
        for step in steps:
            if step not in kept:
                manager.delete(step)
