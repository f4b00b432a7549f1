"""Two processes on one machine (jax.distributed, gloo): the run completes and matches one process.

Each process feeds only its half of every global batch; checkpoints are written collectively
and the workdir outputs by process 0 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from hdml_jax.training import train
from tests.numerics import assert_close, rounding_atol
from tests.simulated_devices import xla_flags_with_devices
from tests.test_train import tiny_config, tiny_network_terms
from tests.tiny_data import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = str(free_port())
    # One device a process (no simulated count), the other XLA flags as here: the one-process run
    # below compiles under the same instruction set.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags_with_devices(None)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_check", port, str(pid), str(tmp_path / "two")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for pid in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        assert "recall@1" in out
    config = tiny_config("hpl_pa", log_every_steps=1)  # step 1's loss is the one before any update
    train.train_and_evaluate(config, tmp_path / "one", dataset=tiny_dataset())

    two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "final_metrics.json").read_text())
    assert two["step"] == one["step"] == 16

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return np.array([r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"])

    # Logs come from process 0 only: one record per log step, not two.
    two_losses, one_losses = losses("two"), losses("one")
    assert len(two_losses) == len(one_losses) == 16
    # Same batches, same steps: the two runs differ by the order of the data-parallel sums (the
    # BatchNorm statistics and the gradients of the two halves of each batch of 16, summed across
    # the processes). Every training step is one more stage of the chain (forward, backward, an
    # Adam update) whose fresh round-off adds in quadrature; the step passes the earlier
    # difference on unamplified: Adam scales each coordinate's step by its gradient's RMS, so a
    # gradient that cancels to round-off moves its coordinate by noise, but that coordinate is
    # one the loss barely depends on (its gradient is what cancelled). The step-t loss then
    # carries the round-off of t - 1 training steps and a forward pass (step 1: the forward
    # pass alone, before any update).
    step_terms, forward_terms = tiny_network_terms(16, backward=True), tiny_network_terms(16)
    for t, (a, b) in enumerate(zip(two_losses, one_losses, strict=True), start=1):
        terms = (t - 1) * step_terms + forward_terms
        assert_close(np.float32(a), np.float32(b), n_terms=terms, err_msg=f"step {t}")
    # The test embeddings after 16 steps: 16 training steps, then the evaluation's forward pass.
    two_embeddings = np.load(tmp_path / "two" / "test_embeddings.npy")
    one_embeddings = np.load(tmp_path / "one" / "test_embeddings.npy")
    embedding_terms = 16 * step_terms + tiny_network_terms()
    assert_close(two_embeddings, one_embeddings, n_terms=embedding_terms, scale=1.0)
    # Recall@1 moves only through queries whose best correct and best wrong reference lie closer
    # than the embeddings' difference can move a cosine: 2·√d·max|Δ| for two unit vectors each
    # off by max|Δ| (plus the cosines' own round-off), twice for the difference of two cosines.
    labels = np.load(tmp_path / "one" / "test_labels.npy")
    similarity = one_embeddings @ one_embeddings.T
    np.fill_diagonal(similarity, -np.inf)  # self-retrieval: a query is not its own reference
    same = labels[:, None] == labels[None, :]
    best_correct = np.max(np.where(same, similarity, -np.inf), axis=1)
    margin = best_correct - np.max(np.where(same, -np.inf, similarity), axis=1)
    dim, eps = one_embeddings.shape[1], float(np.finfo(np.float32).eps)
    moved = 2 * np.sqrt(dim) * float(np.abs(two_embeddings - one_embeddings).max())
    cosine_atol = moved + rounding_atol(1.0, dim, eps=eps)
    ambiguous = int(np.sum(np.abs(margin) <= 2 * cosine_atol))
    assert abs(two["recall@1"] - one["recall@1"]) <= ambiguous / len(labels) + 1e-12, (ambiguous, two, one)
