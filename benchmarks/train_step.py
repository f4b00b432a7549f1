"""One full training step, hdml_jax against PyTorch: images/s, step time, peak memory, MFU.

    python benchmarks/train_step.py                                   # batch 120 and 256, both methods, both frameworks
    python benchmarks/train_step.py --batch 256 --methods hpl_pa --frameworks jax
    python benchmarks/train_step.py --depth 18 --width 16 --size 64 --classes 100 --batch 16   # a quick CPU check

What is timed, per (framework, method, batch): the whole optimizer step on a device-resident
batch of uint8 images (the input pipeline is not part of it), after warm-up steps (compilation
excluded, shown separately):

* **hdml_jax**: the trainer's own compiled step (``hdml_jax.steps.compile_train_step``) for
  ``configs/sop.py:method=...``: ResNet-50 (``--depth``) at ``--size`` px, bf16 compute
  (``--dtype``; parameters stay float32), Proxy-Anchor or HPL-PA over SOP's 11,318 classes (HPL:
  1,000 coarse proxies, hierarchy active), AdamW with the recipe's parameter groups, gradient
  clipping, BatchNorm frozen as the recipe says (SOP: not frozen), uint8 → normalised on device.
* **PyTorch**: the same network built from torch layers (``tests/torch_resnet.py``: torchvision's
  ResNet), channels_last, bf16 autocast, GAP+GMP → Linear → L2, pytorch-metric-learning's
  ``ProxyAnchorLoss`` (HPL-PA: two of them, weighted 1.0 / 0.1, the coarse labels drawn at
  random), AdamW with the proxies at ×100 and ``clip_grad_value_`` 10 — Proxy-Anchor's
  ``train.py`` step. ``torch.compile`` is tried on the network (``--no-compile`` to skip); if it
  fails the eager step is timed and the table says so.

``--backbone vit_s16`` times the ViT-S/16 recipe instead (``configs/sop.py:...,backbone=
vit_s16_dino``: HIER's command, 128-d LayerNorm head, AdamW ε 1e-4, head ×100, proxies ×1e4, the
patch embedding frozen, every gradient clamped to ±10) against the same step in PyTorch
(``tests/torch_vit.py`` with the fused attention timm uses, the same head, PML's
``ProxyAnchorLoss``, HIER's parameter groups and ``clip_gradients_value``).

Columns: images/s, milliseconds per step (median of ``--steps`` timed steps), first call
(compilation), peak device memory (JAX: ``memory_stats()['peak_bytes_in_use']``; torch:
``max_memory_allocated``; "-" on CPU), and MFU: the compiled step's FLOPs (XLA's cost analysis of
the hdml_jax step; the same count is used for the torch step, which does the same arithmetic)
divided by step time and the device's dense bf16 peak (``--peak-tflops``, or looked up by device
name; "-" when unknown). ``--json FILE`` also writes every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import _timing
import jax
import jax.numpy as jnp
import numpy as np

SOP_CLASSES, SOP_COARSE = 11318, 1000
# Dense bf16 peak TFLOP/s by device-name fragment (vendor data sheets; SXM parts).
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16)
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    for fragment, value in BF16_PEAK_TFLOPS.items():
        if fragment.lower() in device_name.lower():
            return value
    return None


# ----------------------------------------------------------------------------- hdml_jax


def jax_config(method: str, args: argparse.Namespace):
    from tests.test_train import load_config_module

    vit = args.backbone == "vit_s16"
    c = load_config_module("sop").get_config(f"method={method}" + (",backbone=vit_s16_dino" if vit else ""))
    c.model.pretrained = "none"  # weights do not change the step's cost
    c.model.depth, c.model.width, c.model.dtype = args.depth, args.width, args.dtype
    c.dataset.image_size = args.size
    c.optimizer.warmup_epochs = 0
    c.loss.num_coarse_groups = (min(SOP_COARSE, max(2, args.classes // 10)),)
    return c


def time_jax(method: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hdml_jax import parallel
    from hdml_jax.training import optim, setup, steps

    config = jax_config(method, args)
    config.batch_size = batch
    coarse = tuple(int(g) for g in config.loss.num_coarse_groups) if method == "hpl_pa" else ()
    mesh = setup.make_mesh()
    model = steps.build_model(config, args.classes, coarse, jax.device_count())
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.size, args.size, 3)), train=False)
    )["params"]
    optimizer = optim.make_optimizer(config, steps.unfreeze(shapes), steps_per_epoch=100)
    state = setup.init_state(config, model, None, optimizer, coarse)
    if coarse:  # the hierarchy active, classes spread over the coarse groups
        rng = np.random.default_rng(0)
        state["hierarchy"] = {
            "assignments": (jnp.asarray(rng.integers(0, coarse[0], args.classes), jnp.int32),),
            "active": jnp.ones((), jnp.float32),
        }
    sharding = parallel.state_sharding(state, mesh, False)
    batch_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, sharding)
    step = steps.compile_train_step(model, config, optimizer, sharding, batch_sharding, False)
    rng = np.random.default_rng(1)
    data = {
        "image": jax.device_put(
            rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8), batch_sharding
        ),
        "label": jax.device_put(np.repeat(np.arange(batch // 4), 4)[:batch].astype(np.int32), batch_sharding),
    }
    compiled = step.lower(state, data).compile()
    flops = _flops(compiled)
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start

    def run_step():
        nonlocal state, metrics
        state, metrics = compiled(state, data)
        return metrics

    timing = _timing.time_call(run_step, repeats=args.steps, warmup=args.warmup)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"step_s": timing.median, "first_s": first, "flops": flops, "peak_bytes": peak}


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    value = (analysis or {}).get("flops")
    return float(value) if value else None


# ----------------------------------------------------------------------------- PyTorch


def time_torch(method: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from pytorch_metric_learning import losses as pml_losses

    from tests.torch_resnet import TorchResNet
    from tests.torch_vit import TorchViT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vit = args.backbone == "vit_s16"
    dim = 128 if vit else 512

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if vit:  # HIER's HeadSwitch, Euclidean: ViT → LayerNorm (no affine) → Linear → L2
                self.trunk = TorchViT(16, 384, 12, 6, 14, fused_attention=True)
                self.trunk.patch_embed.proj.requires_grad_(False)
                self.norm = torch.nn.LayerNorm(384, elementwise_affine=False)
                self.embedding = torch.nn.Linear(384, dim)
            else:
                self.trunk = TorchResNet(args.depth, width=args.width)
                self.embedding = torch.nn.Linear(self.trunk.fc.in_features, dim)

        def forward(self, x):
            if vit:
                return torch.nn.functional.normalize(self.embedding(self.norm(self.trunk(x))))
            f = self.trunk.features(x)
            pooled = f.mean((2, 3)) + f.amax((2, 3))
            return torch.nn.functional.normalize(self.embedding(pooled))

    net = Net().to(device)
    if not vit:
        net = net.to(memory_format=torch.channels_last)
    losses = [pml_losses.ProxyAnchorLoss(args.classes, dim, margin=0.1, alpha=32).to(device)]
    weights = [1.0]
    if method == "hpl_pa":
        coarse = min(SOP_COARSE, max(2, args.classes // 10))
        losses.append(pml_losses.ProxyAnchorLoss(coarse, dim, margin=0.1, alpha=32).to(device))
        weights.append(0.1)
    proxies = [p for loss in losses for p in loss.parameters()]
    if vit:  # HIER's groups (utils.py:756-761) and AdamW eps under fp16 (train.py:272)
        head = list(net.embedding.parameters())
        trunk = [p for p in net.trunk.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": trunk, "lr": 5e-6}, {"params": head, "lr": 5e-4}, {"params": proxies, "lr": 5e-2}],
            weight_decay=1e-4,
            eps=1e-4,
        )
    else:
        optimizer = torch.optim.AdamW(
            [{"params": net.parameters(), "lr": 6e-4}, {"params": proxies, "lr": 6e-4 * 100}],
            weight_decay=1e-4,
        )
    compiled_net, compiled = net, "eager"
    if not args.no_compile:
        try:
            compiled_net, compiled = torch.compile(net), "torch.compile"
        except Exception as error:  # any failure: report it, time the eager step instead
            print(f"torch.compile unavailable ({error}); timing eager", file=sys.stderr)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    images = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    labels = torch.arange(batch, device=device) // 4
    coarse_labels = labels % max(2, min(SOP_COARSE, args.classes // 10))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        x = (images.float() - mean) / std
        if not vit:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            embeddings = compiled_net(x).float()
        loss = weights[0] * losses[0](embeddings, labels)
        if len(losses) > 1:
            loss = loss + weights[1] * losses[1](embeddings, coarse_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = [p for p in [*net.parameters(), *proxies] if p.grad is not None]
        torch.nn.utils.clip_grad_value_(trained, 10)
        optimizer.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        step()
    except Exception as error:  # torch.compile can also fail late, at the first call
        if compiled == "eager":
            raise
        print(f"torch.compile failed at the first step ({type(error).__name__}); timing eager", file=sys.stderr)
        compiled_net, compiled = net, "eager"
        step()
    sync()
    first = time.perf_counter() - start
    timing = _timing.time_call(step, repeats=args.steps, warmup=args.warmup, sync=lambda _: sync())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"step_s": timing.median, "first_s": first, "flops": None, "peak_bytes": peak, "mode": compiled}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="global batch sizes (default 120 and 256)")
    parser.add_argument("--methods", nargs="+", default=["proxy_anchor", "hpl_pa"], choices=["proxy_anchor", "hpl_pa"])
    parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    parser.add_argument("--backbone", default="resnet", choices=("resnet", "vit_s16"))
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=SOP_CLASSES)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--no-compile", action="store_true", help="PyTorch: eager only")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    batches = args.batch or [120, 256]
    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", str(device))
    peak = peak_tflops(device_name, args.peak_tflops)
    print(_timing.describe_environment([f"device: {device_name} × {jax.device_count()}"]))
    rows, flops_of = [], {}
    for method in args.methods:
        for batch in batches:
            for framework in args.frameworks:
                try:
                    result = (time_jax if framework == "jax" else time_torch)(method, batch, args)
                except ImportError as error:
                    print(f"skipping {framework}: {error}", file=sys.stderr)
                    continue
                if framework == "jax":
                    flops_of[(method, batch)] = result["flops"]
                flops = flops_of.get((method, batch))
                mfu = flops / result["step_s"] / (peak * 1e12) if flops and peak else None
                row = {"framework": framework, "method": method, "batch": batch, **result, "mfu": mfu}
                rows.append(row)
                print(
                    f"  {framework} {method} batch {batch}: {batch / result['step_s']:.1f} img/s",
                    file=sys.stderr,
                    flush=True,
                )
    network = "ViT-S/16" if args.backbone == "vit_s16" else f"ResNet-{args.depth}"
    table = []
    for row in rows:
        name = row["framework"] + (f" ({row['mode']})" if row.get("mode") else "")
        jax_row = next(
            (r for r in rows if r["framework"] == "jax" and (r["method"], r["batch"]) == (row["method"], row["batch"])),
            None,
        )
        relative = row["step_s"] / jax_row["step_s"] if jax_row and row is not jax_row else None
        table.append(
            [
                name,
                row["method"],
                str(row["batch"]),
                f"{row['batch'] / row['step_s']:.1f}",
                f"{1e3 * row['step_s']:.1f}",
                _timing.format_seconds(row["first_s"]),
                "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB",
                "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                "-" if relative is None else f"{relative:.2f}x",
            ]
        )
    _timing.print_table(
        ["framework", "method", "batch", "img/s", "ms/step", "first call", "peak memory", "MFU", "jax ÷ this img/s"],
        table,
        title=f"One train step, {network} {args.size} px, {args.dtype}, {args.classes} classes "
        f"(MFU: XLA's FLOP count of the hdml_jax step / time / {peak or '?'} TFLOP/s; jax ÷ this > 1: hdml_jax faster)",
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "peak_tflops": peak, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
