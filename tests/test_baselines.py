"""The baselines as trainer methods: recipes from MLRC's table, the loss each method computes, mistakes.

The losses themselves are checked against per-sample references in ``test_pair_losses`` and
``test_classification_losses``; here only what the trainer adds: which function, which keywords,
which parameters and rates. A whole training run of two of them is in ``test_train``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdml_jax import losses, methods
from hdml_jax.config import validate
from hdml_jax.errors import ConfigError
from hdml_jax.methods import baselines
from hdml_jax.training import optim, steps
from tests.numerics import assert_close
from tests.test_train import load_config_module

CONFIGS = ("cub", "cars", "sop", "inshop", "synthetic", "synthetic_sop", "custom")
COLUMN = {"cub": "cub", "cars": "cars", "sop": "sop", "inshop": "sop", "synthetic": "cub",
          "synthetic_sop": "sop", "custom": "cub"}


def baseline_config(config_name: str, method: str):
    c = load_config_module(config_name).get_config(f"method={method}")
    if config_name == "custom":
        c.dataset.path = "/data/items.csv"
    return c


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_baseline_takes_mlrcs_numbers_on_the_proxy_anchor_recipe(config_name):
    reference = baseline_config(config_name, "proxy_anchor")
    for method in baselines.BASELINE_METHODS:
        c = baseline_config(config_name, method)
        validate(c)
        kwargs = c.loss.kwargs.to_dict()
        if method in baselines.MLRC_BEST:
            best = baselines.MLRC_BEST[method][COLUMN[config_name]]
            for name, value in best.items():
                if name == "weights_lr":
                    assert c.optimizer.proxy_lr == value
                elif name == "beta_lr":
                    assert c.optimizer.loss_params_lr == value
                elif name == "epsilon":
                    assert c.loss.miner_kwargs.epsilon == value
                else:
                    assert kwargs[name] == value, (method, name)
        else:
            assert kwargs == baselines.PAPER_DEFAULTS[method]
        # One protocol: the network, optimizer and schedule are Proxy-Anchor's for this data set.
        for field in ("optimizer.lr", "optimizer.weight_decay", "optimizer.decay_epochs", "num_epochs",
                      "model.embedding_dim", "model.frozen_bn", "optimizer.warmup_epochs", "dataset.transform"):
            section, name = field.split(".") if "." in field else (None, field)
            ours = c[section][name] if section else c[name]
            theirs = reference[section][name] if section else reference[name]
            assert ours == theirs, (method, field)
        if method in baselines.PAIR_METHODS:
            k = 2 if config_name == "synthetic_sop" else 4  # its P×K is 32 × 2 for every P×K method
            assert (c.sampler, c.samples_per_class) == ("pk", k)
            assert c.batch_size == c.classes_per_batch * k and abs(c.batch_size - reference.batch_size) < 4
        else:
            assert (c.sampler, c.batch_size) == (reference.sampler, reference.batch_size)
    PROXY_ANCHOR_FAMILY = [m.name for m in methods.registered() if m.family == "proxy_anchor"]  # noqa: N806
    assert set(baselines.BASELINE_METHODS) <= set(PROXY_ANCHOR_FAMILY)


def test_mistakes_are_one_line_config_errors():
    c = baseline_config("cub", "contrastive")
    with c.unlocked():
        c.loss.kwargs.neg_margn = 0.5
    with pytest.raises(ConfigError, match=r"no keyword 'neg_margn'; it takes: pos_margin, neg_margin"):
        validate(c)
    c = baseline_config("cub", "contrastive")
    c.loss.miner = "hard"
    with pytest.raises(ConfigError, match=r"unknown loss\.miner 'hard'; valid: none, batch_hard"):
        validate(c)
    c = baseline_config("cub", "contrastive")
    c.loss.xbm_size = 10
    with pytest.raises(ConfigError, match=r"xbm_size must be 0 .* at least batch_size 120"):
        validate(c)
    c = baseline_config("cub", "lifted_structure")
    c.loss.xbm_size = 1024
    with pytest.raises(ConfigError, match="lifted_structure has no cross-batch form"):
        validate(c)
    c = baseline_config("cub", "multi_similarity")
    c.loss.miner = "none"
    with pytest.raises(ConfigError, match=r"miner_kwargs is set but loss\.miner is 'none'"):
        validate(c)
    with pytest.raises(ConfigError, match=r"loss\.kwargs\.margin has no effect with method proxy_anchor"):
        validate(baseline_config("cub", "proxy_anchor"), overridden=("loss.kwargs.margin",))
    validate(baseline_config("cub", "cosface"), overridden=("loss.kwargs.margin", "optimizer.proxy_lr"))


def _inputs(num_classes: int = 6, batch: int = 12, dim: int = 8):
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(keys[0], (batch, dim))
    y = jnp.arange(batch) % num_classes
    mask = jnp.arange(batch) < batch - 1  # the last row is padding
    return x, y, mask, keys[2]


@pytest.mark.parametrize("method", baselines.BASELINE_METHODS)
def test_the_train_step_computes_the_methods_loss_with_its_parameters(method):
    """``steps.compute_loss`` (what the compiled step runs) equals the loss function called directly."""
    c = baseline_config("synthetic", method)
    x, y, mask, key = _inputs()
    num_classes, dim = 6, x.shape[1]
    kwargs = c.loss.kwargs.to_dict()
    params, hierarchy = {}, {}
    fn = getattr(losses, baselines.LOSS_FUNCTIONS[method])
    if method in baselines.PAIR_METHODS:
        mined = {}
        if c.loss.miner != "none":
            miner = getattr(losses, baselines.MINER_FUNCTIONS[c.loss.miner])
            mined = miner(x, y, mask=mask, **c.loss.miner_kwargs.to_dict())
            assert any(bool(jnp.any(v)) for v in mined.values())
        if method == "margin":
            beta = jnp.linspace(0.5, 1.5, num_classes)
            params["margin_beta"] = beta
            kwargs.pop("beta")
            expected = fn(x, y, beta, mask=mask, **kwargs, **mined)
        else:
            expected = fn(x, y, mask=mask, **kwargs, **mined)
    else:
        rows = num_classes * baselines.centers_per_class(c)
        weights = jax.random.normal(key, (rows, dim))
        params["proxies"] = weights
        if method in baselines.HPL_CLASSIFICATION_METHODS:
            coarse = jax.random.normal(jax.random.PRNGKey(9), (2, dim))
            params["coarse_proxies_1"] = coarse
            assignment = jnp.arange(num_classes) % 2
            hierarchy = {"assignments": (assignment,), "active": jnp.float32(1.0)}
            expected = losses.hierarchical_proxy_loss(
                x, y, (weights, coarse), (assignment,), base_loss=fn, level_weights=(1.0, 0.1), mask=mask, **kwargs
            )
        else:
            expected = fn(x, y, weights, mask=mask, **kwargs)
    loss, _ = steps.compute_loss(c, {"embedding": x}, y, params, hierarchy, mask)
    assert np.isfinite(float(loss)) and float(loss) != 0.0
    # The same operations, eagerly, on the same arrays (a level weight 1·0.1 is the float32 0.1 of
    # the direct call): the same bits.
    assert float(loss) == float(expected)


def test_learned_loss_parameters_get_their_own_rate_and_no_decay():
    c = baseline_config("cub", "margin")
    c.model.depth, c.model.width, c.model.embedding_dim = 18, 2, 4  # a tiny network: only β matters
    model = steps.build_model(c, num_classes=7)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert params["margin_beta"].shape == (7,) and "proxies" not in params
    np.testing.assert_array_equal(params["margin_beta"], np.full(7, c.loss.kwargs.beta, np.float32))
    assert optim.parameter_groups(params)["margin_beta"] == "loss_params"
    settings = optim.group_settings(c)
    # (rate / lr) · lr in float64: two roundings, at most 2u + u² < 2ε relative.
    two_roundings = 2 * np.finfo(np.float64).eps
    loss_params_lr = settings["loss_params"].lr_multiplier * c.optimizer.lr
    assert loss_params_lr == pytest.approx(2.65e-4, rel=two_roundings, abs=0)  # MLRC CUB
    assert settings["loss_params"].weight_decay == 0.0 and settings["head"].weight_decay == 1e-4
    cosface = baseline_config("cub", "cosface")
    proxy_lr = optim.group_settings(cosface)["proxies"].lr_multiplier * cosface.optimizer.lr
    assert proxy_lr == pytest.approx(2.53e-3, rel=two_roundings, abs=0)


def test_soft_triple_pads_whole_classes_when_its_centers_are_sharded():
    c = baseline_config("sop", "soft_triple")
    c.shard_proxies = True
    model = steps.build_model(c, num_classes=1001, num_devices=8)
    rows = model.num_proxies + model.proxy_padding
    assert model.num_proxies == 10_010
    assert rows % 10 == 0 and rows % 8 == 0 and rows % 128 == 0 and rows - 10_010 < 640
    x, y, mask, _ = _inputs(num_classes=5, dim=4)
    small = steps.build_model(baseline_config("synthetic", "soft_triple"), num_classes=5)
    assert small.proxy_padding == 0
    weights = jax.random.normal(jax.random.PRNGKey(1), (60, 4))  # 5 classes + 1 padding class, K = 10
    kwargs = baselines.MLRC_BEST["soft_triple"]["cub"] | {"centers_per_class": 10}
    kwargs.pop("weights_lr")
    padded, _ = steps.compute_loss(
        baseline_config("synthetic", "soft_triple"), {"embedding": x}, y, {"proxies": weights}, {}, mask, num_classes=50
    )
    direct = losses.soft_triple_loss(x, y, weights[:50], mask=mask, **kwargs)
    # 60 center rows (10 masked) against 50: two shapes, two orders; 12 rows × 60 rows × 4 dims.
    # The logits λ(S - δ) with S's slope in the cosines at most 1 + 2/γ, plus log C.
    scale = kwargs["la"] * (1 + kwargs["margin"]) * (1 + 2 / kwargs["gamma"]) + math.log(5)
    eps = float(np.finfo(np.float32).eps)
    assert_close(float(padded), float(direct), n_terms=12 * 60 * 4, scale=scale, eps=eps)


def test_the_train_step_pairs_the_batch_with_the_cross_batch_memory():
    """With ``loss.xbm_size`` the step's loss is ``xbm_loss`` of the method's loss, miner included."""
    import functools

    c = baseline_config("synthetic", "multi_similarity")
    x, y, mask, _ = _inputs()
    memory = losses.xbm_init(24, x.shape[1])
    memory, _ = losses.xbm_enqueue(memory, -x, (y + 1) % 6)  # an earlier batch
    loss, after = steps.pair_loss(c, x, y, {}, mask, memory)
    miner = functools.partial(losses.multi_similarity_miner, **c.loss.miner_kwargs.to_dict())
    expected, expected_memory = losses.xbm_loss(
        functools.partial(losses.multi_similarity_loss, **c.loss.kwargs.to_dict()), x, y, memory, mask=mask, miner=miner
    )
    assert float(loss) == float(expected)  # the same operations, eagerly, on the same arrays
    assert int(after.position) == int(expected_memory.position) == 23  # 12 rows, then 11 (one masked)
    assert float(loss) != float(steps.pair_loss(c, x, y, {}, mask)[0])  # the memory takes part
