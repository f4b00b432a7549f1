"""The method registry: each training method declared once, as an immutable ``Method`` record.

Everything that differs between methods is a field of its record: the loss and how the train step
calls it, what is learned besides the network, the head, whether there are coarse proxy levels,
the recipe, the config fields it reads, the protocols and backbones it accepts. The trainer, the
optimizer, the config checks and the inference commands ask the record; none of them compares
method names. Adding a method is one ``register(Method(...))`` call (``tests/test_methods.py``
registers one from a test module and trains, resumes, embeds and exports it).

A package of your own adds methods to every command (``main``, ``embed``, ``search``,
``export``, which rebuild a run from its ``config.json``) by naming the module that registers them
under the ``hdml_jax.methods`` entry-point group of its ``pyproject.toml``::

    [project.entry-points."hdml_jax.methods"]
    my_methods = "my_package.methods"

The registry imports those modules the first time it is asked for the list or for a name it does
not know. Within one Python program, ``register`` before training is enough.

No JAX here: configs stay importable without it. A loss named by a string is looked up in
``hdml_jax.losses`` when the train step is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import ml_collections

from hdml_jax.errors import ConfigError

Config = ml_collections.ConfigDict
LossForm = Literal["proxy", "pair", "cgd"]
Head = Literal["embedding", "cgd"]

# Fields read because of a part of the record (the rest are listed in ``Method.fields``).
HEAD_FIELDS: dict[str, tuple[str, ...]] = {
    "embedding": (
        "model.pooling",
        "model.embedding_init",
        "model.head_layernorm",
        "model.curvature",
        "model.clip_r",
        "model.riemannian",
    ),
    "cgd": ("model.descriptors", "model.combine", "model.architecture", "model.learnable_gem_p"),
}
PROXY_FIELDS = (
    "model.proxy_init",
    "optimizer.proxy_lr_multiplier",
    "optimizer.proxy_eps",
    "optimizer.clip_proxies",
    "optimizer.proxy_lr",
)
HIERARCHY_FIELDS = (
    "loss.level_weights",
    "loss.num_coarse_groups",
    "loss.hierarchy_build_epoch",
    "loss.hierarchy_refresh_epochs",
    "loss.coarse_from_labels",
    "loss.coarse_proxies",
    "loss.kmeans_normalize",
)
PAIR_FIELDS = ("loss.miner", "loss.miner_kwargs", "loss.xbm_size")
LOSS_PARAMETER_FIELDS = ("optimizer.loss_params_lr", "optimizer.loss_params_weight_decay")
HIER_FIELDS = ("loss.hier", "optimizer.lca_lr_multiplier")
# Config groups whose every key belongs to one field (``loss.kwargs.margin`` is ``loss.kwargs``).
GROUP_FIELDS = ("loss.kwargs", "loss.miner_kwargs", "loss.hier")


def loss_kwargs(config: Config) -> dict[str, Any]:
    """The default keywords of a method's loss: ``config.loss.kwargs`` as given (PML's names)."""
    return config.loss.kwargs.to_dict()


def one_row(config: Config) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class LossParameter:
    """A loss's own learned array of one value per class (the margin loss's β).

    ``name`` is its key at the top of ``params`` (optimizer group ``loss_params``); it is passed to
    the loss as ``keyword``, whose value in ``config.loss.kwargs`` is the initial value.
    """

    name: str
    keyword: str


@dataclasses.dataclass(frozen=True)
class Method:
    """What one training method is.

    Attributes:
      name: the ``method=`` name.
      summary: one line for ``--help`` and the method table.
      loss: the loss function: a name in ``hdml_jax.losses``, or the function itself.
      form: how the train step calls it. ``"proxy"``: ``loss(embeddings, labels, proxies, mask=,
        **keywords)`` on class vectors at ``params['proxies']`` (Proxy-Anchor, Proxy-NCA, the
        classification losses' weights); ``"pair"``: ``loss(embeddings, labels, mask=, **keywords)``
        with an optional miner and cross-batch memory; ``"cgd"``: CGD's batch-hard triplet loss
        plus the classifier on its first descriptor.
      recipe: edits a base config into the method's published recipe (every number cited).
      family: whose official training commands set the per-data-set numbers: ``"proxy_anchor"``
        (``config.apply_proxy_anchor_command``), ``"proxynca_pp"`` (``apply_proxynca_pp_config``)
        or ``"cgd"`` (the CGD schedules in ``configs/*.py``).
      keywords: the loss's keyword arguments, built from the config.
      hierarchical: HPL around the loss: coarse proxy levels from k-means over the fine proxies
        (or the data set's coarse labels), weighted by ``loss.level_weights``.
      hier: HIER around the loss: ``loss.hier.weight`` × HIER's triplet loss over learned LCA
        proxies at ``params['lcas']`` (``losses.hier_loss``), in the embedding's geometry
        (``model.curvature``); the LCAs train in the ``loss_params`` group at
        ``optimizer.lca_lr_multiplier`` × lr.
      head: ``"embedding"`` (pooling → Dense → L2, ``models.EmbeddingHead``) or ``"cgd"``.
      rows_per_class: class vectors per class (SoftTriple's K centres; 1 otherwise).
      loss_parameters: the loss's own learned per-class arrays.
      pk_batches: the loss needs positives in every batch: P×K batches with K = 4 replace the
        family's shuffled ones (the pair losses).
      two_images_per_class: a custom data set must give every training class two images.
      fields: config fields the loss reads besides those of its head, form and hierarchy (see
        ``config_fields``); overriding a field no method part reads is an error.
      protocols: evaluation protocols it takes part in (``"mlrc"``).
      backbones: the backbones its recipe is defined on.
    """

    name: str
    summary: str
    loss: str | Callable[..., Any]
    form: LossForm
    recipe: Callable[[Config], None]
    family: str = "proxy_anchor"
    keywords: Callable[[Config], dict[str, Any]] = loss_kwargs
    hierarchical: bool = False
    hier: bool = False
    head: Head = "embedding"
    rows_per_class: Callable[[Config], int] = one_row
    loss_parameters: tuple[LossParameter, ...] = ()
    pk_batches: bool = False
    two_images_per_class: bool = False
    fields: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("mlrc",)
    backbones: tuple[str, ...] = ("resnet", "bn_inception", "vit")

    def __post_init__(self):
        if self.form not in ("proxy", "pair", "cgd"):
            raise ValueError(
                f"Method {self.name!r}: form must be 'proxy', 'pair' or 'cgd', got {self.form!r}"
            )
        if self.head not in HEAD_FIELDS:
            raise ValueError(
                f"Method {self.name!r}: head must be one of {tuple(HEAD_FIELDS)}, got {self.head!r}"
            )
        if self.hierarchical and self.form != "proxy":
            raise ValueError(f"Method {self.name!r}: only a proxy loss has fine proxies to build levels from")
        if self.hier and (self.form == "cgd" or self.head != "embedding"):
            raise ValueError(f"Method {self.name!r}: HIER needs the embedding head (its points) and a proxy or pair loss")
        if self.hier and self.loss_parameters:
            raise ValueError(f"Method {self.name!r}: HIER's LCAs are the loss_params group's only parameters")

    @property
    def learns_proxies(self) -> bool:
        """Class vectors at ``params['proxies']`` (the optimizer's ``proxies`` group)."""
        return self.form == "proxy"

    def loss_function(self) -> Callable[..., Any]:
        if callable(self.loss):
            return self.loss
        losses = importlib.import_module("hdml_jax.losses")
        return getattr(losses, self.loss)

    def loss_name(self) -> str:
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", repr(self.loss))

    def config_fields(self) -> frozenset[str]:
        """Every method-specific config field this method reads."""
        fields = [*HEAD_FIELDS[self.head], *self.fields]
        if self.learns_proxies:
            fields += PROXY_FIELDS
        if self.hierarchical:
            fields += HIERARCHY_FIELDS
        if self.form == "pair":
            fields += PAIR_FIELDS
        if self.loss_parameters:
            fields += LOSS_PARAMETER_FIELDS
        if self.hier:
            fields += HIER_FIELDS
        return frozenset(fields)


_REGISTRY: dict[str, Method] = {}
ENTRY_POINT_GROUP = "hdml_jax.methods"
_plugins_loaded = False


def load_plugins() -> None:
    """Import, once, the modules installed packages declare under ``ENTRY_POINT_GROUP`` (each
    registers its methods on import). One that fails to import is a warning that names it: the
    other methods stay usable, and asking for its methods says they are unknown."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plugin must not take the built-in methods down
            warnings.warn(
                f"hdml_jax method plugin {entry_point.name!r} ({entry_point.value}) failed to import: "
                f"{type(error).__name__}: {error}",
                stacklevel=2,
            )


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace``: overwrite a method of the same name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered (replace=True to overwrite it)")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered method's name, in registration order (plugins' last)."""
    load_plugins()
    return tuple(_REGISTRY)


def registered() -> Iterator[Method]:
    load_plugins()
    return iter(tuple(_REGISTRY.values()))


def find(name: str) -> Method | None:
    """The record of ``name``, or None (a config not yet validated may name an unknown method)."""
    if not isinstance(name, str):
        return None
    if name not in _REGISTRY:
        load_plugins()
    return _REGISTRY.get(name)


def get(name: str) -> Method:
    """The record of ``name``; an unknown name is a one-line ``ConfigError`` listing the valid ones."""
    method = find(name)
    if method is None:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}.")
    return method


def of(config: Config) -> Method:
    """The record of ``config.method``."""
    return get(config.method)


def users_of(field: str) -> tuple[str, ...]:
    """The methods that read ``field`` (a dotted name), in registration order."""
    return tuple(m.name for m in registered() if field in m.config_fields())


def loss_parameter_names() -> frozenset[str]:
    """The top-level ``params`` keys that are a loss's own parameters (optimizer group ``loss_params``)."""
    return frozenset(p.name for m in registered() for p in m.loss_parameters)


def method_specific_fields() -> frozenset[str]:
    """Every field that some method reads and others do not."""
    return frozenset(f for m in registered() for f in m.config_fields())
