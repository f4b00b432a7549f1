"""BN-Inception as in Cadene's ``pretrainedmodels.bninception``, rebuilt from plain torch layers.

Same module names and shapes as Cadene's port (``conv1_7x7_s2``, ``inception_3a_1x1_bn``, ...,
``last_linear``), so ``state_dict()`` has the keys of ``bn_inception-52deb4733.pth``. Pooling uses
torch's own ``MaxPool2d(ceil_mode=True)`` / ``AvgPool2d(count_include_pad=True)``: this is the
independent reference for ``hdml_jax.models.BNInception`` and its weight converter (tests only).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.torch_resnet import randomized_batchnorm

# Widths per block, written out from the layer list of the Caffe prototxt that Cadene ported:
# 1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3_1, double_3x3_2, pool kind, pool_proj.
BLOCKS = {
    "3a": (192, 64, 64, 64, 64, 96, 96, "avg", 32),
    "3b": (256, 64, 64, 96, 64, 96, 96, "avg", 64),
    "3c": (320, None, 128, 160, 64, 96, 96, "stride2", None),
    "4a": (576, 224, 64, 96, 96, 128, 128, "avg", 128),
    "4b": (576, 192, 96, 128, 96, 128, 128, "avg", 128),
    "4c": (576, 160, 128, 160, 128, 160, 160, "avg", 128),
    "4d": (608, 96, 128, 192, 160, 192, 192, "avg", 128),
    "4e": (608, None, 128, 192, 192, 256, 256, "stride2", None),
    "5a": (1056, 352, 192, 320, 160, 224, 224, "avg", 128),
    "5b": (1024, 352, 192, 320, 192, 224, 224, "max", 128),
}


class TorchBNInception(nn.Module):
    """Cadene's BNInception: ``features(x)`` is the ``(N, 1024, 7, 7)`` map at 224 px."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._unit("conv1_7x7_s2", 3, 64, 7, 2)
        self.pool1_3x3_s2 = nn.MaxPool2d((3, 3), stride=(2, 2), dilation=(1, 1), ceil_mode=True)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3)
        self.pool2_3x3_s2 = nn.MaxPool2d((3, 3), stride=(2, 2), dilation=(1, 1), ceil_mode=True)
        for block, (cin, n1, n3r, n3, ndr, nd1, nd2, pool, nproj) in BLOCKS.items():
            p = f"inception_{block}"
            s = 2 if pool == "stride2" else 1
            if n1 is not None:
                self._unit(f"{p}_1x1", cin, n1, 1)
            self._unit(f"{p}_3x3_reduce", cin, n3r, 1)
            self._unit(f"{p}_3x3", n3r, n3, 3, s)
            self._unit(f"{p}_double_3x3_reduce", cin, ndr, 1)
            self._unit(f"{p}_double_3x3_1", ndr, nd1, 3)
            self._unit(f"{p}_double_3x3_2", nd1, nd2, 3, s)
            if pool == "avg":
                setattr(
                    self,
                    f"{p}_pool",
                    nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True),
                )
            elif pool == "max":
                setattr(
                    self, f"{p}_pool", nn.MaxPool2d((3, 3), stride=(1, 1), padding=(1, 1), ceil_mode=True)
                )
            else:
                setattr(self, f"{p}_pool", nn.MaxPool2d((3, 3), stride=(2, 2), ceil_mode=True))
            if nproj is not None:
                self._unit(f"{p}_pool_proj", cin, nproj, 1)
        self.last_linear = nn.Linear(1024, num_classes)

    def _unit(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        setattr(self, name, nn.Conv2d(cin, cout, kernel, stride, kernel // 2))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(cout, affine=True))

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1_3x3_s2(self._run("conv1_7x7_s2", x))
        x = self._run("conv2_3x3", self._run("conv2_3x3_reduce", x))
        x = self.pool2_3x3_s2(x)
        for block, (_, n1, *_rest, _pool, nproj) in BLOCKS.items():
            p = f"inception_{block}"
            outs = []
            if n1 is not None:
                outs.append(self._run(f"{p}_1x1", x))
            outs.append(self._run(f"{p}_3x3", self._run(f"{p}_3x3_reduce", x)))
            y = self._run(f"{p}_double_3x3_1", self._run(f"{p}_double_3x3_reduce", x))
            outs.append(self._run(f"{p}_double_3x3_2", y))
            pooled = getattr(self, f"{p}_pool")(x)
            outs.append(pooled if nproj is None else self._run(f"{p}_pool_proj", pooled))
            x = torch.cat(outs, 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.avg_pool2d(x, kernel_size=x.shape[2]).flatten(1)
        return self.last_linear(x)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, and conv weights scaled so that the
    activations keep a sane magnitude through the 10 blocks; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
                )
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return randomized_batchnorm(model, generator)


def cadene_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as Cadene's file stores it: BatchNorm tensors as ``(1, C)`` (the Caffe port's
    layout, which Proxy-Anchor squeezes back), no ``num_batches_tracked``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        module = key.rpartition(".")[0]
        state[key] = value.clone()[None] if module.endswith("_bn") else value.clone()
    return state
