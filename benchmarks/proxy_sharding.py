"""Memory per device and step time of a proxy-loss step with the proxies sharded over classes.

Run from the repository root::

    python benchmarks/proxy_sharding.py                         # 10^6 classes x 512, 8 simulated CPU devices
    python benchmarks/proxy_sharding.py --classes 100000 --steps 5
    python benchmarks/proxy_sharding.py --simulate 0            # the real devices (GPU/TPU)

The step is the part of training that the proxies make big: a batch of ``--batch`` embeddings
(as if from the backbone, sharded over the batch axis) against ``--classes`` proxies of
``--dim`` dims, ``value_and_grad`` of the loss with respect to both, then an AdamW update of the
proxies (two moment buffers of the proxies' size). The proxies are laid out by
``hdml_jax.parallel.state_sharding`` exactly as the trainer does with ``shard_proxies=True``
(padded to a multiple of 128 rows, split along the class axis) or replicated.

Printed per layout, from XLA's compiled memory analysis (bytes per device): arguments (proxies +
optimizer state + batch), outputs, temporaries, and their sum; then, for the sharded layout, the
median wall time of a step over ``--steps`` timed runs and the collectives the step contains (none
may carry the class axis). The replicated layout is only compiled, for its memory figures: on
simulated devices it would need the device count times its total of this machine's memory.

``--simulate N`` (default 8, 0 to use the real devices) sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts: N CPU "devices" that
share the same cores, so the step time is that of the whole computation on this CPU, not of N
accelerators; the memory per device is what each real device would need.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--loss", choices=("proxy_anchor", "proxy_nca"), default="proxy_anchor")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--simulate", type=int, default=8, help="CPU devices to simulate; 0: real devices")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.simulate:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.simulate}"
    ).strip()

import _timing  # noqa: E402  (after XLA_FLAGS: JAX must not start before)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hdml_jax import losses, parallel  # noqa: E402

GIB = 1 << 30


def build_step(num_classes: int, optimizer: optax.GradientTransformation):
    loss_fn = {"proxy_anchor": losses.proxy_anchor_loss, "proxy_nca": losses.proxy_nca_loss}[ARGS.loss]

    def step(state, embeddings, labels):
        proxies = state["params"]["proxies"]
        proxy_mask = parallel.fine_proxy_mask(proxies.shape[0], num_classes)
        kwargs = {} if proxy_mask is None else {"proxy_mask": proxy_mask}

        def loss_of(params, x):
            return loss_fn(x, labels, params["proxies"], **kwargs)

        loss, (grads, embedding_grads) = jax.value_and_grad(loss_of, argnums=(0, 1))(
            state["params"], embeddings
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # The embedding gradient goes on into the backbone in training; return its norm.
        return {"params": params, "opt_state": opt_state}, loss, jnp.linalg.norm(embedding_grads)

    return step


def memory_row(name: str, compiled) -> tuple[list[str], float]:
    analysis = compiled.memory_analysis()
    parts = [
        analysis.argument_size_in_bytes,
        analysis.output_size_in_bytes - analysis.alias_size_in_bytes,
        analysis.temp_size_in_bytes,
    ]
    total = sum(parts)
    return [name, *(f"{p / GIB:.3f} GiB" for p in parts), f"{total / GIB:.3f} GiB"], total


def main() -> None:
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    padding = parallel.proxy_padding(ARGS.classes, len(devices))
    num_proxies = ARGS.classes + padding
    print(_timing.describe_environment())
    print(
        f"{ARGS.loss}: {ARGS.classes:,} classes (+{padding} padding rows) x {ARGS.dim} dims, "
        f"batch {ARGS.batch}, AdamW, {len(devices)} devices"
    )
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    state_shape = jax.eval_shape(
        lambda: {
            "params": {"proxies": jnp.zeros((num_proxies, ARGS.dim))},
            "opt_state": optimizer.init({"proxies": jnp.zeros((num_proxies, ARGS.dim))}),
        }
    )
    batch_sharding = NamedSharding(mesh, P("data"))
    embeddings_shape = jax.ShapeDtypeStruct((ARGS.batch, ARGS.dim), jnp.float32)
    labels_shape = jax.ShapeDtypeStruct((ARGS.batch,), jnp.int32)
    step = build_step(ARGS.classes, optimizer)

    rows, compiled_by_layout = [], {}
    for layout, shard in (("sharded over classes", True), ("replicated", False)):
        sharding = parallel.state_sharding(state_shape, mesh, shard)
        jitted = jax.jit(
            step,
            in_shardings=(sharding, batch_sharding, batch_sharding),
            out_shardings=(sharding, None, None),
            donate_argnums=(0,),
        )
        compiled = jitted.lower(state_shape, embeddings_shape, labels_shape).compile()
        row, total = memory_row(layout, compiled)
        rows.append(row)
        compiled_by_layout[layout] = (jitted, compiled, sharding, total)
    _timing.print_table(
        ["layout", "arguments", "outputs", "temporaries", "total per device"],
        rows,
        title="Memory per device (XLA memory analysis of the compiled step)",
    )

    jitted, compiled, sharding, _ = compiled_by_layout["sharded over classes"]
    collectives = parallel.collective_shapes(compiled.as_text())
    on_class_axis = [c for c in collectives if num_proxies in c[1]]
    print(
        f"\ncollectives in the sharded step: {len(collectives)}, "
        f"largest {max((int(np.prod(s)) for _, s in collectives), default=0):,} elements; "
        f"with the class axis (a gather of proxies or similarities): {on_class_axis or 'none'}"
    )

    key = jax.random.PRNGKey(0)
    k_proxies, k_x, k_y = jax.random.split(key, 3)
    init = jax.jit(
        lambda k: {
            "params": {"proxies": jax.random.normal(k, (num_proxies, ARGS.dim)) / 8},
            "opt_state": optimizer.init({"proxies": jnp.zeros((num_proxies, ARGS.dim))}),
        },
        out_shardings=sharding,
    )
    state = init(k_proxies)
    embeddings = jax.device_put(jax.random.normal(k_x, (ARGS.batch, ARGS.dim)), batch_sharding)
    labels = jax.device_put(jax.random.randint(k_y, (ARGS.batch,), 0, ARGS.classes), batch_sharding)
    shard_rows = {s.data.shape for s in state["params"]["proxies"].addressable_shards}
    print(f"proxy shard per device: {sorted(shard_rows)}")

    times = []
    for i in range(ARGS.steps + 1):
        start = time.perf_counter()
        state, loss, embedding_grad_norm = jitted(state, embeddings, labels)
        jax.block_until_ready((state, loss))
        if i:  # the first call compiles
            times.append(time.perf_counter() - start)
        if not (np.isfinite(float(loss)) and np.isfinite(float(embedding_grad_norm))):
            raise SystemExit(f"non-finite loss {float(loss)} or embedding gradient at step {i}")
    median = float(np.median(times))
    _timing.print_table(
        ["layout", "median step", "embeddings/s", "loss (last)", "peak RSS (process)"],
        [
            [
                "sharded over classes",
                _timing.format_seconds(median),
                f"{ARGS.batch / median:,.1f}",
                f"{float(loss):.4f}",
                f"{_timing.peak_rss_mib() / 1024:.2f} GiB",
            ]
        ],
        title=f"Step time, {ARGS.steps} timed steps",
    )


if __name__ == "__main__":
    main()
