"""Training phases: what trains at a given step, and the state changes between phases.

A run passes through up to three phases, decided by the global step alone (so a resumed run
takes exactly the path of an uninterrupted one):

1. **warm-up** (``optimizer.warmup_epochs``): the backbone is frozen; only the embedding layer
   and the proxies train (``hdml_jax.optim.frozen_groups``);
2. **HPL hierarchy** (``loss.hierarchy_build_epoch``; by default when warm-up ends): k-means over
   the fine proxies gives the coarse proxies and the class → group map; the coarse proxies get
   fresh optimizer state; every ``loss.hierarchy_refresh_epochs`` the map is re-assigned;
3. with ``optimizer.fresh_state_after_warmup`` (ProxyNCA++), every group's optimizer state
   restarts when warm-up ends, as the official code's second optimizer does.

``Phases.begin_step(state, step)`` applies what is due at the start of ``step`` and
``Phases.step_function(step)`` returns the compiled step of its phase. The trainer's loop and the
step-by-step parity tests (``tests/test_parity.py``) call exactly these two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdml_jax import methods, parallel
from hdml_jax.losses import build_hierarchy, refresh_assignments
from hdml_jax.training import optim, steps

StepFunction = Callable[[steps.State, dict[str, jax.Array]], tuple[steps.State, dict[str, jax.Array]]]


def hierarchy_build_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The step at whose start HPL's k-means runs (``loss.hierarchy_build_epoch``; -1: after warm-up)."""
    epoch = int(config.loss.hierarchy_build_epoch)
    if epoch < 0:
        epoch = max(int(config.optimizer.warmup_epochs), 1)
    return epoch * steps_per_epoch


def pad_fine_assignment(assignments: tuple[jax.Array, ...], num_proxies: int) -> tuple[jax.Array, ...]:
    """Extend the class → group map ``a^0`` over padding proxies (to group 0; they are masked out)."""
    fine = jnp.asarray(assignments[0])
    return (jnp.pad(fine, (0, num_proxies - fine.shape[0])), *assignments[1:])


class Phases:
    """The phase logic of one run (see the module docstring).

    Args:
      config: the run's config.
      model: the ``EmbeddingModel``.
      params: the parameter tree (or its shapes), for the optimizer's group labels.
      steps_per_epoch: optimizer steps per epoch.
      coarse_sizes: HPL's coarse level sizes (``()`` otherwise).
      state_sharding, batch_sharding: shardings of the state and of a batch.
      hierarchy_active: whether the state already holds a hierarchy (resumed, or known labels).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: Any,
        params: Any,
        steps_per_epoch: int,
        coarse_sizes: tuple[int, ...],
        state_sharding: Any,
        batch_sharding: Any,
        hierarchy_active: bool,
    ):
        self.config, self.model, self.params = config, model, params
        self.steps_per_epoch, self.coarse_sizes = steps_per_epoch, coarse_sizes
        self.state_sharding, self.batch_sharding = state_sharding, batch_sharding
        self.hierarchy_active = hierarchy_active
        self.hierarchical = methods.of(config).hierarchical and not config.loss.coarse_from_labels
        self.warm_steps = optim.warmup_steps(config, steps_per_epoch)
        self.build_step = hierarchy_build_step(config, steps_per_epoch)
        self.refresh_steps = int(config.loss.hierarchy_refresh_epochs) * steps_per_epoch
        self._optimizers: dict[frozenset[str], optax.GradientTransformation] = {}
        self._compiled: dict[frozenset[str], StepFunction] = {}

    # ------------------------------------------------------------------ what trains

    def frozen(self, step: int) -> frozenset[str]:
        return optim.frozen_groups(self.config, step, self.steps_per_epoch, self.hierarchy_active)

    def optimizer(self, frozen: frozenset[str] = frozenset()) -> optax.GradientTransformation:
        """The optimizer of a phase; all phases share one state layout (``optim.make_optimizer``)."""
        if frozen not in self._optimizers:
            self._optimizers[frozen] = optim.make_optimizer(
                self.config, self.params, self.steps_per_epoch, frozen
            )
        return self._optimizers[frozen]

    def step_function(self, step: int) -> StepFunction:
        """The compiled train step of ``step``'s phase (compiled once per phase)."""
        frozen = self.frozen(step)
        if frozen not in self._compiled:
            backbone_frozen = {"backbone", "backbone_bn"} <= frozen
            self._compiled[frozen] = steps.compile_train_step(
                self.model,
                self.config,
                self.optimizer(frozen),
                self.state_sharding,
                self.batch_sharding,
                backbone_frozen,
            )
        return self._compiled[frozen]

    # ------------------------------------------------------------------ transitions

    def begin_step(self, state: steps.State, step: int) -> steps.State:
        """``state`` with every change due at the start of ``step`` applied."""
        if self.config.optimizer.fresh_state_after_warmup and self.warm_steps and step == self.warm_steps:
            state = self._reset_optimizer(state, optim.GROUPS)
        if self.hierarchical and step >= self.build_step:
            if not self.hierarchy_active:
                state = self.build_hierarchy(state, step)
            elif (
                self.refresh_steps > 0
                and step > self.build_step
                and (step - self.build_step) % self.refresh_steps == 0
            ):
                state = self.refresh_hierarchy(state)
        return state

    def build_hierarchy(self, state: steps.State, step: int) -> steps.State:
        """k-means over the real classes' fine proxies → coarse proxies, class → group maps."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
        proxies = state["params"]["proxies"]
        num_classes = self.model.num_proxies  # the rest of params['proxies'] is padding
        built = build_hierarchy(
            key, proxies[:num_classes], self.coarse_sizes, normalize=self.config.loss.kmeans_normalize
        )
        params = dict(state["params"])
        for level, centroids in enumerate(built.coarse_proxies, start=1):
            params[f"coarse_proxies_{level}"] = centroids
        hierarchy = {
            "assignments": pad_fine_assignment(built.assignments, proxies.shape[0]),
            "active": jnp.ones((), jnp.float32),
        }
        self.hierarchy_active = True
        # The old moments (if any) belong to other vectors: start the coarse proxies afresh
        # (this also places the new state on the mesh).
        return self._reset_optimizer({**state, "params": params, "hierarchy": hierarchy}, ("coarse_proxies",))

    def refresh_hierarchy(self, state: steps.State) -> steps.State:
        """Re-assign every class to its nearest coarse proxy (learned, or the current group means)."""
        params = state["params"]
        num_proxies = params["proxies"].shape[0]
        proxy_mask = parallel.fine_proxy_mask(num_proxies, self.model.num_proxies)
        levels = steps.hierarchy_levels(self.config, params, state["hierarchy"], proxy_mask)
        assignments = refresh_assignments(levels, normalize=self.config.loss.kmeans_normalize)
        if proxy_mask is not None:  # padding proxies stay in group 0 (masked out everywhere)
            assignments = (jnp.where(proxy_mask, assignments[0], 0), *assignments[1:])
        hierarchy = {**state["hierarchy"], "assignments": assignments}
        return jax.device_put({**state, "hierarchy": hierarchy}, self.state_sharding)

    def _reset_optimizer(self, state: steps.State, groups) -> steps.State:
        opt_state = optim.reset_groups(self.optimizer(), state["opt_state"], state["params"], groups)
        return jax.device_put({**state, "opt_state": opt_state}, self.state_sharding)


def hierarchy_is_active(state: steps.State) -> bool:
    """Whether a state (fresh or restored) already holds a hierarchy (one device read, at start-up)."""
    hierarchy = state.get("hierarchy") or {}
    return bool("active" in hierarchy and np.asarray(jax.device_get(hierarchy["active"])) > 0)
