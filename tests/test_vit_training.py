"""A tiny Vision Transformer (patch 8, 2 blocks) trained with HIER (``method=hier_pa``: a head
into the Poincaré ball, Proxy-Anchor + HIER's LCA proxies) on the synthetic set through the real
command line: it learns, its evaluation ranks by the Poincaré distance, a run cut back to an
earlier checkpoint resumes to the same bits (stochastic depth's and HIER's draws included), and
the run exports with its geometry stated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hdml_jax.evaluation import metrics
from hdml_jax.inference import embedder as inference
from hdml_jax.inference import export

ROOT = Path(__file__).resolve().parents[1]

# configs/synthetic.py (48-px images) with a ViT-Ti of 2 blocks from scratch, its position
# embeddings made for the 6 × 6 patch grid, stochastic depth on; HIER with 64 LCAs; 30 steps
# (batch 64: 32 classes × 2), evaluated at the end.
TINY_VIT = [
    "--config", "configs/synthetic.py:method=hier_pa", "--config.loss.hier.num_lcas=64",
    "--config.model.backbone=vit", "--config.model.pooling=none",
    "--config.model.vit.size=tiny", "--config.model.vit.depth=2",
    "--config.model.vit.patch_size=8", "--config.model.vit.position_grid_size=48",
    "--config.model.vit.drop_path=0.1",  # its draws must resume too
    "--config.num_steps=30", "--config.eval_every_epochs=100",
    "--config.checkpoint_every_steps=15", "--config.pictures=False", "--config.nmi=False",
    "--config.log_every_steps=10",
]  # fmt: skip


def _main(workdir: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hdml_jax.main", *TINY_VIT, *extra, "--workdir", str(workdir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """``(straight, resumed)``: the 30 steps at once, and a copy of that workdir cut back to its
    step-15 checkpoint (as a run killed before step 30 leaves it), then resumed by the same
    command. (Stopping itself, by signal or ``stop_after_steps``, is test_train's and
    test_reliability's; what is the ViT's own here is that its stochastic depth resumes.)"""
    root = tmp_path_factory.mktemp("vit")
    straight, resumed = root / "straight", root / "resumed"
    _main(straight)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "30")
    for name in ("final_metrics.json", "test_embeddings.npy", "test_labels.npy"):
        (resumed / name).unlink()
    log = _main(resumed)
    progress = log.stdout + log.stderr
    assert "step 20/30" in progress and "step 10/30" not in progress, progress[-2000:]  # resumed at 15
    return straight, resumed


def test_tiny_vit_trains_with_hier_on_the_synthetic_set(runs):
    straight, _ = runs
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["kind"] == "eval"]
    trained = [r for r in records if r["kind"] == "train"]
    assert [e["step"] for e in evaluations] == [30] and [r["step"] for r in trained] == [10, 20, 30]
    config = json.loads((straight / "config.json").read_text())
    assert config["model"]["backbone"] == "vit" and config["model"]["vit"]["depth"] == 2
    assert all(np.isfinite(r["loss"]) and r["hier"] > 0 for r in trained)  # HIER's term takes part
    # What HIER trains falls (0.46 → 0.33 here, each a mean over 10 steps). The recall of so short
    # a run is no test (0.155 → 0.184 after 40 steps, 2 standard errors of 960 queries): whether
    # the ViT learns what it should is test_parity's (every step equal to a PyTorch loop of
    # HIER's code).
    assert trained[-1]["hier"] < 0.9 * trained[0]["hier"], [r["hier"] for r in trained]
    assert evaluations[-1]["recall@1"] > 0.1


def test_evaluation_ranks_the_balls_points_by_the_poincare_distance(runs):
    straight, _ = runs
    embeddings = np.load(straight / "test_embeddings.npy")
    labels = np.load(straight / "test_labels.npy")
    norms = np.linalg.norm(embeddings, axis=1)
    # Points of the ball, not unit rows. As in HIER's runs, every feature is longer than clip_r
    # 2.3 (a d-dimensional layer's output of LayerNormed features has norm ~√d), so every point
    # lies at the clipped radius tanh(√c · 2.3)/√c ≈ 1.965; its distances are then a monotone
    # function of the cosine, and the ranking checked here is the trainer's path, not a new order.
    np.testing.assert_allclose(norms, np.tanh(np.sqrt(0.1) * 2.3) / np.sqrt(0.1), rtol=1e-5)
    final = json.loads((straight / "final_metrics.json").read_text())
    poincare = metrics.retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8), distance="poincare", curvature=0.1)
    assert final["recall@1"] == poincare["recall@1"] and final["map@r"] == poincare["map@r"]


def test_interrupted_vit_run_resumes_to_the_same_bits(runs):
    straight, resumed = runs
    np.testing.assert_array_equal(
        np.load(resumed / "test_embeddings.npy"), np.load(straight / "test_embeddings.npy")
    )


def test_vit_run_exports_with_its_input_convention(runs, tmp_path):
    straight, _ = runs
    assert export.main(["--workdir", str(straight), "--output", str(tmp_path / "export")]) == 0
    meta = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert meta["normalization"]["backbone"] == "vit"
    assert meta["retrieval"] == {"distance": "poincare", "curvature": 0.1}
    assert meta["normalization"]["mean"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-4)
    embedder = inference.load_embedder(straight, verbose=False)
    assert embedder.model.backbone.preprocessing == "vit"
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    exported = jax.export.deserialize(bytearray((tmp_path / "export" / "model.jax_export").read_bytes()))
    # The same network traced twice: equal up to float32 round-off of points of norm < 1/√0.1
    # (ToPoincare's tanh and projection have slopes ≤ 1).
    np.testing.assert_allclose(np.asarray(exported.call(images)), embedder.embed(images), rtol=0, atol=1e-5)
