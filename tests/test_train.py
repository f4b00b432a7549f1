"""The main job end to end on a tiny in-memory data set: every method, resume, eval-only, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hdml_jax import methods
from hdml_jax.config import validate
from hdml_jax.training import train
from tests.numerics import assert_best_within, assert_close, rounding_atol
from tests.tiny_data import shrink, tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def load_config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(method: str, **overrides):
    """configs/synthetic.py shrunk: ResNet-18 width 4, batch 16, 4 epochs of 4 steps."""
    c = load_config_module("synthetic").get_config(f"method={method}")
    shrink(c)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def tiny_network_terms(batch: int | None = None, image_size: int = 48, backward: bool = False) -> int:
    """``n_terms`` for ``tests.numerics.assert_close`` when two programs evaluate the tiny network
    (``tiny_config``'s ResNet-18 of width 4 and 16-d unit embedding: another batch shape, device
    layout or process count).

    Every stage on the longest path adds its own reduction's round-off and passes on its input's
    relative error unamplified (BatchNorm, ReLU and well-conditioned kernels keep it at the
    activations' size); independent round-off of chained stages adds in quadrature like the terms
    of one reduction, so an element carries that of ``n = stages × longest stage``. In eval mode
    (``batch=None``): 17 convolutions, the pooling, the embedding layer and the L2 normalisation,
    20 stages, the longest layer4's 3×3×32 = 288 terms. Training on ``batch`` images adds the 17
    BatchNorms' batch statistics and the loss's similarities and log-sum-exp (39 stages), the
    longest the stem BatchNorm's batch × (image_size/2)² positions; the backward pass doubles
    the stages (data gradients, and the kernel gradients that reduce over the same positions).
    """
    if batch is None:
        return 20 * 288
    stages = 2 * 39 if backward else 39
    return stages * max(288, batch * (image_size // 2) ** 2)


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


# The default run trains one method per trainer path; the rest repeat a path with another loss
# (every loss is checked on its own, and ``test_baselines`` checks what the step computes):
# hpl_nca is hpl_pa's path with Proxy-NCA, proxy_nca and proxy_anchor are theirs without coarse
# levels (proxy_anchor also trains through the CLI in test_inference), hier_pa trains through the
# CLI in test_vit_training, ``margin`` stands for the pair losses (P×K batches, a learned loss
# parameter), ``soft_triple`` for the classification ones (K rows per class), ``hyp`` for the
# Poincaré ball's pair loss with the global-norm clip.
DEFAULT_RUNS = ("hpl_pa", "proxy_nca_pp", "cgd", "margin", "soft_triple", "hyp")


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT_RUNS else pytest.param(m, marks=pytest.mark.exhaustive) for m in methods.names()]
)
def test_each_method_trains_and_evaluates(method, dataset, tmp_path):
    # margin runs with a cross-batch memory of 2 batches (it wraps every 2 steps); the memory is a
    # leaf of the checkpointed state, so resume is exact as for every other leaf (the resume test).
    overrides = {"loss.xbm_size": 32} if method == "margin" else {}
    final = train.train_and_evaluate(tiny_config(method, **overrides), tmp_path, dataset=dataset)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "coarse_recall@1"):
        assert summary[key] == final[key]  # the last evaluation, as returned (JSON keeps a float's bits)
    evaluations = [r for r in records if r["kind"] == "eval"]
    best = max(evaluations, key=lambda r: r["recall@1"])  # the first of the best, as the official scripts
    assert (summary["best"]["step"], summary["best"]["recall@1"]) == (best["step"], best["recall@1"])
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all(np.isfinite(r["loss"]) for r in train_records)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [8, 16]
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 16
    assert np.load(tmp_path / "test_embeddings.npy").shape == (48, 16)
    if methods.get(method).hierarchical:
        assert all("fine" in r for r in train_records)
    if method == "cgd":
        assert all("triplet" in r and "classification" in r for r in train_records)
    if method == "hyp":  # points of the ball, ranked by the Poincaré distance
        from hdml_jax.evaluation import metrics

        embeddings = np.load(tmp_path / "test_embeddings.npy")
        assert np.linalg.norm(embeddings, axis=1).max() < 1 / np.sqrt(0.1)
        poincare = metrics.retrieval_metrics(embeddings, dataset.test.labels, distance="poincare", curvature=0.1)
        assert summary["recall@1"] == poincare["recall@1"] and summary["map@r"] == poincare["map@r"]
    if method == "margin":
        saved = sorted((tmp_path / "checkpoints").glob("*/state/_METADATA"))
        assert saved and all("xbm" in path.read_text() for path in saved)
    if method in ("margin", "soft_triple"):  # loss parameters the embedder must leave out
        from hdml_jax.inference import embedder as inference

        embedder = inference.load_embedder(tmp_path, step=16)
        images = np.stack([embedder.preprocess(dataset.test.source[i]["image"]) for i in range(4)])
        trainer = np.load(tmp_path / "test_embeddings.npy")
        # Another batch shape than the trainer's evaluation: round-off of the network, on unit vectors.
        assert_close(embedder.embed(images), trainer[:4], n_terms=tiny_network_terms(), scale=1.0)


def test_training_fits_the_training_classes(tmp_path):
    """Scored on the classes it trains on, a run must beat the untrained network clearly."""
    from hdml_jax.data.base import MetricDataset
    from tests.tiny_data import tiny_split

    split = tiny_split(3, 8, 8, name="noisy")
    seen = MetricDataset("seen", split, split)
    # Width-4 networks learn this toy faster without BatchNorm statistics (frozen_bn: identity BN).
    settings = {"model.frozen_bn": True}
    untrained = train.train_and_evaluate(
        tiny_config("proxy_anchor", num_steps=1, **settings), tmp_path / "a", dataset=seen
    )
    trained = train.train_and_evaluate(
        tiny_config("proxy_anchor", num_epochs=16, **settings), tmp_path / "b", dataset=seen
    )
    assert trained["map@r"] > untrained["map@r"] + 0.1, (untrained, trained)


def test_mixed_precision_trains_with_float32_parameters(dataset, tmp_path):
    config = tiny_config("hpl_pa", **{"model.dtype": "bfloat16"})
    final = train.train_and_evaluate(config, tmp_path, dataset=dataset)
    assert 0.0 <= final["recall@1"] <= 1.0
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.load(tmp_path / "test_embeddings.npy").dtype == np.float32


def test_workdir_outputs_and_pictures(dataset, tmp_path):
    train.train_and_evaluate(
        tiny_config("hpl_pa", pictures=True, nmi=True, tsne_max_points=40), tmp_path, dataset=dataset
    )
    for name in (
        "config.json",
        "metrics.jsonl",
        "final_metrics.json",
        "test_embeddings.npy",
        "test_labels.npy",
        "tsne.png",
        "retrieval.png",
        "curves.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "nmi" in json.loads((tmp_path / "final_metrics.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "hpl_pa"


@pytest.mark.exhaustive  # covered by test_reliability (1 device) and test_sharding (HPL-PA, 8 devices)
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(dataset, tmp_path):
    """HPL-PA: the hierarchy is built at step 4 and refreshed at 8 and 12, across the interruption."""
    straight = train.train_and_evaluate(tiny_config("hpl_pa"), tmp_path / "straight", dataset=dataset)
    with pytest.raises(train.TrainingInterruptedError) as stop:
        train.train_and_evaluate(
            tiny_config("hpl_pa", stop_after_steps=6), tmp_path / "resumed", dataset=dataset
        )
    assert stop.value.step == 6
    resumed = train.train_and_evaluate(tiny_config("hpl_pa"), tmp_path / "resumed", dataset=dataset)
    # The same compiled programs from bit-identical restored state (parameters, optimizer state,
    # hierarchy, random key, data position): the same bits, as test_reliability asserts.
    np.testing.assert_array_equal(
        np.load(tmp_path / "resumed" / "test_embeddings.npy"),
        np.load(tmp_path / "straight" / "test_embeddings.npy"),
    )
    assert resumed == straight


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    with pytest.raises(train.TrainingInterruptedError):
        train.train_and_evaluate(tiny_config("proxy_anchor", stop_after_steps=4), tmp_path, dataset=dataset)
    with pytest.raises(train.TrainingDivergedError, match="NaN/Inf at step 6"):
        train.train_and_evaluate(
            tiny_config("proxy_anchor", **{"optimizer.lr": 1e38}), tmp_path, dataset=dataset
        )
    checkpoints = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == [4]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("method", "triplet", "unknown method 'triplet'; valid: proxy_anchor, proxy_nca"),
        ("dataset.name", "imagenet", "unknown dataset 'imagenet'; valid: synthetic, synthetic_sop, cub200"),
        ("model.descriptors", "SX", "unknown letters"),
        ("batch_size", 60, "classes_per_batch × samples_per_class"),
        ("dataset.num_threads", -1, "dataset.num_threads must be 0 or more"),
    ],
)
def test_config_validation_errors(key, value, message):
    method = "cgd" if key in ("model.descriptors", "batch_size") else "hpl_pa"
    config = tiny_config(method)
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        validate(config)
    assert "\n" not in str(error.value)


SIGNAL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
from tests.tiny_data import shrink, tiny_dataset
from hdml_jax import interrupts
from hdml_jax.training import train
config = tiny_config("proxy_anchor", num_epochs=400, log_every_steps=1)
try:
    train.train_and_evaluate(config, {workdir!r}, dataset=tiny_dataset())
except train.TrainingInterruptedError as stop:
    print("interrupted", stop.step, flush=True)
    sys.exit(interrupts.exit_code(stop.signum))
"""


def test_ctrl_c_saves_a_checkpoint_and_exits_with_130(tmp_path):
    """SIGINT (what Ctrl-C sends; SIGTERM takes the same path and exits 0) in the middle of
    training: a checkpoint at the next step, one line, no traceback."""
    script = SIGNAL_SCRIPT.format(root=str(ROOT), workdir=str(tmp_path))
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        line = process.stderr.readline()
        if "step 3/" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert (
        "interrupted" in out and "Traceback" not in err and "SIGINT: stopping at the next safe point" in err
    )
    step = int(out.split()[-1])
    assert (tmp_path / "checkpoints" / str(step)).is_dir()


def test_hpl_hierarchy_is_built_when_warmup_ends_refreshed_on_schedule_and_never_twice(
    dataset, tmp_path, monkeypatch
):
    """Warm-up 1 epoch (4 steps): k-means at step 4, refresh every epoch (8, 12); a run stopped at
    step 6 and resumed builds nothing again. Right after the build the coarse proxies are the
    k-means centroids of the fine proxies of that moment, and their optimizer state is fresh."""
    from hdml_jax.training import phases

    events = []
    build, refresh = phases.Phases.build_hierarchy, phases.Phases.refresh_hierarchy

    def recording_build(self, state, step):
        fine = np.asarray(jax.device_get(state["params"]["proxies"]))
        state = build(self, state, step)
        events.append(("build", step, fine, jax.device_get(state)))
        return state

    def recording_refresh(self, state):
        events.append(("refresh", int(jax.device_get(state["step"])), None, None))
        return refresh(self, state)

    monkeypatch.setattr(phases.Phases, "build_hierarchy", recording_build)
    monkeypatch.setattr(phases.Phases, "refresh_hierarchy", recording_refresh)
    settings = {"optimizer.warmup_epochs": 1, "model.frozen_bn": True, "loss.hierarchy_build_epoch": -1}
    with pytest.raises(train.TrainingInterruptedError):
        train.train_and_evaluate(
            tiny_config("hpl_pa", stop_after_steps=6, **settings), tmp_path, dataset=dataset
        )
    train.train_and_evaluate(tiny_config("hpl_pa", **settings), tmp_path, dataset=dataset)
    assert [(kind, step) for kind, step, _, _ in events] == [("build", 4), ("refresh", 8), ("refresh", 12)]

    _, _, fine, state = events[0]
    centroids = np.asarray(state["params"]["coarse_proxies_1"])
    assignment = np.asarray(state["hierarchy"]["assignments"][0])
    directions = fine / np.linalg.norm(fine, axis=1, keepdims=True)
    dim = fine.shape[1]
    similarity = directions @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T
    # Every class sits with its nearest centroid, up to the round-off of the cosines (unit vectors,
    # a normalisation and a dot product of dim terms each side): k-means and NumPy may break a
    # near-tie differently.
    cosine_atol = rounding_atol(1.0, 3 * dim, eps=float(np.finfo(np.float32).eps))
    assert_best_within(assignment[:, None], similarity, atol=cosine_atol)
    for group in np.unique(assignment):  # and each centroid is its classes' mean direction
        mean = directions[assignment == group].mean(axis=0)
        # Normalising a mean of unit vectors amplifies its round-off by 1/‖mean‖; n: the points'
        # normalisation, the group's sum and the mean's normalisation, chained.
        assert_close(
            centroids[group] / np.linalg.norm(centroids[group]),
            mean / np.linalg.norm(mean),
            n_terms=2 * dim + len(fine),
            scale=1 / float(np.linalg.norm(mean)),
        )
    coarse_state = state["opt_state"].groups.inner_states["coarse_proxies"].inner_state
    assert all(
        int(np.asarray(x)) == 0 for x in jax.tree.leaves(coarse_state) if np.ndim(x) == 0
    )  # step counts
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(coarse_state))  # zero moments too


def test_centroid_coarse_proxies_and_raw_kmeans_reach_the_loss_and_the_refresh():
    """``loss.coarse_proxies="centroids"``: the step's coarse level is the group means of the fine
    proxies (padding excluded) and a refresh re-assigns each class to its nearest mean;
    ``loss.kmeans_normalize=False`` makes that nearest by Euclidean distance. No model compiled."""
    from types import SimpleNamespace

    from hdml_jax.losses import coarse_centroids, hierarchical_proxy_loss, proxy_anchor_loss
    from hdml_jax.training import phases, steps

    rng = np.random.default_rng(3)
    fine = rng.normal(size=(6, 4)).astype(np.float32)  # 5 classes + 1 padding row
    params = {"proxies": fine, "coarse_proxies_1": np.zeros((2, 4), np.float32)}  # unused with centroids
    hierarchy = {"assignments": (np.array([0, 0, 1, 1, 1, 0], np.int32),), "active": np.float32(1.0)}
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 5, 8)
    mask = np.ones(8, bool)
    proxy_mask = np.arange(6) < 5
    for normalize in (True, False):
        config = tiny_config(
            "hpl_pa", **{"loss.coarse_proxies": "centroids", "loss.kmeans_normalize": normalize}
        )
        validate(config)
        loss, _ = steps.compute_loss(config, {"embedding": x}, y, params, hierarchy, mask, num_classes=5)
        means = coarse_centroids(
            fine, hierarchy["assignments"], (2,), normalize=normalize, proxy_mask=proxy_mask
        )
        want = hierarchical_proxy_loss(
            x,
            y,
            (fine, *means),
            hierarchy["assignments"],
            base_loss=proxy_anchor_loss,
            level_weights=(1.0, 0.1),
            level_proxy_masks=(proxy_mask, None),
            margin=0.1,
            alpha=32.0,
        )
        # Two programs (the step's masked call against a plain one): the loss's round-off. Each
        # level's two log-sum-exps (positives, negatives) take α·(cosine ± margin): an error δ in
        # a cosine moves the loss by up to 2α·δ per level, weighted 1 and 0.1.
        scale = 2 * 32.0 * (1 + 0.1) * (1.0 + 0.1)
        assert_close(np.float32(loss), np.float32(want), n_terms=len(x), scale=scale)

        runner = phases.Phases(config, SimpleNamespace(num_proxies=5), params, 4, (2,), None, None, True)
        refreshed = runner.refresh_hierarchy({"params": params, "hierarchy": hierarchy})
        means = np.asarray(means[0])
        dim = fine.shape[1]
        eps = float(np.finfo(np.float32).eps)
        if normalize:  # cosines of unit vectors; normalising a mean amplifies by 1/‖mean‖
            unit = fine / np.linalg.norm(fine, axis=1, keepdims=True)
            score = unit @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
            atol = rounding_atol(1 / np.linalg.norm(means, axis=1).min(), 3 * dim, eps=eps)
        else:  # squared distances; terms (|f| + |m|)², whatever the formula's cancellation
            score = -(((fine[:, None] - means[None]) ** 2).sum(-1))
            terms = ((np.abs(fine)[:, None] + np.abs(means)[None]) ** 2).sum(-1)
            atol = rounding_atol(terms.max(), dim, eps=eps)
        # The refresh picks each class's nearest mean, up to round-off (a near-tie may go either way).
        picked = np.asarray(refreshed["hierarchy"]["assignments"][0])[:5]
        assert_best_within(picked[:, None], score[:5], atol=atol)
        assert int(refreshed["hierarchy"]["assignments"][0][5]) == 0  # padding stays in group 0
    with pytest.raises(ValueError, match=r"unknown loss\.coarse_proxies 'mean'"):
        validate(tiny_config("hpl_pa", **{"loss.coarse_proxies": "mean"}))


def test_synthetic_sop_config_is_valid_for_every_method():
    module = load_config_module("synthetic_sop")
    for method in methods.names():
        config = module.get_config(f"method={method},seed=3")
        validate(config)
        assert (config.dataset.name, config.seed, config.dataset.image_size) == ("synthetic_sop", 3, 32)
        if config.sampler == "pk":  # every class has at least 2 images
            assert config.samples_per_class == 2


def test_loader_threads_default_to_half_the_usable_cpus_up_to_8(monkeypatch):
    from hdml_jax import config as config_module

    for cpus, threads in [(1, 1), (2, 1), (5, 2), (16, 8), (240, 8)]:
        monkeypatch.setattr(
            config_module.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False
        )
        assert config_module.default_loader_threads() == threads, cpus
