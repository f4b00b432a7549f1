"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (by tests/test_sharding.py).

For one method, one training step's loss, gradients and BatchNorm statistics on a global batch
sharded over 8 devices must equal those of the same batch on 1 device.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import steps, train
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset


def one_step(method: str, devices) -> tuple:
    config = tiny_config(method)
    config.batch_size = 32
    if method == "cgd":
        config.classes_per_batch, config.samples_per_class = 8, 4
    dataset = tiny_dataset()
    coarse = train.coarse_group_sizes(config, dataset)
    model = steps.build_model(config, dataset.train.num_classes, coarse)
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params_shape = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    optimizer = steps.make_optimizer(config, steps.unfreeze(params_shape), 4)
    state = train.init_state(config, model, dataset, optimizer, coarse)
    if method == "hpl_pa":  # an active hierarchy, so the coarse level contributes
        built = train.update_hierarchy(state, 4, 4, 0, coarse, 0, replicated)
        state = built
    state = jax.device_put(state, replicated)
    iterator = train.make_train_iterator(config, dataset.train)
    local = next(iterator)
    batch = {k: jax.device_put(np.asarray(local[k]), sharded) for k in ("image", "label")}
    fn = jax.jit(
        functools.partial(steps.loss_and_grads, model=model, config=config),
        in_shardings=(replicated, replicated, sharded),
        out_shardings=replicated,
    )
    (loss, _, batch_stats), grads = fn(state["params"], state, batch)
    return jax.device_get((loss, grads, batch_stats))


def main(method: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    loss1, grads1, stats1 = one_step(method, jax.devices()[:1])
    loss8, grads8, stats8 = one_step(method, jax.devices())
    worst = {"loss": abs(float(loss1) - float(loss8)) / max(abs(float(loss1)), 1e-6)}

    def relative(a, b):
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(a)), 1e-12))

    worst["grads"] = max(jax.tree.leaves(jax.tree.map(relative, grads1, grads8)))
    worst["batch_stats"] = max(jax.tree.leaves(jax.tree.map(relative, stats1, stats8)))
    worst["grad_norm"] = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1))))
    print(json.dumps(worst))


if __name__ == "__main__":
    main(sys.argv[1])
