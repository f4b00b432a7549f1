"""ImageNet weights → Flax variables: torchvision's ResNet for ``hdml_jax.models.ResNet``, Cadene's
BN-Inception for ``hdml_jax.models.BNInception``.

Mapping (reference.md §5): conv kernels OIHW → HWIO; BatchNorm ``weight/bias`` → ``scale/bias``
(params) and ``running_mean/running_var`` → ``mean/var`` (batch_stats); ``layerS.B.name`` →
``layerS_B/name``; ``downsample.0/1`` → ``downsample_conv/downsample_bn``. ``fc.*`` and
``num_batches_tracked`` are ignored. ``last_stride`` does not change any shape, so the same
weights serve both strides.

One-time conversion to a checkpoint that ``config.model.pretrained`` points to::

    python -m hdml_jax.models.convert resnet50-0676ba61.pth --depth 50 --output ~/weights/resnet50

``--config.model.pretrained=torchvision`` does the download and this conversion by itself
(``hdml_jax.models.weights``).

BN-Inception (``bn_inception_to_flax``): Cadene's module names are ours, so the mapping is the
same rename without the ``layerS.B`` step; its BatchNorm tensors, stored ``(1, C)`` by the Caffe
port, are squeezed to ``(C,)`` (as Proxy-Anchor does before ``load_state_dict``) and
``last_linear.*`` (the ImageNet classifier) is dropped::

    python -m hdml_jax.models.convert bn_inception-52deb4733.pth --arch bn_inception --output DIR

A Vision Transformer (DINO's, DeiT's or timm's state dict; ``hdml_jax.models.vit_weights``), its
depth read from the file; the run's ``model.vit`` fields must describe the same network::

    python -m hdml_jax.models.convert dino_deitsmall16_pretrain.pth --arch vit --output DIR

``.pth`` files are read without torch, in either of torch's formats: the zip archive of torch
≥ 1.6 (``read_torch_zip``) and the older single-stream "legacy" format that Cadene's file uses
(``read_torch_legacy``), both in ``torch_pickle``; ``state_dicts.read_state_dict`` picks the reader
by suffix (``.safetensors`` and ``.npz`` too).

A missing or unreadable weights file, weights of another depth or width and an existing output
are the user's to fix: each raises a ``hdml_jax.errors.UserError`` (that also derives from the
built-in class a caller expects), which the command prints as one ``error: ...`` message, exit
status 2 (``HDML_JAX_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hdml_jax.errors import UserError, exit_with_message, first_line
from hdml_jax.models.bn_inception import BNInception
from hdml_jax.models.errors import (
    BadWeightsFileError,
    OutputExistsError,
    WeightsFileNotFoundError,
    WeightsMismatchError,
)
from hdml_jax.models.resnet import STAGES, ResNet
from hdml_jax.models.state_dicts import read_safetensors, read_state_dict
from hdml_jax.models.torch_pickle import read_torch_legacy, read_torch_zip
from hdml_jax.models.vit_weights import load_vit

__all__ = [
    "ARCHITECTURES",
    "BadWeightsFileError",
    "OutputExistsError",
    "WeightsFileNotFoundError",
    "WeightsMismatchError",
    "bn_inception_to_flax",
    "load_bn_inception",
    "load_pretrained",
    "load_torchvision_resnet",
    "main",
    "read_safetensors",
    "read_state_dict",
    "read_torch_legacy",
    "read_torch_zip",
    "resnet_layout",
    "save_pretrained",
    "torchvision_resnet_to_flax",
]

ARCHITECTURES = ("resnet", "bn_inception", "vit")

IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)


def _flax_name(torch_module: str) -> str:
    """``layer3.1.downsample.0`` → ``layer3_1/downsample_conv``; stem names are unchanged."""
    parts = torch_module.split(".")
    if parts[0].startswith("layer"):
        block = f"{parts[0]}_{parts[1]}"
        rest = parts[2:]
        if rest[:1] == ["downsample"]:
            rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
        return "/".join([block, *rest])
    return "/".join(parts)


@functools.lru_cache(maxsize=8)
def _expected_variables(depth: int, width: int) -> dict[str, Any]:
    """The variable shapes of ``ResNet(depth, width=width)`` (traced once per depth and width; read only)."""
    model = ResNet(depth, width=width)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def resnet_layout(state_dict: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(depth, stem width)`` of a torchvision ResNet state dict; None for what is not recognised.

    The depth comes from the number of blocks per stage and the block type (a ``conv3`` means
    bottleneck blocks), the width from ``conv1.weight``'s output channels.
    """
    blocks = dict.fromkeys(("layer1", "layer2", "layer3", "layer4"), 0)
    bottleneck = False
    for key in state_dict:
        parts = str(key).split(".")
        if len(parts) > 2 and parts[0] in blocks and parts[1].isdigit():
            blocks[parts[0]] = max(blocks[parts[0]], int(parts[1]) + 1)
            bottleneck = bottleneck or parts[2] == "conv3"
    layout = ("bottleneck" if bottleneck else "basic", tuple(blocks.values()))
    depth = next((d for d, stages in STAGES.items() if stages == layout), None)
    stem = state_dict.get("conv1.weight")
    width = int(np.shape(stem)[0]) if stem is not None and np.ndim(stem) == 4 else None
    return depth, width


def torchvision_resnet_to_flax(
    state_dict: Mapping[str, Any], depth: int, *, width: int = 64
) -> dict[str, Any]:
    """Convert a torchvision ResNet state dict (name → array) to ``{'params', 'batch_stats'}``.

    Args:
      state_dict: torchvision keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) mapped
        to NumPy arrays (or anything ``np.asarray`` accepts, torch tensors included).
      depth: 18, 34, 50 or 101.
      width: the stem width of the target ``ResNet`` (64 for torchvision's models).

    Raises:
      WeightsMismatchError: (a ``ValueError``) in one line when the weights are a ResNet of
        another depth or width; else listing every missing, unexpected and mis-shaped key at once.
    """
    expected = {collection: _flatten(tree) for collection, tree in _expected_variables(depth, width).items()}
    converted: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    unexpected, misshaped = [], []
    seen_with_wrong_shape: set[str] = set()
    for key, value in state_dict.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        module, _, kind = key.rpartition(".")
        array = np.asarray(value, dtype=np.float32)
        name = _flax_name(module)
        if kind == "weight" and array.ndim == 4:
            collection, path, array = "params", f"{name}/kernel", array.transpose(2, 3, 1, 0)
        elif kind in ("weight", "bias") and array.ndim == 1:
            collection, path = "params", f"{name}/{'scale' if kind == 'weight' else 'bias'}"
        elif kind in ("running_mean", "running_var"):
            collection, path = "batch_stats", f"{name}/{'mean' if kind == 'running_mean' else 'var'}"
        else:
            unexpected.append(key)
            continue
        target = expected[collection].get(path)
        if target is None:
            unexpected.append(key)
        elif target.shape != array.shape:
            seen_with_wrong_shape.add(f"{collection}/{path}")
            misshaped.append(
                f"{key}: got {tuple(np.shape(value))}, ResNet-{depth} needs {_torch_shape(target.shape)}"
            )
        else:
            converted[collection][path] = array
    missing = [
        f"{collection}/{path}"
        for collection, paths in expected.items()
        for path in paths
        if path not in converted[collection] and f"{collection}/{path}" not in seen_with_wrong_shape
    ]
    if missing or unexpected or misshaped:
        if _is_bn_inception(state_dict):
            raise WeightsMismatchError(
                f"the weights are a BN-Inception (Cadene's layout), not a ResNet-{depth}: convert them with "
                "--arch bn_inception (no --depth) and train with model.backbone='bn_inception'."
            )
        found_depth, found_width = resnet_layout(state_dict)
        if (
            found_depth is not None
            and found_width is not None
            and (found_depth, found_width) != (depth, width)
        ):
            raise WeightsMismatchError(
                f"the weights are a ResNet-{found_depth} of width {found_width}, but ResNet-{depth} of "
                f"width {width} was asked for: the depth/width differ. Use weights of ResNet-{depth}, "
                f"or convert these with --depth {found_depth} and train with model.depth={found_depth}"
                + ("" if found_width == width else f", model.width={found_width}")
                + "."
            )
        lines = [f"the weights do not fit ResNet-{depth}:"]
        if missing:
            lines.append(
                f"  missing ({len(missing)}): "
                + ", ".join(missing[:20])
                + (" ..." if len(missing) > 20 else "")
            )
        if unexpected:
            lines.append(
                f"  unexpected ({len(unexpected)}): "
                + ", ".join(unexpected[:20])
                + (" ..." if len(unexpected) > 20 else "")
            )
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): " + "; ".join(misshaped[:20]))
        lines.append("  Check the depth argument and that the file holds a torchvision ResNet state dict.")
        raise WeightsMismatchError("\n".join(lines))
    return {collection: _unflatten(flat) for collection, flat in converted.items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1)) if len(flax_shape) == 4 else tuple(flax_shape)


# ----------------------------------------------------------------------------- BN-Inception

BN_INCEPTION_IGNORED_PREFIXES = ("last_linear.",)  # the 1000-way ImageNet classifier
# Flax leaf → the torch state-dict suffix it comes from (same module name on both sides).
_BN_INCEPTION_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.lru_cache(maxsize=1)
def bn_inception_torch_keys() -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Every key of Cadene's BN-Inception state dict (classifier excluded) → ``(collection, Flax
    path, torch shape)``, derived from ``BNInception``'s own variables (traced once)."""
    shapes = jax.eval_shape(lambda: BNInception().init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    table = {}
    for collection, tree in shapes.items():
        for path, leaf in _flatten(tree).items():
            module, _, name = path.rpartition("/")
            key = f"{module}.{_BN_INCEPTION_LEAVES[(collection, name)]}"
            table[key] = (collection, path, _torch_shape(leaf.shape))
    return table


def _is_bn_inception(state_dict: Mapping[str, Any]) -> bool:
    return "conv1_7x7_s2.weight" in state_dict or "inception_3a_1x1.weight" in state_dict


def _listed(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def bn_inception_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Convert Cadene's BN-Inception state dict (name → array) to ``{'params', 'batch_stats'}``.

    Conv weights OIHW → HWIO; BatchNorm ``weight/bias/running_mean/running_var`` → ``scale/bias``
    (params) and ``mean/var`` (batch_stats), each squeezed from the file's ``(1, C)`` to ``(C,)``
    (a ``(C,)`` tensor, as a re-saved ``state_dict()`` has, is taken as it is). ``last_linear.*``
    and ``num_batches_tracked`` are ignored.

    Raises:
      WeightsMismatchError: (a ``ValueError``) in one line: ResNet weights, or the missing,
        unexpected and mis-shaped keys (the first few of each) and how to fix it.
    """
    if not _is_bn_inception(state_dict):
        depth, width = resnet_layout(state_dict)
        if depth is not None:
            raise WeightsMismatchError(
                f"the weights are a torchvision ResNet-{depth} (width {width}), not BN-Inception: convert "
                f"them with --depth {depth} (no --arch) and train with model.backbone='resnet', or give "
                "Cadene's bn_inception-52deb4733.pth for --arch bn_inception."
            )
    table = bn_inception_torch_keys()
    converted: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    unexpected, misshaped, seen = [], [], set()
    for key, value in state_dict.items():
        if key.startswith(BN_INCEPTION_IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        if key not in table:
            unexpected.append(key)
            continue
        seen.add(key)
        collection, path, torch_shape = table[key]
        array = np.asarray(value, dtype=np.float32)
        if len(torch_shape) == 1 and array.shape == (1, *torch_shape):
            array = array[0]  # the Caffe port's (1, C) BatchNorm tensors
        if array.shape != torch_shape:
            misshaped.append(f"{key} is {tuple(np.shape(value))}, needs {torch_shape}")
            continue
        converted[collection][path] = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    missing = [key for key in table if key not in seen]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        if misshaped:
            parts.append(f"{len(misshaped)} of the wrong shape ({_listed(misshaped, 3)})")
        raise WeightsMismatchError(
            f"the weights do not fit BN-Inception: {'; '.join(parts)}. Give Cadene's BN-Inception state "
            "dict (pretrainedmodels' bn_inception-52deb4733.pth, or a state_dict() of that network)."
        )
    return {collection: _unflatten(flat) for collection, flat in converted.items()}



def load_torchvision_resnet(path: str | Path, depth: int) -> dict[str, Any]:
    """Read a torchvision ResNet file and convert it (see ``torchvision_resnet_to_flax``)."""
    return torchvision_resnet_to_flax(read_state_dict(path), depth)


def load_bn_inception(path: str | Path) -> dict[str, Any]:
    """Read Cadene's BN-Inception file (or any format of its state dict) and convert it
    (see ``bn_inception_to_flax``)."""
    return bn_inception_to_flax(read_state_dict(path))


def save_pretrained(variables: Mapping[str, Any], output: str | Path) -> Path:
    """Write converted variables as an orbax checkpoint directory (atomic)."""
    import orbax.checkpoint as ocp

    output = Path(output).expanduser().resolve()
    if output.exists():
        raise OutputExistsError(f"{output} exists; choose a new directory or remove it first.")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(output, jax.tree.map(np.asarray, dict(variables)))
    checkpointer.wait_until_finished()
    return output


def load_pretrained(path: str | Path) -> dict[str, Any]:
    """Read variables written by ``save_pretrained`` (the ``config.model.pretrained`` directory)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise WeightsFileNotFoundError(
            f"no converted weights at {path}; create them once with "
            "`python -m hdml_jax.models.convert WEIGHTS --depth N --output DIR` (BN-Inception: "
            "--arch bn_inception instead of --depth N)."
        )
    try:
        return ocp.StandardCheckpointer().restore(path)
    except (OSError, ValueError, KeyError) as error:
        raise BadWeightsFileError(
            f"{path} is not a checkpoint written by `python -m hdml_jax.models.convert` "
            f"({first_line(error)}); convert the weights again into a new directory."
        ) from error


def main(argv: list[str] | None = None) -> int:
    """Convert; 0 when done. A user's mistake exits with one ``error: ...`` message (status 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m hdml_jax.models.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "weights",
        help="torchvision ResNet, Cadene BN-Inception or DINO/DeiT/timm ViT weights: .pth, .safetensors or .npz",
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default="resnet", help="the backbone (default resnet)"
    )
    parser.add_argument(
        "--depth", type=int, choices=sorted(STAGES), help="the ResNet's depth (--arch resnet only, required)"
    )
    parser.add_argument("--output", required=True, help="new checkpoint directory")
    args = parser.parse_args(argv)
    if args.arch == "resnet" and args.depth is None:
        parser.error("the following arguments are required: --depth (or give --arch bn_inception)")
    if args.arch != "resnet" and args.depth is not None:
        parser.error(f"--depth applies to --arch resnet only, not --arch {args.arch}")
    try:
        return _convert(args)
    except UserError as error:
        exit_with_message(error)
    return 2  # not reached: exit_with_message exits


def _convert(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser().resolve()
    if output.exists():  # before the conversion, not after it
        raise OutputExistsError(f"{output} exists; choose a new directory or remove it first.")
    if args.arch == "bn_inception":
        variables, name = load_bn_inception(args.weights), "BN-Inception"
    elif args.arch == "vit":
        variables = load_vit(args.weights)
        blocks = sum(1 for key in variables["params"] if key.startswith("blocks_"))
        name = f"ViT ({blocks} blocks, width {variables['params']['pos_embed'].shape[-1]})"
    else:
        variables, name = load_torchvision_resnet(args.weights, args.depth), f"ResNet-{args.depth}"
    output = save_pretrained(variables, args.output)
    count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {name} ({count:,} parameters) to {output}")
    print(f"use it with --config.model.pretrained={output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
