"""One training run's state and its start: ``Run`` (what the loop works with: the state, the data
iterator, the checkpoint manager, the reporter, the evaluations so far; it saves and evaluates
itself), ``prepare`` (model, sharded state, checkpoint manager) and ``restore`` (resume from the
newest intact checkpoint, or start afresh; config.json and the logs checked against it).

``hdml_jax.training.train`` runs the loop over a ``Run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import interrupts, parallel, storage
from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.evaluation import evaluate
from hdml_jax.training import checkpoints, optim, steps
from hdml_jax.training.phases import Phases, hierarchy_is_active
from hdml_jax.training.reporting import Reporter
from hdml_jax.training.setup import (
    _config_changes,
    _config_json,
    _target_step_note,
    _validate_resume_log,
    coarse_group_sizes,
    init_state,
    make_eval_batches,
    make_mesh,
    make_train_iterator,
)
from hdml_jax.workdir import (
    StorageFullError,
    atomic_write_text,
    storage_errors,
)


class TrainingDivergedError(RuntimeError):
    """The loss, the parameters, the BatchNorm statistics or the embeddings became NaN/Inf; the
    last good checkpoint is left untouched."""


def stoppable(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` with a stop point before each one (evaluation): Ctrl-C / SIGTERM between batches."""
    for batch in batches:
        interrupts.stop_point()
        yield batch


@dataclasses.dataclass
class Run:
    """What one run works with; ``evaluations`` grows (and is checkpointed) as it goes."""

    config: ml_collections.ConfigDict
    workdir: storage.AnyPath
    dataset: MetricDataset
    model: Any
    state: steps.State
    train_iter: Any
    manager: ocp.CheckpointManager
    reporter: Reporter
    embed: Callable[..., jax.Array]
    batch_sharding: NamedSharding
    steps_per_epoch: int
    num_steps: int
    evaluations: list[dict[str, Any]]
    evaluate_first: bool
    phases: Phases | None = None
    # (step, metrics, embeddings) of an evaluation the final one can reuse (early stopping
    # evaluates the state it stops with).
    stopping_evaluation: tuple[int, dict[str, float], dict[str, np.ndarray]] | None = None

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state["step"]))

    def save(self, evaluate_first: bool = False) -> None:
        """Checkpoint the state, then prune; the logs are synced first (a remote workdir's log then
        holds every record up to the checkpoint)."""
        self.reporter.sync()
        intact = self.manager.latest_step()
        before = f"The last complete checkpoint (step {intact}) is intact. " if intact is not None else ""
        try:
            with storage_errors(f"saving the checkpoint of step {self.step}", self.manager.directory, before):
                checkpoints.save(
                    self.manager, self.state, self.train_iter.get_state(), self.evaluations, evaluate_first
                )
                checkpoints.prune(
                    self.manager, self.evaluations, self.config.keep_checkpoints, self.config.best_metric
                )
        except StorageFullError:
            checkpoints.discard_partial_saves(self.manager)
            raise

    def evaluate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Embed the evaluation splits and score them; may stop between batches (``StopRequestedError``)."""
        variables = {"params": self.state["params"], "batch_stats": self.state["batch_stats"]}
        step = self.step

        def embed_split(split: Split) -> np.ndarray:
            batches = stoppable(make_eval_batches(self.config, split))
            return evaluate.embed_batches(
                batches, lambda x: self.embed(variables, x), self.batch_sharding, len(split)
            )

        embeddings = evaluate.embed_dataset(self.dataset, embed_split)
        for name, values in embeddings.items():
            bad = int(np.sum(~np.all(np.isfinite(values), axis=1)))
            if bad:
                raise TrainingDivergedError(
                    f"{bad} of {len(values)} {name} embeddings at step {step} are NaN/Inf: the network "
                    f"diverged{_last_good(self.manager)}. Lower optimizer.lr or raise grad clipping."
                )
        nmi_key = jax.random.PRNGKey(self.config.seed) if self.config.nmi else None
        result = evaluate.evaluate_embeddings(
            self.dataset,
            embeddings["test"],
            nmi_key=nmi_key,
            mesh=_local_reference_mesh() if self.config.eval_shard_references else None,
            ranking=evaluate.ranking_of(self.config),
        )
        return result, embeddings

    def record_evaluation(self, result: dict[str, float]) -> None:
        step = self.step
        epoch = step / self.steps_per_epoch
        self.reporter.eval(step, epoch, result)
        self.evaluations = _with_evaluation(self.evaluations, step, epoch, result)


def _with_evaluation(
    evaluations: list[dict[str, Any]], step: int, epoch: float, result: dict[str, float]
) -> list[dict[str, Any]]:
    """``evaluations`` with ``result`` as the evaluation of ``step`` (replacing an earlier one)."""
    return [e for e in evaluations if e["step"] != step] + [{"step": step, "epoch": epoch, **result}]


def _local_reference_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh of this process's devices, over which the retrieval metrics split the references."""
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("references",))


def _last_good(manager: ocp.CheckpointManager) -> str:
    latest = manager.latest_step()
    if latest is None:
        return "; no checkpoint had been saved yet"
    return f"; the last good checkpoint (step {latest}) is kept"


def prepare(
    config: ml_collections.ConfigDict,
    workdir: storage.AnyPath,
    dataset: MetricDataset,
    steps_per_epoch: int,
    num_steps: int,
) -> Run:
    """Model, state, data, checkpoint: restored (validated) or fresh; then config.json and logs."""
    coarse_sizes = coarse_group_sizes(config, dataset)
    model = steps.build_model(config, dataset.train.num_classes, coarse_sizes, jax.device_count())
    mesh = make_mesh()
    batch_sharding = NamedSharding(mesh, P("data"))
    params_shape = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8 * 32, 8 * 32, 3)), train=False)
    )["params"]
    params_shape = steps.unfreeze(params_shape)
    optimizer = optim.make_optimizer(config, params_shape, steps_per_epoch)  # every phase: this layout
    state = init_state(config, model, dataset, optimizer, coarse_sizes)
    sharding = parallel.state_sharding(state, mesh, config.shard_proxies)
    state = jax.device_put(state, sharding)
    interrupts.stop_point()

    with contextlib.ExitStack() as cleanup:
        manager = checkpoints.manager(workdir / "checkpoints")
        cleanup.callback(manager.close)  # on an error below; the run owns manager and reporter after
        run = restore(config, workdir, dataset, model, state, sharding, manager, batch_sharding, num_steps)
        cleanup.callback(run.reporter.close)  # (a remote workdir's reporter holds a staging folder)
        run.steps_per_epoch = steps_per_epoch
        if not config.eval_only:
            run.phases = Phases(
                config,
                model,
                params_shape,
                steps_per_epoch,
                coarse_sizes,
                sharding,
                batch_sharding,
                hierarchy_active=hierarchy_is_active(run.state),
            )
        cleanup.pop_all()
    return run


def restore(
    config: ml_collections.ConfigDict,
    workdir: storage.AnyPath,
    dataset: MetricDataset,
    model: Any,
    state: steps.State,
    sharding: Any,
    manager: ocp.CheckpointManager,
    batch_sharding: NamedSharding,
    num_steps: int,
) -> Run:
    """Resume from the newest intact checkpoint (or start afresh), then open config and logs."""
    train_iter = make_train_iterator(config, dataset.train)
    evaluations: list[dict[str, Any]] = []
    evaluate_first = False
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpoints.restore_latest_intact(manager, abstract, workdir)
    if restored is not None:
        state, data, step = restored
        state = jax.device_put(state, sharding)
        train_iter.set_state(data["iterator"])
        evaluations, evaluate_first = list(data["evaluations"]), bool(data["evaluate_first"])
        print(f"resumed from {workdir / 'checkpoints' / str(step)} (step {step})", file=sys.stderr)
    step = int(jax.device_get(state["step"]))
    interrupts.stop_point()

    if jax.process_index() == 0 and not config.eval_only:
        changes = _config_changes(workdir / "config.json", config) if restored is not None else []
        if changes:
            print(
                "note: this run's config differs from the saved one: "
                + "; ".join(changes)
                + ". "
                + _target_step_note(config, step, num_steps),
                file=sys.stderr,
            )
        atomic_write_text(workdir / "config.json", _config_json(config))
        if restored is not None:
            _validate_resume_log(workdir, step, evaluations)
    embed = jax.jit(
        lambda variables, images: steps.embed_step(variables, images, model=model),
        in_shardings=(None, batch_sharding),  # the variables keep their own (state) sharding
        out_shardings=batch_sharding,
    )
    reporter = Reporter(
        workdir,
        num_steps,
        config.batch_size,
        record=not config.eval_only,
        purge_step=step + 1 if restored is not None else None,
    )
    return Run(
        config,
        workdir,
        dataset,
        model,
        state,
        train_iter,
        manager,
        reporter,
        embed,
        batch_sharding,
        0,
        num_steps,
        evaluations,
        evaluate_first,
    )
