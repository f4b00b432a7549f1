"""Cross-batch memory (``hdml_jax.losses.xbm``) and the reference rows of the pair losses.

* the ring buffer against a Python-list ring buffer;
* every loss that takes ``ref_embeddings`` against the float64 per-pair references of
  ``tests/reference_pair_losses.py`` (with references) and against PML's ``loss(x, y, ref_emb=...,
  ref_labels=...)``;
* ``xbm_loss`` over batches that wrap the memory against PML's ``CrossBatchMemory`` and against a
  Python ring buffer + reference losses; an exact resume from a memory saved as NumPy arrays;
* gradients: none into the memory, the batch's against float64 central differences of the
  reference; exactly 0 with no pair.

Compilation dominates the run time: the tests share a handful of jitted programs (``_ref_losses``,
``_xbm_steps``, ...), compiled at backend optimisation level 0 as in ``test_pair_losses.py``.

Two evaluations that may round differently agree up to the round-off of ``tests/numerics.py``, as
in ``test_pair_losses.py`` (``_scales``, ``_n_terms``), with the references or the memory as the
rows every pair ends in.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdml_jax.losses import (
    CrossBatchMemory,
    WindowedTriplets,
    batch_hard_miner,
    circle_loss,
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    margin_loss,
    multi_similarity_loss,
    multi_similarity_miner,
    ntxent_loss,
    semi_hard_miner,
    triplet_margin_loss,
    triplet_margin_miner,
    xbm_enqueue,
    xbm_init,
    xbm_loss,
)
from tests import reference_pair_losses as ref
from tests.numerics import assert_close
from tests.test_pair_losses import matrix_scales

B, D, M, C = 6, 5, 16, 3  # 5 batches of 6 wrap a memory of 16 slots (after the third)
NUM_BATCHES = 5
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs)


# The losses compute in float32: their round-off, explicitly (a Python float of a float32 result
# would pass for float64).
EPS32 = float(np.finfo(np.float32).eps)
_LOG_M = math.log(M)  # a log-sum-exp over at most M rows
# As test_pair_losses.SENSITIVITY, per case here: (distance, G, T(r), c).
SENSITIVITY = {
    "contrastive": ("euclidean", 2.0, lambda r: 2 * r, 1.0),
    "contrastive+batch_hard": ("euclidean", 2.0, lambda r: 2 * max(r, 1.0), 1.0),  # neg_margin 2
    "multi_similarity": ("cosine", 2.0, lambda r: r * r + 0.5 + _LOG_M / 2, 50.0),
    "ntxent": ("cosine", 2 / 0.5, lambda r: 2 * r * r / 0.5 + _LOG_M, 2 / 0.5),
    "generalized_lifted": ("euclidean", 2.0, lambda r: 2 * r + 1 + 2 * _LOG_M, 2.0),
    "circle": ("cosine", 8 * 80.0, lambda r: 80.0 * 2.4 * 1.6 + 2 * _LOG_M, 4 * 80.0),
    "triplet": ("euclidean", 2.0, lambda r: 2 * r + 0.2, 1.0),
    "triplet_smooth_cosine": ("cosine", 2.0, lambda r: 2 * r * r + 0.1 + math.log(2), 1.0),
    "margin": ("euclidean", 2.0, lambda r: 2 * r + 1.2 + 0.2, 1.0),
}
SENSITIVITY["multi_similarity+ms_miner"] = SENSITIVITY["multi_similarity"]
SENSITIVITY["triplet+semihard"] = SENSITIVITY["triplet"]
SENSITIVITY["margin+easy"] = SENSITIVITY["margin"]


def _scales(name: str, x, rows) -> tuple[float, float]:
    """``(value scale, gradient factor)`` of case ``name`` with anchors ``x`` and pairs ending in
    ``rows`` (the references or the memory)."""
    distance, lipschitz, terms, weights = SENSITIVITY[name]
    mu, g, r = matrix_scales(x, distance, True, rows)
    return lipschitz * mu + terms(r), weights * mu + g


def _n_terms(name: str, others: int) -> int:
    """B anchors paired with ``others`` rows, a D-term distance each: the float32 sums run over
    pairs (triplets enter as exact integer counts per pair), smooth_loss's over every triplet."""
    return B * others * (others if name == "triplet_smooth_cosine" else 1) * D


def _assert_value_close(name: str, got, want, x, rows, err_msg: str = "") -> None:
    scale = _scales(name, x, rows)[0]
    assert_close(got, want, n_terms=_n_terms(name, len(rows)), scale=scale, eps=EPS32, err_msg=err_msg)


def _assert_grad_close(name: str, got, want, x, rows, err_msg: str = "") -> None:
    scale = _scales(name, x, rows)[1] * float(np.max(np.abs(np.asarray(want))))
    assert_close(got, want, n_terms=_n_terms(name, len(rows)), scale=scale, eps=EPS32, err_msg=err_msg)


def _batch(rng: np.random.Generator, rows: int = B) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(rows, D)).astype(np.float32), rng.integers(0, C, rows).astype(np.int32)


def _batches(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_batch(rng) for _ in range(NUM_BATCHES)]


# --------------------------------------------------------------------------------------------
# 1. The ring buffer
# --------------------------------------------------------------------------------------------


class ListRing:
    """The obvious ring buffer: a list of slots, written one row at a time."""

    def __init__(self, size: int):
        self.embeddings: list[np.ndarray | None] = [None] * size
        self.labels: list[int | None] = [None] * size
        self.position = 0

    def enqueue(self, x, y, mask=None) -> list[int]:
        slots = []
        for i in range(len(x)):
            if mask is not None and not mask[i]:
                slots.append(-1)
                continue
            self.embeddings[self.position] = np.asarray(x[i], np.float64)
            self.labels[self.position] = int(y[i])
            slots.append(self.position)
            self.position = (self.position + 1) % len(self.embeddings)
        return slots

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        filled = np.array([e is not None for e in self.embeddings])
        emb = np.array([np.zeros(D) if e is None else e for e in self.embeddings])
        labels = np.array([0 if v is None else v for v in self.labels])
        return emb, labels, filled


_enqueue = _jit(xbm_enqueue)


def test_enqueue_wraps_like_a_list_ring_buffer():
    rng = np.random.default_rng(0)
    memory, ring = xbm_init(M, D), ListRing(M)
    written = 0
    for step in range(7):
        x, y = _batch(rng)
        mask = rng.random(B) > 0.3
        if step == 0:
            mask[:] = True
        x[~mask] = np.nan  # masked rows are never written
        memory, slots = _enqueue(memory, x, y, mask)
        want_slots = ring.enqueue(x, y, mask)
        written += int(mask.sum())
        emb, labels, filled = ring.arrays()
        np.testing.assert_array_equal(np.asarray(slots), want_slots)
        np.testing.assert_array_equal(np.asarray(memory.filled), filled)
        np.testing.assert_array_equal(np.asarray(memory.labels)[filled], labels[filled])
        np.testing.assert_array_equal(np.asarray(memory.embeddings), emb.astype(np.float32))
        assert int(memory.position) == ring.position == written % M
    assert written > 2 * M  # it wrapped twice
    assert memory.embeddings.dtype == jnp.float32 and memory.labels.dtype == jnp.int32
    # A batch as large as the memory (eager): it replaces every slot, starting at the position.
    x, y = _batch(rng, M)
    full, slots = xbm_enqueue(memory, x, y)
    np.testing.assert_array_equal(np.asarray(slots), (ring.position + np.arange(M)) % M)
    np.testing.assert_array_equal(np.asarray(full.embeddings)[np.asarray(slots)], x)
    assert int(full.position) == ring.position and bool(np.all(full.filled))


def test_enqueue_rejects_a_batch_larger_than_the_memory():
    with pytest.raises(ValueError, match=r"batch of 7 rows does not fit a memory of 6 slots"):
        xbm_enqueue(xbm_init(6, D), np.zeros((7, D), np.float32), np.zeros(7, np.int32))
    with pytest.raises(ValueError, match=r"does not fit"):
        xbm_loss(contrastive_loss, np.zeros((7, D), np.float32), np.zeros(7, np.int32), xbm_init(6, D))
    with pytest.raises(ValueError, match=r"dimension"):
        xbm_enqueue(xbm_init(6, D), np.zeros((2, D + 1), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"memory_size must be a positive integer"):
        xbm_init(0, D)


# --------------------------------------------------------------------------------------------
# 2. The losses with reference rows: against the float64 references and PML
# --------------------------------------------------------------------------------------------

# name: (loss, reference, kwargs, PML class name)
REF_CASES = {
    "contrastive": (contrastive_loss, ref.contrastive_ref, {}, "ContrastiveLoss"),
    "multi_similarity": (multi_similarity_loss, ref.multi_similarity_ref, {}, "MultiSimilarityLoss"),
    "ntxent": (ntxent_loss, ref.ntxent_ref, {"temperature": 0.5}, "NTXentLoss"),
    "generalized_lifted": (
        generalized_lifted_structure_loss,
        ref.generalized_lifted_structure_ref,
        {},
        "GeneralizedLiftedStructureLoss",
    ),
    "circle": (circle_loss, ref.circle_ref, {}, "CircleLoss"),
    "triplet": (triplet_margin_loss, ref.triplet_margin_ref, {"margin": 0.2}, "TripletMarginLoss"),
    "triplet_smooth_cosine": (
        triplet_margin_loss,
        ref.triplet_margin_ref,
        {"margin": 0.1, "smooth_loss": True, "distance": "cosine"},
        "TripletMarginLoss",
    ),
    "margin": (margin_loss, ref.margin_ref, {}, "MarginLoss"),
}
# Mined tuples with references: (case, miner) evaluated in the same program.
MINED_CASES = (("triplet", "semihard"), ("multi_similarity", "multi_similarity"), ("contrastive", "semihard"))
MINERS = {"semihard": semi_hard_miner, "multi_similarity": multi_similarity_miner}
R = 9  # reference rows


@_jit
def _ref_losses(x, y, r, ry, mask, ref_mask):
    """Every case's (value, (grad_x, grad_r)) with references, plain and with mined tuples."""
    refs = {"ref_embeddings": r, "ref_labels": ry, "ref_mask": ref_mask}
    out = {}
    for name, (loss, _, kwargs, _) in REF_CASES.items():
        out[name] = jax.value_and_grad(
            lambda a, b, f=loss, kw=kwargs: f(
                a, y, mask=mask, **kw, ref_embeddings=b, ref_labels=ry, ref_mask=ref_mask
            ),
            argnums=(0, 1),
        )(x, r)
    mined = {name: miner(x, y, mask=mask, **refs) for name, miner in MINERS.items()}
    for name, miner in MINED_CASES:
        loss, _, kwargs, _ = REF_CASES[name]
        out[f"{name}+{miner}"] = (loss(x, y, mask=mask, **kwargs, **refs, **mined[miner]), None)
    return out, mined


def _ref_data(seed: int, masked: bool):
    rng = np.random.default_rng(seed)
    x, y = _batch(rng)
    r, ry = _batch(rng, R)
    ry[2] = y[1]  # a positive pair for every anchor label
    mask = np.ones(B, bool)
    ref_mask = np.ones(R, bool)
    if masked:
        mask[4] = False
        ref_mask[[0, 6]] = False
        x[4] = np.nan  # garbage in masked rows changes nothing
        r[6] = np.inf
    return x, y, r, ry, mask, ref_mask


def _indices(mined: dict[str, np.ndarray]):
    """A mask dict as PML index lists."""
    if "triplet_mask" in mined:
        t = mined["triplet_mask"]
        t = t.dense() if isinstance(t, WindowedTriplets) else t
        return tuple(list(v) for v in np.nonzero(np.asarray(t)))
    a1, p = np.nonzero(np.asarray(mined["pos_mask"]))
    a2, n = np.nonzero(np.asarray(mined["neg_mask"]))
    return list(a1), list(p), list(a2), list(n)


def _reference(name: str, x, y, r, ry, mask, ref_mask, indices=None, **extra) -> float:
    _, reference, kwargs, _ = REF_CASES[name]
    kwargs = dict(kwargs)
    if "normalize_embeddings" in kwargs:
        kwargs["normalize"] = kwargs.pop("normalize_embeddings")
    if name == "margin":
        return reference(
            x, y, 1.2, mask=mask, indices=indices, ref=r, ref_labels=ry, ref_mask=ref_mask, **kwargs
        )
    return reference(
        x, y, mask=mask, indices=indices, ref=r, ref_labels=ry, ref_mask=ref_mask, **kwargs, **extra
    )


@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "masked"])
def test_losses_with_references_match_reference(masked: bool):
    x, y, r, ry, mask, ref_mask = _ref_data(1, masked)
    out, mined = _ref_losses(x, y, r, ry, mask, ref_mask)
    clean_x, clean_r = np.where(mask[:, None], x, 0.0), np.where(ref_mask[:, None], r, 0.0)
    for name in REF_CASES:
        want = _reference(name, clean_x, y, clean_r, ry, mask, ref_mask)
        assert want > 0.0, name
        (value, (grad_x, grad_r)) = out[name]
        _assert_value_close(name, float(value), want, clean_x[mask], clean_r[ref_mask], err_msg=name)
        assert np.all(np.isfinite(np.asarray(grad_x))) and np.all(np.isfinite(np.asarray(grad_r)))
        assert np.all(np.asarray(grad_x)[~mask] == 0.0) and np.all(np.asarray(grad_r)[~ref_mask] == 0.0)
    for name, miner in MINED_CASES:
        indices = _indices(mined[miner])
        assert len(indices[0]) > 0
        want = _reference(name, clean_x, y, clean_r, ry, mask, ref_mask, indices)
        got = float(out[f"{name}+{miner}"][0])
        _assert_value_close(name, got, want, clean_x[mask], clean_r[ref_mask], err_msg=f"{name}+{miner}")


def test_reference_gradients_match_finite_differences():
    """d/dx and d/dref of one smooth loss (multi-similarity) against float64 central differences."""
    x, y, r, ry, mask, ref_mask = _ref_data(2, False)
    (_, (grad_x, grad_r)) = _ref_losses(x, y, r, ry, mask, ref_mask)[0]["multi_similarity"]

    def f(x_, r_):
        return _reference("multi_similarity", x_, y, r_, ry, mask, ref_mask)

    want_x, want_r = _numeric_grad(lambda a: f(a, r), x), _numeric_grad(lambda b: f(x, b), r)
    # The float64 central differences are off by ~ε64·|L|/h + h²·|L‴|, far below float32's round-off.
    for got, want in ((grad_x, want_x), (grad_r, want_r)):
        assert np.max(np.abs(want)) > 1e-3
        _assert_grad_close("multi_similarity", np.asarray(got), want, x, r)


def _numeric_grad(fn, array, h: float = 1e-6) -> np.ndarray:
    array = np.asarray(array, np.float64)
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        plus, minus = array.copy(), array.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(plus) - fn(minus)) / (2.0 * h)
    return grad


def _pml_loss(name: str):
    from pytorch_metric_learning import distances, losses

    kwargs = dict(REF_CASES[name][2])
    if kwargs.pop("distance", None) == "cosine":
        kwargs["distance"] = distances.CosineSimilarity()
    return getattr(losses, REF_CASES[name][3])(**kwargs)


def test_losses_with_references_match_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    x, y, r, ry, mask, ref_mask = _ref_data(3, False)
    out, _ = _ref_losses(x, y, r, ry, mask, ref_mask)
    for name in REF_CASES:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        rt = torch.tensor(r, dtype=torch.float64, requires_grad=True)
        want = _pml_loss(name).double()(
            xt, torch.tensor(y).long(), ref_emb=rt, ref_labels=torch.tensor(ry).long()
        )
        want.backward()
        value, (grad_x, grad_r) = out[name]
        # PML in float64: only float32's round-off counts.
        _assert_value_close(name, float(value), want.item(), x, r, err_msg=name)
        _assert_grad_close(name, np.asarray(grad_x), xt.grad.numpy(), x, r, err_msg=name)
        _assert_grad_close(name, np.asarray(grad_r), rt.grad.numpy(), x, r, err_msg=name)


def test_miners_with_references_match_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import miners

    x, y, r, ry, mask, ref_mask = _ref_data(4, False)
    _, mined = _ref_losses(x, y, r, ry, mask, ref_mask)
    args = [torch.tensor(v, dtype=torch.float64) for v in (x, r)]
    labels = [torch.tensor(v).long() for v in (y, ry)]
    pml = {
        "semihard": miners.TripletMarginMiner(type_of_triplets="semihard"),
        "multi_similarity": miners.MultiSimilarityMiner(),
    }
    for name, miner in pml.items():
        want = miner(args[0], labels[0], args[1], labels[1])
        got = _indices(mined[name])
        if len(want) == 3:
            assert set(zip(*got, strict=True)) == set(zip(*(v.tolist() for v in want), strict=True))
        else:
            for k in (0, 2):
                pairs = set(zip(want[k].tolist(), want[k + 1].tolist(), strict=True))
                assert set(zip(got[k], got[k + 1], strict=True)) == pairs and pairs


def test_unsupported_reference_options_raise():
    x, y, r, ry, *_ = _ref_data(5, False)
    with pytest.raises(ValueError, match=r"lifted_structure_loss does not take ref_embeddings"):
        lifted_structure_loss(x, y, ref_embeddings=r, ref_labels=ry)
    with pytest.raises(ValueError, match=r"with swap=True"):
        triplet_margin_loss(x, y, swap=True, ref_embeddings=r, ref_labels=ry)
    with pytest.raises(ValueError, match=r"need ref_labels"):
        contrastive_loss(x, y, ref_embeddings=r)
    with pytest.raises(ValueError, match=r"without ref_embeddings"):
        contrastive_loss(x, y, ref_labels=ry)
    with pytest.raises(ValueError, match=r"pos_mask must have shape \(6, 9\)"):
        contrastive_loss(
            x,
            y,
            ref_embeddings=r,
            ref_labels=ry,
            pos_mask=np.zeros((B, B), bool),
            neg_mask=np.zeros((B, B), bool),
        )
    with pytest.raises(ValueError, match=r"sets pos_mask, ref_mask itself"):
        xbm_loss(contrastive_loss, x, y, xbm_init(M, D), pos_mask=None, ref_mask=None)


# --------------------------------------------------------------------------------------------
# 3. xbm_loss over several batches: PML's CrossBatchMemory, a list ring buffer, resume
# --------------------------------------------------------------------------------------------

# name: (loss, loss kwargs, miner, miner_pairs_are_triplets)
XBM_CASES = {
    "contrastive": (contrastive_loss, {}, None, False),
    "multi_similarity": (multi_similarity_loss, {}, None, False),
    "triplet": (triplet_margin_loss, {"margin": 0.2}, None, False),
    "multi_similarity+ms_miner": (multi_similarity_loss, {}, multi_similarity_miner, False),
    # neg_margin 2: every mined negative counts (a kept stray negative would show).
    "contrastive+batch_hard": (contrastive_loss, {"neg_margin": 2.0}, batch_hard_miner, True),
}
REFERENCE_CHECKED = ("contrastive", "multi_similarity", "triplet")


@_jit
def _xbm_steps(x, y, mask, memories):
    """One xbm_loss step of every case (each with its own memory): (losses, new memories)."""
    losses, new = {}, {}
    for name, (loss, kwargs, miner, as_triplets) in XBM_CASES.items():
        losses[name], new[name] = xbm_loss(
            loss, x, y, memories[name], mask=mask, miner=miner, miner_pairs_are_triplets=as_triplets, **kwargs
        )
    return losses, new


def _run(batches, memories=None, start: int = 0):
    """Yield ``(losses as floats, memories)`` after each of ``batches[start:]``."""
    memories = memories or {name: xbm_init(M, D) for name in XBM_CASES}
    for x, y in batches[start:]:
        losses, memories = _xbm_steps(x, y, np.ones(B, bool), memories)
        yield {k: float(v) for k, v in losses.items()}, memories


@functools.cache
def _uninterrupted(seed: int):
    return [(losses, jax.tree_util.tree_map(np.asarray, mem)) for losses, mem in _run(_batches(seed))]


def test_xbm_matches_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    pml = {
        "contrastive": losses.CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=M),
        "multi_similarity": losses.CrossBatchMemory(losses.MultiSimilarityLoss(), D, memory_size=M),
        "triplet": losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), D, memory_size=M),
        "multi_similarity+ms_miner": losses.CrossBatchMemory(
            losses.MultiSimilarityLoss(), D, memory_size=M, miner=miners.MultiSimilarityMiner()
        ),
        "contrastive+batch_hard": losses.CrossBatchMemory(
            losses.ContrastiveLoss(neg_margin=2.0), D, memory_size=M, miner=miners.BatchHardMiner()
        ),
    }
    batches = _batches(10)
    for step, ((x, y), (got, memories)) in enumerate(zip(batches, _uninterrupted(10), strict=True)):
        for name, xbm in pml.items():
            want = xbm(torch.tensor(x, dtype=torch.float64), torch.tensor(y).long()).item()
            assert want > 0.0
            rows = memories[name].embeddings[memories[name].filled]  # the memory after this batch
            _assert_value_close(name, got[name], want, x, rows, err_msg=f"{name}, batch {step}")
    assert all(xbm.has_been_filled for xbm in pml.values())  # the memory wrapped


def _reference_xbm_pairs(ring: ListRing, slots: list[int], y):
    """PML's lists against the memory: all pairs, minus the positives (i, own slot of i)."""
    emb, labels, filled = ring.arrays()
    a1, p, a2, n = ref.all_pairs(y, None, labels, filled)
    keep = [k for k in range(len(a1)) if p[k] != slots[a1[k]]]
    return (emb, labels, filled), ([a1[k] for k in keep], [p[k] for k in keep], a2, n)


def test_xbm_matches_a_list_ring_buffer_and_the_references():
    ring = ListRing(M)
    for (x, y), (got, _) in zip(_batches(10), _uninterrupted(10), strict=True):
        slots = ring.enqueue(x, y)
        (emb, labels, filled), indices = _reference_xbm_pairs(ring, slots, y)
        refs = {"ref": emb, "ref_labels": labels, "ref_mask": filled, "indices": indices}
        want = {
            "contrastive": ref.contrastive_ref(x, y, **refs),
            "multi_similarity": ref.multi_similarity_ref(x, y, **refs),
            "triplet": ref.triplet_margin_ref(x, y, margin=0.2, **refs),
        }
        for name in REFERENCE_CHECKED:
            _assert_value_close(name, got[name], want[name], x, emb[filled], err_msg=name)


def test_xbm_resumes_exactly_from_a_saved_memory():
    batches = _batches(10)
    full = _uninterrupted(10)
    saved = {name: {k: np.array(v) for k, v in mem._asdict().items()} for name, mem in full[1][1].items()}
    restored = {
        name: CrossBatchMemory(**{k: jnp.asarray(v) for k, v in arrays.items()})
        for name, arrays in saved.items()
    }
    resumed = list(_run(batches, restored, start=2))
    assert len(resumed) == NUM_BATCHES - 2
    for (got, memories), (want, want_memories) in zip(resumed, full[2:], strict=True):
        assert got == want  # bit for bit
        for name in XBM_CASES:
            for a, b in zip(memories[name], want_memories[name], strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)


# --------------------------------------------------------------------------------------------
# 4. Gradients and edge cases
# --------------------------------------------------------------------------------------------


@_jit
def _xbm_grad(x, y, memory):
    def loss(x_, memory_embeddings):
        return xbm_loss(multi_similarity_loss, x_, y, memory._replace(embeddings=memory_embeddings))[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(x, memory.embeddings)


def test_xbm_gradient_reaches_the_batch_only():
    batches = _batches(10)
    memory = jax.tree_util.tree_map(jnp.asarray, _uninterrupted(10)[2][1]["multi_similarity"])
    x, y = batches[3]
    value, (grad_x, grad_memory) = _xbm_grad(x, y, memory)
    assert np.all(np.asarray(grad_memory) == 0.0)
    after = _uninterrupted(10)[3]
    rows = after[1]["multi_similarity"].embeddings[after[1]["multi_similarity"].filled]
    # Another program (the gradient's) than the step's.
    _assert_value_close("multi_similarity", float(value), after[0]["multi_similarity"], x, rows)
    # The memory after the write, held fixed (a constant, as in PML), and the self pairs removed.
    ring = ListRing(M)
    ring.embeddings = [
        np.asarray(e, np.float64) if f else None
        for e, f in zip(memory.embeddings, memory.filled, strict=True)
    ]
    ring.labels = [int(v) if f else None for v, f in zip(memory.labels, memory.filled, strict=True)]
    ring.position = int(memory.position)
    slots = ring.enqueue(x, y)
    (emb, labels, filled), indices = _reference_xbm_pairs(ring, slots, y)
    want = _numeric_grad(
        lambda a: ref.multi_similarity_ref(
            a, y, ref=emb, ref_labels=labels, ref_mask=filled, indices=indices
        ),
        x,
    )
    assert np.max(np.abs(want)) > 1e-3
    _assert_grad_close("multi_similarity", np.asarray(grad_x), want, x, emb[filled])


def test_xbm_with_nothing_to_pair_is_exactly_zero():
    x, y = _batches(20)[0]
    memories = {name: xbm_init(M, D) for name in XBM_CASES}
    losses, new = _xbm_steps(x, y, np.zeros(B, bool), memories)  # every row masked
    for name in XBM_CASES:
        assert float(losses[name]) == 0.0, name
        assert int(new[name].position) == 0 and not np.any(np.asarray(new[name].filled))
    # A first batch with a single row per class: its only positives are its own slots, removed
    # (for batch-hard with the whole triplet, negative included, as PML does).
    y = np.arange(B, dtype=np.int32)
    losses, _ = _xbm_steps(x, y, np.ones(B, bool), memories)
    for name in ("triplet", "multi_similarity+ms_miner", "contrastive+batch_hard"):
        assert float(losses[name]) == 0.0, name
    assert all(np.isfinite(float(v)) for v in losses.values())


# --------------------------------------------------------------------------------------------
# 5. The triplet miners' WindowedTriplets against references and in xbm_loss: as their dense form
# --------------------------------------------------------------------------------------------

# name: (loss, loss kwargs, type_of_triplets of triplet_margin_miner, PML loss class). The
# triplet margin loss counts the window narrowed by its hinge, the margin loss the window's
# triplets per pair (as the pair losses' weights, which test_pair_losses covers for every type).
WINDOWED_XBM = {
    "triplet+semihard": (triplet_margin_loss, {"margin": 0.2}, "semihard", "TripletMarginLoss"),
    "margin+easy": (margin_loss, {}, "easy", "MarginLoss"),
}
FIRST_XBM = next(iter(WINDOWED_XBM))


def _dense_triplet_miner(miner):
    """The miner, its WindowedTriplets replaced by their dense (B, M, M) mask."""

    def mine(*args, **kwargs):
        return {"triplet_mask": miner(*args, **kwargs)["triplet_mask"].dense()}

    return mine


@_jit
def _windowed_xbm_steps(x, y, masked, memories):
    """Per case and form of the mined triplets: xbm_loss's (value, grad_x) on all rows (and, for
    the first case, with the rows ``masked`` left out); the memories after the step on all rows."""
    out, new = {}, {}
    for name, (loss, kwargs, kind, _) in WINDOWED_XBM.items():
        miner = functools.partial(triplet_margin_miner, type_of_triplets=kind)
        for form, mine in (("windowed", miner), ("dense", _dense_triplet_miner(miner))):
            for rows, mask in (("all", None), ("masked", ~masked))[: 2 if name == FIRST_XBM else 1]:

                def step(x_, mask=mask, loss=loss, kwargs=kwargs, mine=mine, memory=memories[name]):
                    return xbm_loss(loss, x_, y, memory, mask=mask, miner=mine, **kwargs)

                (value, memory), grad = jax.value_and_grad(step, has_aux=True)(x)
                out[name, form, rows] = (value, grad)
                if rows == "all":
                    new[name] = memory
    return out, new


def test_windowed_triplets_in_xbm_equal_their_dense_form_and_pml():
    """xbm_loss with a triplet miner: WindowedTriplets (self comparisons removed from its positive
    pairs) and their dense form (removed from the mask) agree, and match PML's CrossBatchMemory
    with its TripletMarginMiner, over batches that wrap the memory."""
    masked = np.zeros(B, bool)
    masked[[1, 4]] = True
    memories = {name: xbm_init(M, D) for name in WINDOWED_XBM}
    pml = _pml_windowed_xbm()  # {} without PML (then only windowed against dense)
    for step, (x, y) in enumerate(_batches(30)):
        out, memories = _windowed_xbm_steps(x, y, masked, memories)
        out = jax.tree_util.tree_map(np.asarray, out)
        for name in WINDOWED_XBM:
            memory = memories[name]  # after this batch: what its pairs end in
            rows_of_memory = np.asarray(memory.embeddings)[np.asarray(memory.filled)]
            for rows in ("all", "masked") if name == FIRST_XBM else ("all",):
                (value, grad), (want, want_grad) = out[name, "windowed", rows], out[name, "dense", rows]
                msg = f"{name}, {rows} rows, batch {step}"
                # Exact counts or the dense mask's sums: two orders.
                _assert_value_close(name, value, want, x, rows_of_memory, err_msg=msg)
                _assert_grad_close(name, grad, want_grad, x, rows_of_memory, err_msg=msg)
                assert np.all(grad[masked] == 0.0) if rows == "masked" else np.any(grad != 0.0), msg
            if name in pml:
                want = pml[name](*_torch_batch(x, y)).item()
                assert want > 0.0, name
                got = out[name, "windowed", "all"][0]
                _assert_value_close(name, got, want, x, rows_of_memory, err_msg=name)
    assert all(xbm.has_been_filled for xbm in pml.values())  # the memory wrapped


def _torch_batch(x, y):
    import torch

    return torch.tensor(x, dtype=torch.float64), torch.tensor(y).long()


def _pml_windowed_xbm() -> dict:
    try:
        import torch  # noqa: F401
        from pytorch_metric_learning import losses, miners
    except ImportError:
        return {}
    return {
        name: losses.CrossBatchMemory(
            getattr(losses, pml_class)(**kwargs),
            D,
            memory_size=M,
            miner=miners.TripletMarginMiner(type_of_triplets=kind),
        )
        for name, (_, kwargs, kind, pml_class) in WINDOWED_XBM.items()
    }
