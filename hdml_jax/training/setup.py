"""What a training run starts from, and the checks of a resume against the run it continues.

The device mesh, the data and its batch iterators, the sizes of HPL's coarse levels, the fresh
state (with ImageNet weights, the hierarchy's initial assignments, the cross-batch memory), and
for a resumed run: what changed in its config, where it now ends, and its log cut back to the
checkpoint. ``hdml_jax.training.train`` calls these before and around its loop; none holds state.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdml_jax import methods, storage
from hdml_jax.data import pipeline, sampling, transforms
from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.errors import ConfigError
from hdml_jax.losses import hierarchy_from_labels, xbm_init
from hdml_jax.models import load_pretrained
from hdml_jax.models.weights import resolve_pretrained
from hdml_jax.training import steps
from hdml_jax.training.phases import pad_fine_assignment
from hdml_jax.workdir import (
    truncate_log,
)


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, axis ``'data'``.

    ``Auto`` axis type: XLA's sharding propagation places the collectives (the losses and
    BatchNorm see the global batch), so model and loss code stay free of sharding annotations.
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def load_data(config: ml_collections.ConfigDict) -> MetricDataset:
    """The data set a config names; ``custom``: its CSV or folder, checked and prepared once.

    ``dataset.data_dir`` may be a bucket (``gs://...``) for the prepared TFDS data sets, which
    TFDS reads itself; a custom data set is checked and prepared from local files only.
    """
    if config.dataset.name == "custom":
        from hdml_jax.data import custom

        for field in ("path", "root", "data_dir"):
            value = config.dataset[field]
            if value and storage.is_remote(str(value)):
                raise ConfigError(
                    f"dataset.{field}={value}: a custom data set is read and prepared from local "
                    "files; copy it first (e.g. gsutil -m rsync -r) and pass the local path."
                )

        return custom.load_custom(
            config.dataset.path,
            root=config.dataset.root or None,
            cache_dir=config.dataset.data_dir,
            crop_to_bbox=config.dataset.crop_to_bbox,
            recall_ks=tuple(config.dataset.recall_ks),
            requirements=custom.Requirements(
                pairs_in_train=methods.of(config).two_images_per_class, boxes=config.dataset.crop_to_bbox
            ),
        )
    from hdml_jax.data import datasets

    return datasets.load_dataset(config.dataset.name, data_dir=config.dataset.data_dir)


def coarse_group_sizes(config: ml_collections.ConfigDict, dataset: MetricDataset) -> tuple[int, ...]:
    """Sizes of the coarse proxy levels: configured, the known taxonomy, or about C/8."""
    if not methods.of(config).hierarchical:
        return ()
    if config.loss.coarse_from_labels:
        levels = dataset.train.coarse_levels
        if not levels:
            raise ConfigError(f"loss.coarse_from_labels=True but {dataset.name} has no coarse labels.")
        weights = tuple(config.loss.level_weights)
        if len(weights) != 1 + len(levels):
            example = ", ".join(["1.0", *(["0.1"] * len(levels))])
            raise ConfigError(
                f"loss.level_weights has {len(weights)} entries, but with loss.coarse_from_labels=True "
                f"{dataset.name}'s taxonomy gives {1 + len(levels)} levels (the classes and {len(levels)} "
                f"above them): give one weight per level, e.g. --config.loss.level_weights='({example})'."
            )
        return tuple(int(level.max()) + 1 for level in levels)
    num_classes = dataset.train.num_classes
    sizes = []
    for size in config.loss.num_coarse_groups:
        size = int(size) or max(2, round(num_classes / 8))
        if not 1 <= size < (sizes[-1] if sizes else num_classes):
            if num_classes < 3:
                raise ConfigError(
                    f"{config.method} needs at least 3 training classes for a coarse level of groups; "
                    f"{dataset.name} has {num_classes}: use its base loss (e.g. :method=proxy_anchor)."
                )
            raise ConfigError(
                f"loss.num_coarse_groups {tuple(config.loss.num_coarse_groups)} must decrease below the "
                f"{num_classes} training classes: e.g. --config.loss.num_coarse_groups='({max(2, num_classes // 4)},)'."
            )
        sizes.append(size)
    return tuple(sizes)


def taxonomy_maps(split: Split) -> tuple[np.ndarray, ...]:
    """The known taxonomy of a split as parent maps, finest first: class → level-1 group, level-1
    group → level-2 group, ... (``hierarchy_from_labels``'s arguments)."""
    maps, finer = [], split.labels
    for coarser in split.coarse_levels:
        mapping = np.zeros(int(finer.max()) + 1, np.int64)
        mapping[finer] = coarser
        maps.append(mapping)
        finer = coarser
    return tuple(maps)


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
    weights = resolve_pretrained(
        config.model.pretrained,
        config.model.depth,
        width=config.model.width,
        backbone=config.model.get("backbone", "resnet"),
    )
    if weights is not None:
        pretrained = load_pretrained(weights)
        params["backbone"] = _checked_replace(params["backbone"], pretrained["params"], "params")
        if "batch_stats" in pretrained or "backbone" in batch_stats:  # none in a ViT
            batch_stats["backbone"] = _checked_replace(
                batch_stats.get("backbone", {}), pretrained.get("batch_stats", {}), "batch_stats"
            )
    hierarchy: dict[str, Any] = {}
    if methods.of(config).hierarchical:
        levels = (params["proxies"].shape[0], *coarse_sizes)  # padded fine proxies included
        hierarchy = {
            "assignments": tuple(jnp.zeros((levels[i],), jnp.int32) for i in range(len(coarse_sizes))),
            "active": jnp.zeros((), jnp.float32),
        }
        if config.loss.coarse_from_labels:
            hierarchy = {
                "assignments": pad_fine_assignment(hierarchy_from_labels(*taxonomy_maps(dataset.train)), levels[0]),
                "active": jnp.ones((), jnp.float32),
            }
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": optimizer.init(params),
        "hierarchy": hierarchy,
        "rng": jax.random.key_data(rng),
    }
    if config.loss.get("xbm_size", 0):  # a pair loss's cross-batch memory, part of the state
        state["xbm"] = xbm_init(int(config.loss.xbm_size), int(config.model.embedding_dim))
    return state


def _checked_replace(current: Any, loaded: Any, what: str) -> Any:
    shapes = jax.tree.map(np.shape, current)
    loaded_shapes = jax.tree.map(np.shape, loaded)
    if shapes != loaded_shapes:
        raise ConfigError(
            f"model.pretrained {what} do not fit the configured backbone (depth/width differ, or "
            "model.vit's size/patch/distillation token?). Convert weights of the same network with "
            "`python -m hdml_jax.models.convert`."
        )
    return jax.tree.map(jnp.asarray, loaded)


def _transform_pair(config: ml_collections.ConfigDict) -> transforms.TransformPair:
    return transforms.preset(
        config.dataset.transform,
        config.dataset.image_size,
        crop_to_bbox=config.dataset.crop_to_bbox,
        augment=config.dataset.get("augment"),  # absent from configs written before it existed
    )


def make_train_iterator(config: ml_collections.ConfigDict, split: Split):
    transform = _transform_pair(config)
    class_samplers = {"pk": sampling.PKSampler, "unique_class": sampling.UniqueClassSampler}
    if config.sampler in class_samplers:
        sampler = class_samplers[config.sampler](
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
        num_threads=config.dataset.num_threads,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def make_eval_batches(config: ml_collections.ConfigDict, split: Split):
    transform = _transform_pair(config)
    return pipeline.eval_batches(
        split,
        transform=transform.eval,
        batch_size=config.eval_batch_size,
        num_threads=config.dataset.num_threads,  # worker processes would start anew at every evaluation
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


# ----------------------------------------------------------------------------- resume


def _config_changes(path: storage.AnyPath, config: ml_collections.ConfigDict) -> list[str]:
    """``field: old → new`` for the fields where ``config`` differs from the saved ``config.json``."""
    if not path.exists():
        return []
    try:
        old = _flatten(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError):
        return []
    new = _flatten(json.loads(_config_json(config)))
    ignored = {"eval_only", "stop_after_steps", "workdir", "mlrc.fold"}  # fold: which job trains it
    return [
        f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in ignored and old.get(key) != new.get(key)
    ]


def _target_step_note(config: ml_collections.ConfigDict, step: int, num_steps: int) -> str:
    """Where the resumed run now goes, and what ``num_steps = 0`` means: a changed ``num_steps`` or
    ``num_epochs`` moves the end of the run."""
    if config.num_steps > 0:
        target = f"num_steps {config.num_steps}"
    else:
        target = f"num_steps 0: num_epochs {config.num_epochs} × {num_steps // max(1, config.num_epochs)} steps per epoch"
    if step >= num_steps:
        return f"The run now ends at step {num_steps} ({target}); it is at step {step} already."
    return f"The run goes on from step {step} to step {num_steps} ({target})."


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_json(config: ml_collections.ConfigDict) -> str:
    """The config as saved in ``config.json``: what the run trains (``eval_only`` is no part of it)."""
    saved = config.copy_and_resolve_references()
    with saved.unlocked():
        saved.eval_only = False
    return saved.to_json_best_effort(indent=2) + "\n"


def _validate_resume_log(workdir: storage.AnyPath, step: int, evaluations: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` as the restored checkpoint knows it (``workdir.truncate_log``)."""
    truncate_log(workdir / "metrics.jsonl", step, {e["step"] for e in evaluations})
