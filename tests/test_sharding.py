"""Data parallelism: one step over 8 simulated CPU devices equals the same global batch on 1.

Each case runs in a subprocess because the device count must be set before JAX starts.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics import rounding_atol
from tests.simulated_devices import run_on_eight_devices
from tests.test_train import tiny_network_terms

BATCH = 32  # multidevice_check's global batch (4 images a device)
F32 = float(np.finfo(np.float32).eps)


def run_check(*args: str) -> dict:
    return run_on_eight_devices("multidevice_check", *args)


def worst_ratio(rows: list[list], n_terms: int) -> tuple[float, str]:
    """The largest ``max|one - eight| / tolerance`` over the leaves, and its leaf: the tolerance is
    ``tests.numerics``'s for ``n_terms``, on the scale of the 1-device leaf's largest entry."""
    ratios = [
        (diff / rounding_atol(scale, n_terms, eps=F32) if diff else 0.0, path) for path, diff, scale, *_ in rows
    ]
    return max(ratios)


def assert_same_step(worst: dict, method: str) -> None:
    """The 8-device step computes the 1-device step's numbers up to round-off: both sum the batch's
    BatchNorm statistics and gradients, in another order (per-device sums, then a psum)."""
    assert worst["grad_norm"] > 0  # a real gradient was compared
    forward = tiny_network_terms(BATCH)  # the loss and the statistics: the forward pass
    loss_diff, loss_scale = worst["loss"]
    assert loss_diff <= rounding_atol(loss_scale, forward, eps=F32), worst["loss"]
    ratio, leaf = worst_ratio(worst["batch_stats"], forward)
    assert ratio < 1, (ratio, leaf)
    if method == "cgd":
        # CGD's batch-hard triplet picks each anchor's farthest positive and nearest negative. At
        # random initialisation the tiny network maps an anchor's classmates to nearly equal
        # distances, so round-off can pick another of the near-tied pairs: the loss still agrees
        # to round-off (above: a maximum is continuous), its subgradient does not. A flip
        # replaces one of the B anchors' terms of the batch mean: at most 1/B of a leaf's norm.
        worst_leaf = max((diff / norm if norm else 0.0, path) for path, _, _, diff, norm in worst["grads"])
        assert worst_leaf[0] < 1 / BATCH, worst_leaf
    else:
        ratio, leaf = worst_ratio(worst["grads"], tiny_network_terms(BATCH, backward=True))
        assert ratio < 1, (ratio, leaf)


# The default run covers each head (embedding, CGD) and the hierarchy (hpl_pa, sharded below);
# the other combinations run with -m exhaustive.
@pytest.mark.parametrize("method", ["proxy_anchor", pytest.param("hpl_pa", marks=pytest.mark.exhaustive), "cgd"])
def test_eight_devices_match_one(method):
    assert_same_step(run_check(method), method)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("proxy_anchor", marks=pytest.mark.exhaustive),  # hpl_pa's fine level is this loss
        "hpl_pa",
        pytest.param("hpl_nca", marks=pytest.mark.exhaustive),
    ],
)
def test_proxies_sharded_over_classes_match_one_device_and_are_never_gathered(method):
    worst = run_check(method, "--shard-proxies")
    assert_same_step(worst, method)
    # Each device holds (and updates) an eighth of the proxies ...
    assert worst["proxy_shard_rows"] == [worst["num_proxies"] // 8], worst
    # ... and no collective rebuilds an array with the full class axis (proxies or similarities).
    assert worst["num_collectives"] > 0, worst  # the check saw the step's collectives
    assert worst["gathered"] == [], worst


def test_trainer_with_sharded_proxies_resumes_exactly(tmp_path):
    result = run_check("train", str(tmp_path))
    # The metrics: the resumed run scores with the references split over the devices, which gives
    # the single-device metrics (test_metrics); they are ratios of counts (or means of them).
    assert result["resumed"] == pytest.approx(result["straight"]), result
    # The embeddings: the same compiled programs from bit-identical restored state embed the same
    # images, so they agree to the bit; anything else is lost or changed state.
    assert result["embedding_diff"] == 0.0, result
    assert 0 < result["straight"]["recall@1"] <= 1
