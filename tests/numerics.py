"""Tolerances from error analysis, for comparing two floating-point evaluations of one formula.

Two programs that evaluate the same formula in another order — another shape (a masked row
against a batch without it), another device layout, another library (PyTorch, NumPy), another
CPU (XLA picks its vector width, and so its summation order, from the instruction set) — differ
by round-off. Round-off is not a fixed *relative* amount per element: an element that is a
cancelling sum of large terms (a gradient where the pull of the positives nearly balances the
push of the negatives) carries the absolute error of those terms, however small it is itself.
A relative tolerance tuned on one machine then fails on the next.

The model used here. A reduction ``s = Σ_{i<n} t_i`` computed in floating point with unit
round-off ``u = ε/2`` satisfies ``|ŝ - s| ≤ γ_{n-1}·Σ|t_i|``, ``γ_k = k·u/(1 - k·u)`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2). When the rounding errors
behave as independent zero-mean variables (the usual case, and a fortiori for the pairwise and
blocked orders XLA and BLAS use) the factor ``n·u`` becomes ``λ·√n·u`` with high probability
(Higham & Mary, *A New Approach to Probabilistic Rounding Error Analysis*, SIAM J. Sci. Comput.
41, 2019). Two evaluations, each with such an error, differ by at most the sum of both. So::

    |a - b| ≤ k · ε · scale · √n

with ``n`` the length of the longest reduction behind an element, ``scale`` a bound on the
terms' ``Σ|t_i|`` (by default the largest ``|b|`` of the array: the elements of one gradient or
one loss are sums of terms of one magnitude, and the element with the least cancellation shows
it), ``ε`` the machine epsilon of the *less* precise side, and ``k`` a small constant for the
depth of the computation (each chained operation adds its own rounding, amplified by its
condition number: a softmax or a normalisation feeds a few ε of relative error into what
follows). ``k = 8`` covers a loss and its gradient through a normalisation, a matmul, a
log-sum-exp and their backward pass; a deeper chain (a network's forward and backward pass)
states its own ``k`` with its reason.

This is a bound on round-off only. A real error (a wrong index, a missing term, a factor off)
moves results by a fraction of ``scale`` itself, 10⁴–10⁶ times these tolerances.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assert_best_within", "assert_close", "eps_of", "rounding_atol"]


def eps_of(*arrays) -> float:
    """Machine epsilon of the least precise floating dtype among ``arrays`` (float32 when none is
    floating: a Python float compared with a float32 result)."""
    dtypes = [np.asarray(a).dtype for a in arrays]
    floating = [d for d in dtypes if np.issubdtype(d, np.floating)]
    if not floating:
        return float(np.finfo(np.float32).eps)
    return max(float(np.finfo(d).eps) for d in floating)


def rounding_atol(scale: float, n_terms: int, *, eps: float, k: float = 8.0) -> float:
    """``k·ε·scale·√n``: how far two orders of one ``n``-term reduction of terms of size ``scale``
    may drift apart (see the module docstring)."""
    if n_terms < 1:
        raise ValueError(f"n_terms must be at least 1, got {n_terms}")
    return k * eps * float(scale) * float(np.sqrt(n_terms))


def assert_close(
    actual,
    desired,
    *,
    n_terms: int,
    scale: float | None = None,
    k: float = 8.0,
    eps: float | None = None,
    err_msg: str = "",
) -> None:
    """``actual`` equals ``desired`` up to the round-off of ``n_terms``-term reductions.

    ``scale``: the magnitude of the terms; by default ``max|desired|`` (or 1e-30 for an all-zero
    array, where any non-zero ``actual`` is an error). ``eps``: by default that of the less
    precise of the two arrays — a float32 result against a float64 reference carries float32's
    round-off. The tolerance is absolute, the same for every element of the array: see the
    module docstring for why a per-element relative tolerance is the wrong model.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    if actual.shape != desired.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {desired.shape}. {err_msg}")
    if not np.all(np.isfinite(desired)):
        np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(desired), err_msg=err_msg)
    if scale is None:
        finite = desired[np.isfinite(desired)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        scale = scale or 1e-30
    eps = eps_of(actual, desired) if eps is None else eps
    atol = rounding_atol(scale, n_terms, eps=eps, k=k)
    np.testing.assert_allclose(
        actual,
        desired,
        rtol=0,
        atol=atol,
        err_msg=f"{err_msg} (tolerance {atol:.3g} = {k:g}·ε·{scale:.3g}·√{n_terms}, ε = {eps:.3g})",
    )


def assert_best_within(picked, scores, *, atol: float, err_msg: str = "") -> None:
    """The candidates a program ranked best are the best of ``scores`` up to ``atol``.

    ``scores`` ``(..., m)``: another evaluation's scores of all ``m`` candidates (larger is
    better; negate distances); ``picked`` ``(..., k)`` int: the program's ``k`` best, best first.
    Where two candidates score within round-off of each other, which one comes first depends on
    the evaluation order, so comparing the indices exactly tests the machine, not the code. This
    asserts instead that the ``j``-th picked candidate scores within ``atol`` of the ``j``-th best
    score (``atol`` from ``rounding_atol`` for the scores' own computation): a wrong pick (an index
    off, a flipped sign, a missing candidate) misses by a fraction of the scores' spread.
    """
    scores, picked = np.asarray(scores), np.asarray(picked)
    got = np.take_along_axis(scores, picked, axis=-1)
    best = -np.sort(-scores, axis=-1)[..., : picked.shape[-1]]
    np.testing.assert_allclose(got, best, rtol=0, atol=atol, err_msg=f"{err_msg} (tolerance {atol:.3g})")
