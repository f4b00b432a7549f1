"""Parameter groups, phases and learning-rate schedules against the official scripts' PyTorch objects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax.models import EmbeddingHead, EmbeddingModel, ResNet
from hdml_jax.training import optim
from tests.test_train import load_config_module


def test_parameter_groups_label_every_parameter():
    model = EmbeddingModel(
        ResNet(18, width=4), EmbeddingHead(8), num_proxies=5, coarse_groups=(2,), loss_params=(("margin_beta", 5, 1.0),)
    )
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    labels = optim.parameter_groups(params)
    assert labels["backbone"]["conv1"]["kernel"] == "backbone"
    assert labels["backbone"]["bn1"] == {"scale": "backbone_bn", "bias": "backbone_bn"}
    assert labels["backbone"]["layer2_0"]["downsample_bn"]["scale"] == "backbone_bn"
    assert labels["head"]["embedding"] == {"kernel": "head", "bias": "head"}
    assert (labels["proxies"], labels["coarse_proxies_1"]) == ("proxies", "coarse_proxies")
    assert labels["margin_beta"] == "loss_params"
    assert set(jax.tree.leaves(labels)) == set(optim.GROUPS) - {"backbone_fixed"}
    fixed = optim.parameter_groups(params, fixed=("conv1",))["backbone"]
    assert fixed["conv1"]["kernel"] == "backbone_fixed" and fixed["bn1"]["scale"] == "backbone_bn"


@pytest.mark.parametrize(
    "config_name, method, torch_scheduler",
    [
        # StepLR(step_size, gamma) stepped once per epoch (PA train.py:256, 313)
        ("cub", "proxy_anchor", lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)),
        ("sop", "hpl_pa", lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.25)),
        # MultiStepLR at 0.6 / 0.8 of 20 epochs (CGD-port train.py:117)
        (
            "cars",
            "cgd",
            lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[12, 16], gamma=0.1),
        ),
    ],
)
def test_learning_rate_of_every_group_equals_the_official_schedulers(config_name, method, torch_scheduler):
    config = load_config_module(config_name).get_config(f"method={method}")
    steps_per_epoch = 7
    o = config.optimizer
    multipliers = optim.group_settings(config)
    groups = [torch.nn.Parameter(torch.zeros(1)) for _ in multipliers]
    opt = torch.optim.SGD(
        [{"params": [p], "lr": o.lr * m} for p, (m, *_) in zip(groups, multipliers.values(), strict=True)],
        lr=o.lr,
    )
    scheduler = torch_scheduler(opt)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch)
    for epoch in range(config.num_epochs):
        for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):  # first and last step
            ours = [float(schedule(step)) * m for m, *_ in multipliers.values()]
            np.testing.assert_allclose(
                ours, [g["lr"] for g in opt.param_groups], rtol=1e-6, err_msg=f"epoch {epoch}"
            )
        opt.step()
        scheduler.step()


def test_cgd_cub_decays_at_iterations_400_and_800():
    config = load_config_module("cub").get_config("method=cgd")
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=45)
    rates = {step: float(schedule(step)) for step in (0, 399, 400, 799, 800, 1499)}
    assert rates == pytest.approx({0: 1e-4, 399: 1e-4, 400: 1e-5, 799: 1e-5, 800: 1e-6, 1499: 1e-6})
    assert optim.total_steps(config, 45) == 1500


def test_phases_follow_the_official_freezing():
    pa = load_config_module("cub").get_config("method=hpl_pa")  # warm 5, bn_freeze
    spe = 10
    assert optim.frozen_groups(pa, 0, spe, False) == {"backbone", "backbone_bn", "coarse_proxies"}
    assert optim.frozen_groups(pa, 49, spe, False) == {"backbone", "backbone_bn", "coarse_proxies"}
    assert optim.frozen_groups(pa, 50, spe, True) == set()  # BN scale/bias train after warm-up
    pa.optimizer.warmup_epochs = 0  # bn_freeze without warm-up: BN scale/bias frozen all run
    assert optim.frozen_groups(pa, 500, spe, True) == {"backbone_bn"}
    sop = load_config_module("sop").get_config("method=proxy_anchor")  # warm 1, no bn_freeze
    assert optim.frozen_groups(sop, 9, spe) == {"backbone", "backbone_bn"}
    assert optim.frozen_groups(sop, 10, spe) == set()
    cgd = load_config_module("cub").get_config("method=cgd")
    assert optim.frozen_groups(cgd, 0, spe) == set()


def test_a_frozen_group_keeps_fresh_state_until_it_trains():
    config = load_config_module("synthetic").get_config("method=proxy_anchor")
    params = {"backbone": {"conv": {"kernel": jnp.ones((2, 2))}}, "head": {"dense": {"kernel": jnp.ones(3)}}}
    grads = jax.tree.map(jnp.ones_like, params)
    frozen = optim.make_optimizer(config, params, 10, {"backbone", "backbone_bn"})
    state = frozen.init(params)
    for _ in range(3):
        updates, state = frozen.update(grads, state, params)
        assert not np.any(np.asarray(updates["backbone"]["conv"]["kernel"]))
    assert int(state.count) == 3
    backbone_state = state.groups.inner_states["backbone"].inner_state
    head_state = state.groups.inner_states["head"].inner_state
    assert [
        int(s.count) for s in jax.tree.leaves(backbone_state, is_leaf=hasattr_count) if hasattr(s, "count")
    ] == [0]
    assert [
        int(s.count) for s in jax.tree.leaves(head_state, is_leaf=hasattr_count) if hasattr(s, "count")
    ] == [3]


def hasattr_count(node) -> bool:
    return hasattr(node, "count") and hasattr(node, "mu")


@pytest.mark.parametrize("name", ["rmsprop", "adam", "adamw"])
def test_optimizer_trajectories_equal_torch_optim(name):
    """Ten steps on a quartic objective: the parameters after each step agree with
    ``torch.optim``'s (RMSprop: α 0.99, momentum 0.9, L2 weight decay; MLRC's trunk optimizer).

    Both sides run in float64 (JAX's x64 mode, torch doubles), so the comparison does not depend
    on how one CPU rounds float32. Each step is elementwise arithmetic (the gradient 2(p - t)³,
    the moments, a square root, a division, the decay): a few roundings of ε₆₄ relative to the
    parameter and the step, k = 8 (tests/numerics.py), and an earlier step's difference is carried
    along unamplified (the lr·|∂u/∂p| feedback of these steps is below 1), so the bound after step
    s is (s + 1)·8·ε₆₄·(max|p| + lr).
    """
    config = load_config_module("synthetic").get_config("method=proxy_anchor")
    config.optimizer.name = name
    config.optimizer.lr = 1e-2
    config.optimizer.weight_decay = 1e-2
    config.optimizer.grad_clip_value = 0.0
    config.optimizer.decay_epochs = ()
    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3))
    targets = rng.standard_normal((10, 4, 3))
    weight = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    torch_class = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    extra = {"momentum": 0.9} if name == "rmsprop" else {}
    reference = torch_class([weight], lr=1e-2, weight_decay=1e-2, eps=config.optimizer.eps, **extra)
    eps64 = float(np.finfo(np.float64).eps)
    with jax.enable_x64(True):
        params = {"head": {"dense": {"kernel": jnp.asarray(start, jnp.float64)}}}
        optimizer = optim.make_optimizer(config, params, steps_per_epoch=100)
        state = optimizer.init(params)
        for step, target in enumerate(targets):
            grads = {"head": {"dense": {"kernel": 2 * (params["head"]["dense"]["kernel"] - target) ** 3}}}
            updates, state = optimizer.update(grads, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
            reference.zero_grad()
            (0.5 * ((weight - torch.tensor(target)) ** 4).sum()).backward()
            reference.step()
            ours, theirs = np.asarray(params["head"]["dense"]["kernel"]), weight.detach().numpy()
            assert ours.dtype == theirs.dtype == np.float64
            atol = (step + 1) * 8 * eps64 * (float(np.abs(theirs).max()) + 1e-2)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol, err_msg=f"step {step}")
