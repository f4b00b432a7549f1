"""Step-by-step parity of our training step with a PyTorch loop that follows the official scripts.

The PyTorch side is written here from the official ``train.py`` semantics (not copied):

* Proxy-Anchor (tjddus9597/Proxy-Anchor-CVPR2020 ``code/train.py``): param groups backbone /
  embedding / proxies ×100 (l.236-244), ``torch.optim.AdamW`` (l.254), ``StepLR`` stepped once
  per epoch (l.256, 313), ``bn_freeze``: BatchNorm in ``eval()`` every epoch (l.265-271) and its
  weight/bias frozen at construction (net/resnet.py:150-155), warm-up: ``requires_grad=False``
  on everything but the embedding and the proxies at epoch 0, ``True`` again at ``epoch == warm``
  (l.275-287), ``clip_grad_value_`` on the model and the proxies (l.298-300).
* ProxyNCA++ (euwern/proxynca_pp ``train.py``): Adam with ε on every group, warm-up with the
  backbone's lr at 0 in an optimizer of its own, then a new optimizer (l.263-312); clipping of
  the model only (l.416, 451); BatchNorm in train mode.

Both sides start from the same weights and see the same fixed batches; the loss and every
parameter are compared after every step, across the end of warm-up and a learning-rate decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import optim, parallel, phases, steps, train
from hdml_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hdml_jax.models import torchvision_resnet_to_flax
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset
from tests.torch_resnet import TorchResNet, randomized

WIDTH, DIM, SIZE, BATCH, CLASSES = 8, 16, 32, 16, 8
STEPS_PER_EPOCH = 2


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().copy()  # a copy: state_dict() shares the live parameters' memory


class TorchEmbedder(torch.nn.Module):
    """backbone → pooling → Linear (→ L2), the Proxy-Anchor and ProxyNCA++ heads."""

    def __init__(self, pooling: str, normalize: bool):
        super().__init__()
        self.model = randomized(TorchResNet(18, width=WIDTH), seed=1)
        self.model.embedding = torch.nn.Linear(WIDTH * 8, DIM)
        self.pooling, self.normalize = pooling, normalize

    def forward(self, x):
        f = self.model.features(x)
        if self.pooling == "gap_gmp":  # PA net/resnet.py:181-183
            pooled = f.mean((2, 3)) + f.amax((2, 3))
        else:  # NCA++ networks.py:34-39: max pool, LayerNorm without affine
            pooled = F.layer_norm(f.amax((2, 3)), (f.shape[1],), eps=1e-5)
        e = self.model.embedding(pooled)
        return F.normalize(e, dim=1, eps=1e-12) if self.normalize else e

    def head_in_our_layout(self):
        embedding = self.model.embedding
        return {"embedding": {"kernel": _numpy(embedding.weight).T, "bias": _numpy(embedding.bias)}}, {}


class TorchCGD(torch.nn.Module):
    """CGD with descriptors S, G (GeM p = 3): each Linear (no bias) → L2, concatenated → L2;
    BatchNorm1d → Linear classifier on the first descriptor (the paper; CGD-port model.py:14-86)."""

    def __init__(self):
        super().__init__()
        self.model = randomized(TorchResNet(18, width=WIDTH, last_stride=1), seed=1)
        features = WIDTH * 8
        self.fc_S = torch.nn.Linear(features, DIM // 2, bias=False)
        self.fc_G = torch.nn.Linear(features, DIM // 2, bias=False)
        self.auxiliary_bn = torch.nn.BatchNorm1d(features)
        self.auxiliary_fc = torch.nn.Linear(features, CLASSES)

    def forward(self, x):
        f = self.model.features(x)
        spoc = f.mean((2, 3))
        gem = f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        branches = [F.normalize(self.fc_S(spoc), dim=1), F.normalize(self.fc_G(gem), dim=1)]
        return F.normalize(torch.cat(branches, 1), dim=1), self.auxiliary_fc(self.auxiliary_bn(spoc))

    def head_in_our_layout(self):
        bn, fc = self.auxiliary_bn, self.auxiliary_fc
        params = {
            "fc_S": {"kernel": _numpy(self.fc_S.weight).T},
            "fc_G": {"kernel": _numpy(self.fc_G.weight).T},
            "auxiliary_bn": {"scale": _numpy(bn.weight), "bias": _numpy(bn.bias)},
            "auxiliary_fc": {"kernel": _numpy(fc.weight).T, "bias": _numpy(fc.bias)},
        }
        return params, {"auxiliary_bn": {"mean": _numpy(bn.running_mean), "var": _numpy(bn.running_var)}}


def in_our_layout(torch_model, proxies: torch.Tensor | None) -> dict:
    """``{'params', 'batch_stats'}`` of a PyTorch model (and its proxies) in our tree layout."""
    backbone_state = {
        k: _numpy(v) for k, v in torch_model.model.state_dict().items() if not k.startswith("embedding")
    }
    backbone = torchvision_resnet_to_flax(backbone_state, 18, width=WIDTH)
    head, head_stats = torch_model.head_in_our_layout()
    params = {"backbone": backbone["params"], "head": head}
    if proxies is not None:
        params["proxies"] = _numpy(proxies)
    batch_stats = {"backbone": backbone["batch_stats"], **({"head": head_stats} if head_stats else {})}
    return {"params": params, "batch_stats": batch_stats}


def torch_proxy_anchor(x, y, proxies, margin=0.1, alpha=32.0):
    """Proxy-Anchor as PA losses.py:38-58 defines it."""
    cos = F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).T
    positive = F.one_hot(y, proxies.shape[0]).float()
    pos_sum = (positive * torch.exp(-alpha * (cos - margin))).sum(0)
    neg_sum = ((1 - positive) * torch.exp(alpha * (cos + margin))).sum(0)
    num_valid = (positive.sum(0) > 0).sum()
    return torch.log1p(pos_sum).sum() / num_valid + torch.log1p(neg_sum).sum() / proxies.shape[0]


def torch_proxy_nca_pp(x, y, proxies, scale=3.0):
    """ProxyNCA++ as NCA++ loss.py:58-80 defines it (smoothing 0)."""
    x, p = scale * F.normalize(x, dim=1), scale * F.normalize(proxies, dim=1)
    distance = (x * x).sum(1, keepdim=True) + (p * p).sum(1)[None] - 2 * x @ p.T
    return F.cross_entropy(-distance, y)


def fixed_batches(num_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
            "label": rng.permutation(np.repeat(np.arange(CLASSES), BATCH // CLASSES)).astype(np.int32),
        }
        for _ in range(num_steps)
    ]


def to_torch_images(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def jax_setup(config, torch_model, torch_proxies: torch.Tensor | None):
    """Our state with the PyTorch weights, and the trainer's phase logic on one device."""
    dataset = tiny_dataset(num_train_classes=CLASSES, num_test_classes=2, per_class=4)
    model = steps.build_model(config, CLASSES)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    params_shape = steps.unfreeze(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
    )
    optimizer = optim.make_optimizer(config, params_shape, STEPS_PER_EPOCH)
    state = train.init_state(config, model, dataset, optimizer, ())
    theirs = jax.tree.map(jnp.asarray, in_our_layout(torch_model, torch_proxies))
    for collection in ("params", "batch_stats"):
        assert jax.tree.structure(theirs[collection]) == jax.tree.structure(state[collection])
        state[collection] = theirs[collection]
    sharding = parallel.state_sharding(state, mesh, False)
    groups = phases.Phases(
        config, model, params_shape, STEPS_PER_EPOCH, (), sharding, NamedSharding(mesh, P("data")), False
    )
    return groups, jax.device_put(state, sharding)


def torch_named_parameters(torch_model, proxies: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Our parameter paths → the PyTorch values (converted to our layout)."""
    return flatten(in_our_layout(torch_model, proxies))


def flatten(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_states_match(
    ours, theirs: dict[str, np.ndarray], step: int, lr: float, proxy_lr_multiplier: float = 1.0
):
    """Every value equal at float32 tolerance, except for Adam's rounding-level gradients.

    Adam divides by √v̂: an element whose gradient is at the level of float32 rounding moves by
    a step whose size depends on that rounding, and over a few steps such differences feed back
    through the network. So at most 2% of a tensor's elements (2 in a small tensor) may differ
    by more than 2e-6 (+ 2e-4 relative), and none by more than 2% of the base learning rate.
    (Measured: at most 0.9% of the learning rate, in single elements.)
    """
    ours = flatten({"params": ours["params"], "batch_stats": ours["batch_stats"]})
    assert set(theirs) <= set(ours)
    for name, expected in theirs.items():
        actual, group_lr = ours[name], lr
        if "proxies" in name:  # their own learning rate (×proxy_lr_multiplier), their own scale
            group_lr = lr * proxy_lr_multiplier
            expected, actual = expected / proxy_lr_multiplier, actual / proxy_lr_multiplier
        np.testing.assert_allclose(
            actual, expected, rtol=2e-4, atol=0.02 * group_lr, err_msg=f"{name} after step {step}"
        )
        loose = np.abs(actual - expected) > 2e-6 + 2e-4 * np.abs(expected)
        assert loose.sum() <= max(2, 0.02 * loose.size), (
            f"{name} after step {step}: {loose.sum()} of {loose.size} elements differ"
        )


def run_and_compare(groups, state, batches, history, config):
    """Our trainer's steps (``Phases.begin_step`` + the phase's compiled step) against ``history``."""
    for step, batch in enumerate(batches):
        state = groups.begin_step(state, step)
        state, metrics = groups.step_function(step)(state, batch)
        expected_loss, expected = history[step]
        np.testing.assert_allclose(
            float(metrics["loss"]), expected_loss, rtol=1e-4, err_msg=f"loss at step {step}"
        )
        assert_states_match(
            jax.device_get(state), expected, step, config.optimizer.lr, config.optimizer.proxy_lr_multiplier
        )
    return state


# ----------------------------------------------------------------------------- Proxy-Anchor


def run_torch_proxy_anchor(torch_model, proxies, batches, config, clip):
    """The official loop's semantics on our fixed batches; returns per-step (loss, parameters)."""
    o = config.optimizer
    embedding = list(torch_model.model.embedding.parameters())
    backbone = [p for p in torch_model.parameters() if all(p is not e for e in embedding)]
    bn_modules = [m for m in torch_model.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bn_modules:  # bn_freeze at construction: weight/bias frozen
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone},
            {"params": embedding, "lr": o.lr * o.head_lr_multiplier},
            {"params": [proxies], "lr": o.lr * o.proxy_lr_multiplier},
        ],
        lr=o.lr,
        weight_decay=o.weight_decay,
        eps=o.eps,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.decay_epochs[0], gamma=o.decay_factor)
    warm = o.warmup_epochs
    history, clipped = [], []
    for epoch in range(len(batches) // STEPS_PER_EPOCH):
        torch_model.train()
        for m in bn_modules:
            m.eval()
        if warm > 0 and epoch == 0:
            for p in backbone:
                p.requires_grad = False
        if warm > 0 and epoch == warm:
            for p in backbone:
                p.requires_grad = True
        for batch in batches[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]:
            x = torch_model(to_torch_images(batch["image"]))
            loss = torch_proxy_anchor(x, torch.from_numpy(batch["label"]).long(), proxies)
            optimizer.zero_grad()
            loss.backward()
            grads = [p.grad for p in [*torch_model.parameters(), proxies] if p.grad is not None]
            clipped.append(sum(int((g.abs() > clip).sum()) for g in grads))
            torch.nn.utils.clip_grad_value_(torch_model.parameters(), clip)
            torch.nn.utils.clip_grad_value_([proxies], clip)
            optimizer.step()
            history.append((loss.item(), torch_named_parameters(torch_model, proxies)))
        scheduler.step()
    return history, clipped


@pytest.mark.parametrize("warmup_epochs", [1, 0])
def test_proxy_anchor_steps_match_the_official_pytorch_loop(warmup_epochs):
    """AdamW, proxies ×100, bn_freeze, warm-up, clipping, StepLR: 6 steps over 3 epochs.

    With warm-up 1, BatchNorm's weight/bias are frozen in epoch 0 and train afterwards; without
    warm-up they stay frozen all run (the official quirk). The learning rate halves every epoch.
    """
    torch.manual_seed(0)
    clip = 0.02
    config = tiny_config(
        "proxy_anchor",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "model.frozen_bn": True,
            "optimizer.warmup_epochs": warmup_epochs,
            "optimizer.lr": 3e-3,
            # Adam's first step is lr·g/(|g| + ε): with ε = 1e-8 a gradient at float32 rounding
            # level moves by an lr-sized, rounding-dependent step on either side; ε = 1e-4 keeps
            # the first steps of small gradients linear (still sign-like for |g| ≫ 1e-4).
            "optimizer.eps": 1e-4,
            "optimizer.weight_decay": 1.0,  # large enough that a missing or coupled decay shows
            "optimizer.decay_epochs": (1,),
            "optimizer.decay_every": True,
            "optimizer.decay_factor": 0.5,
            "optimizer.grad_clip_value": clip,
            "batch_size": BATCH,
            "num_epochs": 3,
        },
    )
    torch_model = TorchEmbedder("gap_gmp", normalize=True)
    torch.nn.init.kaiming_normal_(torch_model.model.embedding.weight, mode="fan_out")
    torch.nn.init.zeros_(torch_model.model.embedding.bias)
    proxies = torch.nn.Parameter(torch.randn(CLASSES, DIM) * 0.3)
    batches = fixed_batches(3 * STEPS_PER_EPOCH)
    groups, state = jax_setup(config, torch_model, proxies)
    initial = flatten(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]}))
    history, clipped = run_torch_proxy_anchor(torch_model, proxies, batches, config, clip)
    assert sum(clipped) > 0, "clipping never acted: the test would not check it"

    state = run_and_compare(groups, state, batches, history, config)

    final = flatten(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]}))
    bn_scale = next(k for k in final if k.endswith("['bn1']['scale']") and "backbone" in k)
    conv = next(k for k in final if k.endswith("['conv1']['kernel']") and "backbone" in k)
    stats = next(k for k in final if "batch_stats" in k)
    assert not np.array_equal(final[conv], initial[conv])  # the backbone trained after warm-up
    assert np.array_equal(final[stats], initial[stats])  # running statistics frozen all run
    # BatchNorm's affine parameters train after a warm-up, and never without one.
    assert np.array_equal(final[bn_scale], initial[bn_scale]) == (warmup_epochs == 0)


# ----------------------------------------------------------------------------- CGD


def torch_cgd_loss(embedding, logits, y, temperature=0.5, smoothing=0.1, margin=0.1):
    """CE with τ and ε (CGD-port utils.py:61-72) + batch-hard triplet (utils.py:75-106)."""
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    nll = -log_probs.gather(1, y[:, None])[:, 0]
    classification = ((1 - smoothing) * nll + smoothing * -log_probs.mean(-1)).mean()
    distance = torch.cdist(embedding[None], embedding[None])[0]
    same = y[:, None] == y[None, :]
    positive = same & ~torch.eye(len(y), dtype=torch.bool)
    hardest_positive = (positive.float() * distance).max(1)[0]
    hardest_negative = (distance + distance.max(1, keepdim=True)[0] * same.float()).min(1)[0]
    return classification + F.relu(hardest_positive - hardest_negative + margin).mean()


def test_cgd_steps_match_a_pytorch_loop():
    """Adam, BatchNorm in train mode (running statistics compared too), CE + triplet, and the
    learning rate ×0.1 after an absolute step (the paper's iteration milestones): 6 steps."""
    torch.manual_seed(0)
    config = tiny_config(
        "cgd",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "model.descriptors": "SG",
            "optimizer.lr": 3e-3,
            "optimizer.eps": 1e-4,  # see test_proxy_anchor_steps_match_the_official_pytorch_loop
            "optimizer.decay_steps": (3,),
            "batch_size": BATCH,
            "classes_per_batch": CLASSES,
            "samples_per_class": BATCH // CLASSES,
            "num_epochs": 3,
        },
    )
    torch_model = TorchCGD()
    batches = fixed_batches(3 * STEPS_PER_EPOCH)
    groups, state = jax_setup(config, torch_model, None)
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=config.optimizer.lr, eps=config.optimizer.eps)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3], gamma=0.1)
    history = []
    torch_model.train()
    for batch in batches:  # the schedule counts iterations here
        embedding, logits = torch_model(to_torch_images(batch["image"]))
        loss = torch_cgd_loss(embedding, logits, torch.from_numpy(batch["label"]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append((loss.item(), torch_named_parameters(torch_model, None)))
    run_and_compare(groups, state, batches, history, config)


# ----------------------------------------------------------------------------- ProxyNCA++


def test_proxy_nca_pp_steps_match_the_official_pytorch_loop():
    """Adam ε = 1 on every group, no weight decay, proxies ×1e5, model-only clipping, BatchNorm in
    train mode; warm-up (1 epoch) in an optimizer of its own with the backbone at lr 0, then a new
    optimizer: 6 steps."""
    torch.manual_seed(0)
    clip = 2e-3
    config = tiny_config(
        "proxy_nca_pp",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "optimizer.warmup_epochs": 1,
            "optimizer.grad_clip_value": clip,
            "batch_size": BATCH,
            "classes_per_batch": CLASSES,
            "samples_per_class": BATCH // CLASSES,
            "num_epochs": 3,
        },
    )
    o = config.optimizer
    assert (o.name, o.eps, o.weight_decay, o.proxy_lr_multiplier, o.clip_proxies) == (
        "adam",
        1.0,
        0.0,
        1e5,
        False,
    )
    assert o.fresh_state_after_warmup and not config.model.frozen_bn
    torch_model = TorchEmbedder("mac_layernorm", normalize=True)
    proxies = torch.nn.Parameter(torch.randn(CLASSES, DIM) / 8)
    batches = fixed_batches(3 * STEPS_PER_EPOCH)
    groups, state = jax_setup(config, torch_model, proxies)
    embedding = list(torch_model.model.embedding.parameters())
    backbone = [p for p in torch_model.parameters() if all(p is not e for e in embedding)]

    def adam(backbone_lr):
        return torch.optim.Adam(
            [
                {"params": backbone, "lr": backbone_lr},
                {"params": embedding},
                {"params": [proxies], "lr": o.lr * o.proxy_lr_multiplier},
            ],
            lr=o.lr,
            eps=o.eps,
            weight_decay=0.0,
        )

    history, clipped, proxy_grad = [], 0, 0.0
    torch_model.train()
    for step, batch in enumerate(batches):
        if step == 0:
            optimizer = adam(0.0)  # NCA++ train.py:263-288
        if step == STEPS_PER_EPOCH:
            optimizer = adam(o.lr)  # a new optimizer after warm-up (train.py:290-312)
        x = torch_model(to_torch_images(batch["image"]))
        loss = torch_proxy_nca_pp(x, torch.from_numpy(batch["label"]).long(), proxies)
        optimizer.zero_grad()
        loss.backward()
        clipped += sum(
            int((p.grad.abs() > clip).sum()) for p in torch_model.parameters() if p.grad is not None
        )
        proxy_grad = max(proxy_grad, float(proxies.grad.abs().max()))
        torch.nn.utils.clip_grad_value_(torch_model.parameters(), clip)  # not the proxies
        optimizer.step()
        history.append((loss.item(), torch_named_parameters(torch_model, proxies)))
    assert clipped > 0 and proxy_grad > clip  # both clipping rules are exercised
    run_and_compare(groups, state, batches, history, config)
