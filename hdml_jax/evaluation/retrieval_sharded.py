"""``metrics.retrieval_metrics(..., mesh=...)``: the references split by row over devices.

Sharded references (``retrieval_metrics(..., mesh=...)``), for reference sets larger than one
device's memory: the references are split by row over the devices of a 1-D mesh (each device
normalises and holds ``N / D`` of them, in order), query chunks are sent to every device, and each
device computes its block, its part of the count and its own top-``R_max`` list. The best correct
similarity is a ``pmax``, the counts a ``psum``, and the ``D`` lists are all-gathered and merged
by one ``top_k``: devices hold the references in index order and each list keeps ties in index
order, so the merge keeps the tie rule. The results equal the single-device ones exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax.evaluation.finite import NonFiniteEmbeddingsError, check_finite
from hdml_jax.evaluation.retrieval_kernels import (
    GROUP,
    ball_rows,
    chunk_statistics,
    default_chunk_size,
    normalize_rows,
    pad_rows,
    poincare_similarity,
)
from hdml_jax.losses._common import FULL_PRECISION


def host_float32(x) -> np.ndarray:
    """A concrete array as float32 on the host (one transfer for a JAX array)."""
    return np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x).astype(np.float32, copy=False)


def sharded_rows(values: np.ndarray, rows: int, sharding) -> jax.Array:
    """``values`` zero-padded to ``rows`` rows and split over ``sharding``'s devices by row, each
    device receiving only its own rows (no padded copy of the whole array on the host)."""

    def piece(index):
        start, stop, _ = index[0].indices(rows)
        out = np.zeros((stop - start, *values.shape[1:]), values.dtype)
        present = values[start : min(stop, values.shape[0])]
        out[: present.shape[0]] = present
        return out

    return jax.make_array_from_callback((rows, *values.shape[1:]), sharding, piece)


@functools.partial(
    jax.jit, static_argnames=("mesh", "num_references", "padded_groups", "exclude_self", "top_r", "curvature")
)
def sharded_chunk(
    queries,
    query_labels,
    query_index,
    positive_index,
    reference,
    reference_labels,
    query_squared=None,
    reference_squared=None,
    *,
    mesh,
    num_references,
    padded_groups,
    exclude_self,
    top_r,
    curvature=0.0,
):
    """One query chunk (replicated) against the references split by row over ``mesh``'s axis
    (``curvature > 0``: Poincaré, from the squared norms, as ``all_chunks``)."""
    axis = mesh.axis_names[0]
    def local(q, labels, index, positives, reference, reference_labels, q_squared=None, r_squared=None):
        similarity = jnp.matmul(q, reference.T, precision=FULL_PRECISION)
        if curvature:
            similarity = poincare_similarity(similarity, q_squared, r_squared, curvature)
        return chunk_statistics(
            similarity,
            positives,
            labels,
            index,
            reference_labels,
            num_references=num_references,
            padded_groups=padded_groups,
            column_start=jax.lax.axis_index(axis) * reference.shape[0],
            exclude_self=exclude_self,
            top_r=top_r,
            axis_name=axis,
        )

    replicated, split = P(), P(axis)
    # The outputs are the same on every device (psum / pmax, or computed from all-gathered lists),
    # which the replication check cannot infer through all_gather: it is turned off.
    arguments = [queries, query_labels, query_index, positive_index, reference, reference_labels]
    specs = [replicated] * 4 + [split, split]
    if curvature:  # the squared norms: the query chunk's replicated, the references' split
        arguments += [query_squared, reference_squared]
        specs += [replicated, split]
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=(replicated, replicated),
        check_vma=False,
    )(*arguments)


def sharded_statistics(
    query,
    reference,
    self_retrieval,
    query_labels,
    reference_labels,
    positive_index,
    self_column,
    *,
    mesh,
    chunk_size,
    top_r,
    curvature=0.0,
):
    """``single_device_statistics`` with the references split over the devices of ``mesh``.

    Each device holds ``W / D`` of the (padded) references, normalised where they lie; query chunks
    go from the host to every device. The per-query results equal the single-device ones exactly:
    the similarities are the same products, the best correct one is a ``pmax``, the counts a
    ``psum`` and the top-R an all-gather of the local top-R lists merged by ``top_k`` (see
    ``chunk_statistics``).
    """
    num_devices = mesh.devices.size
    query_np = host_float32(query)
    if self_retrieval:
        reference_np = query_np
    else:
        check_finite(query_np, "query embedding")
        reference_np = host_float32(reference)
    num_queries, num_references = query_np.shape[0], reference_np.shape[0]
    width = -(-num_references // (GROUP * num_devices)) * GROUP * num_devices
    split = NamedSharding(mesh, P(mesh.axis_names[0]))
    replicated = NamedSharding(mesh, P())
    if curvature:
        # Padding rows: the −1 mark of ball_rows on the squared norm, on every device's share.
        reference_n, reference_squared, bad_references = ball_rows(sharded_rows(reference_np, width, split))
        padding = np.arange(width) >= num_references
        reference_squared = jnp.where(jax.device_put(padding, split), -1.0, reference_squared)
    else:
        reference_n, bad_references = normalize_rows(sharded_rows(reference_np, width, split))
        reference_squared = None
    if int(bad_references):
        raise NonFiniteEmbeddingsError(
            int(bad_references), num_references, "embedding" if self_retrieval else "reference embedding"
        )
    reference_labels_d = sharded_rows(reference_labels.astype(np.int32), width, split)
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, width // num_devices)
    chunk_size = int(min(chunk_size, num_queries))
    query_labels = query_labels.astype(np.int32)
    exclude_self = self_retrieval or self_column is not None
    if self_column is None:
        self_column = np.arange(num_queries, dtype=np.int32)  # read only when exclude_self

    def chunk_of(values, start, fill=0):
        rows = pad_rows(values[start : start + chunk_size], chunk_size, fill)
        return jax.device_put(rows, replicated)

    outputs = []
    for start in range(0, num_queries, chunk_size):
        if curvature:
            queries_n, query_squared, _ = ball_rows(chunk_of(query_np, start))
        else:
            queries_n, _ = normalize_rows(chunk_of(query_np, start))
            query_squared = None
        outputs.append(
            sharded_chunk(
                queries_n,
                chunk_of(query_labels, start),
                chunk_of(self_column.astype(np.int32), start, -1),
                chunk_of(positive_index, start, -1),
                reference_n,
                reference_labels_d,
                query_squared,
                reference_squared,
                mesh=mesh,
                num_references=num_references,
                padded_groups=width // GROUP - num_references // GROUP,
                exclude_self=exclude_self,
                top_r=top_r,
                curvature=float(curvature),
            )
        )
    rank = np.concatenate([np.asarray(r) for r, _ in outputs])
    return rank, np.concatenate([np.asarray(r) for _, r in outputs])
