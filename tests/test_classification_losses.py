"""PML's classification-style losses (normalized softmax, CosFace, ArcFace, SoftTriple) in JAX.

Against slow float64 per-sample references (``tests/reference_classification_losses.py``), with
float64 finite-difference gradients, both computation paths (concrete hyperparameters: written-out
gradient; traced ones: autodiff), masks, padded weight rows, dtypes, jit / vmap and errors. A last
test compares with pytorch-metric-learning itself and is skipped when it is not installed.

Two evaluations that may round differently (float32 against float64, two programs, two shapes,
PyTorch) agree up to the round-off of ``tests/numerics.py``: ``n`` = rows × weight rows × dims
(``_n_terms``), ``scale`` from the logits' size and condition (``_scales``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdml_jax.errors import ConfigError
from hdml_jax.losses import LossHyperparameterError
from hdml_jax.losses.normalized_softmax import (
    _CosineSpec,
    _row_logsumexp,
    arcface_loss,
    cosface_loss,
    normalized_softmax_loss,
)
from hdml_jax.losses.soft_triple import _SoftTripleSpec, soft_triple_loss
from tests import reference_classification_losses as ref
from tests.numerics import assert_close, rounding_atol

BATCH, DIM, CLASSES, CENTERS = 8, 5, 4, 3
# The losses compute in float32: their round-off, explicitly (a Python float of a float32 result
# would pass for float64).
EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Case:
    name: str
    loss: Callable[..., jax.Array]
    reference: Callable[..., float]
    kwargs: dict[str, Any] = field(default_factory=dict)  # hyperparameters (PML's defaults when empty)
    centers: int = 1  # weight rows per class

    @property
    def rows(self) -> int:
        return CLASSES * self.centers

    def all_kwargs(self) -> dict[str, Any]:
        extra = {"centers_per_class": self.centers} if self.loss is soft_triple_loss else {}
        return {**extra, **self.kwargs}

    def make(self, rng: np.random.Generator, batch: int = BATCH):
        labels = rng.permutation(np.resize(np.arange(CLASSES), batch)).astype(np.int32)
        x = rng.normal(size=(batch, DIM)).astype(np.float32)
        w = rng.normal(size=(self.rows, DIM)).astype(np.float32)
        return x, labels, w

    def value(self, x, labels, w, mask=None, proxy_mask=None):
        return self.loss(x, labels, w, mask=mask, proxy_mask=proxy_mask, **self.all_kwargs())

    def ref(self, x, labels, w, mask=None, proxy_mask=None) -> float:
        return self.reference(x, labels, w, mask=mask, proxy_mask=proxy_mask, **self.all_kwargs())


# PML's defaults (CosFace / ArcFace at s = 64 take row maxima in the log-sum-exp, the normalized
# softmax and SoftTriple a fixed shift) and settings that take the other paths.
CASES = [
    Case("normsoftmax", normalized_softmax_loss, ref.normalized_softmax_ref),
    Case("cosface", cosface_loss, ref.cosface_ref),
    Case("arcface", arcface_loss, ref.arcface_ref),
    Case("softtriple", soft_triple_loss, ref.soft_triple_ref, centers=CENTERS),
    # The largest CosFace scale that still takes the fixed log-sum-exp shift: s (2 + m) = 80.
    Case("cosface_edge", cosface_loss, ref.cosface_ref, {"margin": 0.35, "scale": 80.0 / 2.35}),
    Case("arcface_s8", arcface_loss, ref.arcface_ref, {"margin": 40.0, "scale": 8.0}),
    # γ below 0.025 and λ(2 + δ) above 80: SoftTriple takes row maxima in both softmaxes.
    Case(
        "softtriple_sharp",
        soft_triple_loss,
        ref.soft_triple_ref,
        {"la": 50.0, "gamma": 0.01, "margin": 0.1},
        centers=CENTERS,
    ),
]
BY_NAME = {case.name: case for case in CASES}
all_cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
DEFAULTS = [c for c in CASES if not c.kwargs]
default_cases = pytest.mark.parametrize("case", DEFAULTS, ids=[c.name for c in DEFAULTS])


@functools.cache
def _jit_value_and_grad(name: str):
    """One jitted value-and-gradient (w.r.t. embeddings and weights) per case, masks as arguments."""
    case = BY_NAME[name]
    return jax.jit(jax.value_and_grad(lambda x, y, w, m, pm: case.value(x, y, w, m, pm), argnums=(0, 2)))


def _value_and_grad(case: Case, x, labels, w, mask=None, proxy_mask=None):
    mask = np.ones(len(labels), bool) if mask is None else mask
    proxy_mask = np.ones(len(w), bool) if proxy_mask is None else proxy_mask
    value, (gx, gw) = _jit_value_and_grad(case.name)(x, labels, w, mask, proxy_mask)
    return float(value), np.asarray(gx, np.float32), np.asarray(gw, np.float32)


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


def _n_terms(case: Case, batch: int = BATCH) -> int:
    """The chained reductions: a DIM-term cosine per (row, weight row), summed over both."""
    return batch * case.rows * DIM


def _scales(case: Case, x, labels, w) -> tuple[float, float]:
    """``(value scale, condition)`` at these inputs. A cosine rounds by ~ε; the logits turn that
    into an error of ε times their slope in the cosine, the condition (also the relative error of
    the softmax weights, hence of the gradients); the value's terms are the logits, plus log C."""
    hyper = {**PML_DEFAULTS[case.loss], **case.kwargs}
    log_classes = math.log(CLASSES)
    if case.loss is normalized_softmax_loss:
        slope = 1.0 / hyper["temperature"]
        return slope + log_classes, slope
    if case.loss is cosface_loss:
        largest = hyper["scale"] * (1.0 + hyper["margin"])
        return largest + log_classes, largest
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    x_hat = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cosines = x_hat @ (w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)).T
    if case.loss is arcface_loss:
        # s·cos(θ + m) of the own class has slope s·sin(θ + m)/sin θ in cos θ, unbounded as θ → 0
        # (test_arcface_branches_and_the_angle_singularity), s past θ = π - m; |s(cos θ - m sin m)|
        # reaches s(1 + m sin m).
        s, m = hyper["scale"], math.radians(hyper["margin"])
        theta = np.arccos(np.clip(cosines[np.arange(len(labels)), labels], -1.0, 1.0))
        slopes = np.where(theta <= math.pi - m, np.sin(theta + m) / np.sin(theta), 1.0)
        largest = s * max(1.0 + m * math.sin(m), float(np.max(slopes)))
        return largest + log_classes, largest
    # SoftTriple: S_c = Σ_k p_k cos_k with p = softmax(cos / γ) over the class's centers has slope
    # Σ_k p_k (1 + |cos_k - S_c| / γ) (at least 1, at most 1 + 2/γ); the logits are λ(S_c - δ). The
    # weights p carry 2ε/γ relative error on top.
    la, gamma, delta = hyper["la"], hyper["gamma"], hyper["margin"]
    per_class = cosines.reshape(len(x), -1, case.centers)
    p = np.exp((per_class - per_class.max(axis=-1, keepdims=True)) / gamma)
    p /= p.sum(axis=-1, keepdims=True)
    relaxed = np.sum(p * per_class, axis=-1, keepdims=True)
    slope = la * float(np.max(np.sum(p * (1.0 + np.abs(per_class - relaxed) / gamma), axis=-1)))
    return max(la * (1.0 + delta), slope) + log_classes, slope + 2.0 / gamma


def _assert_value_close(case: Case, got, want, x, labels, w, err_msg: str = "") -> None:
    scale = _scales(case, x, labels, w)[0]
    assert_close(got, want, n_terms=_n_terms(case, len(x)), scale=scale, eps=EPS32, err_msg=err_msg)


def _assert_grad_close(case: Case, got, want, x, labels, w, err_msg: str = "") -> None:
    """A gradient: round-off of its largest entry, times the logits' condition."""
    scale = _scales(case, x, labels, w)[1] * float(np.max(np.abs(np.asarray(want))))
    assert_close(got, want, n_terms=_n_terms(case, len(x)), scale=scale, eps=EPS32, err_msg=err_msg)


def _edge_inputs(case: Case, seed: int):
    """A masked row, a row past ArcFace's θ = π - m, a row close to its own class vector."""
    rng = np.random.default_rng(seed)
    x, labels, w = case.make(rng)
    own = labels[1] * case.centers
    x[1] = -3.0 * w[own] + 0.05 * rng.normal(size=DIM)  # θ ≈ π: ArcFace's linear branch
    # Close to its class vector (cosine ≈ 0.99): ArcFace's sqrt(1 - t²) is steep there. (At
    # cosine 1 itself float32 rounding of t moves ψ by ~1e-4: see the singularity test.)
    x[4] = 2.0 * w[labels[4] * case.centers] + 0.2 * rng.normal(size=DIM)
    mask = np.ones(BATCH, bool)
    mask[6] = False
    return x, labels, w, mask


# --------------------------------------------------------------------------------------------
# 1. Values and gradients against the references


@all_cases
def test_value_matches_reference(case: Case):
    x, labels, w, mask = _edge_inputs(case, 1)
    for m in (None, mask):
        value, _, _ = _value_and_grad(case, x, labels, w, m)
        _assert_value_close(case, value, case.ref(x, labels, w, m), x, labels, w)


@all_cases
def test_gradients_match_finite_differences_of_reference(case: Case):
    """jax.grad (float32) against float64 central differences of the loop reference."""
    x, labels, w, mask = _edge_inputs(case, 2)
    want = _numeric_grad(lambda a, b: case.ref(a, labels, b, mask), [x, w])
    _, gx, gw = _value_and_grad(case, x, labels, w, mask)
    # The float64 central differences are off by ~ε64·|L|/h + h²·|L‴|, far below float32's round-off.
    for got, expected in ((gx, want[0]), (gw, want[1])):
        assert float(np.max(np.abs(expected))) > 1e-3  # a real gradient, not a vacuous 0 == 0
        _assert_grad_close(case, got, expected, x, labels, w)
    assert np.all(gx[6] == 0.0)  # the masked row


# PML's defaults, by loss: what the traced (autodiff) path gets as jit arguments.
PML_DEFAULTS = {
    normalized_softmax_loss: {"temperature": 0.05},
    cosface_loss: {"margin": 0.35, "scale": 64.0},
    arcface_loss: {"margin": 28.6, "scale": 64.0},
    soft_triple_loss: {"la": 20.0, "gamma": 0.1, "margin": 0.01},
}


def _hyperparameter_terms(case: Case, x, labels, w, hyper: dict[str, float]) -> dict[str, float]:
    """``mean_i Σ_c |softmax(z)_ic - onehot_ic|·|∂z_ic/∂θ|`` per hyperparameter θ, in float64: the
    terms that ``∂L/∂θ`` sums, each weight rounded like a gradient (the condition of ``_scales``)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    x_hat = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosines = x_hat @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    onehot = np.eye(CLASSES)[labels]
    if case.loss is normalized_softmax_loss:
        t = hyper["temperature"]
        z, slopes = cosines / t, {"temperature": -cosines / t**2}
    elif case.loss is cosface_loss:
        s, m = hyper["scale"], hyper["margin"]
        z = s * (cosines - m * onehot)
        slopes = {"margin": -s * onehot, "scale": cosines - m * onehot}
    elif case.loss is arcface_loss:
        s, m = hyper["scale"], math.radians(hyper["margin"])
        theta = np.arccos(np.clip(cosines, -1.0, 1.0))
        arc = theta <= math.pi - m
        psi = np.where(arc, np.cos(theta + m), cosines - m * math.sin(m))
        z = s * np.where(onehot > 0, psi, cosines)
        dpsi = np.where(arc, -np.sin(theta + m), -(math.sin(m) + m * math.cos(m))) * math.pi / 180.0
        slopes = {"margin": s * dpsi * onehot, "scale": z / s}
    else:
        la, gamma, delta = hyper["la"], hyper["gamma"], hyper["margin"]
        per_class = cosines.reshape(len(x), CLASSES, case.centers)
        p = np.exp((per_class - per_class.max(axis=-1, keepdims=True)) / gamma)
        p /= p.sum(axis=-1, keepdims=True)
        relaxed = np.sum(p * per_class, axis=-1)
        z = la * (relaxed - delta * onehot)
        spread = np.sum(p * per_class * (per_class - relaxed[..., None]), axis=-1)
        slopes = {"la": relaxed - delta * onehot, "gamma": -la * spread / gamma**2, "margin": -la * onehot}
    q = np.exp(z - z.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    return {
        name: float(np.mean(np.sum(np.abs(q - onehot) * np.abs(d), axis=1))) for name, d in slopes.items()
    }


@functools.cache
def _traced_value_and_grad(loss: Callable[..., jax.Array]):
    """Value and gradients w.r.t. embeddings, weights and the hyperparameters, all jit arguments."""
    static = {"centers_per_class": CENTERS} if loss is soft_triple_loss else {}

    def value(x, labels, w, mask, hyper):
        return loss(x, labels, w, mask=mask, **static, **hyper)

    return jax.jit(jax.value_and_grad(value, argnums=(0, 2, 4)))


def _traced(loss, x, labels, w, mask=None, **hyper):
    mask = np.ones(len(labels), bool) if mask is None else mask
    hyper = {k: jnp.float32(v) for k, v in {**PML_DEFAULTS[loss], **hyper}.items()}
    return _traced_value_and_grad(loss)(x, labels, w, mask, hyper)


@default_cases
def test_traced_hyperparameters_take_the_autodiff_path_and_agree(case: Case):
    """Hyperparameters passed through jit: the plain autodiff formulation, same values and gradients,
    and a gradient w.r.t. each hyperparameter that matches finite differences of the reference."""
    x, labels, w, mask = _edge_inputs(case, 3)
    value, (gx, gw, gh) = _traced(case.loss, x, labels, w, mask)
    direct, dgx, dgw = _value_and_grad(case, x, labels, w, mask)
    _assert_value_close(case, float(value), direct, x, labels, w)
    _assert_grad_close(case, np.asarray(gx), dgx, x, labels, w)
    _assert_grad_close(case, np.asarray(gw), dgw, x, labels, w)
    hyper = PML_DEFAULTS[case.loss]
    static = {k: v for k, v in case.all_kwargs().items() if k not in hyper}
    condition = _scales(case, x, labels, w)[1]
    terms = _hyperparameter_terms(case, x[mask], labels[mask], w, hyper)
    for name, v in hyper.items():
        h = 1e-5 * max(1.0, abs(v))
        plus = case.reference(x, labels, w, mask=mask, **static, **{**hyper, name: v + h})
        minus = case.reference(x, labels, w, mask=mask, **static, **{**hyper, name: v - h})
        # The float64 central differences are off by ~1e-9 of it.
        scale = condition * terms[name]
        assert_close(
            float(gh[name]), (plus - minus) / (2 * h), n_terms=_n_terms(case), scale=scale, eps=EPS32
        )


def test_arcface_branches_and_the_angle_singularity():
    """Both branches of ψ are exercised, and a row exactly on its weight has finite gradients."""
    case = BY_NAME["arcface"]
    x, labels, w, _ = _edge_inputs(case, 4)
    w_hat = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos_own = np.sum(x / np.linalg.norm(x, axis=1, keepdims=True) * w_hat[labels], axis=1)
    assert cos_own[1] < -math.cos(math.radians(28.6))  # θ > π - m: the linear continuation
    x[4] = w[labels[4]]  # exactly on it: PML's arccos has an infinite derivative here
    value, gx, gw = _value_and_grad(case, x, labels, w)
    assert np.isfinite(value) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    # At θ = 0 a rounding δ of the cosine moves θ by √(2δ) and s·ψ by s·sin(m)·√(2δ) (PML alike):
    # δ = the cosine's round-off (terms ≤ 1, DIM of them), the row's share of the mean 1/BATCH,
    # on top of the other rows' ordinary round-off.
    rows = np.arange(BATCH) != 4
    ordinary = rounding_atol(_scales(case, x[rows], labels[rows], w)[0], _n_terms(case), eps=EPS32)
    singular = 64.0 * math.sin(math.radians(28.6)) * math.sqrt(2 * rounding_atol(1.0, DIM, eps=EPS32)) / BATCH
    np.testing.assert_allclose(value, case.ref(x, labels, w), rtol=0, atol=ordinary + singular)


def test_margins_and_units():
    """Larger margins give larger losses; ArcFace's margin is in degrees (0.5° is tiny, not 0.5
    rad); the normalized softmax at T = 1/s is CosFace without margin. (Traced hyperparameters:
    the compilations of the test above.)"""
    x, labels, w = BY_NAME["cosface"].make(np.random.default_rng(5))

    def cos(**hyper):
        return float(_traced(cosface_loss, x, labels, w, **hyper)[0])

    def arc(**hyper):
        return float(_traced(arcface_loss, x, labels, w, **hyper)[0])

    plain = cos(margin=0.0, scale=16.0)
    assert cos(margin=0.3, scale=16.0) > plain + 1.0
    assert abs(arc(margin=0.5, scale=16.0) - plain) < 0.2 < arc(margin=math.degrees(0.5), scale=16.0) - plain
    # The same logits 16·cos from three programs: the round-off of CosFace's at s = 16, m = 0.
    tolerance = {"n_terms": BATCH * CLASSES * DIM, "scale": 16.0 + math.log(CLASSES), "eps": EPS32}
    assert_close(arc(margin=0.0, scale=16.0), plain, **tolerance)
    nsl = float(_traced(normalized_softmax_loss, x, labels, w, temperature=1 / 16)[0])
    assert_close(nsl, plain, **tolerance)


# --------------------------------------------------------------------------------------------
# 2. Masks and padding


@default_cases
def test_all_rows_masked_is_exactly_zero_with_zero_gradients(case: Case):
    x, labels, w = case.make(np.random.default_rng(11))
    value, gx, gw = _value_and_grad(case, x, labels, w, np.zeros(BATCH, bool))
    assert value == 0.0
    assert np.all(gx == 0.0) and np.all(gw == 0.0)


@default_cases
def test_masked_garbage_rows_change_nothing(case: Case):
    """Whatever a masked row holds (NaN, inf, 1e30), the results are bit-identical."""
    x, labels, w = case.make(np.random.default_rng(12))
    mask = np.ones(BATCH, bool)
    mask[[2, 5]] = False
    clean = _value_and_grad(case, x, labels, w, mask)
    _assert_value_close(case, clean[0], case.ref(x, labels, w, mask), x, labels, w)
    for garbage in (np.nan, np.inf, 1e30):
        dirty = x.copy()
        dirty[2] = garbage
        dirty[5, 0] = -garbage
        value, gx, gw = _value_and_grad(case, dirty, labels, w, mask)
        assert value == clean[0]
        np.testing.assert_array_equal(gx, clean[1])
        np.testing.assert_array_equal(gw, clean[2])
        assert np.all(gx[[2, 5]] == 0.0)


@all_cases
def test_padded_classes_change_nothing_and_get_zero_gradient(case: Case):
    """Padding as the trainer does it: a whole class of weight rows masked by ``proxy_mask`` (one
    flag per row). Whatever it holds (rows on top of embeddings, NaN), the value and every
    gradient are bit-identical, the padding's gradient is exactly 0, and the value is that of the
    reference without the class; unmasked, the same rows would count."""
    rng = np.random.default_rng(13)
    x, labels, w = case.make(rng)
    labels = np.where(labels == 1, 0, np.where(labels == 2, 3, labels))  # classes 1, 2: padding
    k = case.centers
    proxy_mask = np.ones(case.rows, bool)
    proxy_mask[k : 3 * k] = False
    if k > 1:
        proxy_mask[[2, 3 * k]] = False  # and one center of classes 0 and 3
    clean = _value_and_grad(case, x, labels, w, proxy_mask=proxy_mask)
    _assert_value_close(case, clean[0], case.ref(x, labels, w, proxy_mask=proxy_mask), x, labels, w)
    assert np.all(clean[2][~proxy_mask] == 0.0)
    dirty = w.copy()
    dirty[k : 2 * k] = 3.0 * x[:k]  # on top of embeddings
    dirty[2 * k : 3 * k] = np.nan
    if k > 1:
        dirty[2] = np.inf
    value, gx, gw = _value_and_grad(case, x, labels, dirty, proxy_mask=proxy_mask)
    assert value == clean[0]
    np.testing.assert_array_equal(gx, clean[1])
    np.testing.assert_array_equal(gw, clean[2])
    finite = np.where(np.isfinite(dirty), dirty, 0.0)
    unmasked = _value_and_grad(case, x, labels, finite)[0]
    # Unmasked, the padding counts, far beyond the round-off.
    tolerance = rounding_atol(_scales(case, x, labels, finite)[0], _n_terms(case), eps=EPS32)
    assert abs(unmasked - clean[0]) > 10 * tolerance
    if case.name in ("normsoftmax", "softtriple"):
        want = _numeric_grad(lambda a, b: case.ref(a, labels, b, proxy_mask=proxy_mask), [x, w])
        _assert_grad_close(case, clean[1], want[0], x, labels, w)
        _assert_grad_close(case, clean[2], want[1], x, labels, w)


def test_soft_triple_per_class_proxy_mask_is_per_center_repeated():
    from hdml_jax.losses.soft_triple import _resolve_center_mask

    per_class = np.array([True, False, True, True])
    got = _resolve_center_mask(per_class, CLASSES, CENTERS)
    np.testing.assert_array_equal(got, np.repeat(per_class, CENTERS))
    assert _resolve_center_mask(None, CLASSES, CENTERS) is None


def test_masked_rows_may_carry_any_label_and_jit_ignores_bad_targets():
    case = BY_NAME["arcface_s8"]
    x, labels, w = case.make(np.random.default_rng(16))
    mask = np.ones(BATCH, bool)
    mask[[3, 5]] = False
    bad = labels.copy()
    bad[3], bad[5] = -1, 99
    _assert_value_close(
        case, _value_and_grad(case, x, bad, w, mask)[0], case.ref(x, labels, w, mask), x, labels, w
    )
    with pytest.raises(ValueError, match=r"found \[-1, 99\]"):
        case.value(x, bad, w)
    # Under jit an unmasked out-of-range label cannot raise: the row keeps only its log-sum-exp.
    value = _value_and_grad(case, x, bad, w)[0]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = 8.0 * unit.astype(np.float64) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    lse = np.log(np.exp(z).sum(axis=1))
    expected = (case.ref(x, labels, w, mask) * mask.sum() + lse[3] + lse[5]) / BATCH
    _assert_value_close(case, value, expected, x, labels, w)


# --------------------------------------------------------------------------------------------
# 3. SoftTriple's layout: class c owns rows c·K ... c·K + K - 1


def test_soft_triple_centers_are_class_major_rows():
    case = BY_NAME["softtriple"]
    x, labels, w = case.make(np.random.default_rng(17))
    base = _value_and_grad(case, x, labels, w)[0]
    within = w.copy()
    within[[0, 1, 2]] = w[[2, 0, 1]]  # permute class 0's own centers: nothing changes but the order
    _assert_value_close(case, _value_and_grad(case, x, labels, within)[0], base, x, labels, w)
    across = w.copy()
    across[[2, 3]] = w[[3, 2]]  # swap a center of class 0 with one of class 1: it changes
    tolerance = rounding_atol(_scales(case, x, labels, w)[0], _n_terms(case), eps=EPS32)
    assert abs(_value_and_grad(case, x, labels, across)[0] - base) > 10 * tolerance


# --------------------------------------------------------------------------------------------
# 4. Transformations, dtypes, numerics


@pytest.mark.parametrize("name", ["arcface", "softtriple"])  # the two code paths
def test_vmap_equals_loop(name: str):
    case = BY_NAME[name]
    x, labels, w = case.make(np.random.default_rng(21))
    xs = np.stack([x, x[::-1], 2.0 * x + 1.0])
    values, (gxs, gws) = jax.jit(
        jax.vmap(jax.value_and_grad(lambda a, b: case.value(a, labels, b), argnums=(0, 1)), in_axes=(0, None))
    )(xs, w)
    for k in range(3):  # two programs
        value, gx, gw = _value_and_grad(case, xs[k], labels, w)
        _assert_value_close(case, float(values[k]), value, xs[k], labels, w)
        _assert_grad_close(case, gxs[k], gx, xs[k], labels, w)
        _assert_grad_close(case, gws[k], gw, xs[k], labels, w)


def test_bf16_inputs_give_float32_close_to_float32():
    case = BY_NAME["softtriple"]  # (all four share the input handling)
    x, labels, w = case.make(np.random.default_rng(23))
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    value, (gx, gw) = jax.jit(jax.value_and_grad(lambda a, b: case.value(a, labels, b), argnums=(0, 1)))(
        x16, w16
    )
    assert value.dtype == jnp.float32 and gx.dtype == gw.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(gx, np.float32))) and np.all(np.isfinite(np.asarray(gw, np.float32)))
    # The math is float32: the same as float32 on the bf16-rounded inputs (gradients rounded to bf16).
    x_up, w_up = np.asarray(x16, np.float32), np.asarray(w16, np.float32)
    upcast = _value_and_grad(case, x_up, labels, w_up)
    _assert_value_close(case, float(value), upcast[0], x_up, labels, w_up)  # two programs
    # The gradient, rounded to bf16 once (≤ ε_bf16/2 of its largest entry), on top of the float32
    # round-off of two programs.
    eps_bf16 = float(jnp.finfo(jnp.bfloat16).eps)
    largest = float(np.abs(upcast[1]).max())
    float32_part = rounding_atol(_scales(case, x_up, labels, w_up)[1] * largest, _n_terms(case), eps=EPS32)
    atol = eps_bf16 / 2 * largest + float32_part
    np.testing.assert_allclose(np.asarray(gx, np.float32), upcast[1], rtol=0, atol=atol)
    # Against the unrounded inputs: rounding every input v to bf16 (relative error ≤ ε_bf16/2)
    # moves the loss by at most ε_bf16/2 · Σ|∂L/∂v|·|v|, to first order.
    value32, gx32, gw32 = _value_and_grad(case, x, labels, w)
    first_order = float(np.sum(np.abs(gx32 * x)) + np.sum(np.abs(gw32 * w)))
    assert_close(float(value), value32, n_terms=1, scale=first_order, eps=eps_bf16)


def test_forward_mode_matches_reverse_mode():
    """The written-out derivative is a custom JVP: forward mode works and agrees with ``grad``."""
    arc, st = BY_NAME["arcface"], BY_NAME["softtriple"]
    rng = np.random.default_rng(22)
    x, labels, w = arc.make(rng)
    _, _, centers = st.make(rng)
    dx, dw, dc = (rng.normal(size=a.shape).astype(np.float32) for a in (x, w, centers))

    @jax.jit
    def tangents(x, dx, w, dw, centers, dc):
        return (
            jax.jvp(lambda a, b: arc.value(a, labels, b), (x, w), (dx, dw))[1],
            jax.jvp(lambda a, b: st.value(a, labels, b), (x, centers), (dx, dc))[1],
        )

    got = tangents(x, dx, w, dw, centers, dc)
    for case, params, dparams, tangent in ((arc, w, dw, got[0]), (st, centers, dc, got[1])):
        _, gx, gp = _value_and_grad(case, x, labels, params)
        want = float(np.vdot(gx, dx) + np.vdot(gp, dparams))
        # Σ g·dv over every input: terms |g|·|dv|, each g rounded like a gradient (the condition).
        terms = float(np.sum(np.abs(gx * dx)) + np.sum(np.abs(gp * dparams)))
        scale = _scales(case, x, labels, params)[1] * terms
        assert_close(float(tangent), want, n_terms=_n_terms(case), scale=scale, eps=EPS32)


@default_cases
def test_result_is_float32_under_x64(case: Case):
    x, labels, w = case.make(np.random.default_rng(24))
    with jax.enable_x64(True):
        out = jax.eval_shape(
            lambda a, b: case.value(a, jnp.asarray(labels), b),
            jnp.asarray(x, jnp.float64),
            jnp.asarray(w, jnp.float64),
        )
        assert out.dtype == jnp.float32


@default_cases
def test_non_finite_input_gives_nan(case: Case):
    x, labels, w = case.make(np.random.default_rng(25))
    for where in ("nan_row", "inf_row", "nan_weight", "inf_weight"):
        x_bad, w_bad = x.copy(), w.copy()
        if where == "nan_row":
            x_bad[2] = np.nan
        elif where == "inf_row":
            x_bad[2, 1] = np.inf
        elif where == "nan_weight":
            w_bad[1, 0] = np.nan
        else:
            w_bad[1, 0] = -np.inf
        assert np.isnan(_value_and_grad(case, x_bad, labels, w_bad)[0]), where


@default_cases
def test_scale_invariance_huge_norms_zero_rows_and_one_class(case: Case):
    """Only directions count, even for rows near float32's overflow (exact powers of 2); zero rows
    are finite (cosine 0: torch's normalisation epsilon); one class left gives log 1 = 0."""
    rng = np.random.default_rng(26)
    x, labels, w = case.make(rng)
    base = _value_and_grad(case, x, labels, w)[0]

    def blow_up(a):
        return (a * 2.0 ** rng.choice([-20, 0, 64, 120], size=(len(a), 1))).astype(np.float32)

    # Exact powers of two, but normalised in another order.
    _assert_value_close(case, _value_and_grad(case, blow_up(x), labels, blow_up(w))[0], base, x, labels, w)
    x[0] = 0.0
    w[1] = 0.0
    value, gx, gw = _value_and_grad(case, x, labels, w)
    assert np.isfinite(value) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    scale = _scales(case, x, labels, w)[0]
    assert_close(value, case.ref(x, labels, w), n_terms=_n_terms(case), scale=scale, eps=EPS32)
    only_first = np.arange(case.rows) < case.centers
    value, gx, gw = _value_and_grad(case, x, np.zeros(BATCH, np.int32), w, proxy_mask=only_first)
    # log Σ exp over the one class left minus its own logit: 0 up to the round-off of that logit.
    assert abs(value) <= rounding_atol(scale, _n_terms(case), eps=EPS32)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


def test_empty_batch_gives_zero():
    _, _, w = CASES[0].make(np.random.default_rng(28))
    _, _, centers = BY_NAME["softtriple"].make(np.random.default_rng(28))

    @jax.jit
    def both(x, labels):
        return arcface_loss(x, labels, w), soft_triple_loss(x, labels, centers, centers_per_class=CENTERS)

    for value in both(np.zeros((0, DIM), np.float32), np.zeros((0,), np.int32)):
        assert float(value) == 0.0


def test_fixed_shifts_are_exact_at_the_edge_of_their_range():
    """A fixed log-sum-exp shift is used only while every logit stays within range of it."""
    assert _CosineSpec("plain", 20.0, 0.0).fixed_shift() == 20.0  # PML's temperature 0.05
    assert _CosineSpec("cosface", 64.0, 0.35).fixed_shift() is None
    assert _CosineSpec("arcface", 64.0, 0.5).fixed_shift() is None
    assert _SoftTripleSpec(10, 20.0, 0.1, 0.01).center_shift() == 10.0
    assert _SoftTripleSpec(10, 20.0, 0.1, 0.01).class_shift() == 20.0
    assert _SoftTripleSpec(10, 50.0, 0.01, 0.1).center_shift() is None
    assert _SoftTripleSpec(10, 50.0, 0.01, 0.1).class_shift() is None
    # Logits at the far end of the range: the fixed shift gives the row maximum's result.
    logits = jnp.asarray([[-40.0, -40.0, -jnp.inf], [40.0, -40.0, 0.0]], jnp.float32)
    # Two shifts of 3-term sums of logits up to 40 (and their log-sum-exp, up to 40 + log 3).
    got, want = _row_logsumexp(logits, 40.0), _row_logsumexp(logits)
    assert_close(got, want, n_terms=3, scale=40.0 + math.log(3.0), eps=EPS32)
    # CosFace at s (2 + m) = 80 exactly, every cosine -1 (all classes on one direction): every
    # logit lies 80 or s below the shift, and the value is still that of the reference.
    case = BY_NAME["cosface_edge"]
    assert _CosineSpec("cosface", case.kwargs["scale"], 0.35).fixed_shift() == case.kwargs["scale"]
    x, labels, _ = case.make(np.random.default_rng(29))
    w = np.zeros((CLASSES, DIM), np.float32)
    w[:, 0] = 1.0
    x = np.zeros_like(x)
    x[:, 0] = -1.0
    value, gx, gw = _value_and_grad(case, x, labels, w)
    scale = case.kwargs["scale"] * (1.0 + 0.35) + math.log(CLASSES)  # (x and w are one direction)
    assert_close(value, case.ref(x, labels, w), n_terms=_n_terms(case), scale=scale, eps=EPS32)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


# --------------------------------------------------------------------------------------------
# 5. Errors

_X = np.ones((4, DIM), np.float32)
_Y = np.array([0, 1, 2, 3], np.int32)
_W = np.eye(CLASSES, DIM, dtype=np.float32)
_W3 = np.ones((CLASSES * 3, DIM), np.float32)

HYPERPARAMETER_ERRORS = {
    "temperature_zero": (lambda: normalized_softmax_loss(_X, _Y, _W, temperature=0.0), r"temperature .* > 0"),
    "temperature_nan": (lambda: normalized_softmax_loss(_X, _Y, _W, temperature=math.nan), r"finite"),
    "cosface_margin": (lambda: cosface_loss(_X, _Y, _W, margin=-0.1), r"cosface_loss margin .* >= 0"),
    "cosface_scale": (lambda: cosface_loss(_X, _Y, _W, scale=0.0), r"cosface_loss scale .* > 0"),
    "arcface_margin_high": (lambda: arcface_loss(_X, _Y, _W, margin=200.0), r"in \[0, 180\].*degrees"),
    "arcface_margin_negative": (lambda: arcface_loss(_X, _Y, _W, margin=-1.0), r"arcface_loss margin"),
    "arcface_scale": (lambda: arcface_loss(_X, _Y, _W, scale=-64.0), r"arcface_loss scale"),
    "st_centers_zero": (lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=0), r"centers_per_class"),
    "st_centers_float": (lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=3.0), r"Python int"),
    "st_centers_bool": (lambda: soft_triple_loss(_X, _Y, _W, centers_per_class=True), r"Python int"),
    "st_la": (lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=3, la=0.0), r"la .* > 0"),
    "st_gamma": (lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=3, gamma=-0.1), r"gamma"),
    "st_margin": (lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=3, margin=-0.01), r"margin"),
}


@pytest.mark.parametrize("name", list(HYPERPARAMETER_ERRORS), ids=list(HYPERPARAMETER_ERRORS))
def test_bad_hyperparameters_raise_config_errors(name: str):
    call, message = HYPERPARAMETER_ERRORS[name]
    with pytest.raises(LossHyperparameterError, match=message) as info:
        call()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


INPUT_ERRORS = {
    "weights_dim": (lambda: cosface_loss(_X, _Y, np.ones((4, DIM + 1), np.float32)), r"dimension"),
    "weights_rank": (lambda: arcface_loss(_X, _Y, np.ones(DIM, np.float32)), r"weights must have shape"),
    "no_class": (lambda: normalized_softmax_loss(_X, _Y, np.ones((0, DIM), np.float32)), r"rows"),
    "label_range": (lambda: cosface_loss(_X, np.array([0, 1, 2, 4]), _W), r"found \[4\]"),
    "labels_float": (lambda: arcface_loss(_X, _Y.astype(np.float32), _W), r"integers"),
    "mask_shape": (lambda: cosface_loss(_X, _Y, _W, mask=np.ones(3, bool)), r"mask must have shape"),
    "proxy_mask_shape": (
        lambda: cosface_loss(_X, _Y, _W, proxy_mask=np.ones(3, bool)),
        r"proxy_mask must have shape \(4,\)",
    ),
    "st_rows": (
        lambda: soft_triple_loss(_X, _Y, np.ones((10, DIM), np.float32), centers_per_class=3),
        r"multiple of 3 rows \(3 consecutive rows per class\)",
    ),
    "st_proxy_mask": (
        lambda: soft_triple_loss(_X, _Y, _W3, centers_per_class=3, proxy_mask=np.ones(5, bool)),
        r"\(12,\) \(one flag per center row\) or \(4,\)",
    ),
    "st_label_range": (
        lambda: soft_triple_loss(_X, np.array([0, 1, 2, 4]), _W3, centers_per_class=3),
        r"\[4\]",
    ),
}


@pytest.mark.parametrize("name", list(INPUT_ERRORS), ids=list(INPUT_ERRORS))
def test_bad_inputs_raise_value_errors(name: str):
    call, message = INPUT_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# 6. pytorch-metric-learning itself (optional: skipped when it is not installed)

PML_CLASSES = {
    "normsoftmax": "NormalizedSoftmaxLoss",
    "cosface": "CosFaceLoss",
    "arcface": "ArcFaceLoss",
    "softtriple": "SoftTripleLoss",
    "cosface_edge": "CosFaceLoss",
    "arcface_s8": "ArcFaceLoss",
    "softtriple_sharp": "SoftTripleLoss",
}


@pytest.mark.parametrize("name", list(PML_CLASSES), ids=list(PML_CLASSES))
def test_matches_pytorch_metric_learning(name: str):
    """Same value and gradients as PML 2.x with ``W = weights.T`` (``fc = weights.T`` for SoftTriple)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch = pytest.importorskip("torch")
    case = BY_NAME[name]
    x, labels, w, _ = _edge_inputs(case, 31)
    loss = getattr(pml_losses, PML_CLASSES[name])(
        num_classes=CLASSES, embedding_size=DIM, **case.all_kwargs()
    )
    param = loss.fc if case.centers > 1 else loss.W
    param.data = torch.tensor(w.T.copy())
    xt = torch.tensor(x, requires_grad=True)
    value_t = loss(xt, torch.tensor(labels, dtype=torch.long))
    value_t.backward()
    value, gx, gw = _value_and_grad(case, x, labels, w)
    # PyTorch in float32 too: two libraries' orders.
    _assert_value_close(case, value, value_t.item(), x, labels, w)
    _assert_grad_close(case, gx, xt.grad.numpy(), x, labels, w)
    _assert_grad_close(case, gw, param.grad.numpy().T, x, labels, w)
