"""CGD (Jun et al. 2019, arXiv 1903.10663): a combination of global descriptors, trained with a
batch-hard triplet loss and a classifier on the first descriptor.

Where the paper is silent, the numbers are those of CGD-port = leftthomas/CGD @c9cd98f (a
reimplementation, not the authors' code), as reference.md §2 summarises the paper.
"""

from __future__ import annotations

from hdml_jax.methods.registry import Config, Method


def cgd_recipe(c: Config) -> None:
    c.model.last_stride = 1  # the paper: no downsampling between stages 3 and 4 (layer4)
    c.model.frozen_bn = False
    c.model.embedding_dim = 1536  # CGD-port train.py:77
    c.model.descriptors = "SG"  # CGD-port train.py:74-76
    c.dataset.transform = "cgd"  # resize 252, random crop 224, flip; eval resize 224 (utils.py:19-24)
    c.optimizer.name = "adam"  # Adam(model.parameters(), lr=1e-4), no decay (CGD-port train.py:116)
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_epochs = 0
    c.optimizer.grad_clip_value = 0.0
    c.optimizer.decay_factor = 0.1  # MultiStepLR gamma 0.1 (train.py:117)
    c.optimizer.decay_every = False
    c.optimizer.decay_epochs = (12, 16)  # milestones 0.6 / 0.8 × 20 epochs (train.py:117; README:54-55)
    c.num_epochs = 20  # CGD-port train.py:84
    c.sampler = "pk"  # MPerClassSampler, m = 4 (utils.py:109-137)
    c.classes_per_batch = 32
    c.samples_per_class = 4
    c.batch_size = 128  # CGD-port train.py:83


def cgd_keywords(c: Config) -> dict[str, float]:
    """The triplet margin; the classifier's τ, ε and weight are read by the train step's CGD form."""
    return {"margin": c.loss.triplet_margin}


CGD = Method(
    name="cgd",
    summary="CGD: last stride 1, SPoC/MAC/GeM descriptors; batch-hard triplet + classifier; P×K 32 × 4",
    loss="batch_hard_triplet_loss",
    form="cgd",
    recipe=cgd_recipe,
    family="cgd",
    keywords=cgd_keywords,
    head="cgd",
    two_images_per_class=True,  # batch-hard triplets need a positive for every anchor
    fields=("loss.temperature", "loss.label_smoothing", "loss.triplet_margin", "loss.classification_weight"),
    protocols=(),  # its recipe replaces the network and head
    backbones=("resnet",),
)
