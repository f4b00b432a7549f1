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

from hdml_jax.losses import proxy_anchor_loss
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
from tests.numerics import assert_close
from tests.torch_resnet import TorchResNet, randomized

# Blocks per stage (torchvision).
LAYER_COUNTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# torchvision's parameter counts minus the 1000-way fc layer.
TORCHVISION_BACKBONE_PARAMS = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}


def path_terms(depth: int, width: int = 64) -> tuple[int, int]:
    """``(stages, longest)`` of a ResNet's longest path: its convolutions (stem, then 2 per basic
    block or 3 per bottleneck; the downsampling shortcut runs beside them) and the most terms
    (``k_h·k_w·C_in``) any of them sums, the 3×3 convolution of the last stage.

    Comparing two implementations of the forward pass (XLA against oneDNN), every stage adds its
    own reduction's round-off, and a stage passes on its input's relative error unamplified
    (BatchNorm's scale, ReLU and a well-conditioned kernel keep it at the activations' size; the
    residual adds it up along the stream). Independent round-off of chained stages adds in
    quadrature like the terms of one reduction, so an output element carries that of
    ``n = stages × longest`` terms; BatchNorm in eval mode is one multiply-add per element.
    """
    convs_per_block = 2 if depth < 50 else 3
    blocks = sum(LAYER_COUNTS[depth])
    return 1 + convs_per_block * blocks, 3 * 3 * 8 * width


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
    torch.manual_seed(0)  # the convolutions' default initialisation draws from torch's global generator
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
    # 49 stages (stem + 16 bottlenecks × 3), the longest 3×3×512 = 4608 terms (``path_terms``).
    stages, longest = path_terms(50)
    assert (stages, longest) == (49, 4608)
    assert_close(actual, expected, n_terms=stages * longest)


def test_resnet18_matches_torch_forward_with_odd_size():
    torch.manual_seed(3)
    torch_model = randomized(TorchResNet(18, width=16), seed=3)
    images = np.random.default_rng(2).normal(size=(1, 3, 45, 37)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.features(torch.from_numpy(images)).numpy().transpose(0, 2, 3, 1)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = torchvision_resnet_to_flax(state, 18, width=16)
    actual = ResNet(18, width=16).apply(variables, images.transpose(0, 2, 3, 1))
    stages, longest = path_terms(18, width=16)  # 17 stages, the longest 3×3×128 = 1152 terms
    assert_close(np.asarray(actual), expected, n_terms=stages * longest)


def test_bfloat16_compute_stays_close_to_float32():
    model32, model16 = ResNet(18, width=8), ResNet(18, width=8, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    variables = model32.init(jax.random.PRNGKey(1), images)
    out32 = model32.apply(variables, images)
    out16 = model16.apply(variables, images)
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    # The convolutions accumulate in float32 (XLA:CPU widens bfloat16 products), so the error is
    # bfloat16's rounding of what passes between layers: on the longest path the input, then per
    # convolution its kernel and its output, per BatchNorm its output, per block the residual sum,
    # 1 + 3 + 8 × 7 = 60 roundings of at most u = ε/2 each. Independent, they add in quadrature
    # to λ·u·√60 with λ ≈ 2 (tests.numerics): k = 1 in bfloat16's ε, about 6% of the largest
    # output. Computing a layer in bfloat16 end to end, or dropping one, misses by far more.
    assert_close(out16.astype(jnp.float32), out32, n_terms=60, k=1.0, eps=float(jnp.finfo(jnp.bfloat16).eps))


def test_train_mode_updates_batch_stats_and_frozen_bn_freezes():
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3)) * 2 + 1
    labels = jnp.array([0, 1, 0, 1])
    for frozen in (False, True):
        model = EmbeddingModel(ResNet(18, width=8, frozen_bn=frozen), EmbeddingHead(16), num_proxies=2)
        # Everything jitted and compared on the host: eager per-leaf operations compile once per
        # leaf shape, which took 10x longer than the step itself.
        variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
        optimizer = optax.adam(0.1)

        @jax.jit
        def one_step(variables, model=model, optimizer=optimizer):
            def loss_fn(params):
                outputs, updates = model.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                return proxy_anchor_loss(outputs["embedding"], labels, params["proxies"]), updates

            (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
            step, _ = optimizer.update(grads, optimizer.init(variables["params"]), variables["params"])
            return optax.apply_updates(variables["params"], step), updates["batch_stats"]

        new_params, new_stats = jax.device_get(one_step(variables))
        old = jax.device_get(variables)
        stats_changed = [
            bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(old["batch_stats"]), jax.tree.leaves(new_stats), strict=True)
        ]
        mask = batchnorm_mask(old["params"])
        bn_changed = [
            bool(np.any(a != b))
            for a, b, is_bn in zip(
                jax.tree.leaves(old["params"]), jax.tree.leaves(new_params), jax.tree.leaves(mask), strict=True
            )
            if is_bn
        ]
        assert np.any(new_params["backbone"]["conv1"]["kernel"] != old["params"]["backbone"]["conv1"]["kernel"])
        if frozen:  # statistics frozen; the affine parameters train unless the optimizer freezes them
            assert not any(stats_changed) and all(bn_changed)
        else:
            assert all(stats_changed) and all(bn_changed)


def test_mac_gradient_goes_to_the_first_maximum_of_each_channel():
    """One position per (image, channel) gets the cotangent, the first maximum in row-major
    (h, w) order, as PyTorch's max pooling; ties (a channel of ReLU zeros) do not split it."""
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    x[1, :, :, 2] = 0.0  # a dead channel: every position ties
    x[0, 2, 3, 4] = x[0, 0, 1, 4] = x[0, :, :, 4].max() + 1.0  # two tied maxima
    cotangent = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
    grad = np.asarray(jax.grad(lambda v: jnp.sum(mac(v) * cotangent))(jnp.asarray(x)))
    expected = np.zeros_like(x)
    for n in range(2):
        for c in range(5):
            first = np.argmax(x[n, :, :, c].ravel())  # NumPy's argmax: the first maximum
            expected[n, first // 4, first % 4, c] = cotangent[n, c]
    np.testing.assert_array_equal(grad, expected)  # a copy of the cotangent, nothing rounds


def test_pooling_formulas_against_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    positions = 5 * 4  # every descriptor reduces over the 20 positions of a channel
    mean_magnitude = np.abs(x).mean(axis=(1, 2))  # Σ|t_i| of a mean of signed values (cancelling)
    assert_close(spoc(x), x.mean(axis=(1, 2)), n_terms=positions, scale=mean_magnitude.max())
    np.testing.assert_array_equal(mac(x), x.max(axis=(1, 2)))  # a maximum rounds nothing
    clipped = np.maximum(x, 1e-6).astype(np.float64)
    # Non-negative terms: the result bounds their sum. k = 8 covers the powers around the mean.
    assert_close(gem(x, 3.0), np.mean(clipped**3, axis=(1, 2)) ** (1 / 3), n_terms=positions)
    assert_close(gem(x, 1.0), clipped.mean(axis=(1, 2)), n_terms=positions)
    peak = x.max(axis=(1, 2))
    assert_close(
        gap_gmp(x), x.mean(axis=(1, 2)) + peak, n_terms=positions, scale=(mean_magnitude + np.abs(peak)).max()
    )
    # GeM tends to MAC as p grows: max·(1/HW)^(1/p) ≤ GeM_p ≤ max (the peak's own term is 1).
    positive = np.abs(x) + 0.1
    low = 1 - (1 / positions) ** (1 / 200)
    ratio = np.asarray(gem(positive, 200.0)) / np.asarray(mac(positive))
    eps = np.finfo(np.float32).eps
    assert np.all(ratio >= 1 - low - 8 * eps) and np.all(ratio <= 1 + 8 * eps), (ratio, low)


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
    # Normalising a projection whose terms cancel amplifies their round-off by Σ|t| / ‖Σ t‖: that
    # is the scale of the unit embedding's error. n: GeM's 16-position mean, then the 8-term
    # projection and two 3- and 6-term norms (chained, in quadrature).
    condition = 0.0
    for d, w in ((mac_d, np.asarray(p["fc_M"]["kernel"])), (gem_d, np.asarray(p["fc_G"]["kernel"]))):
        magnitude = np.abs(d) @ np.abs(w) / np.linalg.norm(d @ w, axis=1, keepdims=True)
        condition = max(condition, float(magnitude.max()))
    expected = l2(np.concatenate([e_m, e_g], 1))
    assert_close(out["embedding"], expected, n_terms=16 + 8 + 3 + 6, scale=condition)
    assert "bias" not in p["fc_M"] and "bias" not in p["fc_G"]
    # Auxiliary classifier on the raw MAC descriptor (eval-mode BN with fresh stats = identity / sqrt(1+eps)).
    bn_out = mac_d / np.sqrt(1 + 1e-5)
    kernel, bias = np.asarray(p["auxiliary_fc"]["kernel"]), np.asarray(p["auxiliary_fc"]["bias"])
    expected_logits = bn_out @ kernel + bias
    # An 8-term product plus the bias, terms of signed size: their Σ|t| is the scale.
    terms = np.abs(bn_out) @ np.abs(kernel) + np.abs(bias)
    assert_close(out["logits"], expected_logits, n_terms=8 + 1, scale=terms.max())
    assert len(out["branch_embeddings"]) == 2 and out["branch_embeddings"][0].shape == (3, 3)


@pytest.mark.parametrize("combine, architecture", [("sum", "cgd"), ("concat", "A"), ("concat", "B")])
def test_cgd_ablations_shapes_and_norms(combine, architecture):
    features = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8)))
    head = CGDHead("SMG", embedding_dim=12, combine=combine, architecture=architecture)
    out = head.apply(head.init(jax.random.PRNGKey(1), features), features)
    assert out["embedding"].shape == (2, 12)
    # A unit vector's norm, to the round-off of two 12-term sums of squares (the normalisation's
    # and this one's).
    assert_close(jnp.linalg.norm(out["embedding"], axis=1), np.ones(2, np.float32), n_terms=2 * 12)
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
    # The sample standard deviation of N = 128,000 normal draws is within 5/√(2N) = 1% of σ (5
    # standard errors); a wrong fan (64 for 2000) or gain (1 for 2) is off by 29% or more.
    assert float(jnp.std(proxies)) == pytest.approx(np.sqrt(2 / 2000), rel=5 / np.sqrt(2 * proxies.size))


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
    # Each channel's statistics reduce over n values; the scales are those of the terms: x·w/σ
    # (the normalised output before cancelling against the mean), for the gradient
    # (w/σ)·dy·(1 + x̂²) with dy = 3y² (its two batch means, then the forward pass's: 2n),
    # and 0.1·|x| for the running mean (signed values: the running mean cancels).
    axes = tuple(range(len(shape) - 1))
    n = x.size // shape[-1]
    gain, normed = np.abs(weight) / x.std(axis=axes), (x - x.mean(axis=axes)) / x.std(axis=axes)
    assert_close(y, expected, n_terms=n, scale=float(np.max(gain * np.abs(x).max(axis=axes))))
    grad_terms = gain * 3 * np.square(expected) * (1 + np.square(normed))
    assert_close(grad, expected_grad, n_terms=2 * n, scale=float(grad_terms.max()))
    running_mean_terms = 0.1 * np.abs(x).mean(axis=axes)
    running_mean = reference.running_mean.numpy()
    assert_close(updates["batch_stats"]["mean"], running_mean, n_terms=n, scale=running_mean_terms.max())
    assert_close(updates["batch_stats"]["var"], reference.running_var.numpy(), n_terms=2 * n)
