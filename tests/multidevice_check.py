"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (by tests/test_sharding.py).

For one method, one training step's loss, gradients and BatchNorm statistics on a global batch
sharded over 8 devices must equal those of the same batch on 1 device, up to round-off: the two
programs sum the batch's statistics and gradients in another order (the report gives, per leaf,
the differences and scales that tests/test_sharding.py turns into tolerances). With ``--shard-proxies``
the fine proxies (padded) are also split over the 8 devices along the class axis; then the
compiled step must not gather them: no collective may produce an array with a proxy-count axis.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import parallel
from hdml_jax.training import optim, phases, setup, steps, train
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset


def one_step(method: str, devices, shard_proxies: bool, pad_proxies: bool) -> dict:
    # pad_proxies: the 1-device baseline of a sharded run has the same padded proxies.
    config = tiny_config(method, shard_proxies=pad_proxies)
    config.batch_size = 32
    if method == "cgd":
        config.classes_per_batch, config.samples_per_class = 8, 4
    dataset = tiny_dataset()
    coarse = setup.coarse_group_sizes(config, dataset)
    # Padding for 8 devices in both runs, so the two compute the same function.
    model = steps.build_model(config, dataset.train.num_classes, coarse, num_devices=8)
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    sharded = NamedSharding(mesh, P("data"))
    params_shape = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))[
        "params"
    ]
    optimizer = optim.make_optimizer(config, steps.unfreeze(params_shape), 4)
    state = setup.init_state(config, model, dataset, optimizer, coarse)
    state_sharding = parallel.state_sharding(state, mesh, shard_proxies)
    state = jax.device_put(state, state_sharding)
    if method in ("hpl_pa", "hpl_nca"):  # an active hierarchy, so the coarse level contributes
        hierarchy = phases.Phases(
            config, model, steps.unfreeze(params_shape), 4, coarse, state_sharding, sharded, False
        )
        state = hierarchy.build_hierarchy(state, 4)
    iterator = setup.make_train_iterator(config, dataset.train)
    local = next(iterator)
    batch = {k: jax.device_put(np.asarray(local[k]), sharded) for k in ("image", "label")}
    fn = jax.jit(
        functools.partial(steps.loss_and_grads, model=model, config=config),
        in_shardings=(state_sharding["params"], state_sharding, sharded),
        out_shardings=((None, None, None, None), state_sharding["params"]),
    )
    (loss, _, batch_stats, _), grads = fn(state["params"], state, batch)
    result = {"values": jax.device_get((loss, grads, batch_stats))}
    if shard_proxies:
        num_proxies = state["params"]["proxies"].shape[0]
        others = [leaf.shape for leaf in jax.tree.leaves(params_shape) if num_proxies in leaf.shape]
        assert len(others) == 1, (
            f"a non-proxy parameter has {num_proxies} rows: the check would be inconclusive"
        )
        hlo = fn.lower(state["params"], state, batch).compile().as_text()
        result["gathered"] = [(op, s) for op, s in parallel.collective_shapes(hlo) if num_proxies in s]
        result["num_collectives"] = len(parallel.collective_shapes(hlo))
        result["proxy_shard_rows"] = {s.data.shape[0] for s in grads["proxies"].addressable_shards}
        result["num_proxies"] = num_proxies
    return result


def differences(one, eight) -> list[list]:
    """Per leaf of two pytrees of the same structure: ``[path, max|one - eight|, max|one|,
    ‖one - eight‖, ‖one‖]``. The test turns them into tolerances (``tests.numerics``: the 1-device
    leaf's largest magnitude is the scale its round-off is measured against)."""
    rows = []
    paths, _ = jax.tree_util.tree_flatten_with_path(one)
    for (path, a), b in zip(paths, jax.tree.leaves(eight), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rows.append(
            [
                jax.tree_util.keystr(path),
                float(np.max(np.abs(a - b), initial=0.0)),
                float(np.max(np.abs(a), initial=0.0)),
                float(np.linalg.norm(a - b)),
                float(np.linalg.norm(a)),
            ]
        )
    return rows


def main(method: str, shard_proxies: bool) -> None:
    assert jax.device_count() == 8, jax.devices()
    one = one_step(method, jax.devices()[:1], False, shard_proxies)
    eight = one_step(method, jax.devices(), shard_proxies, shard_proxies)
    (loss1, grads1, stats1), (loss8, grads8, stats8) = one["values"], eight["values"]
    worst = {
        "loss": [abs(float(loss1) - float(loss8)), abs(float(loss1))],
        "grads": differences(grads1, grads8),
        "batch_stats": differences(stats1, stats8),
        "grad_norm": float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))),
    }
    for key in ("gathered", "num_collectives", "proxy_shard_rows", "num_proxies"):
        if key in eight:
            value = eight[key]
            worst[key] = sorted(value) if isinstance(value, set) else value
    print(json.dumps(worst))


def train_sharded(workdir: str) -> None:
    """HPL-PA with sharded proxies through the trainer: a copy of a straight run cut back to its
    (sharded) step-6 checkpoint, as a run stopped there leaves it, resumes to the straight run's
    end; the hierarchy is built and refreshed on the way. The resumed run's final evaluation
    splits the references over the devices. (Stopping itself is test_train's.)"""
    import shutil

    root = Path(workdir)
    dataset = tiny_dataset()
    config = functools.partial(
        tiny_config, "hpl_pa", shard_proxies=True, eval_every_epochs=0, checkpoint_every_steps=6, keep_checkpoints=3
    )
    straight = train.train_and_evaluate(config(), root / "straight", dataset=dataset)
    shutil.copytree(root / "straight", root / "resumed")
    kept = sorted(int(p.name) for p in (root / "resumed" / "checkpoints").iterdir() if p.name.isdigit())
    assert 6 in kept and max(kept) > 6, kept
    for step in kept:
        if step > 6:
            shutil.rmtree(root / "resumed" / "checkpoints" / str(step))
    for name in ("final_metrics.json", "test_embeddings.npy"):
        (root / "resumed" / name).unlink()
    # The resumed run also scores with the references split over the 8 devices: same metrics.
    resumed = train.train_and_evaluate(config(eval_shard_references=True), root / "resumed", dataset=dataset)
    embeddings = [np.load(root / run / "test_embeddings.npy") for run in ("straight", "resumed")]
    print(
        json.dumps(
            {
                "straight": straight,
                "resumed": resumed,
                "embedding_diff": float(np.abs(embeddings[0] - embeddings[1]).max()),
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_sharded(sys.argv[2])
    else:
        main(sys.argv[1], "--shard-proxies" in sys.argv[2:])
