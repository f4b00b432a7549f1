"""Forward+backward wall time of the hdml_jax losses, against plain matmuls and pytorch-metric-learning.

Run from the repository root::

    python benchmarks/losses.py                       # both sizes, 10 timed runs each
    python benchmarks/losses.py --sizes cub --repeats 5 --skip-torch
    python benchmarks/losses.py --sizes 64x128x1000   # any BxDxC

What is timed, per loss and size: the median (and the best) wall time of one call of the
``jax.jit``-compiled ``jax.value_and_grad`` of the loss with respect to the embeddings and, where
the loss has them, the proxies (every level for HPL), after warm-up runs (so compilation is not
included; it is shown separately as "compile"). Inputs are float32, SOP-like ``P×K`` batches
(``B/4`` classes × 4 images), random proxies.

The callables of one table row (ours, its matmul reference, torch) are timed interleaved, in
rounds of 2 timed calls each (after 1 untimed call that absorbs the hand-over between JAX's and
torch's thread pools), so a busy machine slows them alike and the ratios stay meaningful.

Columns:
  * ``jax``: median seconds of our forward+backward.
  * ``matmuls`` / ``jax/mm``: a jitted function doing exactly the matrix products a proxy loss's
    forward+backward needs (``x@P.T`` (B,C), ``g@P`` (B,d), ``g.T@x`` (C,d); for HPL the same on
    every level) on the same shapes, and our time divided by it: the overhead of everything
    that is not a matmul (target for proxy anchor: ≤ 1.5).
  * ``torch``: the same work with pytorch-metric-learning (``ProxyAnchorLoss``, ``ProxyNCALoss``,
    ``TripletMarginLoss`` + ``BatchHardMiner``; two weighted ``ProxyAnchorLoss`` for HPL) or
    ``torch.nn.CrossEntropyLoss(label_smoothing=...)``, forward + ``.backward()``, with
    ``torch.set_num_threads`` = the usable CPU count; ``torch/jax`` > 1 means we are faster.

Before timing, the values (and gradients) of ours and PML are compared once on the same inputs
and the same initial proxies, and printed.
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
    batch_hard_triplet_loss,
    hierarchical_proxy_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    softmax_cross_entropy,
)

NAMED_SIZES = {"sop": (256, 512, 11318), "cub": (180, 512, 100)}
LOSSES = ("proxy_anchor", "proxy_nca", "hpl_pa", "triplet_bh", "softmax_ce")
MARGIN, ALPHA = 0.1, 32.0  # proxy anchor
NCA_SCALE = 1.0
HPL_WEIGHTS = (1.0, 0.1)
TRIPLET_MARGIN = 0.1
CE_TEMPERATURE, CE_SMOOTHING = 0.5, 0.1
IMAGES_PER_CLASS = 4


@dataclass
class Inputs:
    batch: int
    dim: int
    classes: int
    coarse: int
    x: np.ndarray  # (B, d) raw embeddings
    x_unit: np.ndarray  # (B, d) L2-normalised (what CGD feeds the triplet loss)
    labels: np.ndarray  # (B,) int32 in [0, C)
    proxies: np.ndarray  # (C, d)
    coarse_proxies: np.ndarray  # (K, d)
    assignment: np.ndarray  # (C,) int32 in [0, K)
    logits: np.ndarray  # (B, C) for the cross-entropy

    @property
    def coarse_labels(self) -> np.ndarray:
        return self.assignment[self.labels]


def make_inputs(batch: int, dim: int, classes: int, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    num_batch_classes = -(-batch // IMAGES_PER_CLASS)
    chosen = rng.choice(classes, num_batch_classes, replace=num_batch_classes > classes)
    labels = np.repeat(chosen, IMAGES_PER_CLASS)[:batch].astype(np.int32)
    coarse = max(2, round(classes / 10))
    # Every coarse group gets about C/K classes; contents do not change the cost.
    assignment = rng.permutation(np.arange(classes) % coarse).astype(np.int32)
    return Inputs(
        batch=batch,
        dim=dim,
        classes=classes,
        coarse=coarse,
        x=x,
        x_unit=x / np.linalg.norm(x, axis=1, keepdims=True),
        labels=labels,
        proxies=rng.standard_normal((classes, dim), dtype=np.float32),
        coarse_proxies=rng.standard_normal((coarse, dim), dtype=np.float32),
        assignment=assignment,
        logits=rng.standard_normal((batch, classes), dtype=np.float32) * 3.0,
    )


# --------------------------------------------------------------------------------------------- JAX


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
    return {
        "proxy_anchor": (pa, (x, y, p0)),
        "proxy_nca": (nca, (x, y, p0)),
        "hpl_pa": (hpl_step, (x, y, p0, p1, a0)),
        "triplet_bh": (triplet, (xu, y)),
        "softmax_ce": (ce, (jnp.asarray(inp.logits), y)),
    }


@jax.jit
def three_matmuls(x, p, g):
    """Exactly the products of a proxy loss's forward+backward: logits, dL/dx, dL/dP."""
    return x @ p.T, g @ p, g.T @ x


@jax.jit
def six_matmuls(x, p0, g0, p1, g1):
    return three_matmuls(x, p0, g0), three_matmuls(x, p1, g1)


def matmul_steps(inp: Inputs, rng: np.random.Generator) -> dict[str, tuple]:
    x = jnp.asarray(inp.x)
    p0, p1 = jnp.asarray(inp.proxies), jnp.asarray(inp.coarse_proxies)
    g0 = jnp.asarray(rng.standard_normal((inp.batch, inp.classes), dtype=np.float32))
    g1 = jnp.asarray(rng.standard_normal((inp.batch, inp.coarse), dtype=np.float32))
    return {"level0": (three_matmuls, (x, p0, g0)), "hpl": (six_matmuls, (x, p0, g0, p1, g1))}


# ------------------------------------------------------------------------------------------- torch


def torch_steps(inp: Inputs) -> dict[str, tuple]:
    """name -> (callable doing forward+backward, returning (loss, grads))."""
    import torch
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    x = torch.from_numpy(inp.x.copy()).requires_grad_(True)
    xu = torch.from_numpy(inp.x_unit.copy()).requires_grad_(True)
    logits = torch.from_numpy(inp.logits.copy()).requires_grad_(True)
    y = torch.from_numpy(inp.labels.astype(np.int64))
    y1 = torch.from_numpy(inp.coarse_labels.astype(np.int64))

    def with_proxies(loss, proxies):
        with torch.no_grad():
            loss.proxies.copy_(torch.from_numpy(proxies))
        return loss

    pa = with_proxies(
        pml_losses.ProxyAnchorLoss(inp.classes, inp.dim, margin=MARGIN, alpha=ALPHA), inp.proxies
    )
    nca = with_proxies(pml_losses.ProxyNCALoss(inp.classes, inp.dim, softmax_scale=NCA_SCALE), inp.proxies)
    hpl0 = with_proxies(
        pml_losses.ProxyAnchorLoss(inp.classes, inp.dim, margin=MARGIN, alpha=ALPHA), inp.proxies
    )
    hpl1 = with_proxies(
        pml_losses.ProxyAnchorLoss(inp.coarse, inp.dim, margin=MARGIN, alpha=ALPHA), inp.coarse_proxies
    )
    triplet = pml_losses.TripletMarginLoss(margin=TRIPLET_MARGIN)
    miner = pml_miners.BatchHardMiner()
    ce = torch.nn.CrossEntropyLoss(label_smoothing=CE_SMOOTHING)

    def run(compute, params):
        for t in params:
            t.grad = None
        loss = compute()
        loss.backward()
        return loss.detach(), tuple(t.grad for t in params)

    return {
        "proxy_anchor": lambda: run(lambda: pa(x, y), (x, pa.proxies)),
        "proxy_nca": lambda: run(lambda: nca(x, y), (x, nca.proxies)),
        "hpl_pa": lambda: run(
            lambda: HPL_WEIGHTS[0] * hpl0(x, y) + HPL_WEIGHTS[1] * hpl1(x, y1),
            (x, hpl0.proxies, hpl1.proxies),
        ),
        "triplet_bh": lambda: run(lambda: triplet(xu, y, miner(xu, y)), (xu,)),
        "softmax_ce": lambda: run(lambda: ce(logits / CE_TEMPERATURE, y), (logits,)),
    }


def torch_matmuls(inp: Inputs, rng: np.random.Generator):
    import torch

    x, p = torch.from_numpy(inp.x), torch.from_numpy(inp.proxies)
    g = torch.from_numpy(rng.standard_normal((inp.batch, inp.classes), dtype=np.float32))
    return lambda: (x @ p.T, g @ p, g.T @ x)


# -------------------------------------------------------------------------------------- reporting


def _max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_agreement(inp: Inputs, ours: dict, theirs: dict, label: str) -> None:
    rows = []
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
        grad_diff = max(_max_rel_diff(g, tg.numpy()) for g, tg in zip(grads, t_grads, strict=True))
        rel = abs(value - t_value) / max(abs(t_value), 1e-30)
        ok = rel < 1e-4 and grad_diff < 1e-3
        rows.append(
            (
                name,
                f"{value:.6f}",
                f"{t_value:.6f}",
                f"{rel:.1e}",
                f"{grad_diff:.1e}",
                "ok" if ok else "DIFFERS",
            )
        )
    _timing.print_table(
        ("loss", "ours", "torch/PML", "rel diff", "max grad rel diff", ""),
        rows,
        title=f"Agreement with pytorch-metric-learning / torch at {label} (same inputs, same initial proxies; "
        "triplet: gradient tangential to the unit sphere, as PML normalises inside)",
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
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--skip-torch", action="store_true", help="do not time or check against PML/torch")
    args = parser.parse_args(argv)

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
    print(
        f"settings: proxy_anchor margin={MARGIN} alpha={ALPHA}; proxy_nca scale={NCA_SCALE}; "
        f"hpl_pa = proxy anchor on 2 levels, weights {HPL_WEIGHTS}, coarse K = round(C/10); "
        f"triplet_bh margin={TRIPLET_MARGIN} on L2-normalised x; "
        f"softmax_ce on (B, C) logits, temperature={CE_TEMPERATURE}, label_smoothing={CE_SMOOTHING}"
    )

    rows = []
    for size_name, (batch, dim, classes) in parse_sizes(args.sizes):
        inp = make_inputs(batch, dim, classes)
        label = f"{size_name} B={batch} d={dim} C={classes} K={inp.coarse}"
        ours = {k: v for k, v in jax_steps(inp).items() if k in args.losses}
        theirs = {k: v for k, v in torch_steps(inp).items() if k in args.losses} if torch else {}
        # First call = trace + compile + one run; before anything else calls the functions.
        compile_time = {
            name: _timing.time_call(lambda f=fn, a=fn_args: f(*a), repeats=1, warmup=0).median
            for name, (fn, fn_args) in ours.items()
        }
        if torch is not None:
            check_agreement(inp, ours, theirs, label)

        rng = np.random.default_rng(1)
        mm = {key: (lambda f=f, a=a: f(*a)) for key, (f, a) in matmul_steps(inp, rng).items()}
        no_sync = {"torch": lambda r: r}  # torch CPU ops are synchronous
        # Each row's callables run interleaved, round by round, so background load hits all alike.
        calls = {"jax": mm["level0"]}
        if torch is not None:
            calls["torch"] = torch_matmuls(inp, rng)
        t = _timing.time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, syncs=no_sync)
        rows.append(
            (
                label,
                "3 matmuls (x@P.T, g@P, g.T@x)",
                _timing.format_seconds(t["jax"].median),
                _timing.format_seconds(t["jax"].best),
                "-",
                "-",
                "-",
                _timing.format_seconds(t["torch"].median) if "torch" in t else "-",
                _timing.format_ratio(t["torch"].median / t["jax"].median) if "torch" in t else "-",
                f"{t['jax'].spread:.0%}",
            )
        )
        for name in args.losses:
            fn, fn_args = ours[name]
            calls = {"jax": lambda f=fn, a=fn_args: f(*a)}
            reference = {"proxy_anchor": "level0", "proxy_nca": "level0", "hpl_pa": "hpl"}.get(name)
            if reference:
                calls["matmuls"] = mm[reference]
            if name in theirs:
                calls["torch"] = theirs[name]
            t = _timing.time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, syncs=no_sync)
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
                    f"{t['jax'].spread:.0%}",
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
            "spread",
        ),
        rows,
        title="Forward+backward wall time (median; 'matmuls' = the same products alone, jitted; "
        "'compile' = first call; 'spread' = (max-min)/median of the jax runs)",
    )
    print(f"peak RSS of this process: {_timing.peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
