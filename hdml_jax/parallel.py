"""How the training state is laid out over the device mesh.

Everything is replicated except, with ``config.shard_proxies``, the fine proxies: they and their
optimizer state (Adam's moments) are split along the class axis over the mesh's ``'data'`` axis,
so a device holds ``1/n`` of them. ``jax.jit`` then partitions the losses over that axis: each
device computes the similarities of the (small, gathered) batch to its own proxies, and only
per-row and per-proxy sums cross devices; the ``(C, d)`` proxy matrix is never gathered.

Sharded arrays must split evenly, so the proxies are padded to a multiple of
``lcm(PROXY_PAD_MULTIPLE, device count)`` rows; the losses get a ``proxy_mask`` that removes the
padding from every term (it gets zero gradient). The multiple does not depend on the device count
for up to 128 devices (powers of two), so a checkpoint resumes on 1, 8 or 128 devices alike.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PROXY_PAD_MULTIPLE = 128
SHARDED_PROXY_KEY = "proxies"  # params['proxies'] (the fine level); coarse levels stay replicated


def proxy_padding(num_classes: int, num_devices: int) -> int:
    """Rows to add to ``num_classes`` proxies so that every device gets an equal share."""
    multiple = math.lcm(PROXY_PAD_MULTIPLE, num_devices)
    return -num_classes % multiple


def _is_fine_proxy(path) -> bool:
    return any(getattr(key, "key", None) == SHARDED_PROXY_KEY for key in path)


def state_sharding(tree: Any, mesh: Mesh, shard_proxies: bool) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (the state, or any part of it such as params).

    Leaves under a ``'proxies'`` key (the parameter and its mirrors in the optimizer state) are
    split along their first axis when ``shard_proxies``; everything else is replicated.
    """
    replicated = NamedSharding(mesh, P())
    by_class = NamedSharding(mesh, P("data", None))
    num_shards = mesh.shape["data"]

    def choose(path, leaf):
        shape = jnp.shape(leaf)
        if shard_proxies and _is_fine_proxy(path) and len(shape) == 2 and shape[0] % num_shards == 0:
            return by_class
        return replicated

    return jax.tree_util.tree_map_with_path(choose, tree)


def fine_proxy_mask(num_proxies: int, num_classes: int) -> jax.Array | None:
    """``(num_proxies,)`` bool, False on padding rows; None when there is no padding."""
    if num_proxies == num_classes:
        return None
    return jnp.arange(num_proxies) < num_classes


_COLLECTIVE = re.compile(
    r"=\s*\(?([^=]*?)\)?\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


def collective_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(op, shape)`` of every array a collective produces, from compiled HLO text.

    ``jax.jit(f).lower(...).compile().as_text()`` gives the text. Used to check that a step with
    sharded proxies never rebuilds the class axis (no shape may contain the proxy count).
    """
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1)):
                found.append((match.group(2), tuple(int(d) for d in dims.split(",") if d)))
    return found
