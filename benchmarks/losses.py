"""Forward+backward wall time of the hdml_jax losses, against plain matmuls and pytorch-metric-learning.

Run from the repository root::

    python benchmarks/losses.py                       # both sizes, every loss, 10 timed runs each
    python benchmarks/losses.py --sizes cub --repeats 5 --skip-torch
    python benchmarks/losses.py --sizes sop --losses contrastive circle cosface
    python benchmarks/losses.py --sizes 64x128x1000   # any BxDxC

What is timed, per loss and size: the median (and the best) wall time of one call of the
``jax.jit``-compiled ``jax.value_and_grad`` of the loss with respect to the embeddings and, where
the loss has them, its parameters: the proxies (every level for HPL), the class weights of the
classification losses, the per-class ``β`` of the margin loss. Miners run inside the timed call
(their masks carry no gradient). Warm-up runs come first (so compilation is not included; it is
shown separately as "compile"). Inputs are float32, SOP-like ``P×K`` batches (``B/4`` classes ×
4 images), random proxies / class weights / SoftTriple centers.

The losses, in three groups:
  * proxy losses (the first ones): ``proxy_anchor``, ``proxy_nca``, ``hpl_pa`` / ``hpl_nca``
    (Proxy-Anchor / Proxy-NCA on 2 levels), ``triplet_bh`` (CGD's batch-hard triplet), ``softmax_ce`` (on given logits);
  * pair losses, PML's defaults, gradient w.r.t. the raw embeddings (both sides normalise
    inside): ``contrastive``, ``triplet_all`` (all triplets), ``triplet_semihard`` (+ the
    semi-hard ``TripletMarginMiner``), ``multi_similarity`` (+ ``MultiSimilarityMiner``, ε=0.1),
    ``margin`` (all triplets, one learnable β per class: gradients w.r.t. embeddings and β),
    ``ntxent``, ``lifted``, ``generalized_lifted``, ``circle``;
  * classification losses, PML's defaults, gradients w.r.t. embeddings and class weights
    (``(C, d)`` here, PML's ``W`` is its transpose): ``normalized_softmax``, ``cosface``,
    ``arcface``, ``soft_triple`` (10 centers per class: weights ``(C·10, d)``).

The callables of one table row (ours, its matmul reference, torch) are timed interleaved, in
rounds of 2 timed calls each (after 1 untimed call that absorbs the hand-over between JAX's and
torch's thread pools), so a busy machine slows them alike and the ratios stay meaningful. A few
losses whose PML baseline is slow run fewer timed rounds (``REPEATS_CAP``, at most that many runs
whatever ``--repeats`` says; ``--no-repeats-cap`` lifts it); the "runs" column shows the count.

Columns:
  * ``jax``: median seconds of our forward+backward.
  * ``matmuls`` / ``jax/mm``: a jitted function doing exactly the matrix products the loss's
    forward+backward needs, on the same shapes, and our time divided by it: the overhead of
    everything that is not a matmul. Proxy / classification losses: ``x@P.T`` (B,C), ``g@P``
    (B,d), ``g.T@x`` (C,d) (for HPL the same on every level; for SoftTriple over the C·10 center
    rows); target ≤ 1.5. Pair losses: the Gram products ``x@x.T`` (B,B), ``g@x`` and ``g.T@x``
    (B,d); these are tiny, so ``jax/mm`` there is information only (no target).
  * ``torch``: the same work with pytorch-metric-learning (``ProxyAnchorLoss``, ``ProxyNCALoss``,
    ``TripletMarginLoss`` + ``BatchHardMiner``; two weighted ``ProxyAnchorLoss`` for HPL; the PML
    class of each pair / classification loss, with its miner) or
    ``torch.nn.CrossEntropyLoss(label_smoothing=...)``, forward + ``.backward()``, with
    ``torch.set_num_threads`` = the usable CPU count; ``torch/jax`` > 1 means we are faster
    (target for the pair and classification losses: ≥ 2).
  * ``runs``: timed runs per callable (``--repeats``, or the loss's cap).

Before timing, the values and gradients of ours and PML are compared once on the same inputs and
the same initial parameters (PML's ``W`` / ``fc`` = our weights transposed; its weight gradients
transposed back), and the largest relative differences printed. PML computes in float32 with its
own reductions, so ~1e-5–1e-4 is expected; anything above 1e-3 is flagged "DIFFERS" with a
warning.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass

import _timing
import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.losses import (
    arcface_loss,
    batch_hard_triplet_loss,
    circle_loss,
    contrastive_loss,
    cosface_loss,
    generalized_lifted_structure_loss,
    hierarchical_proxy_loss,
    init_margin_beta,
    lifted_structure_loss,
    margin_loss,
    multi_similarity_loss,
    multi_similarity_miner,
    normalized_softmax_loss,
    ntxent_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    semi_hard_miner,
    soft_triple_loss,
    softmax_cross_entropy,
    triplet_margin_loss,
)

NAMED_SIZES = {"sop": (256, 512, 11318), "cub": (180, 512, 100)}
PROXY_LOSSES = ("proxy_anchor", "proxy_nca", "hpl_pa", "hpl_nca", "triplet_bh", "softmax_ce")
PAIR_LOSSES = (
    "contrastive",
    "triplet_all",
    "triplet_semihard",
    "multi_similarity",
    "margin",
    "ntxent",
    "lifted",
    "generalized_lifted",
    "circle",
)
CLASSIFICATION_LOSSES = ("normalized_softmax", "cosface", "arcface", "soft_triple")
LOSSES = PROXY_LOSSES + PAIR_LOSSES + CLASSIFICATION_LOSSES
MARGIN, ALPHA = 0.1, 32.0  # proxy anchor
NCA_SCALE = 1.0
HPL_WEIGHTS = (1.0, 0.1)
TRIPLET_MARGIN = 0.1
CE_TEMPERATURE, CE_SMOOTHING = 0.5, 0.1
MS_EPSILON = 0.1  # multi_similarity_miner / MultiSimilarityMiner
CENTERS_PER_CLASS = 10  # soft_triple (PML's default)
IMAGES_PER_CLASS = 4
# At most this many timed runs for the losses whose PML baseline is slow (see --no-repeats-cap).
# Their PML baselines take seconds per call at the sop size (ntxent and lifted build a
# (positive pairs x negative pairs) matrix); the "centers" matmul reference row follows soft_triple.
REPEATS_CAP: dict[str, int] = {"ntxent": 5, "lifted": 5, "soft_triple": 5}
# Which matmul reference (a key of matmul_steps) each loss is set against; none for the others.
REFERENCE = {
    "proxy_anchor": "level0",
    "proxy_nca": "level0",
    "hpl_pa": "hpl",
    "hpl_nca": "hpl",
    **dict.fromkeys(PAIR_LOSSES, "gram"),
    **dict.fromkeys(("normalized_softmax", "cosface", "arcface"), "level0"),
    "soft_triple": "centers",
}
REFERENCE_LABEL = {
    "level0": "3 matmuls (x@P.T, g@P, g.T@x)",
    "gram": "Gram matmuls (x@x.T, g@x, g.T@x)",
    "centers": f"3 matmuls over C*{CENTERS_PER_CLASS} centers",
}


@dataclass
class Inputs:
    batch: int
    dim: int
    classes: int
    coarse: int
    x: np.ndarray  # (B, d) raw embeddings
    x_unit: np.ndarray  # (B, d) L2-normalised (what CGD feeds the triplet loss)
    labels: np.ndarray  # (B,) int32 in [0, C)
    proxies: np.ndarray  # (C, d); also the class weights of the classification losses
    coarse_proxies: np.ndarray  # (K, d)
    assignment: np.ndarray  # (C,) int32 in [0, K)
    logits: np.ndarray  # (B, C) for the cross-entropy
    centers: np.ndarray  # (C * CENTERS_PER_CLASS, d) SoftTriple's centers, class-major

    @property
    def coarse_labels(self) -> np.ndarray:
        return self.assignment[self.labels]


def make_inputs(batch: int, dim: int, classes: int, seed: int = 0, with_centers: bool = True) -> Inputs:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    num_batch_classes = -(-batch // IMAGES_PER_CLASS)
    chosen = rng.choice(classes, num_batch_classes, replace=num_batch_classes > classes)
    labels = np.repeat(chosen, IMAGES_PER_CLASS)[:batch].astype(np.int32)
    coarse = max(2, round(classes / 10))
    # Every coarse group gets about C/K classes; contents do not change the cost.
    assignment = rng.permutation(np.arange(classes) % coarse).astype(np.int32)
    proxies = rng.standard_normal((classes, dim), dtype=np.float32)
    coarse_proxies = rng.standard_normal((coarse, dim), dtype=np.float32)
    logits = rng.standard_normal((batch, classes), dtype=np.float32) * 3.0
    # Drawn last, so the other inputs do not depend on whether SoftTriple is run.
    centers_shape = (classes * CENTERS_PER_CLASS, dim) if with_centers else (0, dim)
    return Inputs(
        batch=batch,
        dim=dim,
        classes=classes,
        coarse=coarse,
        x=x,
        x_unit=x / np.linalg.norm(x, axis=1, keepdims=True),
        labels=labels,
        proxies=proxies,
        coarse_proxies=coarse_proxies,
        assignment=assignment,
        logits=logits,
        centers=rng.standard_normal(centers_shape, dtype=np.float32),
    )


# --------------------------------------------------------------------------------------------- JAX


def _with_miner(loss, miner):
    """``loss(x, y, **miner(x, y))``: the mining runs inside the same jitted call."""

    def mined(x, y):
        return loss(x, y, **miner(x, y))

    return mined


def jax_steps(inp: Inputs) -> dict[str, tuple]:
    """name -> (jitted value_and_grad, args). Each returns (loss, grads)."""
    pa = jax.jit(
        jax.value_and_grad(functools.partial(proxy_anchor_loss, margin=MARGIN, alpha=ALPHA), argnums=(0, 2))
    )
    nca = jax.jit(jax.value_and_grad(functools.partial(proxy_nca_loss, scale=NCA_SCALE), argnums=(0, 2)))

    def hpl(x, y, p0, p1, a0):
        return hierarchical_proxy_loss(
            x, y, (p0, p1), (a0,), level_weights=HPL_WEIGHTS, margin=MARGIN, alpha=ALPHA
        )

    hpl_step = jax.jit(jax.value_and_grad(hpl, argnums=(0, 2, 3)))

    def hpl_nca(x, y, p0, p1, a0):
        return hierarchical_proxy_loss(
            x, y, (p0, p1), (a0,), level_weights=HPL_WEIGHTS, base_loss=proxy_nca_loss, scale=NCA_SCALE
        )

    hpl_nca_step = jax.jit(jax.value_and_grad(hpl_nca, argnums=(0, 2, 3)))
    triplet = jax.jit(
        jax.value_and_grad(functools.partial(batch_hard_triplet_loss, margin=TRIPLET_MARGIN), argnums=0)
    )
    ce = jax.jit(
        jax.value_and_grad(
            functools.partial(
                softmax_cross_entropy, temperature=CE_TEMPERATURE, label_smoothing=CE_SMOOTHING
            ),
            argnums=0,
        )
    )
    x, xu, y = jnp.asarray(inp.x), jnp.asarray(inp.x_unit), jnp.asarray(inp.labels)
    p0, p1, a0 = jnp.asarray(inp.proxies), jnp.asarray(inp.coarse_proxies), jnp.asarray(inp.assignment)
    steps = {
        "proxy_anchor": (pa, (x, y, p0)),
        "proxy_nca": (nca, (x, y, p0)),
        "hpl_pa": (hpl_step, (x, y, p0, p1, a0)),
        "hpl_nca": (hpl_nca_step, (x, y, p0, p1, a0)),
        "triplet_bh": (triplet, (xu, y)),
        "softmax_ce": (ce, (jnp.asarray(inp.logits), y)),
    }

    # Pair losses: PML's defaults; gradient w.r.t. the raw embeddings.
    pair = {
        "contrastive": contrastive_loss,
        "triplet_all": triplet_margin_loss,
        "triplet_semihard": _with_miner(triplet_margin_loss, semi_hard_miner),
        "multi_similarity": _with_miner(
            multi_similarity_loss, functools.partial(multi_similarity_miner, epsilon=MS_EPSILON)
        ),
        "ntxent": ntxent_loss,
        "lifted": lifted_structure_loss,
        "generalized_lifted": generalized_lifted_structure_loss,
        "circle": circle_loss,
    }
    for name, loss in pair.items():
        steps[name] = (jax.jit(jax.value_and_grad(loss, argnums=0)), (x, y))
    margin = functools.partial(margin_loss, learn_beta=True, num_classes=inp.classes)
    beta = init_margin_beta(num_classes=inp.classes)  # PML's β = 1.2 for every class
    steps["margin"] = (jax.jit(jax.value_and_grad(margin, argnums=(0, 2))), (x, y, beta))

    # Classification losses: PML's defaults; gradients w.r.t. embeddings and weights.
    classification = {
        "normalized_softmax": normalized_softmax_loss,
        "cosface": cosface_loss,
        "arcface": arcface_loss,
    }
    for name, loss in classification.items():
        steps[name] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 2))), (x, y, p0))
    if inp.centers.shape[0]:
        soft_triple = functools.partial(soft_triple_loss, centers_per_class=CENTERS_PER_CLASS)
        steps["soft_triple"] = (
            jax.jit(jax.value_and_grad(soft_triple, argnums=(0, 2))),
            (x, y, jnp.asarray(inp.centers)),
        )
    return steps


@jax.jit
def three_matmuls(x, p, g):
    """Exactly the products of a proxy loss's forward+backward: logits, dL/dx, dL/dP."""
    return x @ p.T, g @ p, g.T @ x


@jax.jit
def six_matmuls(x, p0, g0, p1, g1):
    return three_matmuls(x, p0, g0), three_matmuls(x, p1, g1)


@jax.jit
def gram_matmuls(x, g):
    """The products of a pair loss's forward+backward: the Gram matrix, then dL/dx = (g + g.T) @ x."""
    return x @ x.T, g @ x, g.T @ x


def matmul_steps(inp: Inputs, rng: np.random.Generator, needed: set[str]) -> dict[str, tuple]:
    """The matmul references named in ``needed`` (keys of ``REFERENCE_LABEL`` and "hpl")."""
    x = jnp.asarray(inp.x)
    p0, p1 = jnp.asarray(inp.proxies), jnp.asarray(inp.coarse_proxies)
    g0 = jnp.asarray(rng.standard_normal((inp.batch, inp.classes), dtype=np.float32))
    g1 = jnp.asarray(rng.standard_normal((inp.batch, inp.coarse), dtype=np.float32))
    steps = {"level0": (three_matmuls, (x, p0, g0)), "hpl": (six_matmuls, (x, p0, g0, p1, g1))}
    if "gram" in needed:
        gb = jnp.asarray(rng.standard_normal((inp.batch, inp.batch), dtype=np.float32))
        steps["gram"] = (gram_matmuls, (x, gb))
    if "centers" in needed and inp.centers.shape[0]:
        gc = jnp.asarray(rng.standard_normal((inp.batch, inp.centers.shape[0]), dtype=np.float32))
        steps["centers"] = (three_matmuls, (x, jnp.asarray(inp.centers), gc))
    return steps


# ------------------------------------------------------------------------------------------- torch


def torch_steps(inp: Inputs, names) -> dict[str, tuple]:
    """name -> (callable doing forward+backward, returning (loss, grads)), for the losses in ``names``.

    Grads come in our layouts: PML's (d, C) class weights' gradients are returned transposed (a
    view, no copy).
    """
    import torch
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    names = set(names)
    x = torch.from_numpy(inp.x.copy()).requires_grad_(True)
    xu = torch.from_numpy(inp.x_unit.copy()).requires_grad_(True)
    logits = torch.from_numpy(inp.logits.copy()).requires_grad_(True)
    y = torch.from_numpy(inp.labels.astype(np.int64))
    y1 = torch.from_numpy(inp.coarse_labels.astype(np.int64))

    def with_proxies(loss, proxies):
        with torch.no_grad():
            loss.proxies.copy_(torch.from_numpy(proxies))
        return loss

    def run(compute, params, transposed=()):
        for t in params:
            t.grad = None
        loss = compute()
        loss.backward()
        return loss.detach(), tuple(t.grad.T if i in transposed else t.grad for i, t in enumerate(params))

    steps = {}
    if "proxy_anchor" in names:
        pa = with_proxies(
            pml_losses.ProxyAnchorLoss(inp.classes, inp.dim, margin=MARGIN, alpha=ALPHA), inp.proxies
        )
        steps["proxy_anchor"] = lambda: run(lambda: pa(x, y), (x, pa.proxies))
    if "proxy_nca" in names:
        nca = with_proxies(
            pml_losses.ProxyNCALoss(inp.classes, inp.dim, softmax_scale=NCA_SCALE), inp.proxies
        )
        steps["proxy_nca"] = lambda: run(lambda: nca(x, y), (x, nca.proxies))
    if "hpl_pa" in names:
        hpl0 = with_proxies(
            pml_losses.ProxyAnchorLoss(inp.classes, inp.dim, margin=MARGIN, alpha=ALPHA), inp.proxies
        )
        hpl1 = with_proxies(
            pml_losses.ProxyAnchorLoss(inp.coarse, inp.dim, margin=MARGIN, alpha=ALPHA), inp.coarse_proxies
        )
        steps["hpl_pa"] = lambda: run(
            lambda: HPL_WEIGHTS[0] * hpl0(x, y) + HPL_WEIGHTS[1] * hpl1(x, y1),
            (x, hpl0.proxies, hpl1.proxies),
        )
    if "hpl_nca" in names:
        nca0 = with_proxies(pml_losses.ProxyNCALoss(inp.classes, inp.dim, softmax_scale=NCA_SCALE), inp.proxies)
        nca1 = with_proxies(
            pml_losses.ProxyNCALoss(inp.coarse, inp.dim, softmax_scale=NCA_SCALE), inp.coarse_proxies
        )
        steps["hpl_nca"] = lambda: run(
            lambda: HPL_WEIGHTS[0] * nca0(x, y) + HPL_WEIGHTS[1] * nca1(x, y1),
            (x, nca0.proxies, nca1.proxies),
        )
    if "triplet_bh" in names:
        triplet = pml_losses.TripletMarginLoss(margin=TRIPLET_MARGIN)
        batch_hard = pml_miners.BatchHardMiner()
        steps["triplet_bh"] = lambda: run(lambda: triplet(xu, y, batch_hard(xu, y)), (xu,))
    if "softmax_ce" in names:
        ce = torch.nn.CrossEntropyLoss(label_smoothing=CE_SMOOTHING)
        steps["softmax_ce"] = lambda: run(lambda: ce(logits / CE_TEMPERATURE, y), (logits,))

    # Pair losses (PML's defaults), on the raw embeddings.
    def pair_step(loss, miner=None):
        if miner is None:
            return lambda: run(lambda: loss(x, y), (x,))
        return lambda: run(lambda: loss(x, y, miner(x, y)), (x,))

    pair = {
        "contrastive": lambda: pair_step(pml_losses.ContrastiveLoss()),
        "triplet_all": lambda: pair_step(pml_losses.TripletMarginLoss()),
        "triplet_semihard": lambda: pair_step(
            pml_losses.TripletMarginLoss(), pml_miners.TripletMarginMiner(type_of_triplets="semihard")
        ),
        "multi_similarity": lambda: pair_step(
            pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(epsilon=MS_EPSILON)
        ),
        "ntxent": lambda: pair_step(pml_losses.NTXentLoss()),
        "lifted": lambda: pair_step(pml_losses.LiftedStructureLoss()),
        "generalized_lifted": lambda: pair_step(pml_losses.GeneralizedLiftedStructureLoss()),
        "circle": lambda: pair_step(pml_losses.CircleLoss()),
    }
    for name, make in pair.items():
        if name in names:
            steps[name] = make()
    if "margin" in names:
        margin = pml_losses.MarginLoss(learn_beta=True, num_classes=inp.classes)
        steps["margin"] = lambda: run(lambda: margin(x, y), (x, margin.beta))

    # Classification losses (PML's defaults): W (d, C) = our weights transposed.
    def with_weights(loss, param_name, weights):
        param = getattr(loss, param_name)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(weights.T)))
        return lambda: run(lambda: loss(x, y), (x, param), transposed=(1,))

    classification = {
        "normalized_softmax": pml_losses.NormalizedSoftmaxLoss,
        "cosface": pml_losses.CosFaceLoss,
        "arcface": pml_losses.ArcFaceLoss,
    }
    for name, cls in classification.items():
        if name in names:
            steps[name] = with_weights(cls(inp.classes, inp.dim), "W", inp.proxies)
    if "soft_triple" in names and inp.centers.shape[0]:
        soft_triple = pml_losses.SoftTripleLoss(inp.classes, inp.dim, centers_per_class=CENTERS_PER_CLASS)
        steps["soft_triple"] = with_weights(soft_triple, "fc", inp.centers)
    return steps


def torch_matmuls(inp: Inputs, rng: np.random.Generator, needed: set[str]) -> dict[str, object]:
    """torch versions of the matmul references in ``needed``."""
    import torch

    x, p = torch.from_numpy(inp.x), torch.from_numpy(inp.proxies)
    g = torch.from_numpy(rng.standard_normal((inp.batch, inp.classes), dtype=np.float32))
    calls = {"level0": lambda: (x @ p.T, g @ p, g.T @ x)}
    if "gram" in needed:
        gb = torch.from_numpy(rng.standard_normal((inp.batch, inp.batch), dtype=np.float32))
        calls["gram"] = lambda: (x @ x.T, gb @ x, gb.T @ x)
    if "centers" in needed and inp.centers.shape[0]:
        c = torch.from_numpy(inp.centers)
        gc = torch.from_numpy(rng.standard_normal((inp.batch, inp.centers.shape[0]), dtype=np.float32))
        calls["centers"] = lambda: (x @ c.T, gc @ c, gc.T @ x)
    return calls


# -------------------------------------------------------------------------------------- reporting

AGREEMENT_OK = 1e-4  # value; gradients: LOUD_DIFF
LOUD_DIFF = 1e-3


def _max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_agreement(inp: Inputs, ours: dict, theirs: dict, label: str) -> None:
    rows, loud = [], []
    for name in LOSSES:
        if name not in ours or name not in theirs:
            continue
        fn, args = ours[name]
        value, grads = fn(*args)
        grads = grads if isinstance(grads, tuple) else (grads,)
        t_value, t_grads = theirs[name]()
        value, t_value = float(value), float(t_value)
        grads = [np.asarray(g) for g in grads]
        if name == "triplet_bh":
            # PML normalises inside (a no-op on these unit rows), so its gradient is ours with the
            # radial part projected out; compare that.
            xu = inp.x_unit
            grads[0] = grads[0] - np.sum(grads[0] * xu, axis=1, keepdims=True) * xu
        diffs = [_max_rel_diff(g, tg.numpy()) for g, tg in zip(grads, t_grads, strict=True)]
        grad_diff = max(diffs)
        rel = abs(value - t_value) / max(abs(t_value), 1e-30)
        if rel > LOUD_DIFF or grad_diff > LOUD_DIFF:
            status = "DIFFERS"
            loud.append(name)
        elif rel < AGREEMENT_OK:
            status = "ok"
        else:
            status = "ok (value > 1e-4)"
        rows.append(
            (
                name,
                f"{value:.6f}",
                f"{t_value:.6f}",
                f"{rel:.1e}",
                f"{grad_diff:.1e}",
                " ".join(f"{d:.1e}" for d in diffs),
                status,
            )
        )
    _timing.print_table(
        ("loss", "ours", "torch/PML", "rel diff", "max grad rel diff", "per gradient", ""),
        rows,
        title=f"Agreement with pytorch-metric-learning / torch at {label} (same inputs, same initial "
        "parameters; grad rel diff = max|ours - PML| / max|PML| per gradient (x, then proxies / "
        "weights / beta); triplet_bh: gradient tangential to the unit sphere, as PML normalises inside)",
    )
    if loud:
        print(
            f"\n!!! WARNING: {', '.join(loud)} differ(s) from PML by more than {LOUD_DIFF:.0e} "
            f"(value or gradient) at {label}; the timings below may not compare the same computation. !!!\n",
            flush=True,
        )


def parse_sizes(spec: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    result = []
    for item in spec:
        if item.lower() in NAMED_SIZES:
            result.append((item.lower(), NAMED_SIZES[item.lower()]))
            continue
        try:
            b, d, c = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {item!r} is neither one of {sorted(NAMED_SIZES)} nor BxDxC") from None
        result.append((item, (b, d, c)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
    parser.add_argument(
        "--sizes", nargs="+", default=list(NAMED_SIZES), help="sop, cub and/or BxDxC (default: sop cub)"
    )
    parser.add_argument(
        "--losses",
        nargs="+",
        default=list(LOSSES),
        choices=LOSSES,
        metavar="LOSS",
        help=f"some of: {', '.join(LOSSES)} (default: all of them)",
    )
    parser.add_argument("--skip-torch", action="store_true", help="do not time or check against PML/torch")
    parser.add_argument(
        "--no-repeats-cap",
        action="store_true",
        help="time every loss --repeats times (default: at most "
        + ", ".join(f"{n} runs for {name}" for name, n in REPEATS_CAP.items())
        + ")",
    )
    args = parser.parse_args(argv)
    selected = [name for name in LOSSES if name in args.losses]  # table order, no duplicates
    cap = {} if args.no_repeats_cap else REPEATS_CAP

    torch = None
    extra = []
    if not args.skip_torch:
        try:
            import pytorch_metric_learning
            import torch

            torch.set_num_threads(_timing.cpu_count())
            extra.append(
                f"torch {torch.__version__} (threads={torch.get_num_threads()}), "
                f"pytorch-metric-learning {pytorch_metric_learning.__version__}"
            )
        except ImportError as error:
            extra.append(f"torch / pytorch-metric-learning not importable ({error}); torch columns skipped")
            torch = None
    print(_timing.describe_environment(extra))
    print(
        f"timing: median of {args.repeats} runs after {args.warmup} warm-up runs; float32; "
        f"labels: B/{IMAGES_PER_CLASS} classes x {IMAGES_PER_CLASS} images"
    )
    capped = {name: n for name, n in cap.items() if name in selected and n < args.repeats}
    if capped:
        print(
            "repeats capped (slow PML baselines; --no-repeats-cap to lift): "
            + ", ".join(f"{name} {n} runs" for name, n in capped.items())
            + (" (and its matmul reference row)" if "soft_triple" in capped else "")
        )
    print(
        f"settings: proxy_anchor margin={MARGIN} alpha={ALPHA}; proxy_nca scale={NCA_SCALE}; "
        f"hpl_pa / hpl_nca = proxy anchor / proxy nca on 2 levels, weights {HPL_WEIGHTS}, coarse K = round(C/10); "
        f"triplet_bh margin={TRIPLET_MARGIN} on L2-normalised x; "
        f"softmax_ce on (B, C) logits, temperature={CE_TEMPERATURE}, label_smoothing={CE_SMOOTHING}"
    )
    print(
        "settings: pair and classification losses at PML's defaults, on raw x (normalised inside); "
        "triplet_all / margin: all triplets; triplet_semihard: TripletMarginMiner(semihard, margin 0.2); "
        f"multi_similarity: MultiSimilarityMiner(epsilon={MS_EPSILON}); margin: learn_beta, one beta per "
        f"class (C of them); soft_triple: {CENTERS_PER_CLASS} centers per class, weights (C*{CENTERS_PER_CLASS}, d)"
    )

    rows = []
    for size_name, (batch, dim, classes) in parse_sizes(args.sizes):
        inp = make_inputs(batch, dim, classes, with_centers="soft_triple" in selected)
        label = f"{size_name} B={batch} d={dim} C={classes} K={inp.coarse}"
        ours = {k: v for k, v in jax_steps(inp).items() if k in selected}
        theirs = torch_steps(inp, selected) if torch else {}
        # First call = trace + compile + one run; before anything else calls the functions.
        compile_time = {
            name: _timing.time_call(lambda f=fn, a=fn_args: f(*a), repeats=1, warmup=0).median
            for name, (fn, fn_args) in ours.items()
        }
        if torch is not None:
            check_agreement(inp, ours, theirs, label)

        rng = np.random.default_rng(1)
        needed = {"level0"} | {REFERENCE[name] for name in selected if name in REFERENCE}
        mm_steps = matmul_steps(inp, rng, needed)
        mm = {key: (lambda f=f, a=a: f(*a)) for key, (f, a) in mm_steps.items()}
        torch_mm = torch_matmuls(inp, rng, needed) if torch is not None else {}
        no_sync = {"torch": lambda r: r}  # torch CPU ops are synchronous
        # The matmul references alone (with torch's), then every loss. Each row's callables run
        # interleaved, round by round, so background load hits all alike.
        for reference in ("level0", "gram", "centers"):
            if reference not in needed or reference not in mm:
                continue
            calls = {"jax": mm[reference]}
            if reference in torch_mm:
                calls["torch"] = torch_mm[reference]
            repeats = args.repeats
            if reference == "centers":
                repeats = min(repeats, cap.get("soft_triple", repeats))
            t = _timing.time_interleaved(calls, repeats=repeats, warmup=args.warmup, syncs=no_sync)
            rows.append(
                (
                    label,
                    REFERENCE_LABEL[reference],
                    _timing.format_seconds(t["jax"].median),
                    _timing.format_seconds(t["jax"].best),
                    "-",
                    "-",
                    "-",
                    _timing.format_seconds(t["torch"].median) if "torch" in t else "-",
                    _timing.format_ratio(t["torch"].median / t["jax"].median) if "torch" in t else "-",
                    _timing.format_ratio(t["torch"].best / t["jax"].best) if "torch" in t else "-",
                    f"{t['jax'].spread:.0%}",
                    str(len(t["jax"].runs)),
                )
            )
        for name in selected:
            if name not in ours:  # soft_triple without centers cannot happen; keep it robust
                continue
            fn, fn_args = ours[name]
            calls = {"jax": lambda f=fn, a=fn_args: f(*a)}
            reference = REFERENCE.get(name)
            if reference in mm:
                calls["matmuls"] = mm[reference]
            if name in theirs:
                calls["torch"] = theirs[name]
            repeats = min(args.repeats, cap.get(name, args.repeats))
            t = _timing.time_interleaved(calls, repeats=repeats, warmup=args.warmup, syncs=no_sync)
            ours_time = t["jax"].median
            ref_time = t["matmuls"].median if "matmuls" in t else None
            torch_time = t["torch"].median if "torch" in t else None
            rows.append(
                (
                    label,
                    name,
                    _timing.format_seconds(ours_time),
                    _timing.format_seconds(t["jax"].best),
                    _timing.format_seconds(compile_time[name]),
                    _timing.format_seconds(ref_time),
                    _timing.format_ratio(ours_time / ref_time) if ref_time else "-",
                    _timing.format_seconds(torch_time),
                    _timing.format_ratio(torch_time / ours_time) if torch_time else "-",
                    _timing.format_ratio(t["torch"].best / t["jax"].best) if torch_time else "-",
                    f"{t['jax'].spread:.0%}",
                    str(len(t["jax"].runs)),
                )
            )
            print(f"  timed: {label} {name}", flush=True)

    _timing.print_table(
        (
            "size",
            "loss (fwd+bwd)",
            "jax",
            "jax best",
            "compile",
            "matmuls",
            "jax/mm",
            "torch",
            "torch/jax",
            "best/best",
            "spread",
            "runs",
        ),
        rows,
        title="Forward+backward wall time (median; 'matmuls' = the loss's products alone, jitted; "
        "'compile' = first call; 'best/best' = torch's fastest run over ours, the ratio least touched "
        "by background load; 'spread' = (max-min)/median of the jax runs; 'runs' = timed runs each). "
        "Targets: proxy and classification losses jax/mm <= 1.5; pair and classification losses "
        "torch/jax >= 2 (pair losses' jax/mm is information only)",
    )
    print(f"peak RSS of this process: {_timing.peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
