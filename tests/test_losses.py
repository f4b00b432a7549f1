"""The losses against slow float64 references, plus gradients, jit, invariances, edge cases and errors.

The references (``tests/reference_losses.py``) are per-sample Python loops in float64; the library
computes in float32. Every comparison of two evaluations that may round differently (float32 against
float64, two shapes, two programs) allows the round-off of ``tests/numerics.py``, ``k·ε·scale·√n``:
``n`` the chained reductions of the loss (``LossCase.n_terms``), ``scale`` the size of the terms it
exponentiates or sums (``LossCase.value_scale``) for a value, that times the loss's condition
(``LossCase.grad_factor``) times the largest entry for a gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from hdml_jax.errors import ConfigError
from hdml_jax.losses import (
    LossHyperparameterError,
    batch_hard_triplet_loss,
    build_hierarchy,
    coarse_centroids,
    hierarchical_proxy_loss,
    hierarchy_from_labels,
    level_labels,
    proxy_anchor_loss,
    proxy_nca_loss,
    refresh_assignments,
    softmax_cross_entropy,
)
from hdml_jax.losses._common import l2_normalize
from tests import reference_losses as ref
from tests.numerics import assert_close, rounding_atol

Params = Any  # None, a (C, d) proxy array, or a tuple of per-level proxy arrays
# The library computes in float32: its round-off, passed explicitly (a Python float of a float32
# result would otherwise pass for float64).
EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _random_mask(rng: np.random.Generator, batch: int) -> np.ndarray:
    """About a third of the rows masked out, never fewer than two kept."""
    mask = rng.random(batch) > 0.35
    mask[:2] = True
    rng.shuffle(mask)
    return mask


def _tree_np(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _assert_tree_finite(tree) -> None:
    for leaf in _tree_np(tree):
        assert np.all(np.isfinite(leaf)), leaf


def _assert_tree_zero(tree) -> None:
    for leaf in _tree_np(tree):
        assert np.array_equal(leaf, np.zeros_like(leaf)), leaf


def _gram_distance_scales(x: np.ndarray, squared: bool) -> tuple[float, float]:
    """``(value scale, gradient factor)`` of a loss on ``D² = ‖a‖² + ‖b‖² - 2a·b`` of x's rows.

    D² rounds like its terms, up to ``4·max‖x‖²``. The square root divides that by ``2D``, at worst
    the smallest distance between distinct rows, and a gradient ``(a - b)/D`` carries ``δD/D``
    relative; ``2(a - b)`` (squared) only the cancellation of ``a - b``, ``max‖x‖/D``. Exact
    duplicates (``D = 0``) are left out (``test_zero_norm_and_duplicate_rows_are_finite``).
    """
    x = np.asarray(x, np.float64)
    max_sq_norm = float(np.max(np.sum(x * x, axis=1)))
    dist = np.sqrt(np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1))
    d_min = float(np.min(dist[dist > 0]))
    if squared:
        return 4.0 * max_sq_norm, 2.0 * math.sqrt(max_sq_norm) / d_min
    return 2.0 * max_sq_norm / d_min, 2.0 * max_sq_norm / d_min**2


def _hpl_assignment(num_classes: int) -> np.ndarray:
    """Level-0 → level-1 map used by the generic HPL cases: two coarse groups, even / odd class."""
    return (np.arange(num_classes) % 2).astype(np.int32)


def _numeric_grad(fn: Callable[..., float], arrays: list[np.ndarray], h: float = 1e-6) -> list[np.ndarray]:
    """Central differences in float64 over every coordinate of every array."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    grads = []
    for k, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[k][idx] += h
            minus[k][idx] -= h
            grad[idx] = (fn(*plus) - fn(*minus)) / (2.0 * h)
        grads.append(grad)
    return grads


# --------------------------------------------------------------------------------------------
# The losses under test, in one uniform signature: loss(x, labels, params, mask)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCase:
    name: str
    loss: Callable[[jax.Array, jax.Array, Params, jax.Array | None], jax.Array]
    reference: Callable[[np.ndarray, np.ndarray, Params, np.ndarray | None], float]
    proxies: str  # "none", "single" (one (C, d) array) or "levels" (tuple (P0, P1))
    # (value scale, gradient factor) at given inputs: the largest logit the loss exponentiates (or
    # the distance scale of _gram_distance_scales), plus the log of the count a log-sum-exp adds,
    # is the size of the terms behind the value; the largest logit is also the condition of the
    # softmax weights (a logit's rounding ε·|z| is their relative rounding), by which a gradient's
    # round-off exceeds ε times its largest entry.
    scales: Callable[[np.ndarray, Params], tuple[float, float]]
    logits: bool = False  # x is (B, C) logits rather than (B, d) embeddings
    cosine: bool = False  # invariant to positive per-row rescaling of x and proxies

    def value_scale(self, x, params) -> float:
        return self.scales(x, params)[0]

    def grad_factor(self, x, params) -> float:
        return self.scales(x, params)[1]

    def n_terms(self, batch: int, dim: int, num_classes: int) -> int:
        """The chained reductions behind the value and its gradients: a d-term similarity for each
        (row, proxy) pair, summed over rows and proxies (make()'s two coarse proxies included);
        a C-term log-sum-exp per row of logits; a d-term distance per anchor of the triplet loss."""
        if self.logits:
            return batch * num_classes
        if self.proxies == "none":
            return batch * dim
        return batch * (num_classes + (2 if self.proxies == "levels" else 0)) * dim

    def make(
        self, rng: np.random.Generator, batch: int = 8, dim: int = 4, num_classes: int = 3
    ) -> tuple[np.ndarray, np.ndarray, Params]:
        labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
        labels[: min(batch, num_classes)] = np.arange(min(batch, num_classes))  # every class once
        labels = rng.permutation(labels)
        width = num_classes if self.logits else dim
        x = rng.normal(size=(batch, width)).astype(np.float32)
        if self.logits:
            x *= 3.0
        if self.proxies == "single":
            params: Params = rng.normal(size=(num_classes, dim)).astype(np.float32)
        elif self.proxies == "levels":
            params = (
                rng.normal(size=(num_classes, dim)).astype(np.float32),
                rng.normal(size=(2, dim)).astype(np.float32),
            )
        else:
            params = None
        return x, labels, params


def _pa(x, y, p, mask):
    return proxy_anchor_loss(x, y, p, margin=0.1, alpha=32.0, mask=mask)


def _pa_ref(x, y, p, mask):
    return ref.proxy_anchor_ref(x, y, p, margin=0.1, alpha=32.0, mask=mask)


def _nca(x, y, p, mask):
    return proxy_nca_loss(x, y, p, scale=9.0, mask=mask)


def _nca_ref(x, y, p, mask):
    return ref.proxy_nca_ref(x, y, p, scale=9.0, mask=mask)


def _nca_classic(x, y, p, mask):
    return proxy_nca_loss(x, y, p, scale=9.0, include_target_in_denominator=False, mask=mask)


def _nca_classic_ref(x, y, p, mask):
    return ref.proxy_nca_ref(x, y, p, scale=9.0, include_target_in_denominator=False, mask=mask)


def _triplet(x, y, p, mask):
    return batch_hard_triplet_loss(x, y, margin=0.5, mask=mask)


def _triplet_ref(x, y, p, mask):
    return ref.batch_hard_triplet_ref(x, y, margin=0.5, mask=mask)


def _triplet_sq(x, y, p, mask):
    return batch_hard_triplet_loss(x, y, margin=1.0, squared=True, mask=mask)


def _triplet_sq_ref(x, y, p, mask):
    return ref.batch_hard_triplet_ref(x, y, margin=1.0, squared=True, mask=mask)


def _ce(x, y, p, mask):
    return softmax_cross_entropy(x, y, temperature=0.5, label_smoothing=0.1, mask=mask)


def _ce_ref(x, y, p, mask):
    return ref.softmax_cross_entropy_ref(x, y, temperature=0.5, label_smoothing=0.1, mask=mask)


def _hpl_pa(x, y, p, mask):
    assignments = (jnp.asarray(_hpl_assignment(p[0].shape[0])),)
    return hierarchical_proxy_loss(
        x, y, p, assignments, level_weights=(1.0, 0.1), mask=mask, margin=0.1, alpha=32.0
    )


def _hpl_pa_ref(x, y, p, mask):
    assignments = (_hpl_assignment(np.shape(p[0])[0]),)
    return ref.hierarchical_ref(
        x, y, p, assignments, level_weights=(1.0, 0.1), mask=mask, margin=0.1, alpha=32.0
    )


def _hpl_nca(x, y, p, mask):
    assignments = (jnp.asarray(_hpl_assignment(p[0].shape[0])),)
    return hierarchical_proxy_loss(
        x, y, p, assignments, base_loss=proxy_nca_loss, level_weights=(1.0, 0.5), mask=mask, scale=9.0
    )


def _hpl_nca_ref(x, y, p, mask):
    assignments = (_hpl_assignment(np.shape(p[0])[0]),)
    return ref.hierarchical_ref(
        x, y, p, assignments, base_ref=ref.proxy_nca_ref, level_weights=(1.0, 0.5), mask=mask, scale=9.0
    )


def _pa_scales(alpha: float, margin: float, weight: float = 1.0):
    """Proxy-Anchor exponentiates α(s ± δ), at most α(1 + δ); log(1 + Σ_B exp) adds log B.
    ``weight``: the sum of the level weights of a hierarchy of such levels."""
    return lambda x, p: (weight * (alpha * (1 + margin) + math.log(len(x))), alpha * (1 + margin))


def _nca_scales(scale: float, weight: float = 1.0):
    """Proxy-NCA's logits -σ‖x̂ - p̂‖² lie in [-4σ, 0]; the log-sum-exp over C proxies adds log C."""
    return lambda x, p: (weight * (4 * scale + math.log(len(jax.tree_util.tree_leaves(p)[0]))), 4 * scale)


def _triplet_scales(squared: bool):
    return lambda x, p: _gram_distance_scales(x, squared)


def _ce_scales(temperature: float):
    """Cross-entropy on the logits z / τ: their largest magnitude, plus log C from the normaliser."""

    def scales(x, p):
        largest = float(np.max(np.abs(x))) / temperature
        return largest + math.log(np.shape(x)[1]), largest

    return scales


CASES = [
    LossCase("proxy_anchor", _pa, _pa_ref, "single", _pa_scales(32.0, 0.1), cosine=True),
    LossCase("proxy_nca", _nca, _nca_ref, "single", _nca_scales(9.0), cosine=True),
    LossCase("proxy_nca_classic", _nca_classic, _nca_classic_ref, "single", _nca_scales(9.0), cosine=True),
    LossCase("triplet", _triplet, _triplet_ref, "none", _triplet_scales(False)),
    LossCase("triplet_squared", _triplet_sq, _triplet_sq_ref, "none", _triplet_scales(True)),
    LossCase("cross_entropy", _ce, _ce_ref, "none", _ce_scales(0.5), logits=True),
    LossCase("hpl_proxy_anchor", _hpl_pa, _hpl_pa_ref, "levels", _pa_scales(32.0, 0.1, 1.1), cosine=True),
    LossCase("hpl_proxy_nca", _hpl_nca, _hpl_nca_ref, "levels", _nca_scales(9.0, 1.5), cosine=True),
]
CASES_BY_NAME = {case.name: case for case in CASES}
all_cases = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


@functools.cache
def _jit_value_and_grad(name: str):
    """One jitted value-and-gradient (w.r.t. x and the proxies) per loss, shared by all tests."""
    return jax.jit(jax.value_and_grad(CASES_BY_NAME[name].loss, argnums=(0, 2)))


def _value_and_grad(case: LossCase, x, labels, params, mask=None):
    """Jitted value and gradients; ``mask=None`` is passed as an all-True mask so that every call of
    a given shape shares one compilation (``mask=None`` itself is covered by the per-loss
    reference tests and ``test_jit_equals_eager``)."""
    if mask is None:
        mask = np.ones(np.shape(labels)[0], dtype=bool)
    return _jit_value_and_grad(case.name)(
        jnp.asarray(x), jnp.asarray(labels), jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(mask)
    )


def _assert_value_close(case: LossCase, got, want, x, params, n_terms: int, err_msg: str = "") -> None:
    assert_close(got, want, n_terms=n_terms, scale=case.value_scale(x, params), err_msg=err_msg, eps=EPS32)


def _assert_grad_close(case: LossCase, got, want, x, params, n_terms: int, err_msg: str = "") -> None:
    """A gradient: round-off of its largest entry, times the loss's condition (LossCase.scales)."""
    scale = case.grad_factor(x, params) * float(np.max(np.abs(np.asarray(want))))
    assert_close(got, want, n_terms=n_terms, scale=scale, err_msg=err_msg, eps=EPS32)


def _value(case: LossCase, x, labels, params, mask=None) -> float:
    return float(_value_and_grad(case, x, labels, params, mask)[0])


def _jit(fn: Callable, **kwargs) -> Callable:
    """``fn`` with its keyword hyper-parameters fixed, jitted (one small compile instead of the
    many per-op compiles of an eager first call at a new shape)."""
    return jax.jit(functools.partial(fn, **kwargs))


# --------------------------------------------------------------------------------------------
# 1. Against the float64 references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "dim", "num_classes", "margin", "alpha", "masked"),
    [
        (8, 4, 3, 0.1, 32.0, False),
        (16, 8, 5, 0.2, 16.0, True),
        (5, 3, 7, 0.0, 64.0, True),  # most proxies have no positive: P⁺ ≠ P
        (12, 16, 4, 0.1, 32.0, True),
        (24, 32, 10, 0.1, 8.0, False),
    ],
)
def test_proxy_anchor_matches_reference(batch, dim, num_classes, margin, alpha, masked):
    rng = np.random.default_rng(batch * 100 + dim)
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    proxies = rng.normal(size=(num_classes, dim)).astype(np.float32)
    mask = _random_mask(rng, batch) if masked else None
    got = _jit(proxy_anchor_loss, margin=margin, alpha=alpha)(x, labels, proxies, mask=mask)
    want = ref.proxy_anchor_ref(x, labels, proxies, margin=margin, alpha=alpha, mask=mask)
    assert got.dtype == jnp.float32
    scale = _pa_scales(alpha, margin)(x, proxies)[0]
    assert_close(float(got), want, n_terms=batch * num_classes * dim, scale=scale, eps=EPS32)


@pytest.mark.parametrize(
    ("batch", "dim", "num_classes", "scale", "include_target", "masked"),
    [
        (8, 4, 3, 1.0, True, False),
        (16, 8, 5, 9.0, True, True),
        (10, 6, 4, 32.0, False, True),
        (6, 3, 2, 9.0, False, False),
        (20, 16, 12, 16.0, True, True),
    ],
)
def test_proxy_nca_matches_reference(batch, dim, num_classes, scale, include_target, masked):
    rng = np.random.default_rng(batch * 100 + dim + 1)
    x = rng.normal(size=(batch, dim)).astype(np.float32) * 5.0
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    proxies = rng.normal(size=(num_classes, dim)).astype(np.float32)
    mask = _random_mask(rng, batch) if masked else None
    kwargs = {"scale": scale, "include_target_in_denominator": include_target}
    got = _jit(proxy_nca_loss, **kwargs)(x, labels, proxies, mask=mask)
    want = ref.proxy_nca_ref(x, labels, proxies, mask=mask, **kwargs)
    assert_close(
        float(got),
        want,
        n_terms=batch * num_classes * dim,
        scale=_nca_scales(scale)(x, proxies)[0],
        eps=EPS32,
    )


@pytest.mark.parametrize("scale", [9.0, 32.0])  # a fixed shift (4σ ≤ 80), row maxima (4σ > 80)
def test_proxy_nca_hand_written_gradient_equals_autodiff(scale):
    """A concrete scale takes the hand-written gradient, a traced one the plain formula under
    autodiff: values and gradients agree, with masked rows, a padding proxy (holding NaN), a zero
    proxy and one below the normalisation epsilon (whose ‖p̂‖² < 1 enters the loss)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(12, 6)) * 3.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=12), jnp.int32)
    proxies = rng.normal(size=(7, 6)).astype(np.float32)
    proxies[4] = 0.0
    proxies[5] = 3e-13  # below ε = 1e-12: p̂ = p / ε
    proxies[6] = 50.0  # padding (masked out)
    proxies = jnp.asarray(proxies)
    mask = jnp.asarray(rng.random(12) > 0.25)
    proxy_mask = jnp.arange(7) < 6

    def loss(x, p, s):
        return proxy_nca_loss(x, labels, p, scale=s, mask=mask, proxy_mask=proxy_mask)

    direct = jax.jit(jax.value_and_grad(lambda x, p: loss(x, p, scale), argnums=(0, 1)))(x, proxies)
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, proxies, jnp.float32(scale))
    # Two formulations of 12 rows × 7 proxies × 6 dims (value scale and condition: _nca_scales).
    n_terms = 12 * 7 * 6
    value_scale, condition = _nca_scales(scale)(x, proxies)
    assert_close(float(direct[0]), float(traced[0]), n_terms=n_terms, scale=value_scale, eps=EPS32)
    traced_grad_p = np.asarray(traced[1][1]).copy()
    traced_grad_p[6] = 0.0  # the plain formula leaves a masked proxy's gradient as autodiff gives it
    grad_x = np.asarray(traced[1][0])
    assert_close(direct[1][0], grad_x, n_terms=n_terms, scale=condition * np.abs(grad_x).max(), eps=EPS32)
    # One proxy row at a time: the zero and the sub-ε proxy normalise by 1/ε, their gradients are
    # ~1e12 times the others'.
    for c, (got, want) in enumerate(zip(np.asarray(direct[1][1]), traced_grad_p, strict=True)):
        assert_close(
            got, want, n_terms=n_terms, scale=condition * np.abs(want).max(), err_msg=f"proxy {c}", eps=EPS32
        )
    # Padding may hold anything, NaN included: the same value, exact zeros for its gradient.
    with_nan = proxies.at[6].set(jnp.nan)
    again = jax.jit(jax.value_and_grad(lambda x, p: loss(x, p, scale), argnums=(0, 1)))(x, with_nan)
    assert float(again[0]) == float(direct[0]) and np.all(np.asarray(again[1][1])[6] == 0.0)
    assert np.all(np.asarray(direct[1][0])[~np.asarray(mask)] == 0.0)
    # The zero and the tiny proxy have gradients where the plain formula has them.
    assert np.any(np.asarray(direct[1][1])[5] != 0.0)


@pytest.mark.parametrize(
    ("batch", "dim", "num_classes", "margin", "squared", "masked"),
    [
        (8, 4, 3, 0.1, False, False),
        (12, 6, 4, 0.5, True, True),
        (10, 3, 7, 0.2, False, True),  # several singleton classes: anchors without a positive
        (16, 8, 2, 1.0, True, False),
        (9, 5, 3, 0.0, False, True),
    ],
)
def test_triplet_matches_reference(batch, dim, num_classes, margin, squared, masked):
    rng = np.random.default_rng(batch * 100 + dim + 2)
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    mask = _random_mask(rng, batch) if masked else None
    got = _jit(batch_hard_triplet_loss, margin=margin, squared=squared)(x, labels, mask=mask)
    want = ref.batch_hard_triplet_ref(x, labels, margin=margin, squared=squared, mask=mask)
    assert want > 0.0  # the cases are chosen so that the loss is not trivially 0
    assert_close(float(got), want, n_terms=batch * dim, scale=_gram_distance_scales(x, squared)[0], eps=EPS32)


@pytest.mark.parametrize(
    ("batch", "num_classes", "temperature", "smoothing", "masked"),
    [
        (8, 3, 1.0, 0.0, False),
        (16, 10, 0.5, 0.1, True),
        (5, 4, 2.0, 1.0, True),
        (12, 7, 0.1, 0.3, False),
    ],
)
def test_cross_entropy_matches_reference(batch, num_classes, temperature, smoothing, masked):
    rng = np.random.default_rng(batch * 100 + num_classes + 3)
    logits = (3.0 * rng.normal(size=(batch, num_classes))).astype(np.float32)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    mask = _random_mask(rng, batch) if masked else None
    kwargs = {"temperature": temperature, "label_smoothing": smoothing}
    got = _jit(softmax_cross_entropy, **kwargs)(logits, labels, mask=mask)
    want = ref.softmax_cross_entropy_ref(logits, labels, mask=mask, **kwargs)
    assert_close(
        float(got),
        want,
        n_terms=batch * num_classes,
        scale=_ce_scales(temperature)(logits, None)[0],
        eps=EPS32,
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("base_loss", "base_ref", "base_kwargs"),
    [
        (proxy_anchor_loss, ref.proxy_anchor_ref, {"margin": 0.1, "alpha": 32.0}),
        (proxy_nca_loss, ref.proxy_nca_ref, {"scale": 9.0}),
    ],
    ids=["pa", "nca"],
)
def test_hierarchical_matches_reference(base_loss, base_ref, base_kwargs, masked):
    rng = np.random.default_rng(7 + masked)
    batch, dim, num_classes = 12, 6, 6
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    fine = rng.normal(size=(num_classes, dim)).astype(np.float32)
    coarse = rng.normal(size=(3, dim)).astype(np.float32)
    assignment = np.array([2, 0, 1, 0, 2, 1], dtype=np.int32)
    mask = _random_mask(rng, batch) if masked else None
    got = _jit(hierarchical_proxy_loss, base_loss=base_loss, level_weights=(1.0, 0.1), **base_kwargs)(
        x, labels, (fine, coarse), (assignment,), mask=mask
    )
    want = ref.hierarchical_ref(
        x,
        labels,
        (fine, coarse),
        (assignment,),
        base_ref=base_ref,
        level_weights=(1.0, 0.1),
        mask=mask,
        **base_kwargs,
    )
    scales = (
        _pa_scales(weight=1.1, **base_kwargs)
        if base_loss is proxy_anchor_loss
        else _nca_scales(weight=1.1, **base_kwargs)
    )
    assert_close(
        float(got), want, n_terms=batch * (num_classes + 3) * dim, scale=scales(x, fine)[0], eps=EPS32
    )


# Most generic tests use one shape so that they share one compilation per loss.
BATCH, DIM, CLASSES = 8, 4, 3


@all_cases
@pytest.mark.parametrize("masked", [False, True])
def test_generic_cases_match_reference(case: LossCase, masked: bool):
    rng = np.random.default_rng(11 + masked)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    mask = _random_mask(rng, BATCH) if masked else None
    want = case.reference(x, labels, params, mask)
    _assert_value_close(
        case, _value(case, x, labels, params, mask), want, x, params, case.n_terms(BATCH, DIM, CLASSES)
    )


def test_proxy_anchor_out_of_range_label_under_jit_is_only_a_negative():
    """Documented: under jit a label ≥ C is not detected and its row matches no proxy."""
    case = CASES_BY_NAME["proxy_anchor"]
    x, labels, proxies = case.make(np.random.default_rng(5), BATCH, DIM, CLASSES)
    labels[3] = CLASSES  # out of range
    want = _pa_ref(x, labels, proxies, None)
    _assert_value_close(
        case, _value(case, x, labels, proxies), want, x, proxies, case.n_terms(BATCH, DIM, CLASSES)
    )


# --------------------------------------------------------------------------------------------
# 2. Gradients
# --------------------------------------------------------------------------------------------


@all_cases
def test_check_grads_in_x64(case: LossCase):
    """``jax.test_util.check_grads`` with float64 inputs under ``jax.enable_x64``.

    The library casts to float32 internally whatever the input dtype, so the finite differences
    still see float32 arithmetic: hence ``eps=1e-3`` and tolerances of 5e-3.
    """
    rng = np.random.default_rng(21)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    mask = _random_mask(rng, BATCH)
    with jax.enable_x64(True):
        y, m = jnp.asarray(labels), jnp.asarray(mask)
        args = (jnp.asarray(x, jnp.float64),)
        if params is not None:
            args += (jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params),)
        loss = jax.jit(lambda a, p=None: case.loss(a, y, p, m))
        check_grads(loss, args, order=1, modes=["rev"], eps=1e-3, atol=5e-3, rtol=5e-3)


@all_cases
def test_grad_matches_finite_differences_of_reference(case: LossCase):
    """jax.grad (float32) against float64 central differences of the loop reference, every coordinate."""
    rng = np.random.default_rng(31)
    x, labels, params = case.make(rng, BATCH - 1, DIM, CLASSES)
    mask = np.array([True, True, False, True, True, True, True])
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def reference(x_, *leaves_):
        return case.reference(x_, labels, jax.tree_util.tree_unflatten(treedef, list(leaves_)), mask)

    want = _numeric_grad(reference, [x, *leaves])
    _, (grad_x, grad_params) = _value_and_grad(case, x, labels, params, mask)
    got = [np.asarray(grad_x), *_tree_np(grad_params)]
    assert len(got) == len(want)
    # The float64 central differences are off by ~ε64·|L|/h + h²·|L‴|, about 1e-8 of the gradient:
    # only float32's round-off counts.
    n_terms = case.n_terms(BATCH - 1, DIM, CLASSES)
    for g, w in zip(got, want, strict=True):
        assert np.max(np.abs(w)) > 1e-3  # a real gradient, not a vacuous 0 == 0
        _assert_grad_close(case, g, w, x, params, n_terms)
    assert np.all(got[0][2] == 0.0)  # the masked row


# --------------------------------------------------------------------------------------------
# 3. jit
# --------------------------------------------------------------------------------------------


@all_cases
def test_jit_equals_eager(case: LossCase):
    rng = np.random.default_rng(41)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    mask = _random_mask(rng, BATCH)
    # Fused (jit) and op-by-op programs may round differently.
    n_terms = case.n_terms(BATCH, DIM, CLASSES)
    for m in (None, mask):
        eager = case.loss(x, labels, params, m)
        jitted = jax.jit(case.loss)(x, labels, params, m)
        assert jitted.dtype == eager.dtype == jnp.float32
        _assert_value_close(case, float(jitted), float(eager), x, params, n_terms)
    # mask=None means every row counts.
    everything = case.loss(x, labels, params, np.ones(BATCH, dtype=bool))
    _assert_value_close(
        case, float(case.loss(x, labels, params, None)), float(everything), x, params, n_terms
    )


def test_vmap_over_batches_equals_loop():
    rng = np.random.default_rng(43)
    x = rng.normal(size=(3, BATCH, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(3, BATCH)).astype(np.int32)
    proxies = rng.normal(size=(CLASSES, DIM)).astype(np.float32)

    @jax.jit
    def both(x_, labels_):
        pa = jax.vmap(lambda a, b: _pa(a, b, proxies, None))(x_, labels_)
        tri = jax.vmap(lambda a, b: _triplet(a, b, None, None))(x_, labels_)
        return pa, tri

    pa, tri = both(x, labels)
    pa_case, triplet_case = CASES_BY_NAME["proxy_anchor"], CASES_BY_NAME["triplet"]
    for k in range(3):
        want = _pa_ref(x[k], labels[k], proxies, None)
        _assert_value_close(pa_case, float(pa[k]), want, x[k], proxies, pa_case.n_terms(BATCH, DIM, CLASSES))
        want = _triplet_ref(x[k], labels[k], None, None)
        n_terms = triplet_case.n_terms(BATCH, DIM, CLASSES)
        _assert_value_close(triplet_case, float(tri[k]), want, x[k], None, n_terms)


# --------------------------------------------------------------------------------------------
# 4. Invariances
# --------------------------------------------------------------------------------------------


@all_cases
def test_permuting_the_batch_keeps_the_value(case: LossCase):
    rng = np.random.default_rng(51)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    mask = _random_mask(rng, BATCH)
    perm = rng.permutation(BATCH)
    assert not np.array_equal(perm, np.arange(BATCH))
    original = _value(case, x, labels, params, mask)
    permuted = _value(case, x[perm], labels[perm], params, mask[perm])
    _assert_value_close(case, permuted, original, x, params, case.n_terms(BATCH, DIM, CLASSES))


@pytest.mark.parametrize("case", [c for c in CASES if c.cosine], ids=[c.name for c in CASES if c.cosine])
def test_cosine_losses_ignore_positive_row_scales(case: LossCase):
    rng = np.random.default_rng(61)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    x_scaled = x * rng.uniform(0.05, 20.0, size=(BATCH, 1)).astype(np.float32)
    params_scaled = jax.tree_util.tree_map(
        lambda p: p * rng.uniform(0.05, 20.0, size=(p.shape[0], 1)).astype(np.float32), params
    )
    original = _value(case, x, labels, params)
    # The normalised rows round differently.
    n_terms, scale = case.n_terms(BATCH, DIM, CLASSES), case.value_scale(x, params)
    assert_close(_value(case, x_scaled, labels, params), original, n_terms=n_terms, scale=scale, eps=EPS32)
    assert_close(_value(case, x, labels, params_scaled), original, n_terms=n_terms, scale=scale, eps=EPS32)
    assert_close(
        _value(case, x_scaled, labels, params_scaled), original, n_terms=n_terms, scale=scale, eps=EPS32
    )
    # A negative scale flips a direction and must change the value far beyond that tolerance (the
    # check above is not vacuous).
    flipped = x.copy()
    flipped[0] *= -1.0
    tolerance = rounding_atol(scale, n_terms, eps=EPS32)
    assert abs(_value(case, flipped, labels, params) - original) > 10 * tolerance


def test_triplet_only_label_equality_matters():
    case = CASES_BY_NAME["triplet"]
    x = np.random.default_rng(62).normal(size=(BATCH, DIM)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], dtype=np.int32)
    relabelled = np.array([-7, 1000, 3, -7, 1000, 3, -7, 1000], dtype=np.int32)
    original = _value(case, x, labels, None)
    assert original > 0.0
    # Labels only enter through equality tests: the same booleans, the same program, the same bits.
    assert _value(case, x, relabelled, None) == original


# --------------------------------------------------------------------------------------------
# 5. Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["triplet", "triplet_squared"])
def test_triplet_one_class_is_exactly_zero_with_zero_gradient(name: str):
    case = CASES_BY_NAME[name]
    x = np.random.default_rng(71).normal(size=(BATCH, DIM)).astype(np.float32)
    value, (grad, _) = _value_and_grad(case, x, np.full(BATCH, 3, dtype=np.int32), None)
    assert float(value) == 0.0
    _assert_tree_zero(grad)


@pytest.mark.parametrize("name", ["triplet", "triplet_squared"])
def test_triplet_all_labels_distinct_is_exactly_zero(name: str):
    case = CASES_BY_NAME[name]
    x = np.random.default_rng(72).normal(size=(BATCH, DIM)).astype(np.float32)
    value, (grad, _) = _value_and_grad(case, x, np.arange(BATCH, dtype=np.int32) * 7 - 3, None)
    assert float(value) == 0.0
    _assert_tree_zero(grad)


@all_cases
def test_one_class_batch_is_finite_and_matches_reference(case: LossCase):
    rng = np.random.default_rng(73)
    x, _, params = case.make(rng, BATCH, DIM, CLASSES)
    labels = np.zeros(BATCH, dtype=np.int32)
    value, grads = _value_and_grad(case, x, labels, params)
    _assert_tree_finite((value, grads))
    want = case.reference(x, labels, params, None)
    _assert_value_close(case, float(value), want, x, params, case.n_terms(BATCH, DIM, CLASSES))


@all_cases
def test_all_rows_masked_is_exactly_zero_with_zero_gradients(case: LossCase):
    rng = np.random.default_rng(74)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    value, grads = _value_and_grad(case, x, labels, params, np.zeros(BATCH, dtype=bool))
    assert value.dtype == jnp.float32
    assert float(value) == 0.0
    _assert_tree_zero(grads)


GARBAGE = {
    "1e30": lambda rng, width: np.full(width, 1e30, np.float32),
    "huge_random": lambda rng, width: rng.uniform(-3e38, 3e38, size=width).astype(np.float32),
    "inf": lambda rng, width: np.array([np.inf, -np.inf] * width, np.float32)[:width],
    "nan": lambda rng, width: np.full(width, np.nan, np.float32),
}


@all_cases
@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_masked_garbage_row_changes_nothing(case: LossCase, garbage: str):
    rng = np.random.default_rng(75)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    bad = 2
    mask = np.ones(BATCH, dtype=bool)
    mask[bad] = False
    x_garbage = x.copy()
    x_garbage[bad] = GARBAGE[garbage](rng, x.shape[1])

    value_clean, (gx_clean, gp_clean) = _value_and_grad(case, x, labels, params, mask)
    value, (gx, gp) = _value_and_grad(case, x_garbage, labels, params, mask)
    # Same shapes, same mask: whatever the masked row holds, the results are bit-identical.
    assert float(value) == float(value_clean)
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(gx_clean))
    for a, b in zip(_tree_np(gp), _tree_np(gp_clean), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.asarray(gx)[bad] == 0.0)

    # And the same as the batch without that row at all, up to round-off: two shapes, two
    # summation orders (on another CPU, another vector width and order again).
    keep = np.arange(BATCH) != bad
    value_small, (gx_small, gp_small) = _value_and_grad(case, x[keep], labels[keep], params)
    n_terms = case.n_terms(BATCH, DIM, CLASSES)
    _assert_value_close(case, float(value), float(value_small), x[keep], params, n_terms)
    _assert_grad_close(case, np.asarray(gx)[keep], np.asarray(gx_small), x[keep], params, n_terms)
    for a, b in zip(_tree_np(gp), _tree_np(gp_small), strict=True):
        _assert_grad_close(case, a, b, x[keep], params, n_terms)


@all_cases
def test_zero_norm_and_duplicate_rows_are_finite(case: LossCase):
    rng = np.random.default_rng(76)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    x[0] = 0.0  # zero-norm row
    x[3] = x[1]  # exact duplicate, same label
    labels[3] = labels[1]
    x[5] = x[4]  # exact duplicate, different label
    labels[5] = (labels[4] + 1) % CLASSES
    if case.proxies == "single":
        params[1] = 0.0  # zero-norm proxy
        params[2] = x[6]  # a proxy exactly on an embedding (squared distance exactly 0)
    elif case.proxies == "levels":
        params[0][1] = 0.0
        params[1][0] = 0.0
    value, grads = _value_and_grad(case, x, labels, params)
    _assert_tree_finite((value, grads))
    atol = rounding_atol(case.value_scale(x, params), case.n_terms(BATCH, DIM, CLASSES), eps=EPS32)
    if case.name == "triplet":
        # x[5] duplicates x[4] under another label, each the other's hardest negative. Their
        # D² = ‖a‖² + ‖a‖² - 2a·a sums the same squares in two orders: rounding noise of the size
        # of its terms, 4‖a‖², instead of 0, and the square root of that noise (up to ~1e-3).
        max_sq_norm = float(np.max(np.sum(np.square(x, dtype=np.float64), axis=1)))
        atol = max(atol, math.sqrt(rounding_atol(4.0 * max_sq_norm, DIM, eps=EPS32)))
    np.testing.assert_allclose(float(value), case.reference(x, labels, params, None), rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("loss", "kwargs"),
    [
        (proxy_anchor_loss, {"alpha": 1e4, "margin": 0.1}),
        (proxy_nca_loss, {"scale": 1e4}),
        (proxy_nca_loss, {"scale": 1e4, "include_target_in_denominator": False}),
    ],
    ids=["pa", "nca", "nca_classic"],
)
def test_huge_scales_stay_finite(loss, kwargs):
    """The docstrings promise stability for any α / σ (every exponent goes through a shifted logsumexp)."""
    x, labels, proxies = CASES_BY_NAME["proxy_anchor"].make(np.random.default_rng(78), BATCH, DIM, CLASSES)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, **kwargs), argnums=(0, 2)))(
        x, labels, proxies
    )
    _assert_tree_finite((value, grads))
    assert float(value) > 100.0  # exp(α·…) would have overflowed float32 long before this


@all_cases
def test_empty_batch_gives_zero(case: LossCase):
    # A (0, d) batch is valid (check_labels allows it) and, like a fully masked one, gives 0.
    rng = np.random.default_rng(77)
    _, _, params = case.make(rng, BATCH, DIM, CLASSES)
    width = CLASSES if case.logits else DIM
    value = jax.jit(case.loss)(np.zeros((0, width), np.float32), np.zeros((0,), np.int32), params, None)
    assert float(value) == 0.0


# --------------------------------------------------------------------------------------------
# 6. dtypes
# --------------------------------------------------------------------------------------------


@all_cases
def test_bf16_inputs_give_float32_close_to_float32(case: LossCase):
    rng = np.random.default_rng(81)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)
    x16 = jnp.asarray(x, jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.bfloat16), params)
    value16, (grad16, _) = _value_and_grad(case, x16, labels, params16)
    assert value16.dtype == jnp.float32
    assert grad16.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad16, np.float32)))
    # The math is float32: the same as float32 on the bf16-rounded inputs ...
    upcast = _value(
        case,
        np.asarray(x16, np.float32),
        labels,
        jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32), params16),
    )
    n_terms = case.n_terms(BATCH, DIM, CLASSES)
    _assert_value_close(case, float(value16), upcast, x, params, n_terms)  # one conversion more: two programs
    # ... and close to the float32 value of the unrounded inputs: rounding every input v to bf16
    # (relative error ≤ u = ε_bf16 / 2) moves the loss by at most u·Σ|∂L/∂v|·|v|, to first order.
    value32, grads32 = _value_and_grad(case, x, labels, params)
    first_order = sum(
        float(np.sum(np.abs(g * v))) for g, v in zip(_tree_np(grads32), _tree_np((x, params)), strict=True)
    )
    eps_bf16 = float(jnp.finfo(jnp.bfloat16).eps)
    assert_close(float(value16), float(value32), n_terms=1, scale=first_order, eps=eps_bf16)


@all_cases
def test_result_is_float32_under_x64(case: LossCase):
    # Under x64 the promise still holds: the math and the result are float32.
    x, labels, params = case.make(np.random.default_rng(82), BATCH, DIM, CLASSES)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        p64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        out = jax.eval_shape(case.loss, x64, jnp.asarray(labels), p64, None)
        assert out.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# 7. The hierarchy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 0.0), (1, 0)], ids=["float", "int"])
@pytest.mark.parametrize(
    ("base_loss", "base_kwargs"),
    [(proxy_anchor_loss, {"margin": 0.1, "alpha": 32.0}), (proxy_nca_loss, {"scale": 9.0})],
    ids=["pa", "nca"],
)
def test_hierarchical_with_zero_coarse_weight_is_exactly_the_base_loss(base_loss, base_kwargs, weights):
    rng = np.random.default_rng(91)
    x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    fine = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    coarse = rng.normal(size=(2, DIM)).astype(np.float32)
    assignments = (np.array([0, 1, 1], np.int32),)
    mask = _random_mask(rng, BATCH)

    def hpl(c):
        return hierarchical_proxy_loss(
            x,
            labels,
            (fine, c),
            assignments,
            base_loss=base_loss,
            level_weights=weights,
            mask=mask,
            **base_kwargs,
        )

    # Eager on both sides: the same sequence of operations, hence bit-identical.
    assert float(hpl(coarse)) == float(base_loss(x, labels, fine, mask=mask, **base_kwargs))
    # The skipped level gets no gradient at all.
    _assert_tree_zero(jax.jit(jax.grad(hpl))(coarse))


def test_hierarchical_three_levels_match_reference():
    rng = np.random.default_rng(92)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    labels = rng.integers(0, 8, size=16).astype(np.int32)
    levels = tuple(rng.normal(size=(k, 5)).astype(np.float32) for k in (8, 4, 2))
    assignments = (np.array([0, 1, 2, 3, 3, 2, 1, 0], np.int32), np.array([1, 0, 0, 1], np.int32))
    mask = _random_mask(rng, 16)

    @functools.partial(jax.jit, static_argnames="weights")
    def loss(x_, levels_, weights):
        return hierarchical_proxy_loss(x_, labels, levels_, assignments, level_weights=weights, mask=mask)

    weights = (1.0, 0.5, 0.25)
    value, (grad_x, grad_levels) = jax.value_and_grad(loss, argnums=(0, 1))(x, levels, weights)
    want = ref.hierarchical_ref(x, labels, levels, assignments, level_weights=weights, mask=mask)
    # 16 rows × (8 + 4 + 2) proxies × 5 dims; Proxy-Anchor's defaults at level weights 1 + 0.5 + 0.25.
    n_terms, scale = 16 * 14 * 5, _pa_scales(32.0, 0.1, 1.75)(x, levels)[0]
    assert_close(float(value), want, n_terms=n_terms, scale=scale, eps=EPS32)
    _assert_tree_finite((grad_x, grad_levels))
    assert all(float(np.abs(g).sum()) > 0 for g in grad_levels)  # every level is trained
    # The level weights really weight: dropping the last level removes exactly w_2 · L_2.
    two_levels = loss(x, levels, (1.0, 0.5, 0.0))
    y2 = ref.compose_level_labels(labels, assignments)[2]
    want = 0.25 * ref.proxy_anchor_ref(x, y2, levels[2], mask=mask)
    assert_close(float(value) - float(two_levels), want, n_terms=n_terms, scale=scale, eps=EPS32)


def test_level_labels_compose():
    labels = jnp.array([0, 5, 3, 2, 5], jnp.int32)
    a0 = jnp.array([1, 0, 2, 2, 1, 0], jnp.int32)
    a1 = jnp.array([1, 1, 0], jnp.int32)
    result = level_labels(labels, (a0, a1))
    assert len(result) == 3
    np.testing.assert_array_equal(np.asarray(result[0]), [0, 5, 3, 2, 5])
    np.testing.assert_array_equal(np.asarray(result[1]), [1, 0, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray(result[2]), [1, 1, 0, 0, 1])
    for got, want in zip(result, ref.compose_level_labels(labels, (a0, a1)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_hierarchy_from_labels_remaps():
    a0, a1 = hierarchy_from_labels(np.array([10, 3, 10, 7, 3, 42]), np.array([5, 9, 5, 9]))
    assert a0.dtype == jnp.int32 and a1.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(a0), [2, 0, 2, 1, 0, 3])  # 3→0, 7→1, 10→2, 42→3
    np.testing.assert_array_equal(np.asarray(a1), [0, 1, 0, 1])
    (single,) = hierarchy_from_labels([4, 4, 4])
    np.testing.assert_array_equal(np.asarray(single), [0, 0, 0])


FINE_SHAPE = (12, 6)  # shared by the k-means based tests (one k-means compile per level shape)


def _clustered_proxies(rng: np.random.Generator, groups: int) -> np.ndarray:
    count, dim = FINE_SHAPE
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:groups]  # orthonormal directions
    points = np.repeat(centres, count // groups, axis=0) + 0.05 * rng.normal(size=(count, dim))
    scales = rng.uniform(0.5, 3.0, size=(count, 1))  # normalize=True must ignore these
    return (points * scales).astype(np.float32)


def test_build_hierarchy_shapes_ranges_and_determinism():
    rng = np.random.default_rng(94)
    fine = rng.normal(size=FINE_SHAPE).astype(np.float32)
    key = jax.random.PRNGKey(3)
    hierarchy = build_hierarchy(key, fine, (3, 2))
    assert [c.shape for c in hierarchy.coarse_proxies] == [(3, 6), (2, 6)]
    assert [a.shape for a in hierarchy.assignments] == [(12,), (3,)]
    for assignment, groups in zip(hierarchy.assignments, (3, 2), strict=True):
        assert assignment.dtype == jnp.int32
        values = np.asarray(assignment)
        assert values.min() >= 0 and values.max() < groups
        assert np.all(np.bincount(values, minlength=groups) > 0)  # no empty group
    # Coarse proxies are the centroids of their (normalised) members.
    unit = fine / np.linalg.norm(fine, axis=1, keepdims=True)
    a0 = np.asarray(hierarchy.assignments[0])
    for k in range(3):
        # A mean of at most 12 unit rows (entries ≤ 1).
        want = unit[a0 == k].mean(0)
        assert_close(
            np.asarray(hierarchy.coarse_proxies[0][k]), want, n_terms=FINE_SHAPE[0], scale=1.0, eps=EPS32
        )
    again = build_hierarchy(key, fine, (3, 2))
    for a, b in zip(_tree_np(hierarchy), _tree_np(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # And it plugs straight into the loss.
    value = jax.jit(hierarchical_proxy_loss, static_argnames="level_weights")(
        rng.normal(size=(4, 6)).astype(np.float32),
        np.array([0, 3, 7, 11], np.int32),
        (fine, *hierarchy.coarse_proxies),
        hierarchy.assignments,
        level_weights=(1.0, 0.1, 0.1),
    )
    assert np.isfinite(float(value))


def test_build_hierarchy_recovers_clear_clusters():
    rng = np.random.default_rng(95)
    fine = _clustered_proxies(rng, groups=3)
    order = rng.permutation(FINE_SHAPE[0])
    fine, truth = fine[order], np.repeat(np.arange(3), FINE_SHAPE[0] // 3)[order]
    (a0,) = build_hierarchy(jax.random.PRNGKey(0), fine, (3,)).assignments
    a0 = np.asarray(a0)
    # The same partition up to renaming the groups.
    assert np.array_equal(a0[:, None] == a0[None, :], truth[:, None] == truth[None, :])


def test_coarse_centroids_are_group_means_with_padding_and_empty_groups():
    """Per-group loop in float64: means of the (normalised) members; padding joins no group."""
    rng = np.random.default_rng(7)
    fine = rng.normal(size=(9, 4)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(9, 1)).astype(np.float32)
    a0 = np.array([0, 0, 1, 1, 1, 3, 3, 0, 0], np.int32)  # group 2 empty; rows 7, 8 are padding
    a1 = np.array([0, 1, 1, 0], np.int32)
    mask = np.arange(9) < 7
    for normalize in (True, False):
        got = coarse_centroids(fine, (a0, a1), (4, 2), normalize=normalize, proxy_mask=jnp.asarray(mask))
        points = fine.astype(np.float64)
        if normalize:
            points = points / np.linalg.norm(points, axis=1, keepdims=True)
        want1 = np.zeros((4, 4))
        for k in range(4):
            members = [i for i in range(9) if a0[i] == k and mask[i]]
            if members:
                want1[k] = points[members].mean(axis=0)
        level1 = (
            want1 / np.maximum(np.linalg.norm(want1, axis=1, keepdims=True), 1e-12) if normalize else want1
        )
        nonempty = np.array([np.any((a0 == k) & mask) for k in range(4)])
        want2 = np.stack([level1[(a1 == k) & nonempty].mean(axis=0) for k in range(2)])
        # Means over at most the 9 fine rows, then over at most 4 of those means; no entry exceeds
        # the largest member's.
        scale = float(np.max(np.abs(points)))
        assert_close(np.asarray(got[0]), want1, n_terms=9, scale=scale, eps=EPS32)
        assert_close(np.asarray(got[1]), want2, n_terms=9 * 4, scale=scale, eps=EPS32)
    assert np.all(np.asarray(got[0])[2] == 0)  # the empty group


def test_hierarchical_loss_with_centroid_coarse_proxies_trains_the_fine_proxies():
    """The coarse level built from group means passes its gradient on to the fine proxies."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 4))
    y = np.array([0, 1, 2, 3, 4, 5])
    fine = rng.normal(size=(6, 4))
    a0 = np.array([0, 0, 1, 1, 2, 2], np.int32)

    def coarse_only(fine):
        levels = (fine, *coarse_centroids(fine, (a0,), (3,)))
        return hierarchical_proxy_loss(
            x, y, levels, (a0,), base_loss=proxy_anchor_loss, level_weights=(0.0, 1.0)
        )

    coarse_only = jax.jit(coarse_only)  # evaluated many times: one compilation, not one per operation
    check_grads(coarse_only, (fine,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    assert np.all(np.abs(np.asarray(jax.jit(jax.grad(coarse_only))(jnp.asarray(fine, jnp.float32)))).sum(axis=1) > 0)


def test_refresh_assignments_is_nearest_by_cosine_and_by_distance():
    rng = np.random.default_rng(96)
    levels = (
        rng.normal(size=(10, 4)).astype(np.float32) * rng.uniform(0.1, 10.0, size=(10, 1)).astype(np.float32),
        rng.normal(size=(4, 4)).astype(np.float32) * rng.uniform(0.1, 10.0, size=(4, 1)).astype(np.float32),
        rng.normal(size=(2, 4)).astype(np.float32),
    )
    cosine = refresh_assignments(levels)
    euclid = refresh_assignments(levels, normalize=False)
    assert len(cosine) == len(euclid) == 2
    for level in range(2):
        finer, coarser = levels[level].astype(np.float64), levels[level + 1].astype(np.float64)
        for i in range(finer.shape[0]):
            cos = [finer[i] @ c / (np.linalg.norm(finer[i]) * np.linalg.norm(c)) for c in coarser]
            dist = [np.sum((finer[i] - c) ** 2) for c in coarser]
            assert int(cosine[level][i]) == int(np.argmax(cos))
            assert int(euclid[level][i]) == int(np.argmin(dist))
        assert cosine[level].dtype == euclid[level].dtype == jnp.int32
    # With these scales the two criteria disagree somewhere, so both code paths are exercised.
    assert any(not np.array_equal(np.asarray(c), np.asarray(e)) for c, e in zip(cosine, euclid, strict=True))


# 8. Errors
# --------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(101)
_X = _RNG.normal(size=(6, 4)).astype(np.float32)
_Y = np.array([0, 1, 2, 0, 1, 2], np.int32)
_P = _RNG.normal(size=(3, 4)).astype(np.float32)
_P1 = _RNG.normal(size=(2, 4)).astype(np.float32)
_A0 = np.array([0, 1, 1], np.int32)
_BAD_Y = np.array([0, 1, 3, 0, 1, 2], np.int32)
_FINE = _RNG.normal(size=FINE_SHAPE).astype(np.float32)

ERROR_CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "pa_label_too_big": (lambda: proxy_anchor_loss(_X, _BAD_Y, _P), r"labels must lie in \[0, 3\).*\[3\]"),
    "nca_label_negative": (lambda: proxy_nca_loss(_X, _Y - 1, _P), r"labels must lie in \[0, 3\)"),
    "ce_label_too_big": (lambda: softmax_cross_entropy(_X, _Y + 2), r"labels must lie in \[0, 4\)"),
    "hpl_label_too_big": (
        lambda: hierarchical_proxy_loss(_X, _BAD_Y, (_P, _P1), (_A0,)),
        r"labels must lie in \[0, 3\)",
    ),
    "pa_dim_mismatch": (
        lambda: proxy_anchor_loss(_X, _Y, np.ones((3, 5), np.float32)),
        r"proxies have dimension 5 but embeddings have dimension 4",
    ),
    "nca_dim_mismatch": (
        lambda: proxy_nca_loss(_X, _Y, _P[:, :3]),
        r"dimension 3 but embeddings have dimension 4",
    ),
    "hpl_coarse_dim_mismatch": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1[:, :2]), (_A0,)),
        r"level_proxies\[1\] have dimension 2",
    ),
    "pa_embeddings_rank": (
        lambda: proxy_anchor_loss(_X[0], _Y[:1], _P),
        r"embeddings must have shape \(batch, dim\)",
    ),
    "triplet_embeddings_rank": (
        lambda: batch_hard_triplet_loss(_X[None], _Y),
        r"embeddings must have shape \(batch, dim\)",
    ),
    "nca_proxies_rank": (
        lambda: proxy_nca_loss(_X, _Y, _P[0]),
        r"proxies must have shape \(num_classes, dim\)",
    ),
    "pa_labels_rank": (lambda: proxy_anchor_loss(_X, _Y[:, None], _P), r"labels must have shape \(batch,\)"),
    "ce_logits_rank": (
        lambda: softmax_cross_entropy(_X[:, 0], _Y),
        r"logits must have shape \(batch, num_classes\)",
    ),
    "triplet_label_count": (
        lambda: batch_hard_triplet_loss(_X, _Y[:5]),
        r"labels has 5 entries but there are 6",
    ),
    "pa_float_labels": (lambda: proxy_anchor_loss(_X, _Y.astype(np.float32), _P), r"labels must be integers"),
    "triplet_int_embeddings": (lambda: batch_hard_triplet_loss(_Y[:, None], _Y), r"floating-point"),
    "pa_mask_shape": (
        lambda: proxy_anchor_loss(_X, _Y, _P, mask=np.ones(5, bool)),
        r"mask must have shape \(6,\)",
    ),
    "nca_mask_shape": (
        lambda: proxy_nca_loss(_X, _Y, _P, mask=np.ones((6, 1), bool)),
        r"mask must have shape \(6,\)",
    ),
    "triplet_mask_shape": (
        lambda: batch_hard_triplet_loss(_X, _Y, mask=np.ones(7, bool)),
        r"mask must have shape \(6,\)",
    ),
    "ce_mask_shape": (
        lambda: softmax_cross_entropy(_X, _Y, mask=np.ones(3, bool)),
        r"mask must have shape \(6,\)",
    ),
    "hpl_mask_shape": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0,), mask=np.ones(2, bool)),
        r"mask must have shape \(6,\)",
    ),
    "hpl_weight_count": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0,), level_weights=(1.0, 0.1, 0.1)),
        r"level_weights has 3 entries but there are 2 proxy levels",
    ),
    "hpl_assignment_count": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0, _A0)),
        r"2 proxy levels need 1 level_assignments",
    ),
    "hpl_no_levels": (
        lambda: hierarchical_proxy_loss(_X, _Y, (), (), level_weights=()),
        r"at least the fine",
    ),
    "hpl_assignment_shape": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (np.array([0, 1], np.int32),)),
        r"level_assignments\[0\] must have shape \(3,\)",
    ),
    "hpl_assignment_range": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (np.array([0, 2, 1], np.int32),)),
        r"level_assignments\[0\] must lie in \[0, 2\)",
    ),
    "hpl_assignment_negative": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (np.array([0, -1, 1], np.int32),)),
        r"level_assignments\[0\] must lie in \[0, 2\)",
    ),
    "hpl_assignment_float": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (np.array([0.0, 1.0, 1.0]),)),
        r"level_assignments\[0\] must be integers",
    ),
    "build_too_many_groups": (
        lambda: build_hierarchy(jax.random.PRNGKey(0), _FINE, (13,)),
        r"num_groups\[0\] = 13 but level 0 has only 12 proxies",
    ),
    "build_second_level_too_many": (
        lambda: build_hierarchy(jax.random.PRNGKey(0), _FINE, (3, 4)),
        r"num_groups\[1\] = 4 but level 1 has only 3 proxies",
    ),
    "build_zero_groups": (
        lambda: build_hierarchy(jax.random.PRNGKey(0), _FINE, (0,)),
        r"num_groups\[0\] = 0",
    ),
    "nca_classic_one_proxy": (
        lambda: proxy_nca_loss(_X, np.zeros(6, np.int32), _P[:1], include_target_in_denominator=False),
        r"at least 2 proxies",
    ),
    "ce_temperature": (
        lambda: softmax_cross_entropy(_X, _Y, temperature=0.0),
        r"temperature \(config field loss.temperature\) must be a finite number > 0",
    ),
    "ce_smoothing": (
        lambda: softmax_cross_entropy(_X, _Y, label_smoothing=1.5),
        r"label_smoothing \(config field loss.label_smoothing\) must be a finite number in \[0, 1\]",
    ),
    "from_labels_float": (lambda: hierarchy_from_labels(np.array([0.5, 1.0])), r"1-D integer array"),
    "from_labels_length": (
        lambda: hierarchy_from_labels(np.array([0, 1, 1]), np.array([0, 0, 1])),
        r"fine_to_coarse\[1\] has 3 entries but level 1 has 2 groups",
    ),
}


@pytest.mark.parametrize("name", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_invalid_inputs_raise_helpful_value_errors(name: str):
    call, message = ERROR_CASES[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_out_of_range_label_message_lists_the_culprits():
    labels = np.array([0, 7, -2, 1, 1, 9], np.int32)
    with pytest.raises(ValueError, match=r"found \[7, -2, 9\]; remap labels"):
        proxy_anchor_loss(_X, labels, _P)


# --------------------------------------------------------------------------------------------
# 9. Properties (hypothesis): near-duplicate and zero-norm rows never give NaN / inf
# --------------------------------------------------------------------------------------------

# (batch, dim, num_classes): the shapes of the other tests, so no extra compiles.
SHAPES = [(BATCH, DIM, CLASSES), (BATCH - 1, DIM, CLASSES)]


@st.composite
def loss_inputs(draw, case: LossCase):
    batch, dim, num_classes = draw(st.sampled_from(SHAPES))
    width = num_classes if case.logits else dim
    values = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, width=32)
    x = draw(hnp.arrays(np.float32, (batch, width), elements=values, fill=st.nothing())).copy()
    row = st.integers(0, batch - 1)
    for _ in range(draw(st.integers(0, 3))):  # near-duplicate (or exact duplicate) rows
        i, j = draw(row), draw(row)
        x[j] = x[i] + np.float32(draw(st.sampled_from([0.0, 1e-7, 1e-5, 1e-3])))
    for i in draw(st.lists(row, max_size=2)):  # zero-norm rows
        x[i] = 0.0
    labels = draw(hnp.arrays(np.int32, (batch,), elements=st.integers(0, num_classes - 1)))
    mask = draw(hnp.arrays(np.bool_, (batch,), elements=st.booleans()))
    if case.proxies == "none":
        return x, labels, None, mask
    fine = draw(hnp.arrays(np.float32, (num_classes, dim), elements=values, fill=st.nothing())).copy()
    if draw(st.booleans()):
        fine[draw(st.integers(0, num_classes - 1))] = x[draw(row)]  # a proxy on an embedding
    if case.proxies == "single":
        return x, labels, fine, mask
    coarse = draw(hnp.arrays(np.float32, (2, dim), elements=values))
    return x, labels, (fine, coarse), mask


def _property_test(case: LossCase):
    @given(data=loss_inputs(case))
    def test(data):
        x, labels, params, mask = data
        value, grads = _value_and_grad(case, x, labels, params, mask)
        _assert_tree_finite((value, grads))
        assert float(value) >= 0.0 or case.name == "proxy_nca_classic"  # only the classic form can go below 0
        if not mask.any():
            assert float(value) == 0.0

    return test


@all_cases
def test_property_values_and_gradients_finite(case: LossCase):
    _property_test(case)()


def test_masked_rows_may_carry_any_label():
    """Padding rows (mask False) are exempt from the label range check and change nothing."""
    from hdml_jax.losses import proxy_anchor_loss, proxy_nca_loss, softmax_cross_entropy

    rng = np.random.default_rng(90)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    proxies = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, -1, 7])
    mask = np.array([True, True, True, False, False])
    # Five rows against three (two shapes), 3 proxies or logits, 4 dims; the losses' defaults
    # (α = 32, δ = 0.1; σ = 1; τ = 1).
    for loss, scales in ((proxy_anchor_loss, _pa_scales(32.0, 0.1)), (proxy_nca_loss, _nca_scales(1.0))):
        want = float(loss(x[:3], labels[:3], proxies))
        assert_close(
            float(loss(x, labels, proxies, mask=mask)),
            want,
            n_terms=5 * 3 * 4,
            scale=scales(x, proxies)[0],
            eps=EPS32,
        )
    want = float(softmax_cross_entropy(x[:3, :3], labels[:3]))
    got = float(softmax_cross_entropy(x[:, :3], labels, mask=mask))
    assert_close(got, want, n_terms=5 * 3, scale=_ce_scales(1.0)(x[:3, :3], None)[0], eps=EPS32)
    with pytest.raises(ValueError, match=r"\[-1, 7\]"):
        proxy_anchor_loss(x, labels, proxies)


# --------------------------------------------------------------------------------------------
# Padded proxies (proxy_mask): what sharding along the class axis relies on


PADDED_LOSSES = {
    "proxy_anchor": functools.partial(proxy_anchor_loss, margin=0.1, alpha=32.0),
    "proxy_nca": functools.partial(proxy_nca_loss, scale=9.0),
    "proxy_nca_classic": functools.partial(proxy_nca_loss, scale=9.0, include_target_in_denominator=False),
}


@pytest.mark.parametrize("name", list(PADDED_LOSSES), ids=list(PADDED_LOSSES))
def test_masked_padding_proxies_change_nothing(name: str):
    loss = PADDED_LOSSES[name]
    rng = np.random.default_rng(21)
    num_classes, num_padding = 11, 5
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, 16))
    proxies = jnp.asarray(rng.normal(size=(num_classes, 6)), jnp.float32)
    # Padding proxies right on top of the embeddings: they would change the loss a lot if counted.
    padded = jnp.concatenate([proxies, x[:num_padding] * 3.0])
    proxy_mask = jnp.arange(num_classes + num_padding) < num_classes
    # Jitted: two programs of different shapes compared (eagerly, each operation compiles alone).
    value, (gx, gp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))(x, y, proxies)
    value_p, (gx_p, gp_p) = jax.jit(
        jax.value_and_grad(lambda a, b, c: loss(a, b, c, proxy_mask=proxy_mask), argnums=(0, 2))
    )(x, y, padded)
    # Two shapes (11 and 16 proxies): 16 rows × 16 proxies × 6 dims.
    n_terms = 16 * (num_classes + num_padding) * 6
    value_scale, condition = CASES_BY_NAME[name].scales(np.asarray(x), np.asarray(padded))
    assert_close(value_p, value, n_terms=n_terms, scale=value_scale, eps=EPS32)
    assert_close(gx_p, gx, n_terms=n_terms, scale=condition * np.abs(gx).max(), eps=EPS32)
    assert_close(gp_p[:num_classes], gp, n_terms=n_terms, scale=condition * np.abs(gp).max(), eps=EPS32)
    np.testing.assert_array_equal(gp_p[num_classes:], 0.0)
    # Unmasked, the padding does count, far beyond that tolerance.
    tolerance = rounding_atol(value_scale, n_terms, eps=EPS32)
    assert abs(float(jax.jit(loss)(x, y, padded)) - float(value)) > 10 * tolerance


def _two_level_inputs(seed: int):
    """12 rows of 5-d embeddings over 8 classes, 8 fine and 3 coarse proxies, the class → group map."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 8, 12))
    fine = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    coarse = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    assignment = jnp.asarray([0, 0, 1, 1, 2, 2, 0, 1])
    return x, y, fine, coarse, assignment


def test_hierarchical_passes_level_proxy_masks_to_its_levels():
    x, y, fine, coarse, assignment = _two_level_inputs(22)
    expected = jax.jit(hierarchical_proxy_loss)(x, y, (fine, coarse), (assignment,))
    padded = jnp.concatenate([fine, jnp.ones((4, 5))])
    got = jax.jit(hierarchical_proxy_loss)(
        x,
        y,
        (padded, coarse),
        (jnp.concatenate([assignment, jnp.zeros(4, int)]),),
        level_proxy_masks=(jnp.arange(12) < 8, None),
    )
    # 4 padding proxies more: 12 rows × (12 + 3) proxies × 5 dims, default levels (1.0, 0.1).
    assert_close(got, expected, n_terms=12 * 15 * 5, scale=_pa_scales(32.0, 0.1, 1.1)(x, fine)[0], eps=EPS32)
    with pytest.raises(ValueError, match="one mask"):
        hierarchical_proxy_loss(x, y, (fine, coarse), (assignment,), level_proxy_masks=(None,))
    with pytest.raises(ValueError, match="proxy_mask must have shape"):
        proxy_anchor_loss(x, y, fine, proxy_mask=jnp.ones(7, bool))


# --------------------------------------------------------------------------------------------
# Proxy-Anchor's two computation paths: direct sums with a hand-written gradient (concrete,
# moderate α and δ) and max-shifted logsumexps differentiated automatically (anything else)


def _proxy_anchor_edge_inputs(rng: np.random.Generator):
    """Masks, padding proxies, a zero-norm proxy, an out-of-range label, repeated classes."""
    batch, dim, num_classes = 24, 8, 10
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, 6, size=batch).astype(np.int32)  # classes 6..9 have no positive
    labels[3] = -1  # only a negative (under jit)
    labels[4] = num_classes + 2
    proxies = rng.normal(size=(num_classes, dim)).astype(np.float32)
    proxies[7] *= 1e-14  # nonzero, but its norm is below the normalisation epsilon
    proxies[2] *= 1e-3  # small but normalised
    mask = np.ones(batch, bool)
    mask[[5, 9, 17]] = False
    mask[labels == 1] = False  # class 1: every row masked, so it leaves P⁺
    proxy_mask = np.ones(num_classes, bool)
    proxy_mask[[0, 8]] = False  # class 0 has rows, but its proxy is padding
    return x, labels, proxies, mask, proxy_mask


def test_proxy_anchor_direct_and_shifted_paths_agree():
    x, labels, proxies, mask, proxy_mask = _proxy_anchor_edge_inputs(np.random.default_rng(31))

    def value_and_grads(alpha_as_argument: bool):
        def loss(x, p, y, alpha):
            # A traced α cannot be bounded, so it takes the shifted path; a Python float the direct one.
            alpha = alpha if alpha_as_argument else 32.0
            return proxy_anchor_loss(x, y, p, margin=0.1, alpha=alpha, mask=mask, proxy_mask=proxy_mask)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, proxies, labels, jnp.float32(32.0))

    value_direct, (gx_direct, gp_direct) = jax.tree_util.tree_map(np.asarray, value_and_grads(False))
    value_shifted, (gx_shifted, gp_shifted) = jax.tree_util.tree_map(np.asarray, value_and_grads(True))
    # Two formulations of 24 rows × 10 proxies × 8 dims.
    n_terms = 24 * 10 * 8
    value_scale, condition = _pa_scales(32.0, 0.1)(x, proxies)
    assert_close(value_direct, value_shifted, n_terms=n_terms, scale=value_scale, eps=EPS32)
    assert_close(
        gx_direct, gx_shifted, n_terms=n_terms, scale=condition * np.abs(gx_shifted).max(), eps=EPS32
    )
    # One proxy row at a time: a proxy's gradient scales with 1/max(‖p‖, ε), 1e12 for the sub-ε
    # row 7, 1e3 times the rest for row 2; one scale for all would leave the others unchecked.
    for c, (got, want) in enumerate(zip(gp_direct, gp_shifted, strict=True)):
        assert_close(
            got, want, n_terms=n_terms, scale=condition * np.abs(want).max(), err_msg=f"proxy {c}", eps=EPS32
        )
    np.testing.assert_array_equal(gp_direct[[0, 8]], 0.0)  # padding proxies
    np.testing.assert_array_equal(gx_direct[[5, 9, 17]], 0.0)  # masked rows
    assert np.abs(gp_direct[7]).max() > 0  # a sub-ε proxy still gets a gradient (p̂ = p/ε)


def test_proxy_anchor_direct_path_matches_reference_with_masks():
    x, labels, proxies, mask, proxy_mask = _proxy_anchor_edge_inputs(np.random.default_rng(32))
    got = jax.jit(lambda *a: proxy_anchor_loss(*a, mask=mask, proxy_mask=proxy_mask))(x, labels, proxies)
    # The reference knows no proxy mask: give it only the real proxies. A row whose class is a
    # padding proxy (or out of range) is then a negative for every real proxy: label -1.
    num_classes = len(proxies)
    in_range = (labels >= 0) & (labels < num_classes)
    real_class = in_range & proxy_mask[np.clip(labels, 0, num_classes - 1)]
    reference_labels = np.where(
        real_class, (np.cumsum(proxy_mask) - 1)[np.clip(labels, 0, num_classes - 1)], -1
    )
    assert (mask & ~real_class).sum() >= 3  # the edge cases are really there
    want = ref.proxy_anchor_ref(x, reference_labels, proxies[proxy_mask], margin=0.1, alpha=32.0, mask=mask)
    assert_close(float(got), want, n_terms=24 * 10 * 8, scale=_pa_scales(32.0, 0.1)(x, proxies)[0], eps=EPS32)


def test_proxy_anchor_direct_path_second_order_and_forward_mode():
    rng = np.random.default_rng(33)
    x = rng.normal(size=(6, 3))
    labels = jnp.asarray([0, 0, 1, 2, 2, 2])
    proxies = rng.normal(size=(4, 3))
    with jax.enable_x64(True):
        loss = jax.jit(lambda a, p: proxy_anchor_loss(a, labels, p, alpha=8.0))
        check_grads(loss, (x, proxies), order=2, modes=["fwd", "rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("alpha", "margin", "batch", "direct"),
    [(32.0, 0.1, 256, True), (64.0, 0.1, 4096, True), (70.0, 0.1, 256, False), (1e4, 0.1, 8, False)],
)
def test_proxy_anchor_takes_the_direct_path_only_far_from_overflow(alpha, margin, batch, direct):
    from hdml_jax.losses.proxy_anchor import _direct_sums_are_safe

    assert _direct_sums_are_safe(alpha, margin, batch) is direct


def test_hierarchical_return_levels_gives_each_unweighted_level():
    x, y, fine, coarse, assignment = _two_level_inputs(34)
    total, (level0, level1) = hierarchical_proxy_loss(
        x, y, (fine, coarse), (assignment,), level_weights=(1.0, 0.25), return_levels=True
    )
    # Eager on both sides, the same operations on the same arrays (the total is 0 + 1·L0 + 0.25·L1):
    # the same bits.
    assert float(level0) == float(proxy_anchor_loss(x, y, fine))
    assert float(level1) == float(proxy_anchor_loss(x, assignment[y], coarse))
    assert float(total) == float(level0 + 0.25 * level1)
    without_levels = hierarchical_proxy_loss(x, y, (fine, coarse), (assignment,), level_weights=(1.0, 0.25))
    assert float(total) == float(without_levels)
    _, levels = hierarchical_proxy_loss(
        x, y, (fine, coarse), (assignment,), level_weights=(1.0, 0), return_levels=True
    )
    assert levels[1] is None  # a Python-zero weight skips its level


# --------------------------------------------------------------------------------------------
# 10. Non-finite inputs, overflow and hyperparameter ranges
# --------------------------------------------------------------------------------------------

# (case, where the bad value goes): a NaN or an inf embedding row, a NaN proxy.
NON_FINITE = [
    (case, where)
    for case in CASES
    for where in ("nan_row", "inf_row", "nan_proxy")
    if where != "nan_proxy" or case.proxies != "none"
]


@pytest.mark.parametrize(
    ("case", "where"), NON_FINITE, ids=[f"{case.name}-{where}" for case, where in NON_FINITE]
)
def test_non_finite_input_gives_nan_never_a_number(case: LossCase, where: str):
    # One bad unmasked value must poison the loss; the batch-hard triplet loss used to map a NaN
    # distance to 0 (safe_sqrt) and return a finite value. Jitted (shared compilation).
    x, labels, params = case.make(np.random.default_rng(91), BATCH, DIM, CLASSES)
    if where == "nan_row":
        x[2] = np.nan
    elif where == "inf_row":
        x[2, 1] = np.inf
    else:
        (params if case.proxies == "single" else params[0])[1, 0] = np.nan
    value = _value(case, x, labels, params)
    if where == "inf_row":
        assert not np.isfinite(value), value
    else:
        assert np.isnan(value), value


def test_triplet_nan_embedding_is_nan_eagerly_and_zero_distance_stays_safe():
    x, labels, _ = CASES_BY_NAME["triplet"].make(np.random.default_rng(92), BATCH, DIM, CLASSES)
    x[5] = np.nan
    assert np.isnan(float(batch_hard_triplet_loss(x, labels, margin=0.5)))
    # safe_sqrt still has value and gradient 0 at an exact 0 (duplicate rows), but passes NaN on.
    from hdml_jax.losses.triplet import safe_sqrt

    value, grad = jax.jit(jax.vmap(jax.value_and_grad(safe_sqrt)))(jnp.array([0.0, 4.0, np.nan]))
    np.testing.assert_array_equal(np.asarray(value), [0.0, 2.0, np.nan])
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 0.25, np.nan])


def test_l2_normalize_is_overflow_safe_and_unchanged_where_it_did_not_overflow():
    rng = np.random.default_rng(93)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    # Components beyond ~1.8e19 overflowed ‖x‖² and the row came out as 0.
    x[1] *= np.float32(1e20)
    x[2] *= np.float32(2.0**126)
    x[3] = [3e38, -3e38, 1.0, 0.0, 0.0]
    x[4] *= np.float32(1e-30)  # ‖x‖ < eps: x / eps, as before
    x[5] = 0.0
    normalize = jax.jit(l2_normalize)
    got = np.asarray(normalize(x))
    x64 = x.astype(np.float64)
    want = x64 / np.maximum(np.linalg.norm(x64, axis=1, keepdims=True), 1e-12)
    # Element by element (Σx² has no cancellation, exact power-of-two rescaling keeps it so): d
    # squares and d - 1 additions round Σx² by at most d·u relative, halved by the square root;
    # the square root, the reciprocal and the product add u each: (d/2 + 3)·u = (d + 6)/4·ε.
    np.testing.assert_allclose(got, want, rtol=(x.shape[1] + 6) / 4 * EPS32, atol=1e-30)
    # Where ‖x‖² does not overflow: the very bits of the plain formula.
    ordinary = [0, 4, 5, 6]
    plain = jax.jit(lambda a: a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=1, keepdims=True), 1e-24)))
    np.testing.assert_array_equal(np.asarray(normalize(x[ordinary])), np.asarray(plain(x[ordinary])))
    # The written-out derivative: (I - x̂x̂ᵀ) dx / ‖x‖, or dx / eps below eps, at every scale
    # (float32 flushes the ~1e-39 derivatives of the 2^126 row to 0).
    dx = rng.normal(size=x.shape).astype(np.float32)
    tangent = np.asarray(jax.jit(lambda a, da: jax.jvp(l2_normalize, (a,), (da,))[1])(x, dx))
    norm = np.linalg.norm(x64, axis=1, keepdims=True)
    unit = x64 / np.maximum(norm, 1e-12)
    radial = np.where(norm >= 1e-12, np.sum(unit * dx, axis=1, keepdims=True), 0.0)
    want = (dx - unit * radial) / np.maximum(norm, 1e-12)
    # Row by row (their scales span 1e-38 to 1e12): dx - x̂(x̂·dx) cancels down from terms of size
    # max|dx| / ‖x‖ over a d-term product; below float32's smallest normal number results are
    # flushed to 0.
    for i, (got_row, want_row) in enumerate(zip(tangent, want, strict=True)):
        terms = float(np.max(np.abs(dx[i]))) / max(float(norm[i, 0]), 1e-12)
        atol = max(rounding_atol(terms, x.shape[1], eps=EPS32), float(np.finfo(np.float32).tiny))
        np.testing.assert_allclose(got_row, want_row, rtol=0, atol=atol, err_msg=f"row {i}")
    # NaN or inf anywhere in a row: the whole row is NaN, never a unit vector.
    bad = np.array([[np.inf, 1.0], [np.nan, 0.0], [-np.inf, np.inf]], np.float32)
    assert np.isnan(np.asarray(normalize(bad))).all()


@pytest.mark.parametrize("case", [c for c in CASES if c.cosine], ids=[c.name for c in CASES if c.cosine])
def test_cosine_losses_ignore_huge_row_scales(case: LossCase):
    # Power-of-two scales up to 2^120 ≈ 1.3e36 per row and per proxy: exactly the same directions.
    rng = np.random.default_rng(94)
    x, labels, params = case.make(rng, BATCH, DIM, CLASSES)

    def blow_up(a):
        return a * (2.0 ** rng.choice([0, 64, 100, 120], size=(a.shape[0], 1))).astype(np.float32)

    huge = _value(case, blow_up(x), labels, jax.tree_util.tree_map(blow_up, params))
    # The rows are rescaled by exact powers of two, but normalised in another order.
    _assert_value_close(
        case, huge, _value(case, x, labels, params), x, params, case.n_terms(BATCH, DIM, CLASSES)
    )


HYPERPARAMETER_ERRORS: dict[str, tuple[Callable[[], Any], str]] = {
    "pa_alpha_zero": (lambda: proxy_anchor_loss(_X, _Y, _P, alpha=0.0), r"alpha \(config field loss.alpha\)"),
    "pa_alpha_negative": (lambda: proxy_anchor_loss(_X, _Y, _P, alpha=-32.0), r"alpha .* > 0 .* got -32.0"),
    "pa_alpha_nan": (lambda: proxy_anchor_loss(_X, _Y, _P, alpha=float("nan")), r"alpha .* finite"),
    "pa_alpha_string": (lambda: proxy_anchor_loss(_X, _Y, _P, alpha="32"), r"alpha .* got '32'"),
    "pa_margin_negative": (
        lambda: proxy_anchor_loss(_X, _Y, _P, margin=-0.1),
        r"margin \(config field loss.margin\) must be a finite number >= 0",
    ),
    "nca_scale_zero": (lambda: proxy_nca_loss(_X, _Y, _P, scale=0.0), r"scale \(config field loss.scale\)"),
    "nca_scale_negative": (lambda: proxy_nca_loss(_X, _Y, _P, scale=-9.0), r"scale .* > 0"),
    "triplet_margin_negative": (
        lambda: batch_hard_triplet_loss(_X, _Y, margin=-0.1),
        r"margin \(config field loss.triplet_margin\) must be a finite number >= 0",
    ),
    "triplet_margin_inf": (lambda: batch_hard_triplet_loss(_X, _Y, margin=np.inf), r"margin .* got inf"),
    "ce_temperature_negative": (lambda: softmax_cross_entropy(_X, _Y, temperature=-1.0), r"temperature"),
    "ce_temperature_inf": (lambda: softmax_cross_entropy(_X, _Y, temperature=np.inf), r"temperature"),
    "ce_smoothing_negative": (
        lambda: softmax_cross_entropy(_X, _Y, label_smoothing=-0.1),
        r"label_smoothing",
    ),
    "hpl_weight_negative": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0,), level_weights=(1.0, -0.1)),
        r"level_weights\[1\] \(config field loss.level_weights\) must be a finite number >= 0",
    ),
    "hpl_weights_all_zero": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0,), level_weights=(0.0, 0)),
        r"level_weights .* are all 0",
    ),
    "hpl_base_alpha": (
        lambda: hierarchical_proxy_loss(_X, _Y, (_P, _P1), (_A0,), alpha=-1.0),
        r"proxy_anchor_loss alpha",
    ),
}


@pytest.mark.parametrize("name", list(HYPERPARAMETER_ERRORS), ids=list(HYPERPARAMETER_ERRORS))
def test_hyperparameters_outside_their_meaning_raise_config_errors(name: str):
    call, message = HYPERPARAMETER_ERRORS[name]
    with pytest.raises(LossHyperparameterError, match=message) as info:
        call()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
