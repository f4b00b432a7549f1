"""Run with JAX_ENABLE_X64=1 (by tests/test_parity.py): our trainer's steps and a PyTorch loop that
follows the official scripts, both in float64, on the same weights and batches.

The PyTorch side is written here from the official ``train.py`` semantics (not copied):

* Proxy-Anchor (tjddus9597/Proxy-Anchor-CVPR2020 ``code/train.py``): param groups backbone /
  embedding / proxies ×100 (l.236-244), ``torch.optim.AdamW`` (l.254), ``StepLR`` stepped once
  per epoch (l.256, 313), ``bn_freeze``: BatchNorm in ``eval()`` every epoch (l.265-271) and its
  weight/bias frozen at construction (net/resnet.py:150-155), warm-up: ``requires_grad=False``
  on everything but the embedding and the proxies at epoch 0, ``True`` again at ``epoch == warm``
  (l.275-287), ``clip_grad_value_`` on the model and the proxies (l.298-300).
* CGD (the paper; CGD-port ``train.py``): Adam, BatchNorm in train mode, CE with temperature and
  label smoothing + batch-hard triplet, ``MultiStepLR`` on iterations.
* ProxyNCA++ (euwern/proxynca_pp ``train.py``): Adam with ε on every group, warm-up with the
  backbone's lr at 0 in an optimizer of its own, then a new optimizer (l.263-312); clipping of
  the model only (l.416, 451); BatchNorm in train mode.
* HIER's ViT recipe (tjddus9597/HIER-CVPR23 ``hier/train.py``, Euclidean): a ViT with its patch
  embedding frozen (models/model.py:155-163), head LayerNorm (no affine) → Linear → L2
  (model.py:103-132), parameter groups backbone / head × fc_lr_scale / proxies × 1e4, every one
  decayed (utils.py:723-761), ``AdamW(eps=1e-4)`` (train.py:271-273), the learning rate set every
  iteration as ``lr · batch / 180 · lr_scale`` and 0 for the backbone's group during warm-up
  (train.py:132-139; its Adam moments still move), every gradient clamped to ±clip, the proxies'
  too (``clip_gradients_value``, utils.py:212-221).

Why float64: Adam divides by √v̂, so an element whose gradient is at the level of the arithmetic's
rounding moves by an lr-sized step whose sign is that rounding's. In float32 such elements exist
in every network (a gradient that is a cancelling sum), and the two programs' different summation
orders (XLA picks its vector width from the CPU) make them differ by a fraction of the learning
rate. In float64 the rounding is 2⁻²⁹ times smaller, far below Adam's ε, and the comparison can be
tight. Everything on the JAX side then has to be float64: the model's compute dtype, the
normalised images, BatchNorm, pooling, the losses' arithmetic (``losses._common.MATH_DTYPE``) and
the optimizer state; ``narrow_floats`` proves it on the compiled step's program.

``python -m tests.float64_parity_check OUT SCENARIO...`` writes ``OUT/SCENARIO.npz`` (per step:
our and their loss, every parameter and BatchNorm statistic, their gradients) and prints a JSON
report (facts about each run, the dtype checks) on its last stdout line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdml_jax import parallel
from hdml_jax.config import use_backbone
from hdml_jax.losses import _common as loss_common
from hdml_jax.models import preprocessing, torchvision_resnet_to_flax, vit
from hdml_jax.training import optim, phases, setup, steps
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset
from tests.torch_resnet import TorchResNet, randomized
from tests.torch_vit import TorchViT

WIDTH, DIM, SIZE, BATCH, CLASSES = 8, 16, 32, 16, 8
STEPS_PER_EPOCH = 2
NUM_STEPS = 3 * STEPS_PER_EPOCH
DTYPE = torch.float64


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


def backbone_in_our_layout(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """``torchvision_resnet_to_flax`` of a float64 state dict, without its float32 rounding.

    The converter writes float32 checkpoints. It is run on the elements' indices instead (exact in
    float32 below 2²⁴), and the float64 values are gathered through the layout it produced.
    """
    return gathered_in_layout(state, lambda indices: torchvision_resnet_to_flax(indices, 18, width=WIDTH))


def in_our_layout(torch_model, proxies: torch.Tensor | None) -> dict:
    """``{'params', 'batch_stats'}`` of a PyTorch model (and its proxies) in our tree layout."""
    if hasattr(torch_model, "backbone_in_our_layout"):  # the ViT: no BatchNorm
        backbone = {"params": torch_model.backbone_in_our_layout()}
    else:
        backbone_state = {
            k: _numpy(v) for k, v in torch_model.model.state_dict().items() if not k.startswith("embedding")
        }
        backbone = backbone_in_our_layout(backbone_state)
    head, head_stats = torch_model.head_in_our_layout()
    params = {"backbone": backbone["params"], "head": head}
    if proxies is not None:
        params["proxies"] = _numpy(proxies)
    batch_stats = {"backbone": backbone["batch_stats"]} if "batch_stats" in backbone else {}
    if head_stats:
        batch_stats["head"] = head_stats
    return {"params": params, "batch_stats": batch_stats}


def gathered_in_layout(state: dict[str, np.ndarray], convert: Callable[[dict], Any]) -> Any:
    """``convert(state)`` for a converter that writes float32, without its float32 rounding: it
    converts the elements' indices (exact in float32 below 2²⁴) and the float64 values are
    gathered through the layout it produced."""
    sizes = [value.size for value in state.values()]
    offsets = np.cumsum([0, *sizes])
    assert offsets[-1] < 2**24, "indices would not be exact in float32"
    indices = {
        key: np.arange(start, start + value.size).reshape(value.shape)
        for (key, value), start in zip(state.items(), offsets, strict=False)
    }
    flat = np.concatenate([value.reshape(-1) for value in state.values()])
    return jax.tree.map(lambda index: flat[np.asarray(index, np.int64)], convert(indices))


def flatten(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def parameters_in_our_layout(
    torch_model, proxies: torch.Tensor | None, value_of: Callable[[torch.nn.Parameter], torch.Tensor]
) -> dict[str, np.ndarray]:
    """``value_of(parameter)`` (a tensor of its shape: its gradient, a bound) for every parameter,
    in our layout and named as ``flatten`` names our parameters."""
    parameters = [*torch_model.parameters(), *([proxies] if proxies is not None else [])]
    saved = [p.data for p in parameters]
    try:
        for p in parameters:
            p.data = value_of(p).detach().to(DTYPE)
        return flatten({"params": in_our_layout(torch_model, proxies)["params"]})
    finally:
        for p, data in zip(parameters, saved, strict=True):
            p.data = data


def gradients(torch_model, proxies: torch.Tensor | None) -> dict[str, np.ndarray]:
    """Their gradients before clipping (zeros where a parameter has none)."""
    return parameters_in_our_layout(
        torch_model, proxies, lambda p: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    )


def adam_bounds(optimizer: torch.optim.Optimizer, torch_model, proxies) -> tuple[dict, dict]:
    """Per element, from their Adam(W) state after a step: ``(sensitivity, movement)``.

    With ``u = m̂ / (√v̂ + ε)`` the step's direction and ``η`` its learning rate, changing every
    gradient so far by at most ``δ`` changes ``u`` by at most ``δ (1 + |u|) / (√v̂ + ε)`` (the moments'
    bias-corrected weights sum to 1, and ``|Δ√v̂| ≤ δ``): ``sensitivity = η (1 + |u|) / (√v̂ + ε)``.
    ``movement = η (|u| + λ |p|)`` bounds the step itself. Both are 0 for a parameter that did not
    take this step (no gradient, or no state yet).
    """
    sensitivity, movement = {}, {}
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if p.grad is None or "exp_avg_sq" not in state:
                continue
            t = float(state["step"])
            denominator = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]
            direction = (state["exp_avg"] / (1 - beta1**t) / denominator).abs()
            sensitivity[p] = group["lr"] * (1 + direction) / denominator
            movement[p] = group["lr"] * (direction + group["weight_decay"] * p.detach().abs())

    def named(values):
        return parameters_in_our_layout(torch_model, proxies, lambda p: values.get(p, torch.zeros_like(p)))

    return named(sensitivity), named(movement)


def torch_proxy_anchor(x, y, proxies, margin=0.1, alpha=32.0):
    """Proxy-Anchor as PA losses.py:38-58 defines it."""
    cos = F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).T
    positive = F.one_hot(y, proxies.shape[0]).to(x.dtype)
    pos_sum = (positive * torch.exp(-alpha * (cos - margin))).sum(0)
    neg_sum = ((1 - positive) * torch.exp(alpha * (cos + margin))).sum(0)
    num_valid = (positive.sum(0) > 0).sum()
    return torch.log1p(pos_sum).sum() / num_valid + torch.log1p(neg_sum).sum() / proxies.shape[0]


def torch_proxy_nca_pp(x, y, proxies, scale=3.0):
    """ProxyNCA++ as NCA++ loss.py:58-80 defines it (smoothing 0)."""
    x, p = scale * F.normalize(x, dim=1), scale * F.normalize(proxies, dim=1)
    distance = (x * x).sum(1, keepdim=True) + (p * p).sum(1)[None] - 2 * x @ p.T
    return F.cross_entropy(-distance, y)


def torch_cgd_loss(embedding, logits, y, temperature=0.5, smoothing=0.1, margin=0.1):
    """CE with τ and ε (CGD-port utils.py:61-72) + batch-hard triplet (utils.py:75-106)."""
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    nll = -log_probs.gather(1, y[:, None])[:, 0]
    classification = ((1 - smoothing) * nll + smoothing * -log_probs.mean(-1)).mean()
    distance = torch.cdist(embedding[None], embedding[None])[0]
    same = y[:, None] == y[None, :]
    positive = same & ~torch.eye(len(y), dtype=torch.bool)
    hardest_positive = (positive.to(distance.dtype) * distance).max(1)[0]
    hardest_negative = (distance + distance.max(1, keepdim=True)[0] * same.to(distance.dtype)).min(1)[0]
    return classification + F.relu(hardest_positive - hardest_negative + margin).mean()


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
    """``(x - mean) / std`` in float64 with the very constants our ``normalize`` uses."""
    spec = preprocessing.convention("resnet")
    x = (images.astype(np.float64) - spec.mean_uint8.astype(np.float64)) / spec.std_uint8.astype(np.float64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the two sides


class Run:
    """One scenario's record: their and our loss and state after each step, their gradients'
    magnitude and Adam bounds (``adam_bounds``), and facts about the run."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.facts: dict[str, Any] = {}

    def record(self, kind: str, step: int, named: dict[str, np.ndarray]) -> None:
        for name, value in named.items():
            self.arrays[f"{kind}/{step}/{name}"] = np.asarray(value)

    def record_theirs(self, step: int, loss: torch.Tensor, torch_model, proxies, optimizer, grads) -> None:
        """After their optimizer's step: loss, state, the gradients' largest magnitude per
        tensor, the Adam bounds and the learning rates (``grads`` taken before clipping)."""
        self.arrays[f"theirs/{step}/loss"] = np.asarray(loss.item())
        self.record("theirs", step, flatten(in_our_layout(torch_model, proxies)))
        self.record("grad_max", step, {k: np.abs(v).max() for k, v in grads.items()})
        sensitivity, movement = adam_bounds(optimizer, torch_model, proxies)
        self.record("sensitivity", step, sensitivity)
        self.record("movement", step, movement)
        self.arrays[f"lr/{step}"] = np.asarray([g["lr"] for g in optimizer.param_groups])


def jax_setup(config, torch_model, torch_proxies: torch.Tensor | None):
    """Our state with the PyTorch weights, and the trainer's phase logic on one device."""
    dataset = tiny_dataset(num_train_classes=CLASSES, num_test_classes=2, per_class=4)
    model = steps.build_model(config, CLASSES)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    params_shape = steps.unfreeze(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
    )
    optimizer = optim.make_optimizer(config, params_shape, STEPS_PER_EPOCH)
    state = setup.init_state(config, model, dataset, optimizer, ())
    theirs = jax.tree.map(jnp.asarray, in_our_layout(torch_model, torch_proxies))
    for collection in ("params", "batch_stats"):
        assert jax.tree.structure(theirs[collection]) == jax.tree.structure(state[collection])
        state[collection] = theirs[collection]
    # init_state made the optimizer state of its own (float32) parameters: the same zeros, now in
    # the dtype of the float64 ones, as init_state makes it for float64 parameters.
    state["opt_state"] = optimizer.init(state["params"])
    sharding = parallel.state_sharding(state, mesh, False)
    groups = phases.Phases(
        config, model, params_shape, STEPS_PER_EPOCH, (), sharding, NamedSharding(mesh, P("data")), False
    )
    return groups, jax.device_put(state, sharding)


def narrow_floats(jaxpr) -> list[str]:
    """Every value of a program (and of the programs inside it) whose dtype is a float narrower
    than float64: ``primitive: shape+dtype``."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            dtype = getattr(var.aval, "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 64:
                found.append(f"{eqn.primitive.name}: {var.aval.str_short()}")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += narrow_floats(inner)
    return found


def floating_dtypes(tree) -> list[str]:
    return sorted(
        {str(leaf.dtype) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    )


def run_ours(run: Run, groups, state, batches) -> None:
    """Our trainer's steps (``Phases.begin_step`` + the phase's compiled step), recorded per step.

    Each phase's program is checked, before its first step, to hold no float narrower than
    float64 (``narrow_floats``; ``trace`` shares the step's own trace, so this costs no retrace),
    and the floating dtypes of the state and the loss are collected after every step.
    """
    checked: set[int] = set()
    dtypes: dict[str, set[str]] = {"params": set(), "batch_stats": set(), "opt_state": set(), "loss": set()}
    run.facts["narrow_floats"], run.facts["phases_checked"] = [], 0
    for step, batch in enumerate(batches):
        state = groups.begin_step(state, step)
        step_function = groups.step_function(step)
        if id(step_function) not in checked:
            checked.add(id(step_function))
            run.facts["narrow_floats"] += narrow_floats(step_function.trace(state, batch).jaxpr.jaxpr)[:20]
            run.facts["phases_checked"] += 1
        state, metrics = step_function(state, batch)
        for key in ("params", "batch_stats", "opt_state"):
            dtypes[key] |= set(floating_dtypes(state[key]))
        dtypes["loss"].add(str(metrics["loss"].dtype))
        run.arrays[f"ours/{step}/loss"] = np.asarray(metrics["loss"])
        run.record(
            "ours",
            step,
            flatten(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})),
        )
    run.facts["dtypes"] = {key: sorted(value) for key, value in dtypes.items()}


# ----------------------------------------------------------------------------- Proxy-Anchor


def proxy_anchor(run: Run, warmup_epochs: int) -> None:
    """AdamW, proxies ×100, bn_freeze, warm-up, clipping, StepLR: 6 steps over 3 epochs.

    With warm-up 1, BatchNorm's weight/bias are frozen in epoch 0 and train afterwards; without
    warm-up they stay frozen all run (the official quirk). The learning rate halves every epoch.
    """
    torch.manual_seed(0)
    config = tiny_config(
        "proxy_anchor",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "model.frozen_bn": True,
            "model.dtype": "float64",
            "optimizer.warmup_epochs": warmup_epochs,
            "optimizer.lr": 3e-3,
            "optimizer.weight_decay": 1.0,  # large enough that a missing or coupled decay shows
            "optimizer.decay_epochs": (1,),
            "optimizer.decay_every": True,
            "optimizer.decay_factor": 0.5,
            "optimizer.grad_clip_value": 0.02,
            "batch_size": BATCH,
            "num_epochs": 3,
        },
    )
    o = config.optimizer
    clip = o.grad_clip_value
    torch_model = TorchEmbedder("gap_gmp", normalize=True)
    torch.nn.init.kaiming_normal_(torch_model.model.embedding.weight, mode="fan_out")
    torch.nn.init.zeros_(torch_model.model.embedding.bias)
    torch_model = torch_model.to(DTYPE)
    proxies = torch.nn.Parameter((torch.randn(CLASSES, DIM) * 0.3).to(DTYPE))
    batches = fixed_batches(NUM_STEPS)
    groups, state = jax_setup(config, torch_model, proxies)
    run.record(
        "initial",
        0,
        flatten(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})),
    )

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
    clipped, step = 0, 0
    for epoch in range(NUM_STEPS // STEPS_PER_EPOCH):
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
            grads = gradients(torch_model, proxies)
            clipped += sum(
                int((p.grad.abs() > clip).sum())
                for p in [*torch_model.parameters(), proxies]
                if p.grad is not None
            )
            torch.nn.utils.clip_grad_value_(torch_model.parameters(), clip)
            torch.nn.utils.clip_grad_value_([proxies], clip)
            optimizer.step()
            run.record_theirs(step, loss, torch_model, proxies, optimizer, grads)
            step += 1
        scheduler.step()
    run.facts["clipped"] = clipped
    run_ours(run, groups, state, batches)


# ----------------------------------------------------------------------------- CGD


def cgd(run: Run) -> None:
    """Adam, BatchNorm in train mode (running statistics compared too), CE + triplet, and the
    learning rate ×0.1 after an absolute step (the paper's iteration milestones): 6 steps."""
    torch.manual_seed(0)
    config = tiny_config(
        "cgd",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "model.descriptors": "SG",
            "model.dtype": "float64",
            "optimizer.lr": 3e-3,
            "optimizer.decay_steps": (3,),
            "batch_size": BATCH,
            "classes_per_batch": CLASSES,
            "samples_per_class": BATCH // CLASSES,
            "num_epochs": 3,
        },
    )
    torch_model = TorchCGD().to(DTYPE)
    batches = fixed_batches(NUM_STEPS)
    groups, state = jax_setup(config, torch_model, None)
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=config.optimizer.lr, eps=config.optimizer.eps)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3], gamma=0.1)
    torch_model.train()
    for step, batch in enumerate(batches):  # the schedule counts iterations here
        embedding, logits = torch_model(to_torch_images(batch["image"]))
        loss = torch_cgd_loss(embedding, logits, torch.from_numpy(batch["label"]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.record_theirs(step, loss, torch_model, None, optimizer, gradients(torch_model, None))
        scheduler.step()
    run_ours(run, groups, state, batches)


# ----------------------------------------------------------------------------- ProxyNCA++


def proxy_nca_pp(run: Run) -> None:
    """Adam ε = 1 on every group, no weight decay, proxies ×1e5, model-only clipping, BatchNorm in
    train mode; warm-up (1 epoch) in an optimizer of its own with the backbone at lr 0, then a new
    optimizer: 6 steps."""
    torch.manual_seed(0)
    config = tiny_config(
        "proxy_nca_pp",
        **{
            "model.width": WIDTH,
            "model.embedding_dim": DIM,
            "model.dtype": "float64",
            "optimizer.warmup_epochs": 1,
            "optimizer.grad_clip_value": 2e-3,
            "batch_size": BATCH,
            "classes_per_batch": CLASSES,
            "samples_per_class": BATCH // CLASSES,
            "num_epochs": 3,
        },
    )
    o = config.optimizer
    clip = o.grad_clip_value
    run.facts["config"] = [o.name, o.eps, o.weight_decay, o.proxy_lr_multiplier, o.clip_proxies]
    run.facts["fresh_state_after_warmup"] = bool(o.fresh_state_after_warmup)
    run.facts["frozen_bn"] = bool(config.model.frozen_bn)
    torch_model = TorchEmbedder("mac_layernorm", normalize=True).to(DTYPE)
    proxies = torch.nn.Parameter((torch.randn(CLASSES, DIM) / 8).to(DTYPE))
    batches = fixed_batches(NUM_STEPS)
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

    clipped, proxy_grad = 0, 0.0
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
        grads = gradients(torch_model, proxies)
        clipped += sum(
            int((p.grad.abs() > clip).sum()) for p in torch_model.parameters() if p.grad is not None
        )
        proxy_grad = max(proxy_grad, float(proxies.grad.abs().max()))
        torch.nn.utils.clip_grad_value_(torch_model.parameters(), clip)  # not the proxies
        optimizer.step()
        run.record_theirs(step, loss, torch_model, proxies, optimizer, grads)
    run.facts["clipped"], run.facts["proxy_grad"], run.facts["clip"] = clipped, proxy_grad, clip
    run_ours(run, groups, state, batches)


# ----------------------------------------------------------------------------- HIER's ViT recipe

VIT_PATCH, VIT_WIDTH, VIT_DEPTH, VIT_HEADS = 4, 16, 2, 2  # 32-px images: an 8 × 8 grid of patches


class TorchViTEmbedder(torch.nn.Module):
    """HIER's ``HeadSwitch`` without ``ToPoincare`` (``hyp_c`` 0): ViT → LayerNorm (no affine) →
    Linear (orthogonal, bias 0) → L2."""

    def __init__(self):
        super().__init__()
        self.model = randomized(
            TorchViT(VIT_PATCH, VIT_WIDTH, VIT_DEPTH, VIT_HEADS, SIZE // VIT_PATCH), seed=1
        )
        self.embedding = torch.nn.Linear(VIT_WIDTH, DIM)
        torch.nn.init.orthogonal_(self.embedding.weight)  # model.py:79-83
        torch.nn.init.zeros_(self.embedding.bias)

    def forward(self, x):
        features = F.layer_norm(self.model(x), (VIT_WIDTH,), eps=1e-5)
        return F.normalize(self.embedding(features), dim=1, eps=1e-12)

    def backbone_in_our_layout(self):
        state = {k: _numpy(v) for k, v in self.model.state_dict().items()}
        return gathered_in_layout(state, lambda indices: vit.vit_from_torch(indices, VIT_DEPTH))

    def head_in_our_layout(self):
        e = self.embedding
        return {"embedding": {"kernel": _numpy(e.weight).T, "bias": _numpy(e.bias)}}, {}


def hier_vit(run: Run) -> None:
    """HIER's Euclidean ViT recipe (``config_vit.apply_hier_vit_command``) on a tiny ViT: AdamW ε
    1e-4, lr × batch/180, backbone at lr 0 in a live group for the warm-up epoch, head ×10,
    proxies ×1e4, weight decay everywhere, the patch embedding frozen, ±clip on every gradient,
    a constant schedule: 6 steps over 3 epochs."""
    torch.manual_seed(0)
    vit.SIZES["test"] = (VIT_WIDTH, VIT_DEPTH, VIT_HEADS)
    config = tiny_config("proxy_anchor")
    use_backbone(config, "vit_s16_dino", hier_dataset="CUB")  # the recipe under test
    overrides = {
        "model.pretrained": "none",
        "model.vit.size": "test",
        "model.vit.patch_size": VIT_PATCH,
        "model.vit.position_grid_size": SIZE,
        "model.embedding_dim": DIM,
        "model.dtype": "float64",
        "dataset.image_size": SIZE,
        "batch_size": BATCH,
        "num_epochs": 3,
        "optimizer.lr": 2e-3,  # × 16 / 180 = 1.8e-4
        "optimizer.weight_decay": 1.0,  # large enough that a missing or coupled decay shows
        "optimizer.head_lr_multiplier": 10.0,  # --fc_lr_scale
        "optimizer.grad_clip_value": 0.01,
    }
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    o = config.optimizer
    run.facts["recipe"] = {
        "warmup": o.warmup,
        "warmup_epochs": o.warmup_epochs,
        "eps": o.eps,
        "proxy_lr_multiplier": o.proxy_lr_multiplier,
        "lr_reference_batch": o.lr_reference_batch,
        "clip_proxies": o.clip_proxies,
        "freeze_patch_embed": config.model.vit.freeze_patch_embed,
        "head_layernorm": config.model.head_layernorm,
    }
    torch_model = TorchViTEmbedder().to(DTYPE)
    proxies = torch.nn.Parameter((torch.randn(CLASSES, DIM) * 0.3).to(DTYPE))
    batches = fixed_batches(NUM_STEPS)
    groups, state = jax_setup(config, torch_model, proxies)
    run.record(
        "initial",
        0,
        flatten(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})),
    )
    torch_model.model.patch_embed.proj.requires_grad_(False)  # freeze(body, 0)
    backbone = [p for p in torch_model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"name": "pretrained_params", "params": backbone, "lr_scale": 1.0},
            {
                "name": "last_layer",
                "params": list(torch_model.embedding.parameters()),
                "lr_scale": o.head_lr_multiplier,
            },
            {"name": "proxies", "params": [proxies], "lr_scale": o.proxy_lr_multiplier},
        ],
        weight_decay=o.weight_decay,
        eps=o.eps,
    )
    clip, clipped, step = o.grad_clip_value, 0, 0
    lr = o.lr * BATCH / 180.0  # train.py:132
    torch_model.train()
    for epoch in range(NUM_STEPS // STEPS_PER_EPOCH):
        for batch in batches[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]:
            for group in optimizer.param_groups:  # train.py:133-139, schedule constant (1)
                group["lr"] = lr * group["lr_scale"]
                if epoch < o.warmup_epochs and group["name"] == "pretrained_params":
                    group["lr"] = 0.0
            x = torch_model(to_torch_images(batch["image"]))
            loss = torch_proxy_anchor(x, torch.from_numpy(batch["label"]).long(), proxies)
            optimizer.zero_grad()
            loss.backward()
            grads = gradients(torch_model, proxies)
            for p in [*torch_model.parameters(), proxies]:  # clip_gradients_value
                if p.grad is not None:
                    clipped += int((p.grad.abs() > clip).sum())
                    p.grad.data.clamp_(min=-clip, max=clip)
            optimizer.step()
            run.record_theirs(step, loss, torch_model, proxies, optimizer, grads)
            step += 1
    run.facts["clipped"] = clipped
    run_ours(run, groups, state, batches)


# ----------------------------------------------------------------------------- entry point

SCENARIOS: dict[str, Callable[[Run], None]] = {
    "proxy_anchor_warmup": lambda run: proxy_anchor(run, warmup_epochs=1),
    "proxy_anchor_no_warmup": lambda run: proxy_anchor(run, warmup_epochs=0),
    "cgd": cgd,
    "proxy_nca_pp": proxy_nca_pp,
    "hier_vit": hier_vit,
}


def main(out: Path, names: list[str]) -> None:
    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    loss_common.MATH_DTYPE = jnp.float64  # before anything is traced
    # One thread: these convolutions are tiny, and with two threads on two busy cores PyTorch's
    # float64 backward pass spins for seconds per step (measured: 0.05 s with one, 1-3 s with two).
    torch.set_num_threads(1)
    report = {}
    for name in names:
        run = Run()
        SCENARIOS[name](run)
        np.savez(out / f"{name}.npz", **run.arrays)
        report[name] = run.facts
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
