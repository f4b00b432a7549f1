"""A picture of the synthetic data set: one row per family, one column per fine class.

``python -c "from hdml_jax.data.synthetic_preview import save_preview; save_preview('grid.png')"``
shows what the classes look like and which of them are test classes (a white bar under them).
"""

from __future__ import annotations

import os

import numpy as np

from hdml_jax.data.synthetic import SyntheticConfig, class_sizes, render_class, train_classes


def preview_grid(
    config: SyntheticConfig | None = None, per_class: int = 1, gap: int = 2, max_classes: int = 16
) -> np.ndarray:
    """One row per family, ``per_class`` images of each fine class side by side; uint8 RGB.

    Only the first ``max_classes`` classes of every family are shown. Test classes are marked
    by a white bar under their images.
    """
    config = config or SyntheticConfig()
    size, per_class = config.image_size, min(per_class, int(class_sizes(config).min()))
    shown = min(config.classes_per_family, max_classes)
    cell = size + gap
    rows, cols = config.num_families, shown * per_class
    grid = np.full((rows * (cell + gap) + gap, cols * cell + gap * shown, 3), 40, np.uint8)
    is_train = train_classes(config)
    for family in range(rows):
        for fine in range(shown):
            images = render_class(config, family, fine)[:per_class]
            top = gap + family * (cell + gap)
            for j, img in enumerate(images):
                left = gap + fine * (per_class * cell + gap) + j * cell
                grid[top : top + size, left : left + size] = img
            if not is_train[family, fine]:
                left = gap + fine * (per_class * cell + gap)
                grid[top + size + 1 : top + size + gap + 1, left : left + per_class * cell - gap] = 255
    return grid


def save_preview(
    path: str | os.PathLike, config: SyntheticConfig | None = None, per_class: int = 1, zoom: int = 2
) -> None:
    """Write ``preview_grid(config, per_class)`` as a PNG, enlarged ``zoom`` times (nearest neighbour).

    Args:
      path: the PNG file to write.
      config: the generator parameters (default ``SyntheticConfig()``).
      per_class: images shown per fine class.
      zoom: integer enlargement.
    """
    from PIL import Image

    grid = preview_grid(config, per_class)
    if zoom > 1:
        grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
    Image.fromarray(grid).save(os.fspath(path))
