"""ResNet, pooling, heads and weight import against torch and NumPy references."""

from __future__ import annotations

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from hdml_jax.models import (
    CGDHead,
    EmbeddingHead,
    EmbeddingModel,
    ResNet,
    batchnorm_mask,
    convert,
    gap_gmp,
    gem,
    mac,
    parse_descriptors,
    proxy_levels,
    spoc,
    torchvision_resnet_to_flax,
)
from tests.torch_resnet import TorchResNet, randomized

# torchvision's parameter counts minus the 1000-way fc layer.
TORCHVISION_BACKBONE_PARAMS = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}


def abstract_variables(model, size=224):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_equal_torchvision(depth):
    params = abstract_variables(ResNet(depth))["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == TORCHVISION_BACKBONE_PARAMS[depth]
    torch_model = TorchResNet(depth)
    torch_count = sum(p.numel() for name, p in torch_model.named_parameters() if not name.startswith("fc."))
    assert torch_count == TORCHVISION_BACKBONE_PARAMS[depth]


@pytest.mark.parametrize("depth, channels", [(18, 512), (50, 2048)])
@pytest.mark.parametrize("last_stride, side", [(2, 7), (1, 14)])
def test_output_shapes(depth, channels, last_stride, side):
    model = ResNet(depth, last_stride=last_stride)
    variables = abstract_variables(model)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), variables)
    assert out.shape == (2, side, side, channels)
    assert model.num_features == channels


@pytest.fixture(scope="module")
def resnet50_pair():
    torch_model = randomized(TorchResNet(50), seed=0)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return torch_model, state


@pytest.mark.parametrize("last_stride", [2, 1])
def test_resnet50_matches_torch_forward(resnet50_pair, last_stride):
    torch_model, state = resnet50_pair
    reference = randomized(TorchResNet(50, last_stride=last_stride), seed=0)
    reference.load_state_dict(torch_model.state_dict())
    images = np.random.default_rng(1).normal(size=(2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        expected = reference.features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
    variables = torchvision_resnet_to_flax(state, 50)
    actual = jax.jit(lambda v, x: ResNet(50, last_stride=last_stride).apply(v, x))(
        variables, images.transpose(0, 2, 3, 1)
    )
    assert actual.shape == expected.shape
    relative = np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected)
    assert relative < 1e-4, relative


def test_resnet18_matches_torch_forward_with_odd_size():
    torch_model = randomized(TorchResNet(18, width=16), seed=3)
    images = np.random.default_rng(2).normal(size=(1, 3, 45, 37)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = torchvision_resnet_to_flax(state, 18, width=16)
    actual = ResNet(18, width=16).apply(variables, images.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_stays_close_to_float32():
    model32, model16 = ResNet(18, width=8), ResNet(18, width=8, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    variables = model32.init(jax.random.PRNGKey(1), images)
    out32 = model32.apply(variables, images)
    out16 = model16.apply(variables, images)
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    relative = jnp.linalg.norm(out16.astype(jnp.float32) - out32) / jnp.linalg.norm(out32)
    assert relative < 0.05


def test_train_mode_updates_batch_stats_and_frozen_bn_freezes():
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3)) * 2 + 1
    labels = jnp.array([0, 1, 0, 1])
    for frozen in (False, True):
        model = EmbeddingModel(ResNet(18, width=8, frozen_bn=frozen), EmbeddingHead(16), num_proxies=2)
        variables = model.init(jax.random.PRNGKey(1), images)
        optimizer = optax.adam(0.1)
        opt_state = optimizer.init(variables["params"])

        def loss_fn(params, variables=variables, model=model):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            from hdml_jax.losses import proxy_anchor_loss

            return proxy_anchor_loss(outputs["embedding"], labels, params["proxies"]), updates

        (_, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
        step, _ = optimizer.update(grads, opt_state, variables["params"])
        new_params = optax.apply_updates(variables["params"], step)
        stats_changed = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
        )
        mask = batchnorm_mask(variables["params"])
        bn_changed = [
            bool(jnp.any(a != b))
            for a, b, is_bn in zip(
                jax.tree.leaves(variables["params"]),
                jax.tree.leaves(new_params),
                jax.tree.leaves(mask),
                strict=True,
            )
            if is_bn
        ]
        conv_changed = bool(
            jnp.any(
                new_params["backbone"]["conv1"]["kernel"]
                != variables["params"]["backbone"]["conv1"]["kernel"]
            )
        )
        assert conv_changed
        if frozen:  # statistics frozen; the affine parameters train unless the optimizer freezes them
            assert not any(stats_changed) and all(bn_changed)
        else:
            assert all(stats_changed) and all(bn_changed)


def test_pooling_formulas_against_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    for n in range(2):
        for c in range(3):
            values = x[n, :, :, c].ravel()
            assert spoc(x)[n, c] == pytest.approx(values.mean(), rel=1e-5)
            assert mac(x)[n, c] == pytest.approx(values.max(), rel=1e-6)
            clipped = np.maximum(values, 1e-6).astype(np.float64)
            assert gem(x, 3.0)[n, c] == pytest.approx(np.mean(clipped**3) ** (1 / 3), rel=1e-4)
            assert gem(x, 1.0)[n, c] == pytest.approx(clipped.mean(), rel=1e-5)
            assert gap_gmp(x)[n, c] == pytest.approx(values.mean() + values.max(), rel=1e-5)
    # GeM tends to MAC as p grows.
    positive = np.abs(x) + 0.1
    np.testing.assert_allclose(gem(positive, 200.0), mac(positive), rtol=0.02)


def test_cgd_head_matches_numpy():
    features = np.abs(np.random.default_rng(1).normal(size=(3, 4, 4, 8))).astype(np.float32)
    head = CGDHead("MG", embedding_dim=6, num_classes=5)
    variables = head.init(jax.random.PRNGKey(0), features)
    out = head.apply(variables, features)
    p = variables["params"]

    def l2(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    mac_d = features.max(axis=(1, 2))
    gem_d = np.mean(np.maximum(features, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    e_m = l2(mac_d @ np.asarray(p["fc_M"]["kernel"]))
    e_g = l2(gem_d @ np.asarray(p["fc_G"]["kernel"]))
    np.testing.assert_allclose(out["embedding"], l2(np.concatenate([e_m, e_g], 1)), rtol=1e-5, atol=1e-6)
    assert "bias" not in p["fc_M"] and "bias" not in p["fc_G"]
    # Auxiliary classifier on the raw MAC descriptor (eval-mode BN with fresh stats = identity / sqrt(1+eps)).
    bn_out = mac_d / np.sqrt(1 + 1e-5)
    expected_logits = bn_out @ np.asarray(p["auxiliary_fc"]["kernel"]) + np.asarray(p["auxiliary_fc"]["bias"])
    np.testing.assert_allclose(out["logits"], expected_logits, rtol=1e-5, atol=1e-5)
    assert len(out["branch_embeddings"]) == 2 and out["branch_embeddings"][0].shape == (3, 3)


@pytest.mark.parametrize("combine, architecture", [("sum", "cgd"), ("concat", "A"), ("concat", "B")])
def test_cgd_ablations_shapes_and_norms(combine, architecture):
    features = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8)))
    head = CGDHead("SMG", embedding_dim=12, combine=combine, architecture=architecture)
    out = head.apply(head.init(jax.random.PRNGKey(1), features), features)
    assert out["embedding"].shape == (2, 12)
    np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    assert ("branch_embeddings" in out) == (architecture != "B")


def test_learnable_gem_p_gets_a_gradient():
    features = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))) + 0.1
    head = CGDHead("G", embedding_dim=4, learnable_gem_p=True)
    variables = head.init(jax.random.PRNGKey(1), features)
    assert variables["params"]["gem"]["p"] == 3.0
    grads = jax.grad(lambda v: head.apply(v, features)["embedding"][:, 0].sum())(variables)
    assert grads["params"]["gem"]["p"] != 0.0


@pytest.mark.parametrize(
    "descriptors, dim, message",
    [
        ("SX", 1536, "unknown letters"),
        ("SS", 1536, "at most once"),
        ("SMG", 1000, "not divisible"),
        ("", 8, "unknown"),
    ],
)
def test_descriptor_string_errors(descriptors, dim, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_descriptors(descriptors, dim)
    assert "\n" not in str(error.value)


def test_embedding_model_proxies_and_levels():
    model = EmbeddingModel(
        ResNet(18, width=8), EmbeddingHead(16, pooling="gem"), num_proxies=10, coarse_groups=(4, 2)
    )
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    levels = proxy_levels(variables["params"])
    assert [level.shape for level in levels] == [(10, 16), (4, 16), (2, 16)]
    # kaiming fan_out on a (C, d) tensor: std sqrt(2 / C).
    big = EmbeddingModel(ResNet(18, width=8), EmbeddingHead(64), num_proxies=2000)
    proxies = big.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]["proxies"]
    assert float(jnp.std(proxies)) == pytest.approx(np.sqrt(2 / 2000), rel=0.05)


def test_model_config_errors():
    with pytest.raises(ValueError, match="depth"):
        ResNet(42)
    with pytest.raises(ValueError, match="last_stride"):
        ResNet(50, last_stride=3)
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingHead(8, pooling="avg").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="NHWC"):
        ResNet(18, width=8).init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))


def test_converter_reports_every_bad_key(resnet50_pair):
    _, state = resnet50_pair
    broken = dict(state)
    del broken["layer2.0.conv1.weight"]
    broken["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    broken["layer1.0.bn1.running_mean"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        torchvision_resnet_to_flax(broken, 50)
    message = str(error.value)
    assert "layer2_0/conv1/kernel" in message and "missing (1)" in message
    assert "layer9.0.conv1.weight" in message
    assert "layer1.0.bn1.running_mean: got (3,)" in message
    with pytest.raises(ValueError, match="ResNet-18"):
        torchvision_resnet_to_flax(state, 18)


def _write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_load_from_every_format_and_save_pretrained(tmp_path):
    torch_model = randomized(TorchResNet(18), seed=5)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    expected = torchvision_resnet_to_flax(state, 18)
    np.savez(tmp_path / "w.npz", **state)
    _write_safetensors(tmp_path / "w.safetensors", {k: v for k, v in state.items() if v.dtype == np.float32})
    torch.save(torch_model.state_dict(), tmp_path / "w.pth")
    for name in ("w.npz", "w.safetensors", "w.pth"):
        loaded = convert.load_torchvision_resnet(tmp_path / name, 18)
        jax.tree.map(np.testing.assert_array_equal, loaded, expected)

    assert convert.main([str(tmp_path / "w.npz"), "--depth", "18", "--output", str(tmp_path / "ckpt")]) == 0
    restored = convert.load_pretrained(tmp_path / "ckpt")
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    with pytest.raises(FileNotFoundError, match="convert"):
        convert.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Download"):
        convert.read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown weight format"):
        (tmp_path / "w.bin").write_bytes(b"")
        convert.read_state_dict(tmp_path / "w.bin")


def test_model_is_a_flax_module():
    assert issubclass(ResNet, nn.Module)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 5)])
def test_batchnorm_matches_torch_in_training_mode(shape):
    """Output, gradient and running statistics (unbiased running variance) of one training step."""
    import torch

    from hdml_jax.models.resnet import BatchNorm

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    weight = rng.normal(1.0, 0.2, shape[-1]).astype(np.float32)
    reference = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[-1])
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(weight))
    channels_first = torch.from_numpy(x if len(shape) == 2 else x.transpose(0, 3, 1, 2)).requires_grad_()
    out = reference.train()(channels_first)
    (out**3).sum().backward()
    expected = out.detach().numpy() if len(shape) == 2 else out.detach().numpy().transpose(0, 2, 3, 1)
    expected_grad = channels_first.grad.numpy() if len(shape) == 2 else channels_first.grad.numpy().transpose(0, 2, 3, 1)

    module = BatchNorm()
    variables = module.init(jax.random.PRNGKey(0), x)
    variables = {"params": {**variables["params"], "scale": jnp.asarray(weight)}, "batch_stats": variables["batch_stats"]}
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    grad = jax.grad(lambda v: jnp.sum(module.apply(variables, v, mutable=["batch_stats"])[0] ** 3))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], reference.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], reference.running_var.numpy(), rtol=1e-6, atol=1e-6)
