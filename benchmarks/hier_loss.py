"""Forward+backward wall time of HIER's loss: ours against the official implementation and against
its own matrix products.

Run from the repository root::

    python benchmarks/hier_loss.py                    # batches 90 and 180, 512 LCAs, 128-d
    python benchmarks/hier_loss.py --batches 180 --repeats 5 --dim 512

What is timed, per batch size ``B`` (``B/2`` classes × 2 images, HIER's batches), with ``M`` LCA
proxies of dimension ``d`` and curvature 0.1:

* ``jax``: one call of the jitted ``value_and_grad`` of ``losses.hier_loss`` with respect to the
  batch's points and the LCA parameters (through ``ToPoincare`` with its Riemannian gradient),
  the triplets and the Gumbel noise drawn on the device from a key inside the call.
* ``torch``: the same work as HIER's users run it (``tests/torch_hier.official_hier_forward``,
  written from tjddus9597/HIER-CVPR23 hier/losses.py:17-104): every distance of the ``B + M``
  nodes as one ``(N, N, d)`` Möbius computation (``dist_matrix``), the candidates on the
  device, the triplets drawn per anchor with NumPy on the host, ``F.gumbel_softmax``'s noise,
  then ``.backward()``; float32, ``torch.set_num_threads`` = the usable CPUs.
* ``matmuls``: a jitted function doing only the matrix products the loss needs: the Gram matrix
  of the nodes ``(N, d) @ (d, N)`` and its two backward products, and our time over it
  (``jax/mm``: the cost of everything else: top-k, the draws, gathers, the LCA choices).

``torch/jax`` > 1 means ours is faster (target ≥ 10). The callables are timed interleaved
(``_timing.time_interleaved``) so background load hits them alike.
"""

from __future__ import annotations

import argparse
import sys

import _timing
import numpy as np

C, CLIP_R, TOPK, PER_ANCHOR = 0.1, 2.3, 20, 50  # HIER's scripts: --hyp_c, --clip_r, --topk; t_per_anchor


def measure(batch: int, lcas_count: int, dim: int, repeats: int, with_torch: bool) -> list[str]:
    """One table row: the timings of batch size ``batch``."""
    import jax
    import jax.numpy as jnp
    import torch

    from hdml_jax import hyperbolic, losses
    from tests import torch_hier

    rng = np.random.default_rng(batch)
    raw = rng.normal(size=(batch, dim)).astype(np.float32)
    lca_raw = (rng.normal(size=(lcas_count, dim)) / np.sqrt(dim) * CLIP_R * 0.9).astype(np.float32)
    labels = np.repeat(np.arange(batch // 2), 2)
    z = jnp.asarray(np.asarray(hyperbolic.to_poincare(jnp.asarray(raw), C, CLIP_R)))
    y, lcas = jnp.asarray(labels), jnp.asarray(lca_raw)

    def ours(z, lcas, key):
        points = hyperbolic.to_poincare(lcas, C, CLIP_R, riemannian=True)
        return losses.hier_loss(z, y, points, key, c=C, topk=TOPK, per_anchor=PER_ANCHOR)

    step = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))
    keys = iter(jax.random.split(jax.random.key(0), 100_000))
    nodes = jnp.concatenate([z, lcas])
    cotangent = jnp.ones((nodes.shape[0], nodes.shape[0]), jnp.float32)

    @jax.jit
    def products(nodes, cotangent):  # the Gram matrix and its two backward products
        return nodes @ nodes.T, cotangent @ nodes, cotangent.T @ nodes

    compile_seconds = _timing.time_call(lambda: step(z, lcas, next(keys)), repeats=1, warmup=0).median
    calls = {"jax": lambda: step(z, lcas, next(keys)), "matmuls": lambda: products(nodes, cotangent)}
    syncs = {}
    if with_torch:
        tz, tlcas, ty = torch.tensor(np.asarray(z)), torch.tensor(lca_raw), torch.tensor(labels)

        def theirs():
            a, b = tz.clone().requires_grad_(True), tlcas.clone().requires_grad_(True)
            loss = torch_hier.official_hier_forward(
                a, ty, b, c=C, clip_r=CLIP_R, topk=TOPK, per_anchor=PER_ANCHOR
            )
            loss.backward()
            return loss

        calls["torch"] = theirs
        syncs["torch"] = lambda result: result
    timings = _timing.time_interleaved(calls, repeats=repeats, warmup=1, syncs=syncs)
    ours_s, mm_s = timings["jax"].median, timings["matmuls"].median
    torch_s = timings["torch"].median if "torch" in timings else None
    return [
        f"{batch}",
        _timing.format_seconds(ours_s),
        _timing.format_seconds(mm_s),
        _timing.format_ratio(ours_s / mm_s),
        _timing.format_seconds(torch_s),
        _timing.format_ratio(None if torch_s is None else torch_s / ours_s),
        _timing.format_seconds(compile_seconds),
        f"{timings['jax'].spread:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[90, 180], help="batch sizes B (even)")
    parser.add_argument("--lcas", type=int, default=512, help="LCA proxies M (--num_hproxies)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size d (--emb)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per callable (median shown)")
    parser.add_argument("--skip-torch", action="store_true", help="do not time the official implementation")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(_timing.cpu_count())
    print(_timing.describe_environment([f"torch {torch.__version__}"]))
    print(
        f"HIER loss forward+backward: M = {args.lcas} LCAs, d = {args.dim}, c = {C}, top-{TOPK}, "
        f"{PER_ANCHOR} triplets per anchor"
    )
    rows = []
    for batch in args.batches:
        if batch % 2:
            print(f"batch {batch}: not a multiple of 2 (classes × 2 images); skipped", file=sys.stderr)
            continue
        rows.append(measure(batch, args.lcas, args.dim, args.repeats, not args.skip_torch))
    _timing.print_table(["B", "jax", "matmuls", "jax/mm", "torch", "torch/jax", "compile", "spread"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
