"""The comparison methods of HPL's tables as trainer methods: which loss, which keywords, which recipe.

Every loss of ``hdml_jax.losses`` that HPL's paper compares against is a ``method=``:

=====================  ==========================  =============================================
method                 loss                        trains
=====================  ==========================  =============================================
contrastive            ``contrastive_loss``        network only (pair loss, P×K batches)
triplet_margin         ``triplet_margin_loss``     network only (all triplets)
multi_similarity       ``multi_similarity_loss``   network only (+ ``multi_similarity_miner``)
margin                 ``margin_loss``             network + β per class (``params['margin_beta']``)
ntxent                 ``ntxent_loss``             network only
lifted_structure       ``lifted_structure_loss``   network only
circle                 ``circle_loss``             network only
normalized_softmax     ``normalized_softmax_loss`` network + class weights (the proxies)
cosface                ``cosface_loss``            network + class weights
arcface                ``arcface_loss``            network + class weights
soft_triple            ``soft_triple_loss``        network + K centers per class (C·K proxies)
hpl_normalized_softmax HPL around normalized_softmax (fine weights + k-means coarse levels)
hpl_cosface            HPL around cosface
hpl_arcface            HPL around arcface
=====================  ==========================  =============================================

The loss's keyword arguments live in ``config.loss.kwargs`` under PML's names (so a
pytorch-metric-learning user's ``pml_kwargs`` carry over: ``--config.loss.kwargs.margin=0.2``);
``config.loss.miner`` picks a miner for the pair losses and ``config.loss.miner_kwargs`` its
keywords; ``config.loss.xbm_size > 0`` adds a cross-batch memory of that many embeddings.

**Recipes.** The loss hyper-parameters are the best ones that "A Metric Learning Reality Check"
(Musgrave et al., ECCV 2020; MLRC) found per data set, as listed in
KevinMusgrave/powerful-benchmarker @ metric-learning branch, ``docs/papers/mlrc.md`` l.35-50
("Optimal hyperparameters", BN-Inception, 128-d, batch 32). A loss with learned weights (the
classification losses' weights, the margin loss's β) gets MLRC's learning rate for them as an
absolute rate: MLRC trains them with RMSprop, which scales each coordinate by its gradient's RMS
as Adam does, so the rate, not its ratio to the trunk's (1e-6 there), is what carries over (our
reading, not MLRC's). Circle and lifted-structure losses are not in MLRC: they keep PML's
defaults, which are their papers' (Sun et al. 2020: m 0.4, γ 80; Song et al. 2016: margin 1).

Everything else (network, optimizer, schedule, batch size, augmentation) is the Proxy-Anchor
recipe of the data-set config, so that every method is compared under one protocol, as HPL's
tables do; the pair losses only change the sampler to P×K with K = 4 (they need positives in the
batch; MLRC samples 8 classes × 4). Data sets without MLRC numbers borrow them (marked
``borrowed`` in ``MLRC_DATASET``): In-Shop and ``synthetic_sop`` SOP's (many classes, few
images each), ``synthetic`` and ``custom`` CUB's.

This module is data, config edits and the methods' records (no JAX); the train step looks the
loss functions up by name when it is built.
"""

from __future__ import annotations

import ml_collections

from hdml_jax.methods.registry import Config, LossParameter, Method, find, of, one_row

PAIR_METHODS = (
    "contrastive",
    "triplet_margin",
    "multi_similarity",
    "margin",
    "ntxent",
    "lifted_structure",
    "circle",
)
CLASSIFICATION_METHODS = ("normalized_softmax", "cosface", "arcface", "soft_triple")
# HPL around a classification loss: its class weights are proxies like Proxy-Anchor's. SoftTriple
# is left out: its K centers per class have no single vector to cluster into a coarse level.
HPL_CLASSIFICATION_METHODS = ("hpl_normalized_softmax", "hpl_cosface", "hpl_arcface")
BASELINE_METHODS = PAIR_METHODS + CLASSIFICATION_METHODS + HPL_CLASSIFICATION_METHODS
MINERS = ("none", "batch_hard", "semi_hard", "multi_similarity")

# The loss function of each method, by its name in hdml_jax.losses.
LOSS_FUNCTIONS = {
    "contrastive": "contrastive_loss",
    "triplet_margin": "triplet_margin_loss",
    "multi_similarity": "multi_similarity_loss",
    "margin": "margin_loss",
    "ntxent": "ntxent_loss",
    "lifted_structure": "lifted_structure_loss",
    "circle": "circle_loss",
    "normalized_softmax": "normalized_softmax_loss",
    "cosface": "cosface_loss",
    "arcface": "arcface_loss",
    "soft_triple": "soft_triple_loss",
    "hpl_normalized_softmax": "normalized_softmax_loss",
    "hpl_cosface": "cosface_loss",
    "hpl_arcface": "arcface_loss",
}
MINER_FUNCTIONS = {
    "batch_hard": "batch_hard_miner",
    "semi_hard": "semi_hard_miner",
    "multi_similarity": "multi_similarity_miner",
}

# Which MLRC column a data set takes; "borrowed" ones have no MLRC numbers of their own.
MLRC_DATASET = {
    "cub200": "cub",
    "cars196": "cars",
    "sop": "sop",
    "inshop": "sop",  # borrowed
    "synthetic_sop": "sop",  # borrowed
    "synthetic": "cub",  # borrowed
    "custom": "cub",  # borrowed
}

# MLRC's optimal hyper-parameters (powerful-benchmarker, metric-learning branch,
# docs/papers/mlrc.md; the line of each row is given). PML keyword names. "weights_lr" / "beta_lr"
# are the learning rates of the loss's own parameters.
MLRC_BEST: dict[str, dict[str, dict[str, float]]] = {
    # l.37 Contrastive: pos_margin, neg_margin (LpDistance, PML's default).
    "contrastive": {
        "cub": {"pos_margin": -0.2, "neg_margin": 0.3841},
        "cars": {"pos_margin": 0.2652, "neg_margin": 0.5409},
        "sop": {"pos_margin": 0.2850, "neg_margin": 0.5130},
    },
    # l.38 Triplet: margin (all triplets).
    "triplet_margin": {
        "cub": {"margin": 0.0961},
        "cars": {"margin": 0.1190},
        "sop": {"margin": 0.0451},
    },
    # l.39 NTXent: temperature.
    "ntxent": {
        "cub": {"temperature": 0.0091},
        "cars": {"temperature": 0.0219},
        "sop": {"temperature": 0.0002},
    },
    # l.42 "Margin / class" (β per class): beta lr, margin, init beta.
    "margin": {
        "cub": {"beta_lr": 2.65e-4, "margin": 0.0779, "beta": 0.9796},
        "cars": {"beta_lr": 4.76e-5, "margin": 0.0776, "beta": 0.9598},
        "sop": {"beta_lr": 7.10e-5, "margin": 0.0518, "beta": 0.8424},
    },
    # l.43 Normalized Softmax: weights lr, temperature.
    "normalized_softmax": {
        "cub": {"weights_lr": 4.46e-3, "temperature": 0.1087},
        "cars": {"weights_lr": 1.10e-2, "temperature": 0.0886},
        "sop": {"weights_lr": 5.46e-4, "temperature": 0.0630},
    },
    # l.44 CosFace: weights lr, margin, scale.
    "cosface": {
        "cub": {"weights_lr": 2.53e-3, "margin": 0.6182, "scale": 100.0},
        "cars": {"weights_lr": 7.41e-3, "margin": 0.4324, "scale": 161.5},
        "sop": {"weights_lr": 2.16e-3, "margin": 0.3364, "scale": 100.0},
    },
    # l.45 ArcFace: weights lr, margin (degrees, as PML), scale.
    "arcface": {
        "cub": {"weights_lr": 5.13e-3, "margin": 23.22, "scale": 100.0},
        "cars": {"weights_lr": 7.39e-6, "margin": 20.52, "scale": 49.50},
        "sop": {"weights_lr": 2.01e-3, "margin": 18.63, "scale": 220.3},
    },
    # l.49 "Multi Similarity + Miner": alpha, beta, base, and the miner's epsilon.
    "multi_similarity": {
        "cub": {"alpha": 17.97, "beta": 75.66, "base": 0.77, "epsilon": 0.39},
        "cars": {"alpha": 7.49, "beta": 47.99, "base": 0.63, "epsilon": 0.72},
        "sop": {"alpha": 15.94, "beta": 156.61, "base": 0.72, "epsilon": 0.34},
    },
    # l.50 SoftTriple: weights lr, la, gamma (PML's reciprocal convention, the same in the PML of
    # 2020 and 2.x), reg_weight (the sparse-centers regulariser, not implemented: see below),
    # margin. centers_per_class is not listed: PML's default 10 (the paper's K), unconfirmed.
    "soft_triple": {
        "cub": {"weights_lr": 5.37e-5, "la": 78.02, "gamma": 58.95, "margin": 0.4307},
        "cars": {"weights_lr": 1.40e-4, "la": 17.69, "gamma": 19.18, "margin": 0.3588},
        "sop": {"weights_lr": 8.68e-5, "la": 100.0, "gamma": 47.90, "margin": 0.3145},
    },
}
MLRC_BEST["hpl_normalized_softmax"] = MLRC_BEST["normalized_softmax"]
MLRC_BEST["hpl_cosface"] = MLRC_BEST["cosface"]
MLRC_BEST["hpl_arcface"] = MLRC_BEST["arcface"]

# Losses MLRC did not run: their papers' values, which are PML's defaults.
PAPER_DEFAULTS: dict[str, dict[str, float]] = {
    "circle": {"m": 0.4, "gamma": 80.0},  # Sun et al. 2020, fine-grained retrieval; PML CircleLoss
    "lifted_structure": {"neg_margin": 1.0, "pos_margin": 0.0},  # Song et al. 2016; PML
}

# PML's weight initialisations (``hdml_jax.models.PROXY_INITS`` keys): W ~ N(0, 1) for the
# large-margin family (PML losses/mixins.py WeightMixin default ``torch.nn.init.normal_``),
# kaiming_uniform_(a=√5) for SoftTriple (soft_triple_loss.py ``get_default_weight_init_func``).
WEIGHT_INITS = {
    "normalized_softmax": "normal",
    "cosface": "normal",
    "arcface": "normal",
    "soft_triple": "kaiming_uniform_sqrt5",
    "hpl_normalized_softmax": "normal",
    "hpl_cosface": "normal",
    "hpl_arcface": "normal",
}

SAMPLES_PER_CLASS = 4  # P×K batches for the pair losses (MLRC: 8 classes × 4)


def soft_triple_centers(config: ml_collections.ConfigDict) -> int:
    """SoftTriple's weight rows per class: its ``K`` (``loss.kwargs.centers_per_class``)."""
    return int(config.loss.kwargs.centers_per_class)


def centers_per_class(config: ml_collections.ConfigDict) -> int:
    """Weight rows per class of ``config``'s method: SoftTriple's K, 1 for everything else."""
    return of(config).rows_per_class(config)


def apply_baseline_recipe(c: ml_collections.ConfigDict, method: str) -> None:
    """Set ``c.loss.kwargs`` / miner / learned-parameter rates for a baseline ``method``.

    The recipe of every baseline record (``baseline_recipe``; the data set is known then: ``c.dataset.name``).
    """
    column = MLRC_DATASET.get(c.dataset.name, "cub")
    if method in MLRC_BEST:
        best = dict(MLRC_BEST[method][column])
    else:
        best = dict(PAPER_DEFAULTS[method])
    weights_lr = best.pop("weights_lr", None)
    beta_lr = best.pop("beta_lr", None)
    epsilon = best.pop("epsilon", None)
    if method == "margin":
        best.update(learn_beta=True, nu=0.0)  # "Margin / class": β per class, no ν penalty
    if method == "soft_triple":
        best["centers_per_class"] = 10
    c.loss.kwargs = ml_collections.ConfigDict(best)
    c.loss.miner = "multi_similarity" if method == "multi_similarity" else "none"
    c.loss.miner_kwargs = ml_collections.ConfigDict({"epsilon": epsilon} if epsilon is not None else {})
    if weights_lr is not None:
        c.optimizer.proxy_lr = weights_lr  # absolute: kept whatever lr the data-set config sets
        c.model.proxy_init = WEIGHT_INITS[method]
    if beta_lr is not None:
        c.optimizer.loss_params_lr = beta_lr
        # MLRC's margin-loss runs do not decay β (its plots are named "margin_no_weight_decay").
        c.optimizer.loss_params_weight_decay = 0.0


def use_pk_batches(c: ml_collections.ConfigDict) -> None:
    """Pair losses need positives in every batch: P×K with K = 4 and P = batch_size // 4 (for the
    methods whose record says ``pk_batches``)."""
    record = find(c.method)  # None: an unknown method, reported by config.validate
    if record is None or not record.pk_batches:
        return
    c.sampler = "pk"
    c.samples_per_class = SAMPLES_PER_CLASS
    c.classes_per_batch = max(2, c.batch_size // SAMPLES_PER_CLASS)
    c.batch_size = c.classes_per_batch * c.samples_per_class


def baseline_recipe(c: Config) -> None:
    """The Proxy-Anchor recipe of the data-set config, MLRC's best loss hyper-parameters."""
    apply_baseline_recipe(c, c.method)
    use_pk_batches(c)


_SUMMARIES = {
    "contrastive": "contrastive loss, P×K batches",
    "triplet_margin": "triplet margin loss over all triplets, P×K batches",
    "multi_similarity": "multi-similarity loss with its miner, P×K batches",
    "margin": "margin loss with a learned β per class, P×K batches",
    "ntxent": "NT-Xent (InfoNCE) over the batch's pairs, P×K batches",
    "lifted_structure": "lifted structured loss, P×K batches",
    "circle": "circle loss (m 0.4, γ 80), P×K batches",
    "normalized_softmax": "normalized softmax over learned class weights",
    "cosface": "CosFace (additive cosine margin) over learned class weights",
    "arcface": "ArcFace (additive angular margin) over learned class weights",
    "soft_triple": "SoftTriple: K = 10 centres per class",
    "hpl_normalized_softmax": "HPL around normalized softmax",
    "hpl_cosface": "HPL around CosFace",
    "hpl_arcface": "HPL around ArcFace",
}
MARGIN_BETA = LossParameter(name="margin_beta", keyword="beta")

RECORDS = tuple(
    Method(
        name=_name,
        summary=_SUMMARIES[_name] + ("; MLRC's values" if _name in MLRC_BEST else "; its paper's values"),
        loss=LOSS_FUNCTIONS[_name],
        form="pair" if _name in PAIR_METHODS else "proxy",
        recipe=baseline_recipe,
        hierarchical=_name in HPL_CLASSIFICATION_METHODS,
        rows_per_class=soft_triple_centers if _name == "soft_triple" else one_row,
        loss_parameters=(MARGIN_BETA,) if _name == "margin" else (),
        pk_batches=_name in PAIR_METHODS,
        fields=("loss.kwargs",),
    )
    for _name in BASELINE_METHODS
)
