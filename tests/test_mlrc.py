"""The MLRC protocol: its class folds, early stopping, the concatenated/separated test, one run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hdml_jax.config import validate
from hdml_jax.data import folds
from hdml_jax.errors import ConfigError
from hdml_jax.protocols import mlrc, mlrc_report
from hdml_jax.training import optim, train
from tests.test_train import load_config_module, shrink
from tests.tiny_data import tiny_dataset

# ----------------------------------------------------------------------------- folds


@pytest.mark.parametrize("num_classes", [8, 9, 11, 200, 196, 22634])
def test_class_split_is_sklearns_unshuffled_split_and_kfold(num_classes):
    """powerful-benchmarker: ``train_test_split(shuffle=False, test_size=0.5)`` of the sorted
    classes, then ``KFold(4)`` of the first part (index_split_manager.py)."""
    model_selection = pytest.importorskip("sklearn.model_selection")
    classes = np.arange(num_classes) * 3 + 5  # sparse ids
    rng = np.random.default_rng(num_classes)
    given = np.repeat(rng.permutation(classes), 2)  # any order, duplicates (one per example)
    split = folds.class_split(given)
    trainval, test = model_selection.train_test_split(classes, test_size=0.5, shuffle=False)
    np.testing.assert_array_equal(split.trainval, trainval)
    np.testing.assert_array_equal(split.test, test)
    for fold, (train_idx, val_idx) in enumerate(model_selection.KFold(4).split(trainval)):
        np.testing.assert_array_equal(split.folds[fold], trainval[val_idx])
        np.testing.assert_array_equal(split.training_classes(fold), trainval[train_idx])
    assert np.array_equal(np.sort(np.concatenate(split.folds)), split.trainval)  # disjoint, covering


def test_published_fold_sizes():
    sizes = {c: [len(f) for f in folds.class_split(np.arange(c)).folds] for c in (200, 196, 22634)}
    assert sizes == {200: [25] * 4, 196: [25, 25, 24, 24], 22634: [2830, 2829, 2829, 2829]}
    assert len(folds.class_split(np.arange(22634)).test) == 11317  # SOP: class 11,318 moves to test
    with pytest.raises(folds.FoldError, match="at least 8 classes"):
        folds.class_split(np.arange(7))


def test_fold_datasets_keep_examples_and_split_classes():
    base = tiny_dataset()  # 8 + 6 classes → train+val = 7 classes in folds of 2, 2, 2, 1
    pool_size = len(base.train) + len(base.test)
    test = folds.test_half(base)
    seen_val = 0
    for fold in range(4):
        data = folds.fold_dataset(base, fold)
        assert len(data.train) + len(data.test) + len(test.test) == pool_size
        assert data.test.num_classes == (2 if fold < 3 else 1)
        assert data.train.num_classes + data.test.num_classes == 7
        seen_val += len(data.test)
        # Labels are remapped per split and every example keeps its image and label.
        example = data.test.source[0]
        assert example["label"] == data.test.labels[0] == 0
        original_class = 2 * fold  # the fold's first class in the pooled order
        first = int(np.flatnonzero(base.train.labels == original_class)[0])
        np.testing.assert_array_equal(example["image"], base.train.source[first]["image"])
    assert seen_val == len(test.train)
    # The test half: the last train class (7) and every test class.
    assert test.test.num_classes == 7 and len(test.test) == len(base.test) + 8
    with pytest.raises(folds.FoldError):
        folds.fold_dataset(base, 4)


# ----------------------------------------------------------------------------- early stopping


def test_patience_is_pmls_epoch_minus_best_epoch():
    """``HookContainer.patience_remaining``: stop when ``epoch - best_epoch > patience``; the best is
    the first of the highest."""
    scores = [0.1, 0.3, 0.2, 0.3, 0.25, 0.2, 0.29]  # best at epoch 2 (the later 0.3 ties)
    evaluations = [{"step": 100 * e, "epoch": float(2 * e), "map@r": s} for e, s in enumerate(scores)]
    exhausted = [train.patience_exhausted(evaluations[: n + 1], "map@r", 9) for n in range(len(scores))]
    # epochs 0, 2, 4, ..., 12: 12 - 2 = 10 > 9 only at the last.
    assert exhausted == [False] * 6 + [True]
    assert not train.patience_exhausted(evaluations, "map@r", 0)  # off


# ----------------------------------------------------------------------------- the test


def _map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Per-query loop: MAP@R of cosine self-retrieval (query excluded)."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = []
    for i in range(len(x)):
        others = np.delete(np.arange(len(x)), i)
        order = others[np.argsort(-(x[others] @ x[i]), kind="stable")]
        r = int(np.sum(labels[others] == labels[i]))
        hits = labels[order[:r]] == labels[i]
        scores.append(np.sum(np.cumsum(hits) / np.arange(1, r + 1) * hits) / r)
    return 100 * float(np.mean(scores))


def test_concatenated_and_separated_scores_on_fixed_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    centers = rng.normal(size=(6, 4))
    per_model = [3.0 * (centers[labels] + rng.normal(scale=1.2, size=(30, 4))) for _ in range(3)]
    results = mlrc.summarize(per_model, labels)
    each = [_map_at_r(e, labels) for e in per_model]
    # The same ranks give the same MAP@R up to the float64 round-off of a 30-query mean of
    # fractions (~1e-12 percent); a rank flipped by a near-tie would move it by at least
    # 100 / (30 · 5²) ≈ 0.13. abs=1e-3 lies between the two (none of these continuous draws ties
    # within float32 round-off, whatever the summation order).
    assert results["separated"]["map@r"]["per_fold"] == pytest.approx(each, abs=1e-3)
    assert results["separated"]["map@r"]["mean"] == pytest.approx(np.mean(each), abs=1e-3)
    unit = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in per_model]
    assert results["concatenated"]["map@r"] == pytest.approx(_map_at_r(np.concatenate(unit, 1), labels), abs=1e-3)
    # Three noisy views of the same centres: their concatenation averages the noise away.
    assert results["concatenated"]["map@r"] > max(each)
    assert results["dims"] == {"separated": 4, "concatenated": 12}
    assert "concatenated (12-d)" in mlrc.table(results)


# ----------------------------------------------------------------------------- configs and a run


@pytest.mark.parametrize("name, every, patience", [("cub", 2, 9), ("cars", 5, 14), ("sop", 20, 39)])
def test_mlrc_configs_carry_the_protocol(name, every, patience):
    c = load_config_module(f"mlrc/{name}").get_config("method=hpl_pa")
    assert (c.mlrc.enabled, c.eval_every_epochs, c.early_stopping_patience_epochs) == (True, every, patience)
    assert (c.batch_size, c.classes_per_batch, c.samples_per_class, c.steps_per_epoch) == (32, 8, 4, 100)
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.momentum) == (
        "rmsprop", 1e-6, 1e-4, 0.9)  # fmt: skip
    assert (c.model.backbone, c.model.embedding_dim, c.model.frozen_bn) == ("bn_inception", 128, True)
    assert (c.dataset.transform, c.dataset.image_size, c.best_metric, c.eval_at_start) == ("mlrc", 227, "map@r", True)
    # PML's freeze_trunk_batchnorm: statistics frozen, weight/bias trained from the first step.
    assert optim.frozen_groups(c, 0, 100) == frozenset()
    nca = load_config_module(f"mlrc/{name}").get_config("method=proxy_nca")
    assert (nca.loss.scale, nca.optimizer.proxy_lr) == (
        mlrc.PROXY_NCA_BEST[name]["scale"], mlrc.PROXY_NCA_BEST[name]["proxy_lr"])  # fmt: skip
    validate(nca)
    cgd = load_config_module(f"mlrc/{name}").get_config("method=cgd")
    with pytest.raises(ConfigError, match="not part of the MLRC comparison"):
        validate(cgd)


def _tiny_mlrc_config(patience: int = 1):
    c = load_config_module("mlrc/synthetic").get_config("method=proxy_anchor")
    shrink(c, num_epochs=5, eval_every_epochs=1)
    c.classes_per_batch, c.samples_per_class = 2, 8  # a fold trains on 3 or 4 classes
    c.steps_per_epoch = 2
    c.early_stopping_patience_epochs = patience
    c.mlrc.num_folds = 2
    return c


def test_a_tiny_mlrc_run_early_stops_selects_tests_and_resumes(tmp_path, capsys):
    dataset = tiny_dataset()
    config = _tiny_mlrc_config()
    # Fold 1 first, stopped after 3 steps (a time-limited job), then everything.
    config.mlrc.fold, config.stop_after_steps = 1, 3
    with pytest.raises(train.TrainingInterruptedError):
        mlrc.run(config, tmp_path, dataset=dataset)
    assert mlrc.incomplete_folds(tmp_path, 2) == [0, 1]
    config.mlrc.fold, config.stop_after_steps = -1, 0
    results = mlrc.run(config, tmp_path, dataset=dataset)
    err = capsys.readouterr().err
    assert "resumed from" in err and "(step 3)" in err
    for fold in range(2):
        summary = json.loads((tmp_path / f"fold{fold}" / "final_metrics.json").read_text())
        records = [json.loads(r) for r in (tmp_path / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()]
        evaluations = [r for r in records if r["kind"] == "eval"]
        assert evaluations[0]["step"] == 0  # the untrained model is evaluated (and may be the best)
        best = max(evaluations, key=lambda r: r["map@r"])
        assert summary["best"]["step"] == best["step"] and summary["best_by"] == "map@r"
        # The test uses each fold's best checkpoint.
        assert results["checkpoints"][fold]["step"] == best["step"]
        if summary.get("stopped_early"):
            assert summary["step"] - best["step"] > config.early_stopping_patience_epochs * 2
        else:
            assert summary["step"] == 10
    saved = json.loads((tmp_path / mlrc.RESULTS_FILE).read_text())
    assert saved["concatenated"] == pytest.approx(results["concatenated"])
    assert saved["dims"] == {"separated": 16, "concatenated": 32}
    assert saved["num_test_classes"] == 7
    # A rerun finds every fold complete and only tests again: the same numbers.
    again = mlrc.run(config, tmp_path, dataset=dataset)
    assert again["concatenated"] == pytest.approx(results["concatenated"])
    assert "nothing to do" in capsys.readouterr().err


def test_report_of_a_workdir_without_folds_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mlrc_report.main(["--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds no MLRC fold" in err and len(err.splitlines()) == 1
    assert not (tmp_path / mlrc.RESULTS_FILE).exists()


@pytest.mark.parametrize("name, batch, warm, decay", [("cub", 180, 1, 10), ("cars", 180, 1, 20), ("sop", 180, 1, 20)])
def test_data_set_configs_offer_the_official_bn_inception_commands(name, batch, warm, decay):
    """``configs/<name>.py:backbone=bn_inception``: Proxy-Anchor's BN-Inception command (README)."""
    c = load_config_module(name).get_config("method=proxy_anchor,backbone=bn_inception")
    assert (c.model.backbone, c.model.pretrained) == ("bn_inception", "bninception")
    assert (c.batch_size, c.optimizer.warmup_epochs, tuple(c.optimizer.decay_epochs)) == (batch, warm, (decay,))
    validate(c)
    assert load_config_module(name).get_config("method=proxy_anchor").model.backbone == "resnet"
    with pytest.raises(ConfigError, match="ResNet-50"):
        load_config_module(name).get_config("method=cgd,backbone=bn_inception")
