"""The protocol of "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020; MLRC).

HPL's MAP@R / P@1 / R-Precision tables follow it. One command trains and tests::

    python -m hdml_jax.main --config configs/mlrc/cub.py:method=hpl_pa --workdir runs/mlrc_cub_hpl_pa

* **Data** (``hdml_jax.data.folds``): the first half of the sorted classes is cut into 4
  class-disjoint folds; model ``f`` trains on three and is validated on fold ``f``; the second
  half is the test set.
* **Training** (``apply_protocol``): every fold model trains in its own workdir
  (``<workdir>/fold<f>``) with the trainer's early stopping on validation MAP@R; its best
  checkpoint is kept.
* **Test** (``report``): the test half is embedded by the 4 best fold models. *Separated*: each
  model's 128-d embeddings alone, metrics averaged over the 4 models; *concatenated*: the 4
  L2-normalised embeddings side by side (512-d), L2-normalised again (powerful-benchmarker's
  ``ConcatenateEmbeddings(normalize_embeddings=True)``). MAP@R, P@1 and R-Precision of both, in
  ``<workdir>/mlrc_results.json`` and as a table.

The folds run one after another in one process (``mlrc.fold = -1``), or one per job
(``--config.mlrc.fold=F``, same ``--workdir``), then ``python -m hdml_jax.mlrc_report --workdir
W`` writes the results. Every fold resumes on its own (a rerun skips finished folds).

Sources. PB = KevinMusgrave/powerful-benchmarker, ``metric-learning`` branch, under
``src/powerful_benchmarker/configs/``; mlrc.md = that branch's ``docs/papers/mlrc.md``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ml_collections
import numpy as np

from hdml_jax import methods
from hdml_jax.errors import UserError

# Per data set: (evaluation interval in epochs, early-stopping patience in epochs).
# PB config_general/default.yaml l.15-16 (save_interval 2, patience 9; CUB), with_cars196.yaml
# l.1-2 (5, 14), with_sop.yaml l.1-2 (20, 39).
SCHEDULES = {"cub": (2, 9), "cars": (5, 14), "sop": (20, 39)}

# MLRC's best ProxyNCA hyper-parameters (mlrc.md l.40: proxy lr, softmax_scale).
PROXY_NCA_BEST = {
    "cub": {"proxy_lr": 6.04e-3, "scale": 13.98},
    "cars": {"proxy_lr": 4.43e-3, "scale": 7.97},
    "sop": {"proxy_lr": 5.28e-4, "scale": 10.73},
}

METRICS = ("map@r", "precision@1", "r_precision")
RESULTS_FILE = "mlrc_results.json"


class IncompleteProtocolError(UserError, FileNotFoundError):
    """An MLRC workdir whose folds are missing or unfinished."""


def apply_protocol(c: ml_collections.ConfigDict, column: str) -> None:
    """Make ``c`` (a data-set config with its method applied) MLRC's; ``column``: cub, cars, sop.

    Every number is PB's unless marked. The loss's own hyper-parameters are MLRC's best ones
    (``hdml_jax.methods.baselines.MLRC_BEST``, applied with the method; ``PROXY_NCA_BEST`` here).
    """
    every, patience = SCHEDULES[column]
    c.mlrc.enabled = True
    # config_models/default.yaml l.1-8: trunk bninception (ImageNet weights), embedder MLP
    # [128] = one Linear(1024, 128) at torch's default init (architectures/misc_models.py
    # l.63-82); the trunk's last_linear is replaced by Identity (factories/model_factory.py
    # l.14-21), so its output is the global average pool of the 7×7 map.
    c.model.backbone = "bn_inception"
    c.model.pretrained = "bninception"
    c.model.embedding_dim = 128
    c.model.pooling = "spoc"
    c.model.embedding_init = "torch_default"
    # freeze_trunk_batchnorm: True (config_general/default.yaml l.8): PML's trainer puts the
    # trunk's BatchNorm layers in eval mode (trainers/base_trainer.py maybe_freeze_trunk_batchnorm)
    # and nothing more: their weight/bias stay in the trunk optimizer's parameters and train.
    c.model.frozen_bn = True
    c.model.frozen_bn_trains_affine = True
    # config_transforms/default.yaml: Resize 256 → RandomResizedCrop 227 (scale 0.16–1, ratio
    # 0.75–1.33) → flip; eval Resize 256 → CenterCrop 227.
    c.dataset.transform = "mlrc"
    c.dataset.image_size = 227
    c.dataset.crop_to_bbox = False
    # config_optimizers/default.yaml: RMSprop lr 1e-6, weight_decay 1e-4, momentum 0.9 for trunk
    # and embedder; with_metric_loss_optimizer.yaml: the loss's parameters on an RMSprop of their
    # own (their lr: MLRC's best per loss). No schedule, no warm-up, no clipping (PB's trainer
    # sets none).
    c.optimizer.name = "rmsprop"
    c.optimizer.lr = 1e-6
    c.optimizer.weight_decay = 1e-4
    c.optimizer.momentum = 0.9
    c.optimizer.warmup_epochs = 0
    c.optimizer.decay_epochs = ()
    c.optimizer.decay_steps = ()
    c.optimizer.grad_clip_value = 0.0
    c.optimizer.clip_proxies = False
    c.optimizer.backbone_lr_multiplier = 1.0
    c.optimizer.head_lr_multiplier = 1.0
    # MLRC's numbers are per loss: ProxyNCA's for the methods built on it (HPL-NCA too).
    loss = methods.get(c.method).loss_name()
    if loss == "proxy_nca_loss":
        best = PROXY_NCA_BEST[column]
        c.loss.scale = best["scale"]
        c.optimizer.proxy_lr = best["proxy_lr"]
    elif loss == "proxy_anchor_loss":
        # (unconfirmed) MLRC did not run Proxy-Anchor: α 32, δ 0.1 are the method's own; the
        # proxies take the rate MLRC found best for ProxyNCA's proxies (same optimizer, same
        # kind of parameter).
        c.optimizer.proxy_lr = PROXY_NCA_BEST[column]["proxy_lr"]
    elif c.optimizer.get("proxy_lr") is None:
        c.optimizer.proxy_lr = 1e-6  # with_metric_loss_optimizer.yaml l.3
    # config_general/default.yaml: batch 32, MPerClassSampler m=4 (config_loss_and_miners/
    # default.yaml l.6-8) → 8 classes × 4; iterations_per_epoch 100, num_epochs_train 1000,
    # check_untrained_accuracy True. (PB also ships with_classification_based_loss.yaml, m=1;
    # whether MLRC's classification-loss runs used it is not recorded: 8 × 4 here for all.)
    c.batch_size = 32
    c.sampler = "pk"
    c.classes_per_batch, c.samples_per_class = 8, 4
    c.steps_per_epoch = 100
    c.num_epochs = 1000
    c.num_steps = 0
    c.eval_at_start = True
    c.eval_every_epochs = every
    c.early_stopping_patience_epochs = patience
    # config_eval/default.yaml: primary_metric mean_average_precision_at_r on the val split.
    c.best_metric = "map@r"
    c.keep_checkpoints = 1  # the best is kept besides


def mlrc_config(dataset: str, column: str, arg: str | None, coarse_groups: int) -> ml_collections.ConfigDict:
    """A ``configs/mlrc/*.py`` config: ``dataset``'s base config, ``method`` from ``arg`` (default
    ``hpl_pa``), the protocol (``apply_protocol``), and HPL's number of coarse groups (our guess,
    as the data set's own config: HPL's paper ablates it, its code is not public)."""
    from hdml_jax.config import base_config, parse_arg

    args = parse_arg(arg)
    c = base_config(dataset, args.pop("method", "hpl_pa"))
    apply_protocol(c, column)
    c.loss.num_coarse_groups = (coarse_groups,)
    return c


# ----------------------------------------------------------------------------- folds and test


def fold_workdir(workdir, fold: int):
    return workdir / f"fold{fold}"


def folds_to_run(config: ml_collections.ConfigDict) -> list[int]:
    num_folds, fold = int(config.mlrc.num_folds), int(config.mlrc.fold)
    return list(range(num_folds)) if fold < 0 else [fold]


def run(
    config: ml_collections.ConfigDict, workdir, overridden: tuple[str, ...] = (), dataset=None
) -> dict[str, Any] | None:
    """Train the configured folds (each resumable in ``<workdir>/fold<f>``), then test if all are done.

    ``dataset``: a ``MetricDataset`` to split instead of the one the config names. Returns the
    results (``report``'s) once every fold is complete, else None (other folds run elsewhere:
    ``python -m hdml_jax.mlrc_report`` tests when they are).
    """
    from hdml_jax import storage
    from hdml_jax.config_checks import validate
    from hdml_jax.data import folds
    from hdml_jax.training import train

    validate(config, overridden)  # before the data are read (each fold validates again)
    workdir = storage.as_path(workdir)
    base = train.load_data(config) if dataset is None else dataset
    for fold in folds_to_run(config):
        print(f"MLRC fold {fold} of {config.mlrc.num_folds}: {fold_workdir(workdir, fold)}", file=sys.stderr)
        data = folds.fold_dataset(base, fold, int(config.mlrc.num_folds))
        train.train_and_evaluate(config, fold_workdir(workdir, fold), dataset=data, overridden=overridden)
    missing = incomplete_folds(workdir, int(config.mlrc.num_folds))
    if missing:
        print(
            f"folds {', '.join(map(str, missing))} are not finished; once they are, run "
            f"python -m hdml_jax.mlrc_report --workdir {storage.display(workdir)}",
            file=sys.stderr,
        )
        return None
    return report(workdir, dataset=base)


def incomplete_folds(workdir, num_folds: int) -> list[int]:
    """The folds whose workdir has no ``final_metrics.json`` (the trainer writes it last)."""
    return [f for f in range(num_folds) if not (fold_workdir(workdir, f) / "final_metrics.json").exists()]


def scores(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MAP@R, P@1, R-Precision of self-retrieval (query excluded), as percentages."""
    from hdml_jax.evaluation import metrics

    result = metrics.retrieval_metrics(embeddings, labels, ks=(1,))
    return {name: 100.0 * result[name] for name in METRICS}


def concatenated(per_model: list[np.ndarray]) -> np.ndarray:
    """``L2(concat_f L2(e_f))``: powerful-benchmarker's ``ConcatenateEmbeddings``."""

    def normalized(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return normalized(np.concatenate([normalized(e) for e in per_model], axis=1)).astype(np.float32)


def summarize(per_model: list[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Separated (mean, std and each model's) and concatenated metrics of fixed test embeddings."""
    each = [scores(e, labels) for e in per_model]
    separated = {
        name: {
            "mean": float(np.mean([s[name] for s in each])),
            "std": float(np.std([s[name] for s in each], ddof=1)) if len(each) > 1 else 0.0,
            "per_fold": [s[name] for s in each],
        }
        for name in METRICS
    }
    return {
        "concatenated": scores(concatenated(per_model), labels),
        "separated": separated,
        "dims": {"separated": int(per_model[0].shape[1]), "concatenated": int(sum(e.shape[1] for e in per_model))},
        "num_test_images": len(labels),
        "num_test_classes": len(np.unique(labels)),
    }


def table(results: dict[str, Any]) -> str:
    """The paper's layout: one row per evaluation mode, MAP@R / P@1 / R-Precision."""
    lines = [f"{'':<22}{'MAP@R':>8}{'P@1':>8}{'R-Prec':>8}"]
    concat, sep, dims = results["concatenated"], results["separated"], results["dims"]
    rows = [
        (f"concatenated ({dims['concatenated']}-d)", [concat[m] for m in METRICS]),
        (f"separated ({dims['separated']}-d)", [sep[m]["mean"] for m in METRICS]),
        ("  ± std over folds", [sep[m]["std"] for m in METRICS]),
    ]
    lines += [f"{label:<22}" + "".join(f"{v:>8.2f}" for v in values) for label, values in rows]
    return "\n".join(lines)


def report(workdir, dataset=None) -> dict[str, Any]:
    """Embed the test half with every fold's best checkpoint; write and print the results.

    ``dataset``: the data set the folds were made of (default: the one fold 0's config names).
    Raises ``hdml_jax.errors.UserError`` subclasses for missing or unfinished folds.
    """
    from hdml_jax import storage
    from hdml_jax.data import folds
    from hdml_jax.evaluation import evaluate
    from hdml_jax.inference import embedder as inference
    from hdml_jax.inference.trained_run import read_config
    from hdml_jax.training import run as training_run
    from hdml_jax.training import setup, train
    from hdml_jax.workdir import atomic_write_text

    workdir = storage.as_path(workdir)
    if not (workdir / "fold0" / "config.json").exists():
        raise IncompleteProtocolError(
            f"{storage.display(workdir)} holds no MLRC fold (fold0/config.json); train first: "
            "python -m hdml_jax.main --config configs/mlrc/<dataset>.py --workdir "
            f"{storage.display(workdir)}"
        )
    config = read_config(fold_workdir(workdir, 0))
    num_folds = int(config.mlrc.num_folds)
    missing = incomplete_folds(workdir, num_folds)
    if missing:
        raise IncompleteProtocolError(
            f"folds {', '.join(map(str, missing))} of {storage.display(workdir)} are not finished "
            f"(no final_metrics.json); run them (--config.mlrc.fold=F, same --workdir), then report."
        )
    base = train.load_data(config) if dataset is None else dataset
    test = folds.test_half(base, num_folds).test
    per_model, checkpoints_used = [], []
    for fold in range(num_folds):
        try:
            embedder = inference.load_embedder(fold_workdir(workdir, fold), verbose=False)
        except UserError as error:
            raise IncompleteProtocolError(f"fold {fold}: {error}") from None
        batches = training_run.stoppable(setup.make_eval_batches(embedder.config, test))
        embeddings = evaluate.embed_batches(batches, embedder.embed_global, embedder.batch_sharding, len(test))
        per_model.append(embeddings)
        checkpoints_used.append({"fold": fold, "step": embedder.step, "checkpoint": embedder.checkpoint_id})
        print(f"fold {fold}: test embedded with step {embedder.step}", file=sys.stderr)
    results = {
        "dataset": config.dataset.name,
        "method": config.method,
        **summarize(per_model, test.labels),
        "checkpoints": checkpoints_used,
    }
    atomic_write_text(workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(table(results))
    return results


__all__ = ["apply_protocol", "concatenated", "report", "run", "summarize", "table"]
