"""``configs/custom.py`` shrunk for tests, as a config file the CLI loads:

    python -m hdml_jax.main --config tests/tiny_custom_config.py:method=proxy_anchor \\
        --config.dataset.path=items.csv

``tests.tiny_data.shrink`` on 32-px images from scratch: 2 epochs, evaluated after each.
"""

import importlib.util
from pathlib import Path

from hdml_jax.config import apply_small_cpu_recipe
from tests.tiny_data import shrink


def get_config(arg: str | None = None):
    path = Path(__file__).resolve().parents[1] / "configs" / "custom.py"
    spec = importlib.util.spec_from_file_location("configs_custom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    apply_small_cpu_recipe(c, image_size=32)
    c.optimizer.decay_epochs = (10,)
    shrink(c, num_epochs=2, eval_every_epochs=1)
    return c
