"""The PML-style pair / triplet losses and miners against slow float64 references, plus gradients,
mined tuples, masks, edge cases, jit / vmap, bf16 and errors.

The references (``tests/reference_pair_losses.py``) loop over PML's index lists in float64; the
library works on masks in float32. Two evaluations that may round differently agree up to the
round-off of ``tests/numerics.py``: ``n`` the pairs (or triplets) times the dimension
(``_n_terms``), ``scale`` from the distance matrix's round-off and the loss's sensitivity to it
(``_scales``). Gradients are checked against float64 central differences of the references. An optional comparison with
pytorch-metric-learning itself runs only where it is installed (the ``bench`` extra).

Compilation dominates the run time (a loss's value-and-gradient takes seconds to compile on a busy
2-core machine). Every generic test uses one batch shape (``B, D``), and ``_value_and_grad`` serves
all of them from three jitted programs (see ``GROUPS``: every loss without mined tuples, and a few
with pair / triplet masks), compiled at backend optimisation level 0. Variants that repeat a covered
path with another distance or option, and the eager (op-by-op) calls, are ``exhaustive``
(``pytest -m exhaustive``).
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
from hdml_jax.losses import _pair_common as pc
from hdml_jax.losses._common import LossHyperparameterError
from hdml_jax.losses._pair_common import WindowedTriplets
from hdml_jax.losses.miners import (
    TRIPLET_TYPES,
    batch_hard_miner,
    multi_similarity_miner,
    semi_hard_miner,
    triplet_margin_miner,
    triplets_from_pairs,
)
from hdml_jax.losses.pair import (
    circle_loss,
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    ntxent_loss,
)
from hdml_jax.losses.triplet_margin import init_margin_beta, margin_loss, triplet_margin_loss
from tests import reference_pair_losses as ref
from tests.numerics import assert_close, rounding_atol

B, D, C = 12, 8, 4
# The losses compute in float32: their round-off, explicitly (a Python float of a float32 result
# would pass for float64).
EPS32 = float(np.finfo(np.float32).eps)


def _batch(seed: int, batch: int = B, classes: int = C) -> tuple[np.ndarray, np.ndarray]:
    """Random rows and labels in which every class appears at least twice."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(classes), 2), rng.integers(0, classes, batch - 2 * classes)])
    return rng.normal(size=(batch, D)).astype(np.float32), rng.permutation(labels).astype(np.int32)


def _mask(seed: int, batch: int = B) -> np.ndarray:
    mask = np.random.default_rng(seed).random(batch) > 0.3
    mask[:3] = True
    return np.random.default_rng(seed + 1).permutation(mask)


# --------------------------------------------------------------------------------------------
# The losses under test in one signature: loss(x, labels, beta, mask, mined) / ref(...)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    loss: Callable[..., jax.Array]
    reference: Callable[..., float]
    kwargs: dict[str, Any] = field(default_factory=dict)
    ref_kwargs: dict[str, Any] = field(default_factory=dict)
    beta: Any = None  # margin loss: the initial beta (a scalar or (C,)); None: no beta argument

    def __call__(self, x, labels, beta, mask, mined):
        if self.beta is None:
            return self.loss(x, labels, mask=mask, **self.kwargs, **mined)
        return self.loss(x, labels, beta, mask=mask, **self.kwargs, **mined)

    def ref(self, x, labels, beta=None, mask=None, indices=None, **extra) -> float:
        kwargs = {**self.kwargs, **self.ref_kwargs, **extra}
        if "normalize_embeddings" in kwargs:
            kwargs["normalize"] = kwargs.pop("normalize_embeddings")
        if self.beta is None:
            return self.reference(x, labels, mask=mask, indices=indices, **kwargs)
        beta = self.beta if beta is None else beta
        return self.reference(x, labels, np.asarray(beta, np.float64), mask=mask, indices=indices, **kwargs)

    def beta_array(self) -> np.ndarray:
        return np.asarray(0.0 if self.beta is None else self.beta, np.float32)


EXHAUSTIVE = pytest.mark.exhaustive

CASES = [
    Case("contrastive", contrastive_loss, ref.contrastive_ref),
    Case("triplet", triplet_margin_loss, ref.triplet_margin_ref, {"margin": 0.2}),
    # swap and smooth_loss (the B³ float path), with a similarity (swap takes the max).
    Case(
        "triplet_swap_smooth_cosine",
        triplet_margin_loss,
        ref.triplet_margin_ref,
        {"margin": 0.1, "swap": True, "smooth_loss": True, "distance": "cosine"},
    ),
    Case("multi_similarity", multi_similarity_loss, ref.multi_similarity_ref),
    Case("ntxent", ntxent_loss, ref.ntxent_ref),
    Case("lifted", lifted_structure_loss, ref.lifted_structure_ref),
    Case("generalized_lifted", generalized_lifted_structure_loss, ref.generalized_lifted_structure_ref),
    Case("circle", circle_loss, ref.circle_ref),
    Case("margin", margin_loss, ref.margin_ref, beta=1.2),
    Case(
        "margin_learn", margin_loss, ref.margin_ref, {"learn_beta": True, "nu": 0.3, "margin": 0.3}, beta=1.1
    ),
    Case(
        "margin_per_class_dot",
        margin_loss,
        ref.margin_ref,
        {"learn_beta": True, "nu": 0.2, "distance": "dot"},
        beta=(0.1, 0.2, 0.0, 0.3),
    ),
]
# Other distances / options on paths the cases above cover (exhaustive).
EXTRA_CASES = [
    Case(
        "contrastive_cosine",
        contrastive_loss,
        ref.contrastive_ref,
        {"pos_margin": 0.8, "neg_margin": 0.1, "distance": "cosine"},
    ),
    Case(
        "triplet_cosine", triplet_margin_loss, ref.triplet_margin_ref, {"margin": 0.3, "distance": "cosine"}
    ),
    Case("triplet_swap", triplet_margin_loss, ref.triplet_margin_ref, {"margin": 0.3, "swap": True}),
    Case(
        "triplet_smooth_raw",
        triplet_margin_loss,
        ref.triplet_margin_ref,
        {"smooth_loss": True, "normalize_embeddings": False},
    ),
    Case(
        "multi_similarity_euclidean",
        multi_similarity_loss,
        ref.multi_similarity_ref,
        {"distance": "euclidean", "base": 1.2, "alpha": 3.0, "beta": 20.0},
    ),
    Case("ntxent_warm", ntxent_loss, ref.ntxent_ref, {"temperature": 0.5}),
]
CASES_BY_NAME = {case.name: case for case in CASES + EXTRA_CASES}


def matrix_scales(x, distance: str, normalize: bool, ref_rows=None) -> tuple[float, float, float]:
    """``(μ, g, r)`` of the distance / similarity matrix of x's rows (or of x against ``ref_rows``):
    ``μ`` its entries' round-off in units of ε, ``g`` the relative round-off of their gradients,
    ``r`` the largest row norm. A similarity sums d products up to ``r²``. A distance is the root
    of ``‖a‖² + ‖b‖² - 2a·b``, whose terms reach ``4r²``: the root divides that rounding by ``2D``
    (D at least the smallest distance between distinct rows), and ``(a - b)/D`` carries ``δD/D``."""
    x = np.asarray(x, np.float64)
    y = x if ref_rows is None else np.asarray(ref_rows, np.float64)
    if normalize or distance == "cosine":
        x, y = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in (x, y))
    r2 = float(max(np.max(np.sum(x * x, axis=1)), np.max(np.sum(y * y, axis=1))))
    if distance != "euclidean":
        return r2, 1.0, math.sqrt(r2)
    dist = np.sqrt(np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1))
    d_min = float(np.min(dist[dist > 0]))
    return max(2.0 * math.sqrt(r2), 2.0 * r2 / d_min), 2.0 * r2 / d_min**2, math.sqrt(r2)


_J = 3.0 + math.log(2 * B)  # the lifted structure loss's J = log Σ exp(m⁻ - d) + d_ap - m⁺, at most
# Per case: (G, T, c): G = Σ|∂L/∂M| over the matrix entries M (how far their round-off moves the
# loss), T(r) the largest term the loss sums (rows of norm ≤ r), c the relative change of its
# softmax / hinge weights per unit change of M (how much a gradient's weights round).
SENSITIVITY: dict[str, tuple[float, Callable[[float], float], float]] = {
    "contrastive": (2.0, lambda r: 2 * r, 1.0),  # relu(d - 0), relu(1 - d)
    "triplet": (2.0, lambda r: 2 * r + 0.2, 1.0),  # relu(d_ap - d_an + m)
    "triplet_swap_smooth_cosine": (2.0, lambda r: 2 * r * r + 0.1 + math.log(2), 1.0),  # softplus
    # (1/α) log(1 + Σ exp(-α(s - λ))) + (1/β) log(1 + Σ exp(β(s - λ))), α = 2, β = 50, λ = 0.5
    "multi_similarity": (2.0, lambda r: r * r + 0.5 + math.log(B) / 2, 50.0),
    "ntxent": (2 / 0.07, lambda r: 2 * r * r / 0.07 + math.log(B), 2 / 0.07),  # softmax of s / τ
    "lifted": (2 * _J, lambda r: _J**2 / 2, 4.0),  # relu(J)² / 2
    "generalized_lifted": (2.0, lambda r: 2 * r + 1 + 2 * math.log(B), 2.0),
    # softplus(LSE γ a_n (s_n - Δ_n) + LSE -γ a_p (s_p - Δ_p)), a = relu(O - s): slopes ≤ 4γ in s
    "circle": (8 * 80.0, lambda r: 80.0 * 2.4 * 1.6 + 2 * math.log(B), 4 * 80.0),
    "margin": (2.0, lambda r: 2 * r + 1.2 + 0.2, 1.0),  # relu(d_ap - β + m), relu(β - d_an + m)
    "margin_learn": (2.0, lambda r: 2 * r + 1.1 + 0.3 + 0.3 * 1.1, 1.0),  # + ν·β
    "margin_per_class_dot": (2.0, lambda r: r * r + 0.3 + 0.2 + 0.2 * 0.3, 1.0),
    "contrastive_cosine": (2.0, lambda r: r * r + 0.8, 1.0),
    "triplet_cosine": (2.0, lambda r: 2 * r * r + 0.3, 1.0),
    "triplet_swap": (2.0, lambda r: 2 * r + 0.3, 1.0),
    "triplet_smooth_raw": (2.0, lambda r: 2 * r + 0.05 + math.log(2), 1.0),
    "multi_similarity_euclidean": (2.0, lambda r: 2 * r + 1.2 + math.log(B) / 3, 20.0),
    "ntxent_warm": (4.0, lambda r: 4 * r * r + math.log(B), 4.0),
}


def _scales(case: Case, x, ref_rows=None) -> tuple[float, float]:
    """``(value scale, gradient factor)``: ``G·μ + T`` and ``c·μ + g`` (see SENSITIVITY)."""
    distance = case.kwargs.get("distance", "euclidean")
    mu, g, r = matrix_scales(x, distance, case.kwargs.get("normalize_embeddings", True), ref_rows)
    lipschitz, terms, weights = SENSITIVITY[case.name]
    return lipschitz * mu + terms(r), weights * mu + g


def _n_terms(case: Case, batch: int = B, others: int | None = None) -> int:
    """Pairs of ``batch`` anchors and ``others`` rows (the batch itself by default), a D-term
    distance each: the float32 sums run over pairs, triplets entering as exact integer counts,
    except with ``swap`` or ``smooth_loss`` (a float pass over every triplet)."""
    others = batch if others is None else others
    per_triplet = case.kwargs.get("swap", False) or case.kwargs.get("smooth_loss", False)
    return batch * others * (others if per_triplet else 1) * D


def _assert_value_close(case: Case, got, want, x, err_msg: str = "") -> None:
    assert_close(got, want, n_terms=_n_terms(case), scale=_scales(case, x)[0], eps=EPS32, err_msg=err_msg)


def _assert_grad_close(case: Case, got, want, x, err_msg: str = "") -> None:
    """A gradient: round-off of its largest entry, times the loss's gradient factor."""
    scale = _scales(case, x)[1] * float(np.max(np.abs(np.asarray(want))))
    assert_close(got, want, n_terms=_n_terms(case), scale=scale, eps=EPS32, err_msg=err_msg)


all_cases = pytest.mark.parametrize(
    "case",
    [*CASES, *(pytest.param(case, marks=EXHAUSTIVE) for case in EXTRA_CASES)],
    ids=[case.name for case in CASES + EXTRA_CASES],
)


# The tests compile at XLA's backend optimisation level 0: about half the compile time, the same
# float32 operations (the values are compared with tolerances; bit-for-bit comparisons are
# between two calls of one compiled function).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit(fn: Callable, **kwargs) -> Callable:
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


# The default run evaluates the cases in three compiled programs, one per kind of mined argument
# (shared subexpressions such as the normalisation are compiled once): every case without mined
# tuples; some with pair masks; some with a triplet mask (see MINED).
GROUPS = {
    "none": tuple(case.name for case in CASES),
    "pairs": ("triplet", "multi_similarity"),
    "triplets": ("triplet", "contrastive", "lifted", "margin"),
}


def _kind(mined) -> str:
    if not mined:
        return "none"
    return "triplets" if "triplet_mask" in mined else "pairs"


@functools.cache
def _group_program(group: str):
    def run(x, labels, mask, betas, mined):
        return {
            name: jax.value_and_grad(CASES_BY_NAME[name], argnums=(0, 2))(x, labels, betas[name], mask, mined)
            for name in GROUPS[group]
        }

    return _jit(run)


@functools.cache
def _case_program(name: str):
    """A case outside the groups (exhaustive variants, bf16 inputs): its own compilation."""
    return _jit(jax.value_and_grad(CASES_BY_NAME[name], argnums=(0, 2)))


_RESULTS: dict[tuple, Any] = {}


def _value_and_grad(case: Case, x, labels, mask=None, mined=None, beta=None):
    """``(value, (grad_x, grad_beta))`` of one case, jitted; from the case's group program when it
    has one (results memoised per input, so the parametrised tests share the evaluations)."""
    if mask is None:
        mask = np.ones(np.shape(labels)[0], dtype=bool)
    beta = case.beta_array() if beta is None else np.asarray(beta, np.float32)
    mined = jax.tree_util.tree_map(np.asarray, dict(mined or {}))
    group = _kind(mined)
    args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(mask))
    if case.name not in GROUPS[group] or args[0].dtype != jnp.float32 or np.shape(labels)[0] != B:
        return _case_program(case.name)(args[0], args[1], jnp.asarray(beta), args[2], mined)
    betas = {name: CASES_BY_NAME[name].beta_array() for name in GROUPS[group]}
    betas[case.name] = beta
    leaves, structure = jax.tree_util.tree_flatten(mined)  # a WindowedTriplets or a dense mask
    key = (group, str(structure), *(np.asarray(v).tobytes() for v in (x, labels, mask, *betas.values(), *leaves)))
    if key not in _RESULTS:
        _RESULTS.clear()  # one batch at a time is enough to share
        _RESULTS[key] = _group_program(group)(*args, betas, mined)
    return _RESULTS[key][case.name]


def _value(case: Case, x, labels, mask=None, mined=None) -> float:
    return float(_value_and_grad(case, x, labels, mask, mined)[0])


# --------------------------------------------------------------------------------------------
# Miners: (jax miner, reference miner, kind of output)
# --------------------------------------------------------------------------------------------

MINERS: dict[str, tuple[Callable, Callable]] = {
    "batch_hard": (batch_hard_miner, ref.batch_hard_miner_ref),
    "semihard": (
        semi_hard_miner,
        functools.partial(ref.triplet_margin_miner_ref, type_of_triplets="semihard"),
    ),
    "multi_similarity": (multi_similarity_miner, ref.multi_similarity_miner_ref),
}


@functools.cache
def _jitted_miner(name: str):
    return _jit(MINERS[name][0])


# The default miners' outputs among _all_miners' (one compilation for every miner variant).
MINER_KEYS = {
    "batch_hard": "bh_euclidean",
    "semihard": "tmm_semihard_euclidean",
    "multi_similarity": "ms_cosine",
}


def _mine(name: str, x, labels, mask=None):
    """(jax masks as numpy, reference index lists)."""
    full = np.ones(B, bool) if mask is None else mask
    mined = _all_miners(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(full))[MINER_KEYS[name]]
    indices = MINERS[name][1](x, labels, mask=mask)
    return jax.tree_util.tree_map(np.asarray, mined), indices


def _dense_triplets(mined: dict[str, Any]) -> np.ndarray:
    """The (B, B, B) bool mask of a miner's output (dense, windowed or pairs)."""
    if "triplet_mask" not in mined:
        return np.asarray(triplets_from_pairs(**mined))
    t = mined["triplet_mask"]
    return np.asarray(t.dense() if isinstance(t, WindowedTriplets) else t)


def _triplet_set(mined: dict[str, Any]) -> set[tuple[int, int, int]]:
    return {tuple(int(i) for i in idx) for idx in zip(*np.nonzero(_dense_triplets(mined)), strict=True)}


def _pair_sets(mined: dict[str, np.ndarray]) -> tuple[set, set]:
    pos = {(int(a), int(p)) for a, p in zip(*np.nonzero(mined["pos_mask"]), strict=True)}
    neg = {(int(a), int(n)) for a, n in zip(*np.nonzero(mined["neg_mask"]), strict=True)}
    return pos, neg


# --------------------------------------------------------------------------------------------
# 1. Values against the references
# --------------------------------------------------------------------------------------------


@all_cases
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(case: Case, masked: bool):
    x, labels = _batch(1 + masked)
    mask = _mask(3) if masked else None
    want = case.ref(x, labels, mask=mask)
    assert want > 0.0  # not trivially 0
    value = _value_and_grad(case, x, labels, mask)[0]
    assert value.dtype == jnp.float32
    _assert_value_close(case, float(value), want, x)


def test_triplet_margins_match_reference_with_a_traced_margin():
    # The sorted-count path for several margins, PML's default 0.05 and 0 included; the margin is
    # a traced argument (one compilation), which the hyperparameter checks let through.
    loss = _jit(lambda x, y, m, margin: triplet_margin_loss(x, y, margin=margin, mask=m))
    case = CASES_BY_NAME["triplet"]
    for seed in (4, 5):
        x, labels = _batch(seed)
        mask = _mask(seed)
        for margin in (0.0, 0.05, 0.7):
            want = ref.triplet_margin_ref(x, labels, margin=margin, mask=mask)
            scale = _scales(case, x)[0] + margin  # (the case's own margin is 0.2, the terms' bound)
            got = float(loss(x, labels, mask, margin))
            assert_close(got, want, n_terms=_n_terms(case), scale=scale, eps=EPS32)


# --------------------------------------------------------------------------------------------
# 2. Gradients: float32 jax.grad against float64 central differences of the reference
# --------------------------------------------------------------------------------------------


# Central differences over the coordinates of these rows of x (and every beta entry): a third of
# the batch, enough to see every kind of row (anchor, positive, negative), at a third of the cost.
FD_ROWS = (0, 3, 6, 9)


def _numeric_grad(fn: Callable[..., float], arrays: list[np.ndarray], h: float = 1e-6) -> list[np.ndarray]:
    """Central differences in float64: of ``arrays[0]``'s ``FD_ROWS`` rows, of all of the others."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    grads = []
    for k, array in enumerate(arrays):
        grad = np.full_like(array, np.nan)
        for idx in np.ndindex(array.shape):
            if k == 0 and idx[0] not in FD_ROWS:
                continue
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[k][idx] += h
            minus[k][idx] -= h
            grad[idx] = (fn(*plus) - fn(*minus)) / (2.0 * h)
        grads.append(grad)
    return grads


def _check_grads(case: Case, x, labels, mask, mined=None, indices=None, masked_row: int | None = None):
    extra = {"detach_x": np.asarray(x, np.float64)} if case.name.startswith("circle") else {}
    learn = case.beta is not None and case.kwargs.get("learn_beta", False)
    arrays = [x, case.beta_array()] if learn else [x]

    def reference(x_, beta_=None):
        return case.ref(x_, labels, beta=beta_, mask=mask, indices=indices, **extra)

    want = _numeric_grad(reference, arrays)
    want[0] = want[0][list(FD_ROWS)]
    _, (grad_x, grad_beta) = _value_and_grad(case, x, labels, mask, mined)
    got = (
        [np.asarray(grad_x)[list(FD_ROWS)], np.asarray(grad_beta)]
        if learn
        else [np.asarray(grad_x)[list(FD_ROWS)]]
    )
    # The float64 central differences are off by ~ε64·|L|/h + h²·|L‴|, far below float32's round-off.
    for g, w in zip(got, want, strict=True):
        assert np.max(np.abs(w)) > 1e-3  # a real gradient
        _assert_grad_close(case, g, w, x)
    if masked_row is not None:
        assert np.all(np.asarray(grad_x)[masked_row] == 0.0)
    if case.beta is not None and not learn:
        assert np.all(np.asarray(grad_beta) == 0.0)  # learn_beta=False: beta is a constant


@all_cases
def test_grad_matches_finite_differences_of_reference(case: Case):
    x, labels = _batch(11)
    mask = np.ones(B, dtype=bool)
    mask[5] = False
    _check_grads(case, x, labels, mask, masked_row=5)


# --------------------------------------------------------------------------------------------
# 3. Mined tuples: loss(x, y, **miner(x, y)) == PML's loss(x, y, miner(x, y))
# --------------------------------------------------------------------------------------------

# (loss, miner) in the default run: one compilation per (loss, kind of mined output), each kind of
# path once: triplets from pairs (sorted counts) and explicit (B³ counts), pair weights from
# triplets (AvgNonZero and weighted logsumexp), boolean pair masks, triplet weights (margin).
MINED = [
    ("triplet", "batch_hard"),
    ("triplet", "multi_similarity"),
    ("triplet", "semihard"),
    ("contrastive", "semihard"),
    ("lifted", "semihard"),
    ("multi_similarity", "multi_similarity"),
    ("margin", "semihard"),
]
MINED_EXTRA = [
    ("contrastive", "batch_hard"),
    ("ntxent", "semihard"),
    ("ntxent", "multi_similarity"),
    ("lifted", "multi_similarity"),
    ("generalized_lifted", "batch_hard"),
    ("circle", "multi_similarity"),
    ("circle", "semihard"),
    ("margin_learn", "multi_similarity"),
    ("margin_per_class_dot", "batch_hard"),
]
mined_cases = pytest.mark.parametrize(
    ("name", "miner"),
    [*MINED, *(pytest.param(*pair, marks=EXHAUSTIVE) for pair in MINED_EXTRA)],
    ids=[f"{n}+{m}" for n, m in MINED + MINED_EXTRA],
)


@mined_cases
def test_mined_matches_reference(name: str, miner: str):
    case = CASES_BY_NAME[name]
    x, labels = _batch(21)
    mask = _mask(22)
    mined, indices = _mine(miner, x, labels, mask)
    want = case.ref(x, labels, mask=mask, indices=indices)
    assert want > 0.0
    _assert_value_close(case, _value(case, x, labels, mask, mined), want, x)


@mined_cases
def test_mined_grad_matches_finite_differences(name: str, miner: str):
    case = CASES_BY_NAME[name]
    x, labels = _batch(23)
    mask = np.ones(B, dtype=bool)
    mask[7] = False
    mined, indices = _mine(miner, x, labels, mask)
    _check_grads(case, x, labels, mask, mined, indices, masked_row=7)


@pytest.mark.parametrize(
    "name",
    [
        "triplet",
        *(pytest.param(n, marks=EXHAUSTIVE) for n in ("contrastive", "ntxent", "lifted", "margin", "circle")),
    ],
)
def test_batch_hard_pairs_equal_its_triplet_mask(name: str):
    """The pair form of batch_hard_miner is PML's (a, p*, n*) triplets for every loss."""
    case = CASES_BY_NAME[name]
    x, labels = _batch(24)
    mined, _ = _mine("batch_hard", x, labels)
    as_triplets = {"triplet_mask": np.asarray(triplets_from_pairs(**mined))}
    # Two programs (pair masks, a triplet mask).
    want = _value(case, x, labels, None, as_triplets)
    _assert_value_close(case, _value(case, x, labels, None, mined), want, x)


# --------------------------------------------------------------------------------------------
# 4. Miners against the reference miners (all variants in one compilation)
# --------------------------------------------------------------------------------------------

BH_RANGES = {"allowed_pos_range": (0.0, 1.3), "allowed_neg_range": (1.0, 2.0)}
TRIPLET_MINERS = [
    (t, d, m) for t in ("all", "hard", "semihard", "easy") for d, m in (("euclidean", 0.2), ("cosine", 0.3))
]


def _dense_triplet_margin_miner(x, labels, mask, margin, type_of_triplets, distance):
    """The dense (B, B, B) mask exactly as triplet_margin_miner computed it before it returned
    WindowedTriplets (its code then, verbatim but for the names)."""
    xp, labels, mask = pc.prepare(x, labels, mask)
    pos, neg = pc.resolve_mined(labels, mask, None, None, None, "test")[:2]
    mat, inverted = pc.distance_matrix(xp, distance, True)
    u = pc.as_distance(jax.lax.stop_gradient(mat), inverted)
    triplet_margin = u[:, None, :] - u[:, :, None]
    if type_of_triplets == "easy":
        selected = triplet_margin > margin
    else:
        selected = triplet_margin <= margin
        if type_of_triplets == "hard":
            selected = selected & (triplet_margin <= 0)
        elif type_of_triplets == "semihard":
            selected = selected & (triplet_margin > 0)
    return pos[:, :, None] & neg[:, None, :] & selected


@_jit
def _all_miners(x, labels, mask):
    return {
        **{
            f"dense_{t}_{d}": _dense_triplet_margin_miner(x, labels, mask, m, t, d)
            for t, d, m in TRIPLET_MINERS
        },
        "bh_euclidean": batch_hard_miner(x, labels, mask=mask),
        "bh_cosine": batch_hard_miner(x, labels, distance="cosine", mask=mask),
        "bh_ranges": batch_hard_miner(x, labels, mask=mask, **BH_RANGES),
        "ms_cosine": multi_similarity_miner(x, labels, mask=mask),
        "semihard": semi_hard_miner(x, labels, mask=mask),
        "ms_euclidean": multi_similarity_miner(x, labels, distance="euclidean", epsilon=0.2, mask=mask),
        **{
            f"tmm_{t}_{d}": triplet_margin_miner(
                x, labels, margin=m, type_of_triplets=t, distance=d, mask=mask
            )
            for t, d, m in TRIPLET_MINERS
        },
    }


@pytest.fixture(scope="module", params=[False, True], ids=["unmasked", "masked"])
def mined_variants(request):
    x, labels = _batch(31)
    mask = _mask(32) if request.param else np.ones(B, bool)
    got = jax.tree_util.tree_map(np.asarray, _all_miners(x, labels, mask))
    return x, labels, (mask if request.param else None), got


def test_batch_hard_miner_matches_reference(mined_variants):
    x, labels, mask, got = mined_variants
    for distance in ("euclidean", "cosine"):
        a, p, n = ref.batch_hard_miner_ref(x, labels, distance=distance, mask=mask)
        assert len(a) > 0
        assert _triplet_set(got[f"bh_{distance}"]) == set(zip(a, p, n, strict=True))
        # One positive and one negative per kept anchor, nothing elsewhere.
        kept = np.isin(np.arange(B), a).astype(int)
        assert np.array_equal(got[f"bh_{distance}"]["pos_mask"].sum(axis=1), kept)
        assert np.array_equal(got[f"bh_{distance}"]["neg_mask"].sum(axis=1), kept)
    want = set(zip(*ref.batch_hard_miner_ref(x, labels, mask=mask, **BH_RANGES), strict=True))
    assert want and _triplet_set(got["bh_ranges"]) == want
    assert want != _triplet_set(got["bh_euclidean"])  # the ranges matter


def test_triplet_margin_miner_matches_reference(mined_variants):
    x, labels, mask, got = mined_variants
    for t, d, m in TRIPLET_MINERS:
        want = ref.triplet_margin_miner_ref(x, labels, margin=m, type_of_triplets=t, distance=d, mask=mask)
        assert len(want[0]) > 0, (t, d)
        assert _triplet_set(got[f"tmm_{t}_{d}"]) == set(zip(*want, strict=True)), (t, d)
        # WindowedTriplets.dense() is bit for bit the dense mask the miner used to return.
        assert isinstance(got[f"tmm_{t}_{d}"]["triplet_mask"], WindowedTriplets)
        assert np.array_equal(_dense_triplets(got[f"tmm_{t}_{d}"]), got[f"dense_{t}_{d}"]), (t, d)
    # semi_hard_miner is TripletMarginMiner(type_of_triplets="semihard") with its defaults.
    semihard, tmm = got["semihard"]["triplet_mask"], got["tmm_semihard_euclidean"]["triplet_mask"]
    for a, b in zip(jax.tree_util.tree_leaves(semihard), jax.tree_util.tree_leaves(tmm), strict=True):
        assert np.array_equal(a, b)


def test_multi_similarity_miner_matches_reference(mined_variants):
    x, labels, mask, got = mined_variants
    for distance, epsilon in (("cosine", 0.1), ("euclidean", 0.2)):
        a1, p, a2, n = ref.multi_similarity_miner_ref(
            x, labels, distance=distance, epsilon=epsilon, mask=mask
        )
        want = (set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True)))
        assert want[0] and want[1]
        assert _pair_sets(got[f"ms_{distance}"]) == want
        a1_all, _, a2_all, _ = ref.all_pairs(labels, mask)
        assert len(want[0]) + len(want[1]) < len(a1_all) + len(a2_all)  # it did select


# --------------------------------------------------------------------------------------------
# 4b. The triplet miners' WindowedTriplets against their dense form, for every loss kind
# --------------------------------------------------------------------------------------------

# (loss, kwargs) given both forms. "triplet" has the miner's distance (the O(B² log B) path);
# "triplet_cosine" another one (hinge and window then disagree: the run-time fallback); margin
# counts the triplets per pair; contrastive (AvgNonZero) and multi-similarity (weighted
# logsumexp) take PML's convert_to_pairs multiplicities. The miner and the losses use raw dot
# products, so that integer rows put μ exactly on the bounds (0, the miner's margin 1 and the
# loss's hinge at 3).
WINDOW_MARGIN, HINGE = 1.0, 3.0
WINDOW_LOSSES = {
    "triplet": (triplet_margin_loss, {"margin": HINGE}),
    "triplet_cosine": (
        triplet_margin_loss,
        {"margin": 0.5, "distance": "cosine", "normalize_embeddings": True},
    ),
    "margin": (margin_loss, {"beta": 0.5}),
    "contrastive": (contrastive_loss, {}),
    "multi_similarity": (multi_similarity_loss, {}),
}
# Which losses run with which window: the triplet margin loss (the window narrowed by its hinge)
# with every one, the others (pair counts, exact for every type below) with some.
WINDOW_CASES = (
    *(("triplet", t) for t in TRIPLET_TYPES),
    ("triplet_cosine", "semihard"),
    ("margin", "easy"),
    ("contrastive", "hard"),
    ("multi_similarity", "all"),
)


# WINDOW_LOSSES' (G, T(r), c) as in SENSITIVITY: raw dot products (r² up to D for rows in {-1, 0, 1}).
WINDOW_SENSITIVITY: dict[str, tuple[float, Callable[[float], float], float]] = {
    "triplet": (2.0, lambda r: 2 * r * r + HINGE, 1.0),
    "triplet_cosine": (2.0, lambda r: 2.0 + 0.5, 1.0),
    "margin": (2.0, lambda r: 2 * r * r + 0.5 + 0.2, 1.0),
    "contrastive": (2.0, lambda r: r * r + 1.0, 1.0),
    "multi_similarity": (2.0, lambda r: r * r + 0.5 + math.log(B) / 2, 50.0),
}


def _window_scales(name: str, x) -> tuple[float, float]:
    distance = WINDOW_LOSSES[name][1].get("distance", "dot")
    mu, g, r = matrix_scales(x, distance, distance == "cosine")
    lipschitz, terms, weights = WINDOW_SENSITIVITY[name]
    return lipschitz * mu + terms(r), weights * mu + g


@_jit
def _windowed_and_dense(x, labels, mask):
    """Per triplet type: the miner's WindowedTriplets' pair counts (with and without the hinge
    ``μ < HINGE``) and its dense()'s; the WINDOW_CASES' values and gradients for both forms."""
    kwargs = {"distance": "dot", "normalize_embeddings": False}
    out, mined = {}, {}
    for t in TRIPLET_TYPES:
        windowed = triplet_margin_miner(
            x, labels, margin=WINDOW_MARGIN, type_of_triplets=t, mask=mask, **kwargs
        )["triplet_mask"]
        dense = windowed.dense()
        mined[t] = {"windowed": windowed, "dense": dense}
        mu = windowed.dist[:, None, :] - windowed.dist[:, :, None]
        hinged = dense & (mu < HINGE)
        out[t, "counts"] = (windowed.counts(), windowed.counts(below=HINGE))
        out[t, "dense_counts"] = tuple((jnp.sum(d, axis=2), jnp.sum(d, axis=1)) for d in (dense, hinged))
        out[t, "num"] = jnp.sum(hinged)
    for name, t in WINDOW_CASES:
        loss, extra = WINDOW_LOSSES[name]
        for form, triplets in mined[t].items():
            out[t, form, name] = jax.value_and_grad(
                lambda a, f=loss, m=triplets, kw={**kwargs, **extra}: f(
                    a, labels, mask=mask, triplet_mask=m, **kw
                )
            )(x)
    return out


@pytest.mark.parametrize("data", ["normal", "ties"])
def test_windowed_triplets_equal_their_dense_form(data: str):
    x, labels = _batch(41)
    if data == "ties":  # rows in {-1, 0, 1}: integer dot products, μ exactly on the bounds, often
        x = np.random.default_rng(42).integers(-1, 2, size=(B, D)).astype(np.float32)
    mask = _mask(43)
    out = jax.tree_util.tree_map(np.asarray, _windowed_and_dense(x, labels, mask))
    for t in TRIPLET_TYPES:
        # The counts per (a, p) and per (a, n) are exact, on the bounds too.
        for got, want in zip(out[t, "counts"], out[t, "dense_counts"], strict=True):
            np.testing.assert_array_equal(got[0], want[0], err_msg=t)
            np.testing.assert_array_equal(got[1], want[1], err_msg=t)
        assert out[t, "num"] > 0, t  # some mined triplet violates the margin: nonzero losses
    for name, t in WINDOW_CASES:
        (value, grad), (want_value, want_grad) = out[t, "windowed", name], out[t, "dense", name]
        assert value != 0.0 and np.isfinite(value), (t, name)
        # The same matrix, weighted by exact counts or summed over the dense mask: two orders.
        value_scale, grad_factor = _window_scales(name, x)
        n_terms = B * B * D
        msg = f"{t}, {name}"
        assert_close(value, want_value, n_terms=n_terms, scale=value_scale, eps=EPS32, err_msg=msg)
        scale = grad_factor * float(np.max(np.abs(want_grad)))
        assert_close(grad, want_grad, n_terms=n_terms, scale=scale, eps=EPS32, err_msg=msg)
    if data == "ties":  # the bounds were hit: valid triplets with μ exactly 0, 1 and 3
        rows = np.where(mask[:, None], x, 0.0)
        dist = -(rows @ rows.T)
        mu = dist[:, None, :] - dist[:, :, None]
        same = labels[:, None] == labels[None, :]
        valid = (same & ~np.eye(B, dtype=bool))[:, :, None] & ~same[:, None, :]
        valid &= mask[:, None, None] & mask[None, :, None] & mask[None, None, :]
        assert all(np.any(valid & (mu == bound)) for bound in (0.0, WINDOW_MARGIN, HINGE))


# --------------------------------------------------------------------------------------------
# 5. Edge cases: nothing to average is exactly 0, never NaN; masked rows change nothing
# --------------------------------------------------------------------------------------------


def _assert_zero_tree(tree) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.array_equal(np.asarray(leaf), np.zeros_like(np.asarray(leaf))), leaf


def _assert_finite_tree(tree) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


@all_cases
def test_all_rows_masked_is_exactly_zero(case: Case):
    x, labels = _batch(51)
    value, grads = _value_and_grad(case, x, labels, np.zeros(B, dtype=bool))
    assert float(value) == 0.0
    _assert_zero_tree(grads)


# All labels distinct needs more classes than a per-class beta has: that case is left out.
NO_PAIR_CASES = [
    pytest.param(case, kind, marks=marks, id=f"{case.name}-{kind}")
    for cases, marks in ((CASES, ()), (EXTRA_CASES, EXHAUSTIVE))
    for case in cases
    for kind in ("one_class", "all_distinct")
    if kind == "one_class" or np.ndim(case.beta) == 0
]


@pytest.mark.parametrize(("case", "labels_kind"), NO_PAIR_CASES)
def test_no_negative_or_no_positive_pair_matches_reference(case: Case, labels_kind: str):
    x, _ = _batch(52)
    labels = np.zeros(B, np.int32) if labels_kind == "one_class" else np.arange(B, dtype=np.int32) * 7 - 3
    value, grads = _value_and_grad(case, x, labels)
    _assert_finite_tree((value, grads))
    want = case.ref(x, labels)
    if want == 0.0:
        assert float(value) == 0.0
    else:
        _assert_value_close(case, float(value), want, x)


# The (loss, kind of mined output) pairs that the default run compiles anyway: the semi-hard
# miner's WindowedTriplets, dense triplet masks (test_single_mined_triplet_follows_pml), pairs.
MINED_KINDS = sorted(
    {(n, kind) for n, m in MINED for kind in (("windowed", "triplets") if m == "semihard" else ("pairs",))}
)


@pytest.mark.parametrize(("name", "kind"), MINED_KINDS, ids=[f"{n}-{k}" for n, k in MINED_KINDS])
def test_empty_mined_tuples_are_exactly_zero(name: str, kind: str):
    case = CASES_BY_NAME[name]
    x, labels = _batch(53)
    empty = np.zeros((B, B), bool)
    if kind == "pairs":
        mined = {"pos_mask": empty, "neg_mask": empty}
    elif kind == "windowed":
        # Pairs but no window, and a window but no pairs.
        zero = np.float32(0.0)
        mined = _all_miners(jnp.asarray(x), jnp.asarray(labels), jnp.ones(B, bool))["semihard"]
        mined = {"triplet_mask": mined["triplet_mask"]._replace(lo=zero, hi=zero)}
        value, grads = _value_and_grad(case, x, labels, None, mined)
        assert float(value) == 0.0
        _assert_zero_tree(grads)
        mined = {"triplet_mask": WindowedTriplets(np.zeros((B, B), np.float32), empty, empty, zero, zero)}
    else:
        mined = {"triplet_mask": np.zeros((B, B, B), bool)}
    value, grads = _value_and_grad(case, x, labels, None, mined)
    assert float(value) == 0.0
    _assert_zero_tree(grads)


def test_single_mined_triplet_follows_pml():
    """PML's GenericPairLoss returns 0 when each index list has ≤ 1 entry (one triplet); the
    triplet losses do not have that rule."""
    x, labels = _batch(54)
    a = 0
    p = int(np.flatnonzero((labels == labels[a]) & (np.arange(B) != a))[0])
    n = int(np.flatnonzero(labels != labels[a])[0])
    t = np.zeros((B, B, B), bool)
    t[a, p, n] = True
    x[n] = x[a] + 0.01 * x[n]  # the negative right next to the anchor: the triplet violates any margin
    indices = ([a], [p], [n])
    for name, pair_loss in (("contrastive", True), ("lifted", True), ("triplet", False), ("margin", False)):
        case = CASES_BY_NAME[name]
        want = case.ref(x, labels, indices=indices)
        assert (want == 0.0) == pair_loss, name
        value = _value(case, x, labels, None, {"triplet_mask": t})
        if pair_loss:
            assert value == 0.0, name  # PML's rule: an exact 0
        else:
            _assert_value_close(case, value, want, x, err_msg=name)


GARBAGE = {
    "nan": lambda width: np.full(width, np.nan, np.float32),
    "inf": lambda width: np.array([np.inf, -np.inf] * width, np.float32)[:width],
    "huge": lambda width: np.full(width, 3e38, np.float32),
}


@all_cases
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_masked_garbage_row_changes_nothing(case: Case, garbage: str):
    x, labels = _batch(55)
    mask = np.ones(B, dtype=bool)
    mask[4] = False
    bad = x.copy()
    bad[4] = GARBAGE[garbage](D)
    clean_value, (clean_gx, clean_gb) = _value_and_grad(case, x, labels, mask)
    value, (gx, gb) = _value_and_grad(case, bad, labels, mask)
    assert float(value) == float(clean_value) and np.isfinite(float(value))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(clean_gx))
    np.testing.assert_array_equal(np.asarray(gb), np.asarray(clean_gb))
    assert np.all(np.asarray(gx)[4] == 0.0)


@all_cases
@pytest.mark.parametrize("where", ["nan", "inf"])
def test_non_finite_unmasked_row_gives_nan(case: Case, where: str):
    x, labels = _batch(56)
    x[3, 2] = np.nan if where == "nan" else np.inf
    assert np.isnan(_value(case, x, labels))


def test_duplicate_and_zero_norm_rows():
    x, labels = _batch(57)
    x[3] = x[1]  # an exact duplicate with the same label: distance exactly 0, as in PML
    labels[3] = labels[1]
    x[6] = x[5]  # and one with another label
    labels[6] = (labels[5] + 1) % C
    for case in CASES:
        value, grads = _value_and_grad(case, x, labels)
        _assert_finite_tree((value, grads))
        # Duplicates are at distance exactly 0 (norms read off the Gram diagonal): matrix_scales
        # leaves them out of the smallest distance.
        _assert_value_close(case, float(value), case.ref(x, labels), x, err_msg=case.name)
    # A zero row (normalised to 0, at distance exactly 1 from every row: on the kink of several
    # default hinges, so only finiteness is checked).
    x[0] = 0.0
    for case in CASES:
        _assert_finite_tree(_value_and_grad(case, x, labels))


@EXHAUSTIVE
def test_empty_batch_gives_zero():
    x, labels = np.zeros((0, D), np.float32), np.zeros((0,), np.int32)
    for loss in (
        contrastive_loss,
        triplet_margin_loss,
        multi_similarity_loss,
        ntxent_loss,
        circle_loss,
        margin_loss,
    ):
        assert float(loss(x, labels)) == 0.0
    assert float(triplet_margin_loss(x, labels, **batch_hard_miner(x, labels))) == 0.0


# --------------------------------------------------------------------------------------------
# 6. jit / vmap / dtypes
# --------------------------------------------------------------------------------------------


@EXHAUSTIVE
@pytest.mark.parametrize("name", ["triplet", "contrastive"])
def test_jit_equals_eager(name: str):
    case = CASES_BY_NAME[name]
    x, labels = _batch(61)
    mask = _mask(62)
    mined = jax.tree_util.tree_map(jnp.asarray, _mine("semihard", x, labels, mask)[0])
    eager = case(x, labels, None, mask, mined)
    # Eager runs op by op, jit fuses them (another summation order): the loss's round-off.
    _assert_value_close(case, float(eager), _value(case, x, labels, mask, mined), x)
    # mask=None: every row counts.
    _assert_value_close(case, float(case(x, labels, None, None, {})), _value(case, x, labels), x)


def test_vmap_over_batches_equals_loop():
    xs = np.stack([_batch(s)[0] for s in (63, 64, 65)])
    ys = np.stack([_batch(s)[1] for s in (63, 64, 65)])

    @_jit
    def batched(x_, y_):
        def one(a, b):
            semihard = semi_hard_miner(a, b)
            losses = (
                triplet_margin_loss(a, b, margin=0.2),
                triplet_margin_loss(a, b, margin=0.2, **batch_hard_miner(a, b)),
                contrastive_loss(a, b, **semihard),
            )
            return losses, semihard["triplet_mask"].dense()

        return jax.vmap(one)(x_, y_)

    losses, semihard = batched(xs, ys)
    for k in range(3):
        x, y = xs[k], ys[k]
        want = (
            ref.triplet_margin_ref(x, y, margin=0.2),
            ref.triplet_margin_ref(x, y, margin=0.2, indices=ref.batch_hard_miner_ref(x, y)),
            ref.contrastive_ref(
                x, y, indices=ref.triplet_margin_miner_ref(x, y, type_of_triplets="semihard")
            ),
        )
        for name, got, expected in zip(("triplet", "triplet", "contrastive"), losses, want, strict=True):
            _assert_value_close(CASES_BY_NAME[name], float(got[k]), expected, x, err_msg=f"{name}, batch {k}")
        assert _triplet_set({"triplet_mask": np.asarray(semihard[k])}) == set(
            zip(*ref.triplet_margin_miner_ref(x, y, type_of_triplets="semihard"), strict=True)
        )


@pytest.mark.parametrize(
    "name", ["triplet", *(pytest.param(n, marks=EXHAUSTIVE) for n in ("multi_similarity", "margin_learn"))]
)
def test_bf16_inputs_give_float32(name: str):
    case = CASES_BY_NAME[name]
    x, labels = _batch(66)
    x16 = jnp.asarray(x, jnp.bfloat16)
    value, (grad, _) = _value_and_grad(case, x16, labels)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    rounded = np.asarray(x16, np.float32)
    _assert_value_close(case, float(value), case.ref(rounded, labels), rounded)


def test_result_is_float32_under_x64():
    x, labels = _batch(67)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        for case in (CASES_BY_NAME["triplet"], CASES_BY_NAME["margin_learn"]):
            out = jax.eval_shape(lambda a, c=case: c(a, jnp.asarray(labels), jnp.float64(1.0), None, {}), x64)
            assert out.dtype == jnp.float32


def test_margin_loss_beta_forms():
    x, labels = _batch(68)
    kwargs = {"learn_beta": True, "nu": 0.3}

    @_jit
    def forms(x_, y_):
        return (
            # num_classes with a scalar beta is one beta per class (PML): the per-class regulariser.
            margin_loss(x_, y_, 1.1, num_classes=C, **kwargs),
            margin_loss(x_, y_, init_margin_beta(1.1, C), **kwargs),
            # A (1,) beta is a scalar beta.
            margin_loss(x_, y_, jnp.array([1.1]), **kwargs),
            margin_loss(x_, y_, 1.1, **kwargs),
        )

    broadcast, explicit, one, scalar = (float(v) for v in forms(x, labels))
    case = CASES_BY_NAME["margin_learn"]  # its terms: β = 1.1, ν = 0.3 (the margin 0.3 bounds 0.2)
    _assert_value_close(case, broadcast, explicit, x)
    _assert_value_close(case, explicit, ref.margin_ref(x, labels, np.full(C, 1.1), **kwargs), x)
    _assert_value_close(case, one, scalar, x)
    _assert_value_close(case, scalar, ref.margin_ref(x, labels, 1.1, **kwargs), x)
    # The two regularisers differ, far beyond the round-off.
    assert abs(scalar - explicit) > 10 * rounding_atol(_scales(case, x)[0], _n_terms(case), eps=EPS32)
    # The float32 nearest 1.2, exactly.
    assert init_margin_beta().shape == () and float(init_margin_beta()) == float(np.float32(1.2))


# --------------------------------------------------------------------------------------------
# 7. Errors
# --------------------------------------------------------------------------------------------

_X, _Y = _batch(71)
_PAIRS = {"pos_mask": np.zeros((B, B), bool), "neg_mask": np.zeros((B, B), bool)}
_PAIRS_5 = (np.zeros((5, 5), np.float32), np.zeros((5, 5), bool))

ERRORS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "distance": (lambda: contrastive_loss(_X, _Y, distance="l1"), ValueError, r"distance must be one of"),
    "cosine_unnormalized": (
        lambda: triplet_margin_loss(_X, _Y, distance="cosine", normalize_embeddings=False),
        ValueError,
        r"use distance='dot'",
    ),
    "circle_euclidean": (lambda: circle_loss(_X, _Y, distance="euclidean"), ValueError, r"'cosine'"),
    "rank": (lambda: ntxent_loss(_X[0], _Y), ValueError, r"shape \(batch, dim\)"),
    "labels": (lambda: ntxent_loss(_X, _Y[:3]), ValueError, r"one label per embedding"),
    "mask_shape": (
        lambda: contrastive_loss(_X, _Y, mask=np.ones(3, bool)),
        ValueError,
        r"mask must have shape",
    ),
    "pos_without_neg": (
        lambda: contrastive_loss(_X, _Y, pos_mask=_PAIRS["pos_mask"]),
        ValueError,
        r"pass both or neither",
    ),
    "pairs_and_triplets": (
        lambda: triplet_margin_loss(_X, _Y, triplet_mask=np.zeros((B, B, B), bool), **_PAIRS),
        ValueError,
        r"not both",
    ),
    "triplet_mask_shape": (
        lambda: margin_loss(_X, _Y, triplet_mask=np.zeros((B, B), bool)),
        ValueError,
        r"triplet_mask must have shape \(12, 12, 12\)",
    ),
    "windowed_shape": (
        lambda: margin_loss(_X, _Y, triplet_mask=WindowedTriplets(*_PAIRS_5, _PAIRS_5[0], None, None)),
        ValueError,
        r"WindowedTriplets\) must have dist / pos / neg of shape \(12, 12\)",
    ),
    "windowed_batched_bounds": (
        lambda: triplet_margin_loss(
            _X, _Y, triplet_mask=WindowedTriplets(np.zeros((B, B), np.float32), *_PAIRS.values(), np.zeros(3), None)
        ),
        ValueError,
        r"lo must be a scalar",
    ),
    "float_mask": (
        lambda: circle_loss(_X, _Y, pos_mask=np.zeros((B, B)), neg_mask=np.zeros((B, B))),
        ValueError,
        r"must be boolean",
    ),
    "triplets_per_anchor": (
        lambda: triplet_margin_loss(_X, _Y, triplets_per_anchor=5),
        ValueError,
        r"triplets_per_anchor='all' only",
    ),
    "beta_shape": (
        lambda: margin_loss(_X, _Y, np.ones((2, 2), np.float32)),
        ValueError,
        r"beta must be a scalar",
    ),
    "beta_num_classes": (
        lambda: margin_loss(_X, _Y, np.ones(3, np.float32), num_classes=4),
        ValueError,
        r"num_classes",
    ),
    "beta_labels": (lambda: margin_loss(_X, _Y, np.ones(3, np.float32)), ValueError, r"must lie in \[0, 3\)"),
    "miner_type": (
        lambda: triplet_margin_miner(_X, _Y, type_of_triplets="medium"),
        ValueError,
        r"type_of_triplets",
    ),
    "miner_range": (lambda: batch_hard_miner(_X, _Y, allowed_pos_range=(0.0,)), ValueError, r"\(low, high\)"),
    "triplet_margin": (lambda: triplet_margin_loss(_X, _Y, margin=-0.1), LossHyperparameterError, r"margin"),
    "ms_alpha": (lambda: multi_similarity_loss(_X, _Y, alpha=0.0), LossHyperparameterError, r"alpha"),
    "ms_base": (
        lambda: multi_similarity_loss(_X, _Y, base=float("nan")),
        LossHyperparameterError,
        r"base .* finite",
    ),
    "temperature": (lambda: ntxent_loss(_X, _Y, temperature=-1.0), LossHyperparameterError, r"temperature"),
    "gamma": (lambda: circle_loss(_X, _Y, gamma=0.0), LossHyperparameterError, r"gamma"),
    "contrastive_margin": (
        lambda: contrastive_loss(_X, _Y, neg_margin=float("inf")),
        LossHyperparameterError,
        r"neg_margin",
    ),
    "nu": (lambda: margin_loss(_X, _Y, nu=-1.0), LossHyperparameterError, r"nu"),
    "epsilon": (lambda: multi_similarity_miner(_X, _Y, epsilon="0.1"), LossHyperparameterError, r"epsilon"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_invalid_inputs_raise(name: str):
    call, error, message = ERRORS[name]
    with pytest.raises(error, match=message) as info:
        call()
    if error is LossHyperparameterError:
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# 8. Against pytorch-metric-learning itself (only where it is installed: the "bench" extra)
# --------------------------------------------------------------------------------------------

# (case, miner, PML class): the case's kwargs are passed to the PML class as they are (the same
# names and defaults), except the distance, which PML takes as an object.
PML_CASES = [
    ("contrastive", None, "ContrastiveLoss"),
    ("contrastive", "semihard", "ContrastiveLoss"),
    ("triplet", None, "TripletMarginLoss"),
    ("triplet", "batch_hard", "TripletMarginLoss"),
    ("triplet", "semihard", "TripletMarginLoss"),
    ("triplet_swap_smooth_cosine", None, "TripletMarginLoss"),
    ("multi_similarity", None, "MultiSimilarityLoss"),
    ("multi_similarity", "multi_similarity", "MultiSimilarityLoss"),
    ("ntxent", None, "NTXentLoss"),
    ("lifted", None, "LiftedStructureLoss"),
    ("lifted", "semihard", "LiftedStructureLoss"),
    ("generalized_lifted", None, "GeneralizedLiftedStructureLoss"),
    ("circle", None, "CircleLoss"),
    ("margin", "semihard", "MarginLoss"),
    ("margin_learn", None, "MarginLoss"),
    ("margin_per_class_dot", None, "MarginLoss"),
]
PML_EXTRA = [
    ("contrastive_cosine", "batch_hard", "ContrastiveLoss"),
    ("triplet_swap", "semihard", "TripletMarginLoss"),
    ("triplet_smooth_raw", "multi_similarity", "TripletMarginLoss"),
    ("multi_similarity_euclidean", None, "MultiSimilarityLoss"),
    ("ntxent", "semihard", "NTXentLoss"),
    ("ntxent_warm", "multi_similarity", "NTXentLoss"),
    ("generalized_lifted", "batch_hard", "GeneralizedLiftedStructureLoss"),
    ("circle", "multi_similarity", "CircleLoss"),
    ("circle", "semihard", "CircleLoss"),
    ("margin_learn", "multi_similarity", "MarginLoss"),
]


@pytest.mark.parametrize(
    ("name", "miner", "pml_class"),
    [*PML_CASES, *(pytest.param(*c, marks=EXHAUSTIVE) for c in PML_EXTRA)],
    ids=[f"{c[0]}+{c[1]}" for c in PML_CASES + PML_EXTRA],
)
def test_against_pytorch_metric_learning(name: str, miner: str | None, pml_class: str):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners

    case = CASES_BY_NAME[name]
    kwargs = dict(case.kwargs)
    distance = kwargs.pop("distance", None)
    normalize = kwargs.pop("normalize_embeddings", True)
    if distance == "cosine":
        kwargs["distance"] = distances.CosineSimilarity()
    elif distance == "dot":
        kwargs["distance"] = distances.DotProductSimilarity(normalize_embeddings=normalize)
    elif distance == "euclidean" or not normalize:
        kwargs["distance"] = distances.LpDistance(normalize_embeddings=normalize)
    beta = None if case.beta is None else np.asarray(case.beta, np.float64)
    if beta is not None:
        kwargs["beta"] = float(beta.reshape(-1)[0])
        if beta.ndim:
            kwargs["num_classes"] = len(beta)
    loss_obj = getattr(losses, pml_class)(**kwargs).double()
    if beta is not None and beta.ndim:
        loss_obj.beta.data = torch.tensor(beta)
    pml_miners = {
        "batch_hard": miners.BatchHardMiner,
        "semihard": functools.partial(miners.TripletMarginMiner, type_of_triplets="semihard"),
        "multi_similarity": miners.MultiSimilarityMiner,
    }
    x, labels = _batch(81)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch.tensor(labels, dtype=torch.int64)
    indices = pml_miners[miner]()(xt, yt) if miner else None
    want = loss_obj(xt, yt, indices_tuple=indices)
    want.backward()
    want = want.detach()

    mined = _mine(miner, x, labels)[0] if miner else {}
    value, (grad, grad_beta) = _value_and_grad(case, x, labels, None, mined)
    # PML in float64: only float32's round-off counts.
    _assert_value_close(case, float(value), want.item(), x)
    _assert_grad_close(case, np.asarray(grad), xt.grad.numpy(), x)
    if case.kwargs.get("learn_beta"):
        want_beta = loss_obj.beta.grad.numpy()
        _assert_grad_close(case, np.asarray(grad_beta).reshape(want_beta.shape), want_beta, x)
