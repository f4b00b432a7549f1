"""Every similarity / distance product runs at HIGHEST (full float32) precision.

Checked on the lowered programs, not numerically: on CPU float32 matmuls are exact whatever the
precision flag, so only the StableHLO text shows whether a TPU or GPU would be allowed to run a
product as bf16/TF32 passes. Each case lowers (without compiling) the jitted forward + backward of
a loss, or a jitted helper of the metrics / k-means, and asserts that every ``dot_general`` in it
asks for HIGHEST on both operands.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdml_jax.evaluation import cluster, retrieval_kernels, retrieval_sharded
from hdml_jax.losses import (
    _common,
    batch_hard_triplet_loss,
    hierarchical,
    hierarchical_proxy_loss,
    proxy_anchor,
    proxy_anchor_loss,
    proxy_nca_loss,
    softmax_cross_entropy,
)

BATCH, DIM, CLASSES, GROUPS = 12, 8, 5, 2

_DOT = re.compile(r"stablehlo\.dot(_general)?\b")
# The pretty-printed form (what ``as_text()`` gives) and the generic MLIR form.
_BOTH_HIGHEST = re.compile(
    r"precision = \[HIGHEST, HIGHEST\]"
    r"|precision_config = \[#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>\]"
)


def assert_dots_at_highest(lowered: jax.stages.Lowered, *, allow_none: bool = False) -> int:
    """Assert that every dot in ``lowered`` has HIGHEST precision on both operands; return their count."""
    assert _common.FULL_PRECISION == jax.lax.Precision.HIGHEST
    dots = [line.strip() for line in lowered.as_text().splitlines() if _DOT.search(line)]
    if not allow_none:
        assert dots, "no dot_general in the lowered program: the check would pass vacuously"
    imprecise = [dot for dot in dots if not _BOTH_HIGHEST.search(dot)]
    assert not imprecise, f"{len(imprecise)} of {len(dots)} dots not at HIGHEST precision:\n" + "\n".join(
        imprecise
    )
    return len(dots)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float32)
    labels = jnp.asarray(np.arange(BATCH) % CLASSES, jnp.int32)
    proxies = jnp.asarray(rng.normal(size=(CLASSES, DIM)), jnp.float32)
    coarse = jnp.asarray(rng.normal(size=(GROUPS, DIM)), jnp.float32)
    assignment = jnp.asarray(np.arange(CLASSES) % GROUPS, jnp.int32)
    mask = jnp.asarray(np.arange(BATCH) != 3)
    return x, labels, proxies, coarse, assignment, mask


def _lower_value_and_grad(fn, args, argnums):
    return jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args)


def test_the_check_catches_a_default_precision_dot():
    a = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(AssertionError, match="not at HIGHEST"):
        assert_dots_at_highest(jax.jit(lambda a: a @ a.T).lower(a))
    with pytest.raises(AssertionError, match="not at HIGHEST"):  # HIGHEST on one operand only
        mixed = (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT)
        assert_dots_at_highest(jax.jit(lambda a: jnp.matmul(a, a.T, precision=mixed)).lower(a))
    with pytest.raises(AssertionError, match="vacuously"):
        assert_dots_at_highest(jax.jit(lambda a: a * 2.0).lower(a))
    full = jax.jit(lambda a: jnp.matmul(a, a.T, precision=_common.FULL_PRECISION)).lower(a)
    assert assert_dots_at_highest(full) == 1


def test_proxy_anchor_direct_path():
    x, labels, proxies, _, _, mask = _inputs()
    assert proxy_anchor._direct_sums_are_safe(32.0, 0.1, BATCH)  # the custom_jvp path is taken
    loss = lambda x, p: proxy_anchor_loss(x, labels, p, alpha=32.0, margin=0.1, mask=mask)  # noqa: E731
    # x·pᵀ, ‖p‖², both column sums, the per-class sum, and the gradient's G·p, Gᵀ·x: at least 7.
    assert assert_dots_at_highest(_lower_value_and_grad(loss, (x, proxies), (0, 1))) >= 7


def test_proxy_anchor_shifted_path_with_traced_alpha():
    x, labels, proxies, _, _, mask = _inputs()
    loss = lambda x, p, alpha: proxy_anchor_loss(x, labels, p, alpha=alpha, margin=0.1, mask=mask)  # noqa: E731
    assert assert_dots_at_highest(_lower_value_and_grad(loss, (x, proxies, jnp.float32(32.0)), (0, 1))) >= 3


@pytest.mark.parametrize("include_target", [True, False])
def test_proxy_nca(include_target):
    x, labels, proxies, _, _, mask = _inputs()

    def loss(x, p):
        return proxy_nca_loss(
            x, labels, p, scale=32.0, include_target_in_denominator=include_target, mask=mask
        )

    assert_dots_at_highest(_lower_value_and_grad(loss, (x, proxies), (0, 1)))


@pytest.mark.parametrize("base_loss", [proxy_anchor_loss, proxy_nca_loss], ids=["pa", "nca"])
def test_hierarchical_proxy_loss(base_loss):
    x, labels, proxies, coarse, assignment, mask = _inputs()

    def loss(x, level_proxies):
        return hierarchical_proxy_loss(
            x, labels, level_proxies, (assignment,), base_loss=base_loss, mask=mask
        )

    assert_dots_at_highest(_lower_value_and_grad(loss, (x, (proxies, coarse)), (0, 1)))


@pytest.mark.parametrize("squared", [False, True])
def test_batch_hard_triplet(squared):
    x, labels, *_, mask = _inputs()
    loss = lambda x: batch_hard_triplet_loss(x, labels, margin=0.1, squared=squared, mask=mask)  # noqa: E731
    assert_dots_at_highest(_lower_value_and_grad(loss, (x,), 0))


def test_softmax_cross_entropy_has_no_imprecise_dot():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, CLASSES)), jnp.float32)
    labels = jnp.asarray(np.arange(BATCH) % CLASSES, jnp.int32)
    loss = lambda z: softmax_cross_entropy(z, labels, temperature=0.5, label_smoothing=0.1)  # noqa: E731
    # It has no product today; should one appear, it must be at HIGHEST too.
    assert_dots_at_highest(_lower_value_and_grad(loss, (logits,), 0), allow_none=True)


def test_refresh_assignments_nearest_proxy_search():
    _, _, proxies, coarse, _, _ = _inputs()
    assert_dots_at_highest(hierarchical._nearest_by_cosine.lower(proxies, coarse))
    assert_dots_at_highest(hierarchical._nearest_by_distance.lower(proxies, coarse))


def _retrieval_programs():
    """The single-device program (every chunk) and the sharded one (a chunk, 1-device mesh)."""
    x, labels, *_ = _inputs()
    width = 64  # the reference set is padded to a multiple of retrieval_kernels.GROUP
    reference = jnp.pad(x, ((0, width - BATCH), (0, 0)))
    reference_labels = jnp.pad(labels, (0, width - BATCH))
    positives = jnp.zeros((BATCH, 3), jnp.int32)
    index = jnp.arange(BATCH, dtype=jnp.int32)
    common = {"num_references": BATCH, "exclude_self": True, "top_r": 2}
    single = retrieval_kernels.all_chunks.lower(
        reference, labels, positives, reference, reference_labels, chunk_size=4, **common
    )
    mesh = jax.make_mesh((1,), ("references",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("references"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    queries = [jax.device_put(a, replicated) for a in (x, labels, index, positives)]
    references = [jax.device_put(a, split) for a in (reference, reference_labels)]
    sharded = retrieval_sharded.sharded_chunk.lower(*queries, *references, mesh=mesh, padded_groups=1, **common)
    return single, sharded


def test_retrieval_similarities():
    # The product of each program (queries × references) is at HIGHEST, as any other dot must be.
    for program in _retrieval_programs():
        assert assert_dots_at_highest(program) >= 1


def test_kmeans():
    x, *_ = _inputs()
    lowered = cluster._kmeans.lower(jax.random.key(0), x, num_clusters=4, num_iters=3, tol=1e-6, block_size=5)
    # The k-means++ seeding's distances to each new centre and the Lloyd steps' blocked distances.
    assert assert_dots_at_highest(lowered) >= 2
