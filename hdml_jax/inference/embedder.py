"""Use a trained run: load a workdir's checkpoint and embed images with it.

The three command-line tools build on this module:

* ``python -m hdml_jax.embed``  — embeddings of a folder or CSV of images → ``.npz``;
* ``python -m hdml_jax.search`` — nearest gallery images of query images (text and a picture);
* ``python -m hdml_jax.export`` — a ``jax.export`` artifact that needs only JAX to run.

From your own code::

    from hdml_jax.inference import embedder as inference

    embedder = inference.load_embedder("runs/cub200_hpl_pa")       # best checkpoint by Recall@1
    image = embedder.preprocess(inference.load_image("bird.jpg"))    # uint8 (S, S, 3)
    embedding = embedder.embed(image[None])                          # float32 (1, d), unit norm

Which checkpoint (``select_step``): by default the best by the run's ``best_metric`` (Recall@1)
among the kept ones — ``final_metrics.json``'s ``best.step`` for a finished run, else the best of
the evaluations stored in the newest checkpoint; if that checkpoint is not on disk, the newest one
(with a note on stderr). ``step=N`` picks exactly that one.

The model is rebuilt from ``<workdir>/config.json`` with ``steps.build_model``; the number of
classes and of coarse groups come from the checkpoint's array shapes (its metadata), so nothing
about the training data set is needed. The whole state is restored (on the host's CPU) so that
its checksum (``checkpoints.fingerprint``) can be verified; only ``params['backbone']``,
``params['head']`` and ``batch_stats`` go on to the devices. The proxies are not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import methods, storage
from hdml_jax.data import transforms
from hdml_jax.inference.cli import load_image
from hdml_jax.inference.errors import (
    CheckpointMismatchError,
    NoCheckpointError,
    UsageError,
)
from hdml_jax.inference.trained_run import (
    available_steps,
    best_step,
    read_config,
    resolve_workdir,
    select_step,
)
from hdml_jax.training import checkpoints, steps


def describe_transform(transform: transforms.ImageTransform) -> dict[str, Any]:
    """The host-side recipe of an eval transform, in words and numbers (for ``metadata.json``)."""
    fields = {f.name: getattr(transform, f.name) for f in dataclasses.fields(transform)}
    recipe: dict[str, Any] = {"name": type(transform).__name__, **fields}
    size = transform.size
    if isinstance(transform, transforms.CenterCrop):
        recipe["description"] = (
            f"resize so that the shorter side is {transform.resize_shorter} px (aspect ratio kept, "
            f"torchvision Resize({transform.resize_shorter})), then crop the central {size}×{size} "
            "pixels (CenterCrop); done as one bilinear resample of the crop box from the original image."
        )
    elif isinstance(transform, transforms.Resize):
        recipe["description"] = (
            f"resize to {size}×{size} pixels (aspect ratio not kept), bilinear; "
            f"images already {size}×{size} are used as they are."
        )
    else:  # pragma: no cover (every preset's eval transform is one of the two above)
        recipe["description"] = f"{type(transform).__name__} to {size}×{size} pixels."
    recipe["interpolation"] = (
        "bilinear, antialiased when downscaling: Pillow's BILINEAR filter and fixed-point arithmetic, "
        "horizontal pass then vertical (PIL Image.resize up to Pillow 12; Pillow 13 may swap the passes, "
        "within 1 grey level)"
    )
    recipe["input"] = "RGB uint8 (grayscale/palette/RGBA converted with PIL .convert('RGB'))"
    return recipe


def checkpoint_id(fingerprint: Sequence[Sequence[int]]) -> str:
    """A short, order-independent hash of a checkpoint's fingerprint: which weights embedded."""
    canonical = json.dumps(sorted([int(a), int(b)] for a, b in fingerprint))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def host_fingerprint(state: Any) -> list[list[int]]:
    """``checkpoints.fingerprint`` computed with NumPy on the host: the same two wrap-around sums
    per leaf (Σ bits and Σ bits·(i·2654435761 + 1), mod 2³²), without compiling a function over
    hundreds of leaves first (seconds on a CPU, for every tool started)."""
    mask = np.uint64(0xFFFFFFFF)
    result = []
    for leaf in jax.tree.leaves(state):
        x = np.asarray(jax.device_get(leaf))
        if x.dtype == np.bool_:
            bits = x.astype(np.uint8)
        else:
            bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
        bits = bits.ravel().astype(np.uint64)
        weights = (np.arange(bits.size, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(1)) & mask
        total = int(np.sum(bits, dtype=np.uint64) & mask)
        weighted = int(np.sum((bits * weights) & mask, dtype=np.uint64) & mask)
        result.append([total, weighted])
    return result


def _host_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # pragma: no cover (no CPU backend)
        return jax.local_devices()[0]


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Orbax array metadata → ``ShapeDtypeStruct`` targets placed by ``sharding``."""

    def leaf(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)
        return x

    return jax.tree.map(leaf, tree)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def _model_sizes(config: ml_collections.ConfigDict, params: Any) -> tuple[int, tuple[int, ...]]:
    """``(num_classes, coarse group sizes)`` from the checkpoint's parameter shapes.

    Proxy methods: the fine proxies' rows (padding included: the model is rebuilt without
    ``shard_proxies`` so that it has exactly these rows). CGD: the auxiliary classifier's outputs.
    A loss's own parameters (the margin loss's β): one value per class.
    """
    loss_params = sorted(methods.loss_parameter_names() & set(params))
    if "proxies" in params:  # SoftTriple: K rows per class
        num_classes = int(params["proxies"].shape[0]) // methods.of(config).rows_per_class(config)
    elif loss_params:
        num_classes = int(params[loss_params[0]].shape[0])
    else:
        head = params.get("head", {})
        num_classes = int(head["auxiliary_fc"]["kernel"].shape[-1]) if "auxiliary_fc" in head else 0
    coarse, level = [], 1
    while f"coarse_proxies_{level}" in params:
        coarse.append(int(params[f"coarse_proxies_{level}"].shape[0]))
        level += 1
    return num_classes, tuple(coarse)


# ----------------------------------------------------------------------------- embedder


@dataclasses.dataclass
class Embedder:
    """A trained run's embedding network, ready to embed uint8 images.

    Attributes:
      workdir: the run's folder (absolute).
      step: the checkpoint's step.
      checkpoint_id: ``checkpoint_id`` of its fingerprint (identifies the weights).
      config: the run's config (``config.json``).
      model: the ``EmbeddingModel`` without proxies (backbone and head only).
      variables: ``{'params': {'backbone', 'head'}, 'batch_stats'}``, replicated over the local devices.
      image_size: ``S``, the side of the images the network takes.
      embedding_dim: ``d``.
      transform: the run's eval transform (``uint8 (H, W, 3)`` → ``uint8 (S, S, 3)``).
    """

    workdir: Path
    step: int
    checkpoint_id: str
    config: ml_collections.ConfigDict
    model: Any
    variables: Any
    image_size: int
    embedding_dim: int
    transform: transforms.ImageTransform
    _embed: Callable[..., jax.Array] = dataclasses.field(repr=False)
    _batch_sharding: NamedSharding = dataclasses.field(repr=False)

    @property
    def num_devices(self) -> int:
        return len(self._batch_sharding.mesh.devices.flat)

    @property
    def batch_sharding(self) -> NamedSharding:
        """How ``embed_global`` expects its batches: split over the local devices."""
        return self._batch_sharding

    def embed_global(self, images: jax.Array) -> jax.Array:
        """A batch already on the devices (``batch_sharding``, preprocessed uint8) → embeddings
        on the devices; what ``hdml_jax.evaluate.embed_batches`` drives."""
        return self._embed(self.variables, images)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` (or grey/RGBA) → ``uint8 (S, S, 3)`` with the run's eval transform."""
        return self.transform(image)

    def embed(self, images: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """``uint8 (B, S, S, 3)`` → ``float32 (B, d)``, L2-normalised rows.

        The batch is split over the local devices; it is padded (with zeros, then sliced off) to
        a multiple of the device count and to at least ``pad_to`` rows (pass the usual batch size
        so that a short last batch reuses the compiled function).
        """
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images of shape (B, {', '.join(map(str, expected))}), got "
                f"{images.dtype} {images.shape}; use preprocess() on each image first."
            )
        count = images.shape[0]
        if count == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        rows = max(count, pad_to or 0)
        rows = -(-rows // self.num_devices) * self.num_devices
        if rows != count:
            images = np.concatenate([images, np.zeros((rows - count, *expected), np.uint8)])
        batch = jax.device_put(images, self._batch_sharding)
        return np.asarray(jax.device_get(self._embed(self.variables, batch)))[:count]

    def inference_function(self) -> Callable[[jax.Array], jax.Array]:
        """``images uint8 (B, S, S, 3) -> float32 (B, d)`` with the weights (as host NumPy arrays)
        closed over: traced, they become constants (``hdml_jax.export``)."""
        variables = jax.device_get(self.variables)
        model = self.model

        def infer(images: jax.Array) -> jax.Array:
            return steps.embed_step(variables, images, model=model)

        return infer


def load_embedder(
    workdir: str | Path,
    step: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    verbose: bool = True,
) -> Embedder:
    """Load a run's checkpoint for embedding (see the module docstring for which one).

    Args:
      workdir: a training run's folder (finished or still running).
      step: a checkpoint step; None: the best by the run's ``best_metric``.
      devices: the devices to shard batches over (default ``jax.local_devices()``).
      verbose: print notes (best checkpoint missing) to stderr.

    Raises:
      WorkdirNotFoundError, ConfigNotFoundError, NoCheckpointError, StepNotFoundError,
      CheckpointMismatchError: each with a message that says how to fix it.
    """
    workdir = resolve_workdir(workdir)
    config = read_config(workdir)
    available = available_steps(workdir)
    if not available:
        raise NoCheckpointError(
            f"{workdir / 'checkpoints'} holds no checkpoint. Train first (python -m hdml_jax.main "
            f"--workdir {workdir}; a run saves every checkpoint_every_steps and when stopped), or point "
            "--workdir at a trained run."
        )
    if step is not None and step not in available:
        select_step(available, None, step)  # raises with the list of steps
    manager = checkpoints.manager(workdir / "checkpoints")
    try:
        chosen = step
        if chosen is None:
            newest_data = _restore_data(manager, available[-1])
            best = best_step(
                workdir, newest_data.get("evaluations", []), config.get("best_metric", "recall@1")
            )
            chosen, note = select_step(available, best)
            if note and verbose:
                print(note, file=sys.stderr)
        state, data = _restore_state(manager, chosen)
    finally:
        manager.close()

    saved = data.get("fingerprint")
    actual = host_fingerprint(state)
    if saved is not None and sorted(map(tuple, actual)) != sorted(map(tuple, saved)):
        others = [s for s in available if s != chosen]
        raise CheckpointMismatchError(
            f"checkpoint step {chosen} in {workdir / 'checkpoints'} fails its checksum (damaged files). "
            + (f"Use another with --step ({', '.join(map(str, others))})." if others else "Retrain the run.")
        )
    params, batch_stats = state["params"], state.get("batch_stats", {})
    num_classes, coarse = _model_sizes(config, params)
    build_config = config.copy_and_resolve_references()
    with build_config.unlocked():
        build_config.shard_proxies = False  # the proxies' rows as saved (padding included)
    try:
        full_model = steps.build_model(build_config, num_classes, coarse, 1)
        size = int(config.dataset.image_size)
        outputs, shapes = jax.eval_shape(
            lambda: full_model.init_with_output(
                jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False
            )
        )
    except Exception as error:
        raise CheckpointMismatchError(
            f"{workdir / 'config.json'} does not build a model ({error})."
        ) from None
    want = {"params": _shapes(shapes["params"]), "batch_stats": _shapes(shapes.get("batch_stats", {}))}
    have = {"params": _shapes(params), "batch_stats": _shapes(batch_stats)}
    if want != have:
        raise CheckpointMismatchError(
            f"the checkpoint of step {chosen} does not fit the model {workdir / 'config.json'} describes "
            "(was config.json edited, or the checkpoints copied from another run?). Use the run's own "
            "config.json."
        )
    model = full_model.clone(num_proxies=0, proxy_padding=0, coarse_groups=(), loss_params=(), num_lcas=0)
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    variables = {
        "params": {"backbone": params["backbone"], "head": params["head"]},
        "batch_stats": batch_stats,
    }
    variables = jax.device_put(variables, replicated)
    embed = jax.jit(
        lambda variables, images: steps.embed_step(variables, images, model=model),
        in_shardings=(replicated, batch_sharding),
        out_shardings=batch_sharding,
    )
    transform = transforms.TRANSFORMS[config.dataset.transform](size, crop_to_bbox=False).eval
    return Embedder(
        workdir=workdir,
        step=int(chosen),
        checkpoint_id=checkpoint_id(saved if saved is not None else actual),
        config=config,
        model=model,
        variables=variables,
        image_size=size,
        embedding_dim=int(outputs["embedding"].shape[-1]),
        transform=transform,
        _embed=embed,
        _batch_sharding=batch_sharding,
    )


def _first_line(error: BaseException) -> str:
    """The first line of the innermost message of ``error``, shortened."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _restore_data(manager: Any, step: int) -> dict[str, Any]:
    try:
        with checkpoints.quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        data = restored["data"]
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _restore_state(manager: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """The whole state of ``step`` on the host's CPU (shapes from the checkpoint's metadata)."""
    directory = storage.as_path(manager.directory) / str(step)
    try:
        with checkpoints.quiet_orbax():
            with ocp.StandardCheckpointer() as checkpointer:
                metadata = checkpointer.metadata(directory / "state")
            item = metadata.item_metadata
            tree = getattr(item, "tree", item)  # orbax >= 0.11 wraps the tree of ArrayMetadata
            target = _abstract(tree, jax.sharding.SingleDeviceSharding(_host_device()))
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
            )
    except Exception as error:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {manager.directory} cannot be restored "
            f"({_first_line(error)}). Pick another with --step."
        ) from None
    data = restored["data"] if isinstance(restored["data"], dict) else {}
    return restored["state"], data


# ----------------------------------------------------------------------------- progress


class Progress:
    """``embedded 128/1000 images  55.3 img/s  ETA 00:00:16`` on stderr: rewritten in place on a
    terminal, one line at most every ``every_s`` seconds (and the last) otherwise."""

    def __init__(self, total: int, what: str = "embedded", every_s: float = 10.0):
        import time

        self._time = time.monotonic
        self.total, self.what, self.every_s = total, what, every_s
        self.start = self._time()
        self._last = -float("inf")
        self._tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = self._time()
        final = done >= self.total
        if not self._tty and not final and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        hours, rest = divmod(int(eta), 3600)
        line = (
            f"{self.what} {done}/{self.total} images  {rate:.1f} img/s  "
            f"ETA {hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
        )
        end = "\n" if final or not self._tty else ""
        print(("\r" if self._tty else "") + line, end=end, file=sys.stderr, flush=True)


def embed_files(
    embedder: Embedder, paths: Sequence[str | Path], batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """``float32 (len(paths), d)``: every image file loaded, preprocessed and embedded in order.

    Files are decoded on a few threads while the devices embed the previous batch.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}.")
    paths = list(paths)
    out = np.zeros((len(paths), embedder.embedding_dim), np.float32)
    meter = Progress(len(paths)) if progress else None

    def prepare(path: str | Path) -> np.ndarray:
        return embedder.preprocess(load_image(path))

    executor = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def submit(start: int) -> list[Future]:
        return [executor.submit(prepare, path) for path in paths[start : start + batch_size]]

    try:
        pending = submit(0)
        for start in range(0, len(paths), batch_size):
            futures, pending = pending, submit(start + batch_size)  # decode the next batch meanwhile
            images = np.stack([future.result() for future in futures])
            out[start : start + len(images)] = embedder.embed(images, pad_to=min(batch_size, len(paths)))
            if meter is not None:
                meter.update(start + len(images))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return out
