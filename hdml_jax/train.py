"""The main job as a library of small functions: set up, train, evaluate, save, resume.

``train_and_evaluate(config, workdir)`` is all ``main.py`` calls. One batch goes
``data.pipeline`` → ``steps.train_step`` (jit, sharded) → optax; every ``eval_every_epochs`` the
test split is embedded and scored (``evaluate``); orbax checkpoints hold the whole state plus the
data iterator position, so rerunning the same command resumes exactly where it stopped.

Workdir layout::

    config.json          the resolved config
    metrics.jsonl        one JSON record per log step and per evaluation
    events.*             TensorBoard (tensorboardX)
    checkpoints/         orbax: the last ``keep_checkpoints`` and the best by Recall@1
    final_metrics.json   the last evaluation, and the best one (by Recall@1) under "best"
    test_embeddings.npy  test_labels.npy (and query/gallery for In-Shop)
    tsne.png  retrieval.png  curves.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import evaluate, optim, parallel, steps, visualize
from hdml_jax.config import HIERARCHICAL_METHODS, validate
from hdml_jax.data import pipeline, sampling, transforms
from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.losses import hierarchy_from_labels
from hdml_jax.models import load_pretrained
from hdml_jax.models.weights import resolve_pretrained
from hdml_jax.phases import Phases, hierarchy_is_active, pad_fine_assignment


class TrainingDivergedError(RuntimeError):
    """The loss or the parameters became NaN/Inf; the last good checkpoint is left untouched."""


class TrainingInterruptedError(Exception):
    """SIGTERM or ``stop_after_steps``: a checkpoint was saved; rerunning the command resumes."""

    def __init__(self, step: int, directory: Path):
        super().__init__(
            f"stopped at step {step}; checkpoint saved in {directory}. Rerun the same command to resume."
        )
        self.step = step


# ----------------------------------------------------------------------------- setup


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, axis ``'data'``.

    ``Auto`` axis type: XLA's sharding propagation places the collectives (the losses and
    BatchNorm see the global batch), so model and loss code stay free of sharding annotations.
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def load_data(config: ml_collections.ConfigDict) -> MetricDataset:
    from hdml_jax.data import datasets

    return datasets.load_dataset(config.dataset.name, data_dir=config.dataset.data_dir)


def coarse_group_sizes(config: ml_collections.ConfigDict, dataset: MetricDataset) -> tuple[int, ...]:
    """Sizes of the coarse proxy levels: configured, the known taxonomy, or about C/8."""
    if config.method not in HIERARCHICAL_METHODS:
        return ()
    if config.loss.coarse_from_labels:
        if dataset.train.coarse_labels is None:
            raise ValueError(f"loss.coarse_from_labels=True but {dataset.name} has no coarse labels.")
        return (dataset.train.num_coarse_classes,)
    num_classes = dataset.train.num_classes
    sizes = []
    for size in config.loss.num_coarse_groups:
        size = int(size) or max(2, round(num_classes / 8))
        if not 1 <= size < (sizes[-1] if sizes else num_classes):
            raise ValueError(
                f"loss.num_coarse_groups {tuple(config.loss.num_coarse_groups)} must decrease below {num_classes} classes."
            )
        sizes.append(size)
    return tuple(sizes)


def class_to_coarse(split: Split) -> np.ndarray:
    """The known class → coarse group map of a split (each class has one coarse label)."""
    mapping = np.zeros(split.num_classes, np.int64)
    mapping[split.labels] = split.coarse_labels
    return mapping


def init_state(
    config: ml_collections.ConfigDict,
    model,
    dataset: MetricDataset,
    optimizer: optax.GradientTransformation,
    coarse_sizes: tuple[int, ...],
) -> steps.State:
    """Fresh parameters (with ImageNet weights per ``model.pretrained``) and optimizer state."""
    size = config.dataset.image_size
    rng = jax.random.PRNGKey(config.seed)
    init_rng, rng = jax.random.split(rng)
    variables = jax.jit(model.init, static_argnames="train")(
        init_rng, jnp.zeros((1, size, size, 3)), train=False
    )
    params = steps.unfreeze(variables["params"])
    batch_stats = steps.unfreeze(variables.get("batch_stats", {}))
    weights = resolve_pretrained(config.model.pretrained, config.model.depth, width=config.model.width)
    if weights is not None:
        pretrained = load_pretrained(weights)
        params["backbone"] = _checked_replace(params["backbone"], pretrained["params"], "params")
        batch_stats["backbone"] = _checked_replace(
            batch_stats["backbone"], pretrained["batch_stats"], "batch_stats"
        )
    hierarchy: dict[str, Any] = {}
    if config.method in HIERARCHICAL_METHODS:
        levels = (params["proxies"].shape[0], *coarse_sizes)  # padded fine proxies included
        hierarchy = {
            "assignments": tuple(jnp.zeros((levels[i],), jnp.int32) for i in range(len(coarse_sizes))),
            "active": jnp.zeros((), jnp.float32),
        }
        if config.loss.coarse_from_labels:
            hierarchy = {
                "assignments": pad_fine_assignment(
                    hierarchy_from_labels(class_to_coarse(dataset.train)), levels[0]
                ),
                "active": jnp.ones((), jnp.float32),
            }
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": optimizer.init(params),
        "hierarchy": hierarchy,
        "rng": jax.random.key_data(rng),
    }


def _checked_replace(current: Any, loaded: Any, what: str) -> Any:
    shapes = jax.tree.map(np.shape, current)
    loaded_shapes = jax.tree.map(np.shape, loaded)
    if shapes != loaded_shapes:
        raise ValueError(
            f"model.pretrained {what} do not fit the configured backbone (depth/width differ?). "
            "Convert weights of the same depth with `python -m hdml_jax.models.convert`."
        )
    return jax.tree.map(jnp.asarray, loaded)


def _transform_pair(config: ml_collections.ConfigDict) -> transforms.TransformPair:
    return transforms.TRANSFORMS[config.dataset.transform](
        config.dataset.image_size, crop_to_bbox=config.dataset.crop_to_bbox
    )


def make_train_iterator(config: ml_collections.ConfigDict, split: Split):
    transform = _transform_pair(config)
    if config.sampler == "pk":
        sampler = sampling.PKSampler(
            split.labels,
            classes_per_batch=config.classes_per_batch,
            samples_per_class=config.samples_per_class,
            seed=config.seed,
        )
    else:
        sampler = sampling.ShuffleSampler(len(split), batch_size=config.batch_size, seed=config.seed)
    return pipeline.train_iterator(
        split,
        sampler=sampler,
        transform=transform.train,
        global_batch_size=config.batch_size,
        seed=config.seed,
        num_workers=config.dataset.num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def make_eval_batches(config: ml_collections.ConfigDict, split: Split):
    transform = _transform_pair(config)
    return pipeline.eval_batches(
        split,
        transform=transform.eval,
        batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


# ----------------------------------------------------------------------------- logging


class Reporter:
    """Progress line on screen; metrics.jsonl and TensorBoard in the workdir (process 0 only)."""

    def __init__(self, workdir: Path, total_steps: int, batch_size: int):
        self.enabled = jax.process_index() == 0
        self.total_steps, self.batch_size = total_steps, batch_size
        self.interactive = sys.stderr.isatty()
        self._tb = None
        self._jsonl = None
        self._last = (time.perf_counter(), None)
        self._smoothed: float | None = None
        if self.enabled:
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir))
            except ImportError:
                print("tensorboardX is not installed: no TensorBoard events are written.", file=sys.stderr)

    def restart_clock(self, step: int) -> None:
        """Exclude what happened since the last log (evaluation, checkpointing) from images/s."""
        self._last = (time.perf_counter(), step)

    def train(self, step: int, epoch: float, values: dict[str, float]) -> None:
        now = time.perf_counter()
        last_time, last_step = self._last
        self._last = (now, step)
        speed = (step - last_step) * self.batch_size / (now - last_time) if last_step is not None else 0.0
        if speed > 0:  # the first interval holds compilation: leave it out of the average
            self._smoothed = speed if self._smoothed is None else 0.7 * self._smoothed + 0.3 * speed
        values = {**values, "images_per_second": speed}
        if not self.enabled:
            return
        remaining = (
            (self.total_steps - step) * self.batch_size / self._smoothed if self._smoothed else float("nan")
        )
        eta = "?" if math.isnan(remaining) else time.strftime("%H:%M:%S", time.gmtime(remaining))
        done = int(30 * step / self.total_steps)
        line = (
            f"[{'#' * done}{'.' * (30 - done)}] step {step}/{self.total_steps} epoch {epoch:.1f} "
            f"loss {values['loss']:.4f} {speed:.0f} img/s ETA {eta}"
        )
        if self.interactive:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        self._write({"kind": "train", "step": step, "epoch": epoch, **values}, "train")

    def eval(self, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.interactive:
            print(file=sys.stderr)
        print(evaluate.summary_line(step, values), file=sys.stderr, flush=True)
        self._write({"kind": "eval", "step": step, "epoch": epoch, **values}, "eval")

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    # TensorBoard tags allow no "@": recall@1 → recall_at_1.
                    self._tb.add_scalar(f"{prefix}/{key.replace('@', '_at_')}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Atomic orbax checkpoints: keep the last N and the best by Recall@1."""
    policies = ocp.checkpoint_managers.preservation_policy
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=config.keep_checkpoints),
                policies.BestN(
                    get_metric_fn=lambda m: m["recall@1"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        ),
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=options)


def save_checkpoint(manager, state, data_state, metrics=None) -> None:
    step = int(jax.device_get(state["step"]))
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        metrics=metrics,
        force=True,
    )
    manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state, step=None):
    step = manager.latest_step() if step is None else step
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["data"]


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def agreed(self, step: int, every: int) -> bool:
        """Whether to stop now. With several processes all must stop at the same step (the save
        is collective), so the flag is all-gathered, every ``every`` steps only (a collective)."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, dataset: MetricDataset | None = None
) -> dict[str, float]:
    """Train (or, with ``eval_only``, just evaluate) and return the final metrics.

    ``dataset`` replaces the one named by ``config.dataset.name`` (train on your own data).
    """
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    dataset = load_data(config) if dataset is None else dataset
    coarse_sizes = coarse_group_sizes(config, dataset)
    model = steps.build_model(config, dataset.train.num_classes, coarse_sizes, jax.device_count())
    steps_per_epoch = max(1, len(dataset.train) // config.batch_size)
    num_steps = optim.total_steps(config, steps_per_epoch)

    mesh = make_mesh()
    batch_sharding = NamedSharding(mesh, P("data"))
    if config.batch_size % jax.device_count() or config.eval_batch_size % jax.device_count():
        raise ValueError(
            f"batch_size {config.batch_size} and eval_batch_size {config.eval_batch_size} must be "
            f"multiples of the {jax.device_count()} devices."
        )

    params_shape = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8 * 32, 8 * 32, 3)), train=False)
    )["params"]
    params_shape = steps.unfreeze(params_shape)
    optimizer = optim.make_optimizer(config, params_shape, steps_per_epoch)  # every phase: this layout
    state = init_state(config, model, dataset, optimizer, coarse_sizes)
    sharding = parallel.state_sharding(state, mesh, config.shard_proxies)
    state = jax.device_put(state, sharding)

    manager = checkpoint_manager(workdir, config)
    train_iter = make_train_iterator(config, dataset.train)
    if manager.latest_step() is not None:
        state, data_state = restore_checkpoint(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        state = jax.device_put(state, sharding)
        train_iter.set_state(data_state)
        print(f"resumed from {workdir / 'checkpoints'} at step {int(state['step'])}", file=sys.stderr)
    elif config.eval_only:
        raise FileNotFoundError(f"eval_only=True but there is no checkpoint in {workdir / 'checkpoints'}.")

    embed = jax.jit(
        lambda variables, images: steps.embed_step(variables, images, model=model),
        in_shardings=(None, batch_sharding),  # the variables keep their own (state) sharding
        out_shardings=batch_sharding,
    )

    def run_evaluation(state: steps.State) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}

        def embed_split(split: Split) -> np.ndarray:
            return evaluate.embed_batches(
                make_eval_batches(config, split), lambda x: embed(variables, x), batch_sharding, len(split)
            )

        embeddings = evaluate.embed_dataset(dataset, embed_split)
        nmi_key = jax.random.PRNGKey(config.seed) if config.nmi else None
        result = evaluate.evaluate_embeddings(
            dataset,
            embeddings["test"],
            query_embeddings=embeddings.get("query"),
            gallery_embeddings=embeddings.get("gallery"),
            nmi_key=nmi_key,
        )
        return result, embeddings

    reporter = Reporter(workdir, num_steps, config.batch_size)
    try:
        if not config.eval_only:
            phases = Phases(
                config,
                model,
                params_shape,
                steps_per_epoch,
                coarse_sizes,
                sharding,
                batch_sharding,
                hierarchy_active=hierarchy_is_active(state),
            )
            run = _Run(
                config, phases, manager, reporter, run_evaluation, batch_sharding, steps_per_epoch, num_steps
            )
            state = _train_loop(run, state, train_iter)
        final, embeddings = run_evaluation(state)
        step = int(jax.device_get(state["step"]))
        reporter.eval(step, step / steps_per_epoch, final)
        if jax.process_index() == 0:
            write_outputs(workdir, config, dataset, final, embeddings, step)
    finally:
        reporter.close()
        manager.close()
    return final


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during one training run."""

    config: ml_collections.ConfigDict
    phases: Phases  # what trains at each step, and the state changes between phases
    manager: ocp.CheckpointManager
    reporter: Reporter
    run_evaluation: Callable[[steps.State], tuple[dict[str, float], dict[str, np.ndarray]]]
    batch_sharding: NamedSharding
    steps_per_epoch: int
    num_steps: int


def _train_loop(run: _Run, state: steps.State, train_iter) -> steps.State:
    """Steps from the state's step to ``num_steps``: log, evaluate, checkpoint, stop on request."""
    config, manager, reporter, phases = run.config, run.manager, run.reporter, run.phases
    steps_per_epoch, num_steps = run.steps_per_epoch, run.num_steps
    schedule = optim.learning_rate_schedule(config, steps_per_epoch)
    eval_steps = config.eval_every_epochs * steps_per_epoch
    step = int(jax.device_get(state["step"]))
    start_step = last_good = step

    with _Preemption() as preemption:
        while step < num_steps:
            state = phases.begin_step(state, step)
            step_fn = phases.step_function(step)
            local = next(train_iter)
            batch = {
                key: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(local[key]))
                for key in ("image", "label")
            }
            state, metrics = step_fn(state, batch)
            step += 1
            log_now = step % config.log_every_steps == 0 or step == num_steps
            stop_now = preemption.agreed(step, config.log_every_steps) or (
                config.stop_after_steps > 0
                and step - start_step >= config.stop_after_steps
                and step < num_steps
            )
            checkpoint_now = step % config.checkpoint_every_steps == 0 or stop_now
            eval_now = eval_steps > 0 and step % eval_steps == 0 and step < num_steps
            if log_now or checkpoint_now or eval_now:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not values.pop("finite"):
                    raise TrainingDivergedError(
                        f"loss or parameters became NaN/Inf at step {step} (loss {values['loss']}); the last good "
                        f"checkpoint (step {last_good}) is kept. Lower optimizer.lr, or raise grad clipping."
                    )
                values["lr"] = float(schedule(step - 1))  # the rate this step used
                if log_now:
                    reporter.train(step, step / steps_per_epoch, values)
            result = None
            if eval_now:
                result, _ = run.run_evaluation(state)
                reporter.eval(step, step / steps_per_epoch, result)
            if checkpoint_now or eval_now:
                save_checkpoint(manager, state, train_iter.get_state(), result)
                last_good = step
                reporter.restart_clock(step)
            if stop_now:
                raise TrainingInterruptedError(step, manager.directory)
    if last_good != step:
        save_checkpoint(manager, state, train_iter.get_state())
    return state


# ----------------------------------------------------------------------------- outputs


def write_outputs(
    workdir: Path, config, dataset: MetricDataset, final: dict[str, float], embeddings, step: int
) -> None:
    """final_metrics.json, embeddings, and the three pictures.

    ``final_metrics.json`` holds the last evaluation at the top level (``step``, ``epoch`` and the
    metrics) and, under ``best``, the evaluation with the highest Recall@1 of the run (its
    ``step`` and ``epoch`` too). The official Proxy-Anchor and CGD scripts evaluate on the test
    split after every epoch and report that best epoch; the last one is the number free of
    selection on the test set.
    """
    steps_per_epoch = max(1, len(dataset.train) // config.batch_size)
    last = {"step": step, "epoch": step / steps_per_epoch, **final}
    best = best_evaluation(workdir / "metrics.jsonl", last, step)
    summary = {**last, "best": best, "best_by": BEST_METRIC}
    (workdir / "final_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.save(workdir / "test_embeddings.npy", embeddings["test"])
    np.save(workdir / "test_labels.npy", dataset.test.labels)
    for name in ("query", "gallery"):
        if name in embeddings:
            np.save(workdir / f"{name}_embeddings.npy", embeddings[name])
            np.save(workdir / f"{name}_labels.npy", getattr(dataset, name).labels)
    if not config.pictures:
        return
    visualize.plot_tsne(
        workdir / "tsne.png",
        embeddings["test"],
        dataset.test.labels,
        dataset.test.coarse_labels,
        jax.random.PRNGKey(config.seed),
        max_points=config.tsne_max_points,
    )
    write_retrieval_picture(workdir / "retrieval.png", dataset, embeddings, config)
    visualize.plot_curves(workdir / "curves.png", workdir / "metrics.jsonl")


BEST_METRIC = "recall@1"


def best_evaluation(metrics_path: Path, last: dict[str, float], step: int) -> dict[str, float]:
    """The evaluation with the highest ``BEST_METRIC`` among ``metrics.jsonl``'s (up to ``step``) and ``last``.

    Ties go to the earlier evaluation, as the official scripts' strict ``<`` does.
    """
    candidates = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval" and record["step"] <= step and BEST_METRIC in record:
                candidates.append({k: v for k, v in record.items() if k != "kind"})
    candidates.append(last)
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate[BEST_METRIC] > best[BEST_METRIC]:
            best = candidate
    return best


def write_retrieval_picture(
    path: Path, dataset: MetricDataset, embeddings, config, num_queries: int = 6, k: int = 5
) -> None:
    if "query" in embeddings:
        queries, query_split = embeddings["query"], dataset.query
        gallery, gallery_split, exclude_self = embeddings["gallery"], dataset.gallery, False
    else:
        queries = gallery = embeddings["test"]
        query_split = gallery_split = dataset.test
        exclude_self = True
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(len(queries), size=min(num_queries, len(queries)), replace=False))
    similarity = queries[chosen] @ gallery.T
    if exclude_self:
        similarity[np.arange(len(chosen)), chosen] = -np.inf
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    visualize.plot_retrieval(
        path,
        [query_split.source[int(i)]["image"] for i in chosen],
        query_split.labels[chosen],
        [[gallery_split.source[int(j)]["image"] for j in row] for row in neighbours],
        gallery_split.labels[neighbours],
    )
