"""Images per second of the backbone: forward (eval) and forward+backward (train step).

    python benchmarks/backbone.py --depth 50 --batch 32 --size 224 --dtype float32 --dtype bfloat16
    python benchmarks/backbone.py --width 16 --size 64          # a quick CPU check
    python benchmarks/backbone.py --backbone vit_s16 --batch 8 --torch   # ViT-S/16 at 224 px

ViT (``--backbone vit_s16`` or ``vit_b16``): ``hdml_jax.models.VisionTransformer`` against the same
network in PyTorch (``tests/torch_vit.py`` with PyTorch's fused ``scaled_dot_product_attention``,
as timm runs it), ``torch.compile``d unless ``--no-compile``; the class token is the output.

Both strides are measured (``last_stride=2``: torchvision; ``1``: CGD, 4× the stage-4 work).
"forward" is ``model.apply`` in eval mode; "fwd+bwd" is ``value_and_grad`` of a scalar of the
features in train mode (BatchNorm statistics updated), which is the backbone part of a train step.
With ``--torch`` and PyTorch installed, the same network built from torch layers
(``tests/torch_resnet.py``) is timed on the same device for comparison.
"""

from __future__ import annotations

import argparse

import _timing
import jax
import jax.numpy as jnp

from hdml_jax.models import ResNet


def measure_jax(depth, width, last_stride, batch, size, dtype, repeats):
    model = ResNet(depth, last_stride=last_stride, width=width, dtype=dtype)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])

    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def objective(params, batch_stats, x):
        features, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(features.astype(jnp.float32) ** 2), updates

    train = jax.jit(jax.value_and_grad(objective, has_aux=True))
    fwd = _timing.time_call(lambda: forward(variables, images), repeats=repeats)
    bwd = _timing.time_call(
        lambda: train(variables["params"], variables["batch_stats"], images), repeats=repeats
    )
    return batch / fwd.median, batch / bwd.median


def time_torch(model, features, batch, size, dtype, repeats):
    """Images/s of ``features(images)`` (a torch module's output) in eval mode without gradients,
    and of forward + backward of a scalar of it in train mode, on CUDA when present."""
    import torch

    device = next(model.parameters()).device.type
    images = torch.randn(batch, 3, size, size, device=device)
    autocast = dtype == "bfloat16"

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        model.eval()
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=autocast):
            return features(images)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            loss = features(images).float().pow(2).mean()
        loss.backward()
        return loss

    fwd = _timing.time_call(forward, repeats=repeats, sync=sync)
    bwd = _timing.time_call(train, repeats=repeats, sync=sync)
    return batch / fwd.median, batch / bwd.median


def _torch_device():
    import sys

    import torch

    sys.path.insert(0, str(_timing.REPO_ROOT))
    torch.set_num_threads(_timing.cpu_count())
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_torch(depth, width, last_stride, batch, size, dtype, repeats):
    device = _torch_device()
    from tests.torch_resnet import TorchResNet

    model = TorchResNet(depth, last_stride=last_stride, width=width).to(device)
    return time_torch(model, model.features, batch, size, dtype, repeats)


VIT_SIZES = {"vit_s16": ("small", 16), "vit_b16": ("base", 16)}


def measure_jax_vit(name, batch, size, dtype, repeats):
    from hdml_jax.models import VisionTransformer
    from hdml_jax.models.vit import SIZES

    width, patch = VIT_SIZES[name]
    dim, depth, heads = SIZES[width]
    model = VisionTransformer(patch, dim, depth, heads, pretrain_grid=224 // patch, dtype=dtype)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])["params"]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    train = jax.jit(
        jax.value_and_grad(
            lambda p, x: jnp.mean(model.apply({"params": p}, x, train=True).astype(jnp.float32) ** 2)
        )
    )
    fwd = _timing.time_call(lambda: forward(params, images), repeats=repeats)
    bwd = _timing.time_call(lambda: train(params, images), repeats=repeats)
    return batch / fwd.median, batch / bwd.median


def measure_torch_vit(name, batch, size, dtype, repeats, compile_network):
    device = _torch_device()
    import torch

    from hdml_jax.models.vit import SIZES
    from tests.torch_vit import TorchViT

    width, patch = VIT_SIZES[name]
    dim, depth, heads = SIZES[width]
    model = TorchViT(patch, dim, depth, heads, 224 // patch, fused_attention=True).to(device)
    network = torch.compile(model) if compile_network else model
    return time_torch(model, network, batch, size, dtype, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch network")
    parser.add_argument("--backbone", default="resnet", choices=("resnet", *VIT_SIZES))
    parser.add_argument("--no-compile", action="store_true", help="PyTorch ViT: eager only")
    args = parser.parse_args()
    dtypes = args.dtype or ["float32"]

    print(_timing.describe_environment())
    rows = []
    for dtype in dtypes:
        if args.backbone != "resnet":
            fwd, bwd = measure_jax_vit(args.backbone, args.batch, args.size, jnp.dtype(dtype), args.repeats)
            row = [f"{args.backbone} {dtype}", f"{fwd:.1f}", f"{bwd:.1f}"]
            if args.torch:
                t_fwd, t_bwd = measure_torch_vit(
                    args.backbone, args.batch, args.size, dtype, args.repeats, not args.no_compile
                )
                row += [f"{t_fwd:.1f}", f"{t_bwd:.1f}", f"{fwd / t_fwd:.2f}x", f"{bwd / t_bwd:.2f}x"]
            rows.append(row)
            continue
        for last_stride in (2, 1):
            setting = (args.depth, args.width, last_stride, args.batch, args.size)
            fwd, bwd = measure_jax(*setting, jnp.dtype(dtype), args.repeats)
            row = [
                f"ResNet-{args.depth} w{args.width} stride{last_stride} {dtype}",
                f"{fwd:.1f}",
                f"{bwd:.1f}",
            ]
            if args.torch:
                t_fwd, t_bwd = measure_torch(*setting, dtype, args.repeats)
                row += [f"{t_fwd:.1f}", f"{t_bwd:.1f}", f"{fwd / t_fwd:.2f}x", f"{bwd / t_bwd:.2f}x"]
            rows.append(row)
    headers = ["model", "jax fwd img/s", "jax fwd+bwd img/s"]
    if args.torch:
        headers += ["torch fwd img/s", "torch fwd+bwd img/s", "fwd jax/torch", "fwd+bwd jax/torch"]
    _timing.print_table(
        headers, rows, title=f"batch {args.batch}, {args.size}x{args.size}, median of {args.repeats}"
    )


if __name__ == "__main__":
    main()
