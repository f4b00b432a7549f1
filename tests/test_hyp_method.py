"""``method=hyp`` in the trainer: its loss in the train step, hyp_metric's global-norm clipping
against ``torch.nn.utils.clip_grad_norm_``, and its README commands as recipes.

The loss itself is checked against the official loop in ``test_hyp_loss``; a training run is in
``test_train`` (``test_each_method_trains_and_evaluates[hyp]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax import hyperbolic, losses
from hdml_jax.config import validate
from hdml_jax.config_vit import HYP_COMMANDS
from hdml_jax.errors import ConfigError
from hdml_jax.evaluation import evaluate
from hdml_jax.training import optim, steps
from tests.numerics import assert_close
from tests.test_train import load_config_module


def hyp_config(name: str = "synthetic", arg: str = "method=hyp"):
    return load_config_module(name).get_config(arg)


def test_the_step_computes_hyps_loss_on_the_heads_points_and_refuses_unordered_batches():
    c = hyp_config()
    k = c.samples_per_class
    rng = np.random.default_rng(0)
    labels = jnp.asarray(np.repeat(np.arange(6), k))
    z = hyperbolic.to_poincare(jnp.asarray(rng.normal(size=(6 * k, 8)), jnp.float32), 0.1, 2.3, False)
    every = jnp.ones(6 * k, bool)
    ours, _ = steps.compute_loss(c, {"embedding": z}, labels, {}, {}, every)
    expected = losses.hyp_loss(z, k, tau=0.2, c=0.1)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))  # the same function
    with pytest.raises(ValueError, match="class-major"):
        steps.compute_loss(c, {"embedding": z}, jnp.asarray(np.tile(np.arange(6), k)), {}, {}, every)
    assert evaluate.ranking_of(c) == {"distance": "poincare", "curvature": 0.1}


def test_global_norm_clipping_equals_torchs_clip_grad_norm_over_the_training_groups():
    params = {
        "backbone": {"patch": {"kernel": jnp.ones((3, 2))}, "block": {"kernel": jnp.ones((4, 5))}},
        "head": {"embedding": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}},
    }
    labels = optim.parameter_groups(params, ("patch",))
    assert labels["backbone"]["patch"]["kernel"] == "backbone_fixed"  # frozen: no gradient in torch
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)
    clipped = jax.jit(lambda g: optim.clip_by_global_norm(g, labels, 3.0))(grads)
    trained = [
        ("backbone", "block", "kernel"),
        ("head", "embedding", "bias"),
        ("head", "embedding", "kernel"),
    ]
    tensors = []
    for path in trained:
        g = np.asarray(grads[path[0]][path[1]][path[2]], np.float64)
        tensor = torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
        tensor.grad = torch.tensor(g)
        tensors.append(tensor)
    norm = float(torch.nn.utils.clip_grad_norm_(tensors, 3.0))
    assert norm > 3.0  # the clip acts
    for path, tensor in zip(trained, tensors, strict=True):
        # A norm over 38 float32 terms, then one product per element.
        got = clipped[path[0]][path[1]][path[2]]
        assert_close(
            got, tensor.grad.numpy(), n_terms=38, k=8, scale=float(np.abs(tensor.grad.numpy()).max())
        )
    # The fixed group is scaled like the rest (its update is 0 anyway) but not counted in the norm.
    patch = np.asarray(grads["backbone"]["patch"]["kernel"]) * (3.0 / (norm + 1e-6))
    assert_close(
        clipped["backbone"]["patch"]["kernel"], patch, n_terms=38, k=8, scale=float(np.abs(patch).max())
    )
    small = jax.tree.map(lambda g: g * 1e-3, grads)
    unchanged = optim.clip_by_global_norm(small, labels, 3.0)
    for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # below the norm: × 1 exactly


@pytest.mark.parametrize("dataset", ["CUB", "Cars", "SOP", "Inshop"])
def test_the_vit_recipes_are_the_readme_commands(dataset):
    name = {"CUB": "cub", "Cars": "cars", "SOP": "sop", "Inshop": "inshop"}[dataset]
    command = HYP_COMMANDS[dataset]
    for weights, lr in (("vit_s16_dino", 1e-5), ("deit_s16_distilled", 3e-5), ("vit_s16_augreg", 3e-5)):
        c = hyp_config(name, f"method=hyp,backbone={weights}")
        validate(c)
        assert (c.samples_per_class, c.classes_per_batch * c.samples_per_class) == (
            command["num_samples"],
            command["bs"],
        )
        assert (c.num_epochs, c.optimizer.lr, c.optimizer.weight_decay) == (command["ep"], lr, 0.01)
        assert (c.optimizer.grad_clip_norm, c.optimizer.grad_clip_value, c.optimizer.warmup_epochs) == (
            3.0,
            0.0,
            0,
        )
        assert (c.model.riemannian, c.model.head_layernorm, c.model.embedding_dim) == (False, False, 128)
    with pytest.raises(ConfigError, match="train the ViTs"):
        hyp_config(name)
