"""The test embeddings in TensorBoard's embedding projector (the PROJECTOR tab), without TensorFlow.

``write_projector`` leaves, in a run's TensorBoard logdir (the workdir, where the events are)::

    projector_config.pbtxt        text ProjectorConfig: one embedding, "test_embeddings"
    projector/test_embeddings.tsv the sampled embeddings, one row per point, tab-separated
    projector/metadata.tsv        their labels: "label<TAB>coarse_label" header and rows, or one
                                  column without a header when there are no coarse labels
    projector/sprite.png          their images, thumbnail k in grid cell k (only with images)

How TensorBoard finds them (``tensorboard/plugins/projector/projector_plugin.py``): it reads
``projector_config.pbtxt`` from each run's directory (``<logdir>/<run>``, a folder holding event
files; also from ``--logdir`` itself, as run ``"."``) and from its plugin-asset folder
``plugins/org_tensorflow_tensorboard_projector/``, not from other subfolders, so the config sits
next to the events. Relative paths in it are joined to the config file's folder, and recent
versions refuse paths that resolve outside that folder; hence the data files go in the
``projector/`` subfolder and are named relative to the logdir. ``tensorboard --logdir runs/``
then lists each finished run in the PROJECTOR tab.

The sample: at most ``max_points`` test points drawn uniformly without replacement by
``numpy.random.default_rng(seed)``, in test-set order (all of them when there are fewer). Uniform
keeps the class frequencies of the test set; with thousands of classes (SOP) a stratified sample
could not cover every class anyway.

The tensor is written with ``%.9g`` of float32 values: the projector reads it back as float32
exactly. Every file is replaced atomically, the config last, so it only names finished files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hdml_jax import storage
from hdml_jax.workdir import atomic_write, atomic_write_text

CONFIG_NAME = "projector_config.pbtxt"  # the plugin's PROJECTOR_FILENAME
SUBDIR = "projector"
TENSOR_NAME = "test_embeddings"
TENSOR_FILE = "test_embeddings.tsv"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
MAX_SPRITE_PX = 8192  # the projector refuses larger sprites (vz_projector/data-provider.ts)


def sample_indices(num_points: int, max_points: int, seed: int) -> np.ndarray:
    """Which test points to show: ``(min(num_points, max_points),)`` int64, sorted, distinct.

    All of them when ``num_points <= max_points``; otherwise a uniform sample without replacement
    drawn by ``numpy.random.default_rng(seed)`` (the same for the same arguments).
    """
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, not {max_points}.")
    if num_points <= max_points:
        return np.arange(num_points, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(num_points, size=max_points, replace=False)
    return np.sort(chosen).astype(np.int64)


def embeddings_tsv(embeddings: np.ndarray) -> str:
    """``(N, d)`` embeddings as N tab-separated lines of d numbers; float32-exact (``%.9g``)."""
    values = np.asarray(embeddings, np.float32)
    if values.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), not {values.shape}.")
    return "".join("\t".join(f"{x:.9g}" for x in row.tolist()) + "\n" for row in values)


def metadata_tsv(labels: np.ndarray, coarse_labels: np.ndarray | None = None) -> str:
    """One line per point, in the order of the tensor's rows.

    ``labels`` ``(N,)`` and ``coarse_labels`` ``(N,)`` or None. With coarse labels: a header
    ``label<TAB>coarse_label`` and N rows of two columns. Without: N lines of the label and no
    header (the projector takes a first line with a tab for a header, and a single column has
    none).
    """
    labels = np.asarray(labels).reshape(-1)
    if coarse_labels is None:
        return "".join(f"{int(label)}\n" for label in labels)
    coarse_labels = np.asarray(coarse_labels).reshape(-1)
    if len(coarse_labels) != len(labels):
        raise ValueError(f"{len(coarse_labels)} coarse labels for {len(labels)} labels.")
    rows = (f"{int(a)}\t{int(b)}\n" for a, b in zip(labels, coarse_labels, strict=True))
    return "label\tcoarse_label\n" + "".join(rows)


def sprite_layout(num_images: int, thumbnail: int = 32) -> tuple[int, int]:
    """``(cells_per_side, cell_px)`` of the square sprite for ``num_images`` thumbnails.

    The grid is square (the projector computes a cell's row with the number of cells per column,
    so rows and columns must agree) with ``ceil(sqrt(num_images))`` cells a side; a cell is
    ``thumbnail`` pixels, smaller if needed to keep the sprite within ``MAX_SPRITE_PX``.
    """
    side = max(1, math.ceil(math.sqrt(num_images)))
    cell = min(thumbnail, MAX_SPRITE_PX // side)
    if cell < 1:
        raise ValueError(f"{num_images} thumbnails do not fit in a {MAX_SPRITE_PX}-pixel sprite.")
    return side, cell


def thumbnail_rgba(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 image → ``(size, size, 4)``.

    Scaled to fit (aspect ratio kept, the longer side ``size``), centred; the margins are
    transparent, which the projector does not draw.
    """
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    picture = Image.fromarray(pixels)
    if picture.mode not in ("L", "RGB", "RGBA"):
        picture = picture.convert("RGB")
    scale = size / max(picture.size)
    width, height = (max(1, min(size, round(n * scale))) for n in picture.size)
    # reducing_gap: a box reduction first, then Lanczos; twice as fast for large photos.
    picture = picture.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=2.0)
    cell = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    cell.paste(picture.convert("RGBA"), ((size - width) // 2, (size - height) // 2))
    return np.asarray(cell)


def sprite_grid(images: Sequence[np.ndarray], thumbnail: int = 32) -> np.ndarray:
    """The sprite: ``(S, S, 4)`` uint8 RGBA, ``S = cells_per_side * cell_px`` (``sprite_layout``).

    Thumbnail k fills cell ``(row, column) = divmod(k, cells_per_side)``, row-major from the top
    left, as the projector indexes it; cells past the last image are transparent.
    """
    side, cell = sprite_layout(len(images), thumbnail)
    sprite = np.zeros((side * cell, side * cell, 4), np.uint8)
    for k, image in enumerate(images):
        row, column = divmod(k, side)
        sprite[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell] = thumbnail_rgba(
            image, cell
        )
    return sprite


def config_pbtxt(
    tensor_path: str,
    metadata_path: str,
    sprite_path: str | None = None,
    single_image_dim: tuple[int, int] | None = None,
    tensor_name: str = TENSOR_NAME,
) -> str:
    """A ``ProjectorConfig`` text proto with one embedding.

    Paths are relative to the config file's folder. ``single_image_dim`` is one thumbnail's
    ``(width, height)``, needed with ``sprite_path``.
    """

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "embeddings {",
        f"  tensor_name: {quoted(tensor_name)}",
        f"  tensor_path: {quoted(tensor_path)}",
        f"  metadata_path: {quoted(metadata_path)}",
    ]
    if sprite_path is not None:
        if single_image_dim is None:
            raise ValueError("a sprite needs single_image_dim (width, height).")
        width, height = single_image_dim
        lines += [
            "  sprite {",
            f"    image_path: {quoted(sprite_path)}",
            f"    single_image_dim: {int(width)}",
            f"    single_image_dim: {int(height)}",
            "  }",
        ]
    return "\n".join([*lines, "}"]) + "\n"


def write_projector(
    logdir: storage.AnyPath | str,
    embeddings: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray | None,
    images: Callable[[int], np.ndarray] | None,
    *,
    max_points: int = 2000,
    seed: int = 0,
    thumbnail: int = 32,
) -> np.ndarray:
    """Write the projector's files for a sample of ``embeddings`` (see the module docstring).

    Args:
      logdir: the run's TensorBoard logdir (the workdir; local or a bucket).
      embeddings: ``(N, d)``; ``labels`` and ``coarse_labels`` (or None) ``(N,)``.
      images: ``images(i)`` is point i's uint8 image; None writes no sprite (and removes an
        earlier one).
      max_points, seed: the sample (``sample_indices``); thumbnail: a cell's largest side in px.

    Returns the sampled indices into ``embeddings``, ``(min(N, max_points),)``, sorted.
    Nothing is written when ``N == 0``.
    """
    logdir = storage.as_path(logdir)
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(labels)} labels for {len(embeddings)} embeddings.")
    chosen = sample_indices(len(embeddings), max_points, seed)
    if len(chosen) == 0:
        return chosen
    folder = logdir / SUBDIR
    storage.makedirs(folder)
    atomic_write_text(folder / TENSOR_FILE, embeddings_tsv(embeddings[chosen]))
    coarse = None if coarse_labels is None else np.asarray(coarse_labels)[chosen]
    atomic_write_text(folder / METADATA_FILE, metadata_tsv(labels[chosen], coarse))
    sprite_path = dims = None
    if images is not None:
        sprite = sprite_grid([images(int(i)) for i in chosen], thumbnail)
        cell = sprite_layout(len(chosen), thumbnail)[1]
        sprite_path, dims = f"{SUBDIR}/{SPRITE_FILE}", (cell, cell)

        def save_png(tmp: Path) -> None:
            from PIL import Image

            Image.fromarray(sprite, "RGBA").save(tmp, format="PNG")

        atomic_write(folder / SPRITE_FILE, save_png)
    else:
        (folder / SPRITE_FILE).unlink(missing_ok=True)
    text = config_pbtxt(f"{SUBDIR}/{TENSOR_FILE}", f"{SUBDIR}/{METADATA_FILE}", sprite_path, dims)
    atomic_write_text(logdir / CONFIG_NAME, text)
    return chosen
