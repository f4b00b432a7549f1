"""Step-by-step parity of our training step with PyTorch loops that follow the official scripts.

Both sides start from the same weights and see the same fixed batches; the loss, every parameter
and every BatchNorm statistic are compared after every step, across the end of warm-up and a
learning-rate decay. The loops and the official scripts they follow are in
``tests/float64_parity_check.py``.

Both sides compute in float64 (JAX's x64 mode, in a subprocess: it must be set before JAX is
used, and the rest of the suite runs in float32). In float32 the comparison encodes one CPU's
rounding: Adam divides by √v̂, so an element whose gradient is a cancelling sum at the level of
float32 rounding takes an lr-sized step whose sign is that rounding's, and the two programs
(XLA's summation order depends on the CPU's vector width) part by a fraction of the learning rate.
In float64 the same rounding is 2⁻²⁹ times smaller, Adam's ε = 1e-8 (the official value) sits far
above it, and every element can be held to a bound derived from float64's round-off
(``parameter_tolerance``), with no element exempt.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.float64_parity_check import BATCH, NUM_STEPS, SIZE
from tests.numerics import assert_close
from tests.simulated_devices import run_check_module

EPS = float(np.finfo(np.float64).eps)

# Round-off of a value the network computes (the loss, a gradient, a BatchNorm statistic), in the
# model of tests/numerics.py, k·ε·scale·√n:
# * n: the longest reduction behind it. The stem's weight gradient and its BatchNorm statistics
#   sum over batch × the stem's 16×16 output = 4096 terms; no other reduction is longer (the
#   convolutions' are 7·7·3 and 3·3·64).
# * k: 8 per chained stage (tests/numerics.py) and √L for L stages whose independent errors add
#   in quadrature: the error passes ResNet-18's 17 convolutions and the head's linear layer
#   forward and again backward, L = 36, k = 8·6 = 48.
N_NETWORK = BATCH * (SIZE // 2) ** 2
K_NETWORK = 8.0 * math.sqrt(2 * 18)
# The tiny ViT of the HIER scenario: its longest reductions are the weight gradients over batch ×
# 65 tokens (the patch embedding, whose gradient sums more, is frozen); 2 blocks of LayerNorm,
# qkv, scores, softmax, mixing, projection, LayerNorm, fc1, GELU, fc2, then the final and the
# head's LayerNorm, the embedding layer and the L2 normalisation: 25 stages forward, 50 with
# the backward pass.
N_VIT = BATCH * ((SIZE // 4) ** 2 + 1)
K_VIT = 8.0 * math.sqrt(2 * 25)
# Round-off of one optimizer step's own arithmetic (moments, square root, division, bias
# corrections, decay and the update: no reduction), relative to the parameter and the step.
K_STEP = 8.0


def scenario_of(item) -> str | None:
    """The ``scenario`` a collected test is parametrized with (None for another test)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("scenario") if callspec is not None else None


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, tuple[np.lib.npyio.NpzFile, dict]]:
    """Every scenario the selected tests of this module need, in one float64 subprocess (one
    start-up of JAX and PyTorch; the scenarios share its compilation cache)."""
    names = sorted(
        {scenario_of(item) for item in request.session.items if item.module is request.module} - {None}
    )
    out = tmp_path_factory.mktemp("float64_parity")
    report = run_check_module(
        "float64_parity_check", str(out), *names, env={"JAX_ENABLE_X64": "1"}, timeout=1200
    )
    return {name: (np.load(out / f"{name}.npz"), report[name]) for name in names}


def assert_float64_program(facts: dict, batch_stats: bool = True) -> None:
    """The JAX side really computed in float64: no float narrower than float64 in any phase's
    compiled program (images, activations, BatchNorm, pooling, losses, gradients, optimizer), and
    a float64 state and loss after every step."""
    assert facts["phases_checked"] >= 1
    assert facts["narrow_floats"] == [], facts["narrow_floats"]
    expected = {k: ["float64"] for k in ("params", "batch_stats", "opt_state", "loss")}
    assert facts["dtypes"] == expected | ({} if batch_stats else {"batch_stats": []})


def names_at(arrays, kind: str, step: int) -> list[str]:
    prefix = f"{kind}/{step}/"
    return [key[len(prefix) :] for key in arrays.files if key.startswith(prefix) and key != f"{prefix}loss"]


def parameter_tolerance(
    arrays, step: int, name: str, n_network: int = N_NETWORK, k_network: float = K_NETWORK
) -> np.ndarray:
    """How far float64 round-off can move an Adam(W)-trained parameter by ``step``, per element.

    Step ``s`` moves the parameter by ``η_s·u_s``. Two sources make the two programs' steps differ:

    * the gradients, each off by at most ``δ_s = k_network·ε·√n_network·G_s`` (``G_s``: the largest
      gradient magnitude of this tensor so far: the moments still hold those), which change
      ``η_s·u_s`` by at most ``sensitivity_s·δ_s``, ``sensitivity_s = η_s(1 + |u_s|)/(√v̂_s + ε)``
      per element, from their optimizer's state (``float64_parity_check.adam_bounds``). This is
      where Adam's division shows: an element with a small gradient (small √v̂) is allowed more;
    * the step's own arithmetic, ``K_STEP·ε·(|p_s| + movement_s)``.

    The bounds of the steps add up (the worst case: a difference once made is carried along;
    AdamW's decay only shrinks it). A parameter that never moved gets 0: it must be equal. Not
    modelled: an earlier difference fed back through the network into a later gradient; it is of
    the same order as the round-off it comes from, and ``K_NETWORK``'s margin covers it.
    """
    tolerance, largest_gradient = 0.0, 0.0
    for s in range(step + 1):
        largest_gradient = max(largest_gradient, float(arrays[f"grad_max/{s}/{name}"]))
        gradient_error = k_network * EPS * math.sqrt(n_network) * largest_gradient
        sensitivity, movement = arrays[f"sensitivity/{s}/{name}"], arrays[f"movement/{s}/{name}"]
        moved = sensitivity > 0
        own = K_STEP * EPS * (np.abs(arrays[f"theirs/{s}/{name}"]) + movement)
        tolerance = tolerance + sensitivity * gradient_error + np.where(moved, own, 0.0)
    return np.broadcast_to(tolerance, arrays[f"theirs/{step}/{name}"].shape)


def assert_steps_match(arrays, n_network: int = N_NETWORK, k_network: float = K_NETWORK) -> dict[str, float]:
    """Loss, parameters and BatchNorm statistics after every step, within float64 round-off
    (``n_network``, ``k_network``: the network's round-off model, ResNet-18's by default).

    Returns, per kind, the largest ratio of a difference to its tolerance (at most 1).
    """
    worst = {"loss": 0.0, "params": 0.0, "batch_stats": 0.0}
    network_atol = k_network * EPS * math.sqrt(n_network)  # times the scale
    for step in range(NUM_STEPS):
        # The loss: the network's forward pass (the gradients' model; K_NETWORK also covers the
        # parameter differences carried from earlier steps), terms of the loss's size.
        ours_loss, theirs_loss = float(arrays[f"ours/{step}/loss"]), float(arrays[f"theirs/{step}/loss"])
        assert_close(
            ours_loss,
            theirs_loss,
            n_terms=n_network,
            k=k_network,
            scale=abs(theirs_loss),
            eps=EPS,
            err_msg=f"loss at step {step}",
        )
        worst["loss"] = max(worst["loss"], abs(ours_loss - theirs_loss) / (network_atol * abs(theirs_loss)))
        names = names_at(arrays, "theirs", step)
        assert set(names) == set(names_at(arrays, "ours", step)), step
        for name in names:
            ours, theirs = arrays[f"ours/{step}/{name}"], arrays[f"theirs/{step}/{name}"]
            assert ours.dtype == theirs.dtype == np.float64, name
            message = f"{name} after step {step}"
            difference = np.abs(ours - theirs)
            if name.startswith("['batch_stats']"):
                # Running mean/variance: statistics of the network's activations over the
                # longest (4096-term) reductions of the forward pass, as the gradients.
                assert_close(ours, theirs, n_terms=n_network, k=k_network, eps=EPS, err_msg=message)
                scale = float(np.abs(theirs).max()) or 1e-30
                worst["batch_stats"] = max(
                    worst["batch_stats"], float(difference.max()) / (network_atol * scale)
                )
                continue
            tolerance = parameter_tolerance(arrays, step, name, n_network, k_network)
            bad = difference > tolerance
            if np.any(bad):
                index = np.unravel_index(
                    np.argmax(np.where(bad, difference - tolerance, -np.inf)), ours.shape
                )
                raise AssertionError(
                    f"{message}: {int(bad.sum())} of {bad.size} elements beyond float64 round-off; at "
                    f"{index}: ours {ours[index]!r}, theirs {theirs[index]!r}, difference "
                    f"{difference[index]:.3g}, tolerance {tolerance[index]:.3g}"
                )
            moved = tolerance > 0
            if np.any(moved):
                worst["params"] = max(worst["params"], float(np.max(difference[moved] / tolerance[moved])))
    return worst


# ----------------------------------------------------------------------------- the scenarios


@pytest.mark.parametrize("scenario", ["proxy_anchor_warmup", "proxy_anchor_no_warmup"])
def test_proxy_anchor_steps_match_the_official_pytorch_loop(scenario, runs):
    """AdamW, proxies ×100, bn_freeze, warm-up, clipping, StepLR: 6 steps over 3 epochs.

    With warm-up 1, BatchNorm's weight/bias are frozen in epoch 0 and train afterwards; without
    warm-up they stay frozen all run (the official quirk). The learning rate halves every epoch.
    """
    arrays, facts = runs[scenario]
    assert_float64_program(facts)
    assert facts["clipped"] > 0, "clipping never acted: the test would not check it"
    assert_steps_match(arrays)

    last = NUM_STEPS - 1
    names = names_at(arrays, "initial", 0)
    bn_scale = next(k for k in names if k.endswith("['bn1']['scale']") and "backbone" in k)
    conv = next(k for k in names if k.endswith("['conv1']['kernel']") and "backbone" in k)
    stats = [k for k in names if "batch_stats" in k]

    def unchanged(name):
        return np.array_equal(arrays[f"ours/{last}/{name}"], arrays[f"initial/0/{name}"])

    assert not unchanged(conv)  # the backbone trained after warm-up
    assert all(unchanged(k) for k in stats)  # running statistics frozen all run
    # BatchNorm's affine parameters train after a warm-up, and never without one.
    assert unchanged(bn_scale) == (scenario == "proxy_anchor_no_warmup")


@pytest.mark.parametrize("scenario", ["cgd"])
def test_cgd_steps_match_a_pytorch_loop(scenario, runs):
    """Adam, BatchNorm in train mode (running statistics compared too), CE + triplet, and the
    learning rate ×0.1 after an absolute step (the paper's iteration milestones): 6 steps."""
    arrays, facts = runs[scenario]
    assert_float64_program(facts)
    assert_steps_match(arrays)


@pytest.mark.parametrize("scenario", ["proxy_nca_pp"])
def test_proxy_nca_pp_steps_match_the_official_pytorch_loop(scenario, runs):
    """Adam ε = 1 on every group, no weight decay, proxies ×1e5, model-only clipping, BatchNorm in
    train mode; warm-up (1 epoch) in an optimizer of its own with the backbone at lr 0, then a new
    optimizer: 6 steps."""
    arrays, facts = runs[scenario]
    assert facts["config"] == ["adam", 1.0, 0.0, 1e5, False]
    assert facts["fresh_state_after_warmup"] and not facts["frozen_bn"]
    assert facts["clipped"] > 0 and facts["proxy_grad"] > facts["clip"]  # both clipping rules act
    assert_float64_program(facts)
    assert_steps_match(arrays)


@pytest.mark.parametrize("scenario", ["hier_vit"])
def test_hier_vit_recipe_steps_match_a_pytorch_loop_from_hier_train_py(scenario, runs):
    """HIER's Euclidean ViT recipe as ``configs/cub.py:...,backbone=vit_s16_dino`` resolves it, on
    a tiny ViT: AdamW ε 1e-4, lr × batch / 180, the backbone at lr 0 in a live AdamW group for
    the warm-up epoch (its moments accumulate), head ×10, proxies ×1e4, decay on every group, the
    patch embedding frozen, ±clip on every gradient: 6 steps over 3 epochs."""
    arrays, facts = runs[scenario]
    assert facts["recipe"] == {
        "warmup": "zero_lr",
        "warmup_epochs": 1,
        "eps": 1e-4,
        "proxy_lr_multiplier": 1e4,
        "lr_reference_batch": 180,
        "clip_proxies": True,
        "freeze_patch_embed": True,
        "head_layernorm": True,
    }
    assert_float64_program(facts, batch_stats=False)
    assert facts["clipped"] > 0, "clipping never acted: the test would not check it"
    assert_steps_match(arrays, N_VIT, K_VIT)

    names = names_at(arrays, "initial", 0)
    patch = next(k for k in names if "patch_embed" in k and k.endswith("['kernel']"))
    qkv = next(k for k in names if "blocks_0" in k and "qkv" in k and k.endswith("['kernel']"))
    head = next(k for k in names if "['head']" in k and k.endswith("['kernel']"))

    def unchanged(name, step):
        return np.array_equal(arrays[f"ours/{step}/{name}"], arrays[f"initial/0/{name}"])

    assert all(unchanged(patch, s) for s in range(NUM_STEPS))  # frozen all run
    assert unchanged(qkv, 1) and not unchanged(qkv, 2)  # lr 0 through the warm-up epoch only
    assert not unchanged(head, 0)
