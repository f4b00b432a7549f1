"""``method=hier_pa`` in the trainer: the loss it computes, its LCAs' parameter group, its recipes
from HIER's scripts, and the Poincaré ranking of its few-query paths.

HIER's loss and geometry themselves are checked against the official semantics in
``test_hier`` and ``test_hyperbolic``; a whole run through the command line (training, resume,
export) is in ``test_vit_training``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax import hyperbolic, losses, methods
from hdml_jax.config_vit import HIER_RESNET_SCRIPTS, HIER_SCRIPTS
from hdml_jax.errors import ConfigError
from hdml_jax.evaluation import evaluate, ranking
from hdml_jax.training import optim, steps
from tests import torch_hyperbolic
from tests.numerics import assert_close
from tests.test_train import load_config_module


def hier_config(name: str = "synthetic", arg: str = "method=hier_pa"):
    return load_config_module(name).get_config(arg)


def test_the_loss_is_proxy_anchor_plus_half_of_hier_on_the_balls_points():
    c = hier_config()
    rng = np.random.default_rng(0)
    labels = jnp.asarray(np.repeat(np.arange(8), 2))
    z = hyperbolic.to_poincare(jnp.asarray(rng.normal(size=(16, 6)), jnp.float32), 0.1, 2.3)
    params = {
        "proxies": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        "lcas": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
    }
    key, every = jax.random.key(7), jnp.ones(16, bool)
    c.loss.hier.topk, c.loss.hier.triplets_per_anchor = 4, 3

    @jax.jit
    def both(z, params, mask):
        total, parts = steps.compute_loss(c, {"embedding": z}, labels, params, {}, mask, key=key)
        pa = losses.proxy_anchor_loss(z, labels, params["proxies"], margin=0.1, alpha=32.0, mask=mask)
        lca_points = hyperbolic.to_poincare(params["lcas"], 0.1, 2.3, riemannian=True)
        regularizer = losses.hier_loss(z, labels, lca_points, key, c=0.1, topk=4, per_anchor=3, mask=mask)
        return total, parts, pa + 0.5 * regularizer, regularizer

    total, parts, expected, regularizer = both(z, params, every)
    assert float(regularizer) > 0  # not vacuous
    np.testing.assert_array_equal(np.asarray(parts["hier"]), np.asarray(regularizer))  # one program
    # The sum's one rounding, relative to its size.
    assert_close(total, expected, n_terms=2, k=2, scale=abs(float(expected)))
    # A padding row (mask False) takes part in neither term: the batch without it.
    padded_z = jnp.concatenate([z, z[:1]])
    with pytest.raises(ValueError, match="pass key"):
        steps.compute_loss(c, {"embedding": z}, labels, params, {}, every)
    padded_labels = jnp.concatenate([labels, labels[:1]])
    padded, _ = jax.jit(
        lambda z, m: steps.compute_loss(c, {"embedding": z}, padded_labels, params, {}, m, key=key)
    )(padded_z, jnp.concatenate([every, jnp.zeros(1, bool)]))
    assert np.isfinite(float(padded)) and float(padded) > 0


def test_the_lcas_train_at_fifty_times_the_rate_with_decay_and_the_clamp():
    c = hier_config("cub")
    c.model.depth, c.model.width, c.model.embedding_dim, c.loss.hier.num_lcas = 18, 2, 4, 3
    model = steps.build_model(c, num_classes=7)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert params["lcas"].shape == (3, 4) and params["proxies"].shape == (7, 4)
    assert optim.parameter_groups(params)["lcas"] == "loss_params"
    settings = optim.group_settings(c)
    assert settings["loss_params"].lr_multiplier == 50.0 and settings["proxies"].lr_multiplier == 1e4
    assert settings["loss_params"].weight_decay == settings["backbone"].weight_decay == 1e-2
    assert c.optimizer.grad_clip_value == 10.0 and c.optimizer.clip_proxies
    # Their initial points: N(0, 1)/√d · 0.9 · clip_r, inside the clipping radius on average.
    assert 0 < float(jnp.sqrt(jnp.mean(jnp.sum(params["lcas"] ** 2, -1)))) < 2.3


@pytest.mark.parametrize("dataset", ["CUB", "Cars", "SOP", "Inshop"])
def test_resnet_recipes_are_hiers_scripts_and_other_methods_keep_theirs(dataset):
    name = {"CUB": "cub", "Cars": "cars", "SOP": "sop", "Inshop": "inshop"}[dataset]
    c = hier_config(name)
    script = HIER_RESNET_SCRIPTS[dataset]
    o = c.optimizer
    assert (o.lr, c.num_epochs, o.warmup_epochs, o.weight_decay) == (
        script["lr"],
        script["epochs"],
        script["warmup_epochs"],
        script["weight_decay"],
    )
    assert (o.decay_epochs, o.decay_factor, c.model.embedding_dim) == (
        (script["lr_decay"],),
        script["lr_decay_gamma"],
        512,
    )
    assert (c.batch_size, c.sampler, c.classes_per_batch, c.samples_per_class) == (180, "unique_class", 90, 2)
    assert (c.model.curvature, c.model.clip_r, c.loss.hier.weight, c.loss.hier.topk) == (0.1, 2.3, 0.5, 20)
    assert c.model.frozen_bn and c.model.frozen_bn_trains_affine and c.model.head_layernorm
    assert evaluate.ranking_of(c) == {"distance": "poincare", "curvature": 0.1}
    # Proxy-Anchor on the same data set keeps Proxy-Anchor's command and the sphere.
    pa = hier_config(name, "method=proxy_anchor")
    assert pa.sampler == "shuffle" and pa.model.curvature == 0.0 and evaluate.ranking_of(pa) == {}
    # On a ViT, HIER's own script for that backbone, now with its hyperbolic part.
    vit = hier_config(name, "method=hier_pa,backbone=vit_s16_dino")
    assert vit.optimizer.lr == HIER_SCRIPTS[("DINO", dataset)]["lr"] and vit.model.curvature == 0.1
    assert hier_config(name, "method=proxy_anchor,backbone=vit_s16_dino").model.curvature == 0.0


def test_mistakes_in_the_hier_fields_end_in_one_clear_message():
    from hdml_jax.config import validate

    for field, value, message in [
        ("model.curvature", -0.1, "model.curvature must be 0"),
        ("loss.hier.topk", 1, "loss.hier.topk must be >= 2"),
        ("loss.hier.num_lcas", 0, "loss.hier.num_lcas must be a positive integer"),
        ("loss.hier.tau", 0.0, "tau"),
        ("loss.xbm_size", 16, "loss.xbm_size=0"),
    ]:
        c = hier_config()
        section, _, leaf = field.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
        with pytest.raises(ConfigError, match=message):
            validate(c)
    with pytest.raises(ConfigError, match="has no effect with method proxy_anchor"):
        validate(hier_config(arg="method=proxy_anchor"), ("loss.hier.weight",))
    assert "hier_pa" in methods.users_of("loss.hier")


@pytest.mark.parametrize("curvature", [0.0, 0.3])
def test_few_query_ranking_is_a_per_query_sort_of_the_official_distances(curvature):
    rng = np.random.default_rng(3)
    queries, gallery = rng.normal(size=(4, 5)), rng.normal(size=(30, 5))
    if curvature:
        queries, gallery = (
            np.asarray(hyperbolic.to_poincare(jnp.asarray(x, jnp.float32), curvature, 2.3))
            for x in (queries, gallery)
        )
    else:
        queries, gallery = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (queries, gallery))
    order, scores = ranking.nearest(queries, gallery, k=6, curvature=curvature)
    for q in range(4):
        if curvature:
            d = torch_hyperbolic.distance_matrix(
                torch.tensor(queries[q : q + 1], dtype=torch.float64),
                torch.tensor(gallery, dtype=torch.float64),
                curvature,
            ).numpy()[0]
            expected = sorted(range(30), key=lambda j: d[j])[:6]
        else:
            s = gallery.astype(np.float64) @ queries[q].astype(np.float64)
            expected = sorted(range(30), key=lambda j: -s[j])[:6]
        assert order[q].tolist() == expected
    assert np.all(np.diff(scores, axis=1) >= 0) if curvature else np.all(np.diff(scores, axis=1) <= 0)
