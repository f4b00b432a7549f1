"""BN-Inception: the Flax port against an independent PyTorch build, Cadene's weights file
(legacy torch format, ``(1, C)`` BatchNorm tensors) read and converted without torch, the
backbone switch in the config, training step, weights cache and input normalisation.
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from hdml_jax import config as config_lib
from hdml_jax.data import transforms
from hdml_jax.errors import ConfigError, UserError
from hdml_jax.inference import export
from hdml_jax.models import (
    PREPROCESSING,
    BNInception,
    EmbeddingHead,
    EmbeddingModel,
    ResNet,
    bn_inception_to_flax,
    convert,
    gap_gmp,
    load_pretrained,
    preprocessing,
    resolve_pretrained,
    torch_pickle,
    torchvision_resnet_to_flax,
    weights,
)
from hdml_jax.models import bn_inception as bn_module
from hdml_jax.training import optim, steps
from tests.numerics import assert_close
from tests.torch_bn_inception import BLOCKS, TorchBNInception, cadene_state_dict, randomized
from tests.torch_resnet import TorchResNet

CADENE_MEAN_BGR = (104.0, 117.0, 128.0)


@pytest.fixture(scope="module")
def torch_net() -> torch.nn.Module:
    return randomized(TorchBNInception(), seed=0)


@pytest.fixture(scope="module")
def cadene_file(torch_net, tmp_path_factory) -> SimpleNamespace:
    """The network's weights laid out as Cadene's file: legacy torch format, ``(1, C)`` BatchNorm
    tensors, the ImageNet classifier included."""
    state = cadene_state_dict(torch_net)
    path = tmp_path_factory.mktemp("cadene") / "bn_inception.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return SimpleNamespace(
        path=path, body=path.read_bytes(), state={key: value.numpy() for key, value in state.items()}
    )


@pytest.fixture(scope="module")
def variables(cadene_file) -> dict:
    return convert.load_bn_inception(cadene_file.path)


def _longest_path() -> tuple[int, int]:
    """``(stages, longest)`` of the network's longest path to a pooled feature: the stem's three
    convolutions, each block's double-3×3 branch (reduce, 3×3, 3×3), then the global pooling over
    the 7×7 map; and the most terms any of its convolutions sums (``k_h·k_w·C_in``).

    Comparing two implementations (XLA against oneDNN), each stage adds its own reduction's
    round-off and passes on its input's relative error unamplified (BatchNorm, ReLU and a
    well-conditioned kernel keep it at the activations' size). Independent round-off of chained
    stages adds in quadrature like the terms of one reduction: a pooled feature carries that of
    ``n = stages × longest`` terms.
    """
    longest = max(
        max(cin, 9 * reduce3, 9 * reduce_double, 9 * double_1)
        for cin, _, reduce3, _, reduce_double, double_1, *_ in BLOCKS.values()
    )
    return 3 + 3 * len(BLOCKS) + 1, max(7 * 7 * 3, 9 * 64, longest)


def _torch_input(images: np.ndarray) -> torch.Tensor:
    """Cadene's convention written out independently: BGR, 0–255, minus the BGR mean."""
    bgr = images[..., ::-1].astype(np.float32) - np.array(CADENE_MEAN_BGR, np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- the network


@pytest.mark.parametrize("size, frozen_bn", [(224, True), (227, False)])
def test_pooled_features_match_torch(torch_net, variables, size, frozen_bn):
    """Eval mode (FrozenBatchNorm, or BatchNorm with running statistics): same features as PyTorch."""
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    model = BNInception(frozen_bn=frozen_bn)
    features = jax.jit(lambda v, x: model.apply(v, steps.normalize_images(x, "bn_inception"), train=False))(
        variables, images
    )
    assert features.shape == (2, 7, 7, 1024)
    with torch.no_grad():
        reference = torch_net.features(_torch_input(images))
        gap = torch.nn.functional.adaptive_avg_pool2d(reference, 1).flatten(1).numpy()
        gmp = torch.nn.functional.adaptive_max_pool2d(reference, 1).flatten(1).numpy()
    stages, longest = _longest_path()
    assert (stages, longest) == (34, 2304)  # 4e's second 3×3 convolution: 3×3×256 terms
    assert_close(jnp.mean(features, axis=(1, 2)), gap, n_terms=stages * longest)
    assert_close(gap_gmp(features), gap + gmp, n_terms=stages * longest)  # Proxy-Anchor's pooled feature


@pytest.mark.parametrize(
    "kind, kernel, stride, padding, ceil_mode, count_include_pad",
    [
        ("max", 3, 2, 0, True, None),  # pool1/pool2, the 3c/4e reductions
        ("max", 3, 1, 1, True, None),  # 5b's pool branch
        ("avg", 3, 1, 1, True, True),  # every other pool branch
        ("avg", 3, 2, 1, True, True),  # a ceil-mode window beyond the padding: a smaller divisor
        ("avg", 3, 2, 1, True, False),
        ("max", 2, 2, 0, False, None),
        ("avg", 4, 3, 1, True, True),
    ],
)
def test_pooling_matches_torch(kind, kernel, stride, padding, ceil_mode, count_include_pad):
    for height in (7, 8, 13, 14):
        x = np.random.default_rng(height).normal(size=(2, height, height + 1, 3)).astype(np.float32)
        if kind == "max":
            ours = bn_module.max_pool(jnp.asarray(x), kernel, stride, padding, ceil_mode)
            layer = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
        else:
            ours = bn_module.avg_pool(jnp.asarray(x), kernel, stride, padding, ceil_mode, count_include_pad)
            layer = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)
        expected = layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        assert ours.shape == expected.shape, (height, ours.shape, expected.shape)
        if kind == "max":  # either way one of the inputs: a maximum rounds nothing
            np.testing.assert_array_equal(ours, expected, err_msg=f"height {height}")
        else:  # a window's sum of signed values, divided: Σ|t_i| ≤ max|x| whatever the divisor
            scale = np.abs(x).max()
            assert_close(ours, expected, n_terms=kernel * kernel, scale=scale, err_msg=f"height {height}")
    grad = jax.grad(lambda v: bn_module.max_pool(v, 3, 2).sum() + bn_module.avg_pool(v, 3, 1, 1).sum())
    assert np.isfinite(np.asarray(grad(jnp.asarray(x)))).all()  # both reductions are differentiable


def test_image_sizes_agree_with_torch(torch_net):
    """Where PyTorch's network fails (a reduction block's branches differ in size), ours refuses."""
    for size in (200, 223, 224, 230, 231, 256):
        try:
            with torch.no_grad():
                torch_net.features(torch.zeros(1, 3, size, size))
            torch_ok = True
        except RuntimeError:
            torch_ok = False
        assert bn_module.is_valid_image_size(size) == torch_ok, size
    with pytest.raises(ValueError, match=r"200 px high.*use e\.g\. 198, 223"):
        jax.eval_shape(lambda: BNInception().init(jax.random.PRNGKey(0), jnp.zeros((1, 200, 224, 3))))


def test_parameters_and_batchnorm_groups(torch_net):
    model = EmbeddingModel(BNInception(), EmbeddingHead(8), num_proxies=3)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    params = shapes["params"]
    count = sum(x.size for x in jax.tree.leaves(params["backbone"]))
    assert count == sum(p.numel() for n, p in torch_net.named_parameters() if not n.startswith("last_linear"))
    mixed = BNInception(dtype=jnp.bfloat16)  # bfloat16 compute, float32 parameters
    out = jax.eval_shape(
        lambda v: mixed.apply(v, jnp.zeros((1, 227, 227, 3))),
        {name: tree["backbone"] for name, tree in shapes.items()},
    )
    assert out.shape == (1, 7, 7, 1024) and out.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    labels = optim.parameter_groups(params)["backbone"]
    bn_modules = [name for name in labels if name.endswith("_bn")]
    assert len(bn_modules) == len(labels) // 2 == 69  # one BatchNorm per conv
    for name, leaves in labels.items():
        expected = "backbone_bn" if name.endswith("_bn") else "backbone"
        assert set(leaves.values()) == {expected}, name
    for init_fn, shape, fan_in in [
        (bn_module.conv_kernel_init, (3, 3, 64, 96), 576),
        (bn_module._uniform_bias_init(576), (96,), 576),
    ]:
        values = init_fn(jax.random.PRNGKey(0), shape)  # PyTorch's default: U(±1/√fan_in)
        assert 0.9 / fan_in**0.5 < float(jnp.max(jnp.abs(values))) <= 1 / fan_in**0.5


# ----------------------------------------------------------------------------- weights files


def test_legacy_reader_matches_torch_load_without_torch(tmp_path, monkeypatch):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = collections.OrderedDict(
        transposed=base.t(),
        sliced=base[1:3, 2:],
        half=torch.randn(3, 5).half(),
        double=torch.randn(2, 2, dtype=torch.float64),
        bfloat=torch.randn(7).bfloat16(),
        long=torch.tensor([1, -2, 3]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(2, 3)),
    )
    path = tmp_path / "legacy.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` from here on fails
    ours = convert.read_state_dict(path)
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).detach().numpy()
        assert ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


class _OldStorage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _OldTensor:
    """Pickles as torch < 0.4 did: ``_rebuild_tensor(storage, offset, size, stride)``."""

    def __init__(self, storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor, self.args


class _OldPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _OldStorage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.data.size, None)
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], _OldStorage):  # a view
            root, (offset, numel) = obj[0], obj[1]
            view = (f"{root.key}_view", offset, numel)
            return ("storage", torch.FloatStorage, root.key, "cpu", root.data.size, view)
        return None


def _write_old_legacy_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A legacy file as torch 0.3 under Python 2 wrote Cadene's: pickle protocol 2, the pre-0.4
    tensor record, one storage per tensor; the last array is also saved through a storage view."""
    storages = {name: _OldStorage(str(1000 + i), a.ravel()) for i, (name, a) in enumerate(arrays.items())}
    state = collections.OrderedDict(
        (name, _OldTensor(storages[name], 0, a.shape, tuple(s // 4 for s in a.strides)))
        for name, a in arrays.items()
    )
    last = list(arrays)[-1]
    state["view_of_last"] = _OldTensor((storages[last], (1, 2)), 0, (2,), (1,))
    with open(path, "wb") as f:
        for header in (
            torch_pickle.LEGACY_MAGIC_NUMBER,
            torch_pickle.LEGACY_PROTOCOL_VERSION,
            {
                "protocol_version": 1001,
                "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 8},
            },
        ):
            pickle.dump(header, f, protocol=2)
        _OldPickler(f, protocol=2).dump(state)
        keys = sorted(storage.key for storage in storages.values())
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            data = next(s.data for s in storages.values() if s.key == key)
            f.write(struct.pack("<q", data.size) + data.astype("<f4").tobytes())


def test_a_torch_03_style_legacy_file_with_1_by_c_batchnorm_tensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "conv1_7x7_s2.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
        "conv1_7x7_s2_bn.running_var": rng.uniform(0.5, 1.5, (1, 4)).astype(np.float32),
        "conv1_7x7_s2_bn.weight": rng.normal(size=(1, 4)).astype(np.float32),
    }
    path = tmp_path / "old.pth"
    _write_old_legacy_file(path, arrays)
    reference = torch.load(path, map_location="cpu", weights_only=False)  # our own file: safe
    ours = convert.read_state_dict(path)
    assert list(ours) == list(reference) == [*arrays, "view_of_last"]
    for key, tensor in reference.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
    np.testing.assert_array_equal(ours["view_of_last"], arrays["conv1_7x7_s2_bn.weight"][0, 1:3])


def test_the_1_by_c_batchnorm_tensors_are_squeezed(cadene_file, torch_net, variables):
    assert cadene_file.state["inception_3a_1x1_bn.running_mean"].shape == (1, 64)
    assert variables["batch_stats"]["inception_3a_1x1_bn"]["mean"].shape == (64,)
    resaved = {key: value.numpy() for key, value in torch_net.state_dict().items()}  # (C,) tensors
    jax.tree.map(np.testing.assert_array_equal, bn_inception_to_flax(resaved), variables)
    np.testing.assert_array_equal(
        variables["params"]["inception_5b_pool_proj"]["kernel"],
        cadene_file.state["inception_5b_pool_proj.weight"].transpose(2, 3, 1, 0),
    )


def test_malformed_legacy_files_are_one_line_errors(cadene_file, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(cadene_file.body[: len(cadene_file.body) // 2])
    with pytest.raises(convert.BadWeightsFileError, match="ends early"):
        convert.read_state_dict(cut)
    other = tmp_path / "other.pth"
    other.write_bytes(pickle.dumps({"weight": 1}))
    with pytest.raises(convert.BadWeightsFileError, match=r"not one written by torch\.save"):
        convert.read_state_dict(other)
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"

    class Payload:
        def __reduce__(self):
            return (print, (f"touch {marker}",))

    with open(evil, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION, {}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"weight": Payload()}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(
        convert.BadWeightsFileError, match=r"print, which is not loaded \(nothing in it was executed\)"
    ):
        convert.read_state_dict(evil)
    for error_path in (cut, other, evil):
        with pytest.raises(UserError) as error:
            convert.read_state_dict(error_path)
        assert "\n" not in str(error.value)


def test_mismatches_are_one_line_user_errors(cadene_file):
    state = dict(cadene_file.state)
    del state["inception_4a_1x1.weight"]
    state["inception_6a_1x1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["conv1_7x7_s2_bn.running_var"] = np.ones((1, 32), np.float32)
    cases = {
        "1 missing (inception_4a_1x1.weight)": state,
        "torchvision ResNet-18 (width 64), not BN-Inception: convert them with --depth 18": {
            key: value.numpy() for key, value in TorchResNet(18).state_dict().items()
        },
    }
    for expected, weights_state in cases.items():
        with pytest.raises(convert.WeightsMismatchError) as error:
            bn_inception_to_flax(weights_state)
        message = str(error.value)
        assert expected in message and "\n" not in message
        assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)
    with pytest.raises(convert.WeightsMismatchError) as error:
        bn_inception_to_flax(state)
    message = str(error.value)
    assert "1 unexpected (inception_6a_1x1.weight)" in message
    assert "conv1_7x7_s2_bn.running_var is (1, 32), needs (64,)" in message
    with pytest.raises(convert.WeightsMismatchError, match="--arch bn_inception") as error:
        torchvision_resnet_to_flax(cadene_file.state, 50)
    assert "\n" not in str(error.value)


def test_convert_cli(cadene_file, variables, tmp_path, capsys, convert_fails):
    out = tmp_path / "ckpt"
    assert convert.main([str(cadene_file.path), "--arch", "bn_inception", "--output", str(out)]) == 0
    assert "BN-Inception (10,270,240 parameters)" in capsys.readouterr().out
    jax.tree.map(np.testing.assert_array_equal, load_pretrained(out), variables)
    resnet = tmp_path / "resnet18.npz"
    np.savez(resnet, **{key: value.numpy() for key, value in TorchResNet(18).state_dict().items()})
    err = convert_fails(str(resnet), "--arch", "bn_inception", "--output", str(tmp_path / "x"))
    assert "--depth 18" in err
    assert "--depth" in convert_fails(str(resnet), "--output", str(tmp_path / "x"), usage=True)
    assert "resnet only" in convert_fails(
        str(cadene_file.path),
        "--arch",
        "bn_inception",
        "--depth",
        "50",
        "--output",
        str(tmp_path / "x"),
        usage=True,
    )


# ----------------------------------------------------------------------------- pretrained="bninception"


def _serve(tmp_path: Path, body: bytes, prefix: str, monkeypatch) -> Path:
    """The weights file as a ``file://`` download of the expected name; the cache in ``tmp_path``."""
    served = tmp_path / "server" / f"bn_inception-{prefix}.pth"
    served.parent.mkdir(exist_ok=True)
    served.write_bytes(body)
    monkeypatch.setattr(weights, "BNINCEPTION_URL", served.as_uri())
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path / "cache"))
    return served


def test_pretrained_bninception_is_downloaded_converted_once_and_reused(
    cadene_file, variables, tmp_path, monkeypatch
):
    prefix = hashlib.sha256(cadene_file.body).hexdigest()[:9]
    served = _serve(tmp_path, cadene_file.body, prefix, monkeypatch)
    first = resolve_pretrained("bninception", 50, backbone="bn_inception")
    assert first == tmp_path / "cache" / f"bn_inception-{prefix}-flax"
    jax.tree.map(np.testing.assert_array_equal, load_pretrained(first), variables)
    served.unlink()  # a second run neither downloads nor converts again
    assert resolve_pretrained("bninception", 50, backbone="bn_inception") == first
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == [f"bn_inception-{prefix}-flax", f"bn_inception-{prefix}.pth"]


def test_pretrained_bninception_failures_explain_the_manual_route(cadene_file, tmp_path, monkeypatch):
    _serve(tmp_path, cadene_file.body, "000000000", monkeypatch)
    with pytest.raises(weights.WeightsHashError, match="--arch bn_inception") as error:
        resolve_pretrained("bninception", 50, backbone="bn_inception")
    assert "does not start with 000000000" in str(error.value)
    assert not any((tmp_path / "cache").iterdir())
    monkeypatch.setattr(
        weights, "BNINCEPTION_URL", (tmp_path / "nowhere" / "bn_inception-52deb4733.pth").as_uri()
    )
    with pytest.raises(weights.WeightsUnavailableError) as error:
        resolve_pretrained("bninception", 50, backbone="bn_inception")
    assert "python -m hdml_jax.models.convert FILE --arch bn_inception --output DIR" in str(error.value)
    assert weights.hash_prefix(weights.BNINCEPTION_URL) == "52deb4733"


# ----------------------------------------------------------------------------- config and training


def _bn_inception_config(**fields) -> ml_collections.ConfigDict:
    c = config_lib.base_config("cub200", "proxy_anchor")
    c.model.backbone = "bn_inception"
    c.model.pretrained = "none"
    for key, value in fields.items():
        node, *path = key.split(".")
        target = c[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return c


def test_config_switch_validation():
    config_lib.validate(_bn_inception_config())
    config_lib.validate(_bn_inception_config(**{"model.pretrained": "bninception"}))
    for fields, expected in [
        ({"model.backbone": "vgg"}, "unknown model.backbone 'vgg'; valid: resnet, bn_inception"),
        ({"model.pretrained": "torchvision"}, "model.pretrained='bninception'"),
        ({"model.backbone": "resnet", "model.pretrained": "bninception"}, "model.pretrained='torchvision'"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            config_lib.validate(_bn_inception_config(**fields))
    unused = config_lib.unused_overrides(_bn_inception_config(), ["model.depth", "model.frozen_bn"])
    assert unused == ["model.depth has no effect with model.backbone='bn_inception' (ResNet only)"]
    with pytest.raises(ConfigError, match="pretrained='bninception'"):
        resolve_pretrained("torchvision", 50, backbone="bn_inception")
    with pytest.raises(ConfigError, match="pretrained='torchvision'"):
        resolve_pretrained("bninception", 50, backbone="resnet")
    assert isinstance(steps.build_model(config_lib.base_config("cub200", "proxy_anchor"), 4).backbone, ResNet)


@pytest.mark.parametrize(
    "warmup_epochs",
    [
        1,  # the default recipe's first phase: backbone frozen, head and proxies train
        # the backbone trains: compiling its backward pass takes XLA:CPU 15–30 s
        pytest.param(0, marks=pytest.mark.exhaustive),
    ],
)
def test_bn_inception_config_builds_and_trains_one_step(variables, warmup_epochs):
    """``model.backbone='bn_inception'``, ``pretrained='none'``: one optimizer step on 2 images of 32 px.

    The backbone starts from the converted random weights instead of ``model.init``'s (whose
    random-number code alone takes XLA:CPU ~40 s to compile), and the step is compiled without
    LLVM optimisation: what is checked is that the pieces fit, not speed or numbers.
    """
    c = _bn_inception_config(**{"optimizer.warmup_epochs": warmup_epochs})
    config_lib.validate(c)
    model = steps.build_model(c, 4)
    assert isinstance(model.backbone, BNInception) and model.backbone.frozen_bn
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(0)
    params = {
        name: jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32), tree)
        for name, tree in steps.unfreeze(shapes["params"]).items()
    }
    params["backbone"] = variables["params"]
    frozen = optim.frozen_groups(c, 0, 10)
    # warm-up: the whole backbone; else bn_freeze keeps the BatchNorm affine parameters
    assert frozen == ({"backbone", "backbone_bn"} if warmup_epochs else {"backbone_bn"})
    optimizer = optim.make_optimizer(c, params, 10, frozen)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": {"backbone": variables["batch_stats"]},
        "opt_state": jax.jit(optimizer.init)(params),  # one program, not one per leaf shape
        "hierarchy": {},
        "rng": jax.random.key_data(jax.random.PRNGKey(1)),
    }
    batch = {
        "image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "label": np.array([0, 1], np.int32),
    }

    def step(state, batch):
        return steps.train_step(
            state, batch, model=model, config=c, optimizer=optimizer, backbone_frozen="backbone" in frozen
        )

    compiled = jax.jit(step).lower(state, batch).compile({"xla_backend_optimization_level": 0})
    new_state, metrics = compiled(state, batch)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(
        new_state["params"]["head"]["embedding"]["kernel"], params["head"]["embedding"]["kernel"]
    )
    before, after = state["params"]["backbone"], new_state["params"]["backbone"]
    conv_moved = not np.array_equal(after["inception_4a_1x1"]["kernel"], before["inception_4a_1x1"]["kernel"])
    assert conv_moved == (not warmup_epochs)
    np.testing.assert_array_equal(
        after["inception_4a_1x1_bn"]["scale"], before["inception_4a_1x1_bn"]["scale"]
    )
    jax.tree.map(np.testing.assert_array_equal, new_state["batch_stats"], state["batch_stats"])


# ----------------------------------------------------------------------------- input normalisation


def test_normalisation_registry():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    resnet = np.asarray(steps.normalize_images(jnp.asarray(images)))
    assert resnet.tobytes() == np.asarray(transforms.normalize(jnp.asarray(images))).tobytes()  # bit for bit
    assert preprocessing.backbone_of(ResNet(18)) == "resnet"
    np.testing.assert_array_equal(PREPROCESSING["resnet"].mean_uint8, transforms.IMAGENET_MEAN)
    np.testing.assert_array_equal(PREPROCESSING["resnet"].std_uint8, transforms.IMAGENET_STD)
    ours = np.asarray(steps.normalize_images(jnp.asarray(images), "bn_inception"))
    np.testing.assert_array_equal(ours, images[..., ::-1].astype(np.float32) - np.float32(CADENE_MEAN_BGR))
    assert preprocessing.backbone_of(BNInception()) == "bn_inception"
    spec = PREPROCESSING["bn_inception"]
    assert (spec.channel_order, spec.value_range, spec.std) == ("BGR", 255.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown input convention 'vgg'"):
        preprocessing.normalize(images, "vgg")


@pytest.mark.parametrize("backbone", [ResNet(18, width=4), BNInception()])
def test_export_metadata_states_the_convention(backbone):
    embedder = SimpleNamespace(
        image_size=224,
        embedding_dim=8,
        transform=transforms.TRANSFORMS["proxy_anchor"](224).eval,
        model=EmbeddingModel(backbone, EmbeddingHead(8)),
        step=1,
        workdir="run",
        checkpoint_id="x",
        config=ml_collections.ConfigDict({"method": "proxy_anchor", "dataset": {"name": "cub200"}, "model": {}}),
    )
    normalization = export.metadata(embedder, None, ["cpu"], None)["normalization"]
    if isinstance(backbone, ResNet):
        assert normalization["backbone"] == "resnet" and normalization["channel_order"] == "RGB"
        # 255 × the float32 constant, rounded twice (the constant, the product: ≤ ε together),
        # then to 6 decimals (5e-7, far inside): k = 2 in float32's ε of the largest value.
        f32 = float(np.finfo(np.float32).eps)
        assert_close(normalization["mean"], [123.675, 116.28, 103.53], n_terms=1, k=2.0, eps=f32)
        assert_close(normalization["std"], [58.395, 57.12, 57.375], n_terms=1, k=2.0, eps=f32)
    else:
        assert normalization["backbone"] == "bn_inception" and normalization["channel_order"] == "BGR"
        assert normalization["mean"] == [104.0, 117.0, 128.0] and normalization["std"] == [1.0, 1.0, 1.0]
        assert "RGB → BGR" in normalization["where"] and normalization["value_range"] == [0, 255.0]
