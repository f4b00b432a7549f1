"""Nothing is lost when the user interrupts or errs: signals, damaged checkpoints, full disks,
locks, reruns, retention, stub workdirs. The expensive runs share one finished reference run."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdml_jax import interrupts, workdir
from hdml_jax.errors import ConfigError, UserError
from hdml_jax.training import checkpoints, reporting, setup, train
from hdml_jax.training import run as training_run
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# Saves at 4, 8 (with the evaluation of epoch 2), 12 and 16 (then the final evaluation).
SETTINGS = {"checkpoint_every_steps": 4, "keep_checkpoints": 2}


def config(**overrides):
    return tiny_config("proxy_anchor", **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """An uninterrupted run: the reference every other run must end identical to."""
    path = tmp_path_factory.mktemp("finished")
    final = train.train_and_evaluate(config(), path, dataset=dataset)
    return path, final


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def evaluation_records(path: Path) -> list[dict]:
    return [r for r in workdir.read_log(path / "metrics.jsonl") if r["kind"] == "eval"]


def signal_during_evaluation(monkeypatch, which: int) -> None:
    """Send SIGINT to this process when the ``which``-th evaluation (1-based) starts."""
    calls = []
    original = training_run.make_eval_batches

    def make_eval_batches(config, split):
        calls.append(split)
        if len(calls) == which:
            os.kill(os.getpid(), signal.SIGINT)
        return original(config, split)

    monkeypatch.setattr(training_run, "make_eval_batches", make_eval_batches)


def flip_a_bit(checkpoint: Path) -> None:
    """Damage that orbax cannot see: one bit of the largest array file (only the fingerprint can)."""
    files = sorted(glob.glob(str(checkpoint / "state" / "**" / "d" / "*"), recursive=True), key=os.path.getsize)
    data = bytearray(Path(files[-1]).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(files[-1]).write_bytes(bytes(data))


def test_interrupted_evaluations_and_a_damaged_checkpoint_end_like_an_uninterrupted_run(
    finished, dataset, tmp_path, monkeypatch
):
    """Ctrl-C during the evaluation of step 8 saves step 8 with that evaluation still due; the
    resumed run evaluates it first. Ctrl-C during the final evaluation leaves the trained step 16
    saved. That checkpoint is then damaged by one flipped bit: the rerun detects it, sets it
    aside, resumes from step 12 (on three loader threads), and ends identical to the uninterrupted
    run."""
    reference, reference_final = finished
    path = tmp_path / "run"
    signal_during_evaluation(monkeypatch, which=1)  # step 8
    with pytest.raises(train.TrainingInterruptedError) as stop:
        train.train_and_evaluate(config(), path, dataset=dataset)
    assert (stop.value.step, stop.value.signum) == (8, signal.SIGINT)
    assert interrupts.exit_code(stop.value.signum) == 130
    assert checkpoints.steps_in(path / "checkpoints") == [4, 8]

    signal_during_evaluation(monkeypatch, which=2)  # step 8 again (due), then the final one
    with pytest.raises(train.TrainingInterruptedError, match="during the final evaluation") as stop:
        train.train_and_evaluate(config(), path, dataset=dataset)
    assert stop.value.step == 16
    assert not (path / "final_metrics.json").exists()
    assert 16 in checkpoints.steps_in(path / "checkpoints")

    flip_a_bit(path / "checkpoints" / "16")
    monkeypatch.undo()
    # Resumed on 3 loader threads: the batches (train and eval) do not depend on the thread count.
    final = train.train_and_evaluate(config(**{"dataset.num_threads": 3}), path, dataset=dataset)
    assert checkpoints.steps_in(path / "damaged_checkpoints") == [16]
    np.testing.assert_array_equal(
        np.load(path / "test_embeddings.npy"), np.load(reference / "test_embeddings.npy")
    )
    assert final == reference_final
    strip = lambda records: [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]  # noqa: E731
    assert strip(workdir.read_log(path / "metrics.jsonl")) == strip(workdir.read_log(reference / "metrics.jsonl"))
    assert json.loads((path / "final_metrics.json").read_text()) == json.loads(
        (reference / "final_metrics.json").read_text()
    )


def test_kept_checkpoints_are_the_last_ones_and_the_best_one_seen(finished):
    path, _ = finished
    evaluations = evaluation_records(path)
    assert [e["step"] for e in evaluations] == [8, 16]
    best = max(evaluations, key=lambda e: e["recall@1"])  # the first of the best on ties
    assert set(checkpoints.steps_in(path / "checkpoints")) == {12, 16, best["step"]}
    summary = json.loads((path / "final_metrics.json").read_text())
    assert (summary["best"]["step"], summary["best_by"]) == (best["step"], "recall@1")


def test_retention_keeps_the_best_even_when_it_is_old():
    evaluations = [{"step": 10, "recall@1": 0.5}, {"step": 20, "recall@1": 0.9}, {"step": 30, "recall@1": 0.9},
                   {"step": 40, "recall@1": float("nan")}]
    assert checkpoints.steps_to_keep([10, 20, 30, 40, 50], evaluations, 2, "recall@1") == {20, 40, 50}
    assert checkpoints.steps_to_keep([10, 30, 40, 50], evaluations, 1, "recall@1") == {30, 50}
    assert checkpoints.steps_to_keep([50], [], 3, "recall@1") == {50}


def test_rerunning_a_finished_run_changes_nothing_and_eval_only_records_nothing(finished, dataset, tmp_path, capsys):
    path = copy_of(finished[0], tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != ".lock"}
    again = train.train_and_evaluate(config(), path, dataset=dataset)
    assert "holds a complete run" in capsys.readouterr().err
    assert again["recall@1"] == finished[1]["recall@1"]
    evaluated = train.train_and_evaluate(config(eval_only=True), path, dataset=dataset)
    # The same compiled evaluation of the bit-identical restored step-16 state: the same metrics.
    assert evaluated == finished[1]
    after = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != ".lock"}
    for name in ("metrics.jsonl", "config.json"):
        assert after[name] == before[name], name
    assert json.loads(after["config.json"])["eval_only"] is False
    assert sorted(after) == sorted(before)  # no second TensorBoard events file either


def test_a_save_cut_short_by_a_hard_kill_is_ignored_and_cleaned_up(finished, dataset, tmp_path):
    """What a SIGKILL in the middle of a save leaves: orbax's temporary folder, half written, and
    no final_metrics.json. The rerun restores the last complete checkpoint, removes the folder
    and finishes with the reference's numbers."""
    path = copy_of(finished[0], tmp_path)
    (path / "final_metrics.json").unlink()
    partial = path / "checkpoints" / "20.orbax-checkpoint-tmp"
    shutil.copytree(path / "checkpoints" / "16", partial)
    for file in sorted(partial.rglob("*"), key=lambda f: str(f))[::2]:
        if file.is_file():
            os.truncate(file, file.stat().st_size // 2)
    final = train.train_and_evaluate(config(), path, dataset=dataset)
    assert final == finished[1]
    assert not partial.exists()
    assert checkpoints.steps_in(path / "checkpoints") == checkpoints.steps_in(finished[0] / "checkpoints")


def test_divergence_messages_name_only_checkpoints_that_exist(tmp_path):
    manager = checkpoints.manager(tmp_path / "checkpoints")
    assert training_run._last_good(manager) == "; no checkpoint had been saved yet"
    manager.close()


def test_a_second_run_on_a_busy_workdir_is_refused(dataset, tmp_path):
    with workdir.WorkdirLock(tmp_path):
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(config(), tmp_path, dataset=dataset)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()


def test_a_run_that_fails_or_stops_before_its_first_step_leaves_no_workdir(dataset, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train.train_and_evaluate(config(eval_only=True), tmp_path / "a" / "b", dataset=dataset)
    with pytest.raises(UserError, match=r"model\.pretrained"):
        train.train_and_evaluate(config(**{"model.pretrained": str(tmp_path / "none")}), tmp_path / "c", dataset=dataset)
    monkeypatch.setattr(train.optim, "total_steps", lambda *a: os.kill(os.getpid(), signal.SIGINT) or 16)
    with pytest.raises(train.TrainingInterruptedError, match="during start-up") as stop:
        train.train_and_evaluate(config(), tmp_path / "d", dataset=dataset)
    assert stop.value.step is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_during_a_save_names_the_intact_checkpoint(dataset, tmp_path, monkeypatch):
    original, calls = checkpoints.save, []

    def save(manager, state, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # as tensorstore reports it: a ValueError around the OS error
            raise ValueError("RESOURCE_EXHAUSTED: Failed writing") from OSError(errno.ENOSPC, "No space left on device")
        return original(manager, state, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save", save)
    with pytest.raises(workdir.StorageFullError, match=r"step 8 .*checkpoint \(step 4\) is intact") as error:
        train.train_and_evaluate(config(), tmp_path, dataset=dataset)
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert checkpoints.steps_in(tmp_path / "checkpoints") == [4]


def test_a_full_disk_while_logging_is_one_error(tmp_path):
    reporter = reporting.Reporter(tmp_path, 10, 4)

    class FullFile:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    reporter._jsonl, reporter._tb = FullFile(), None
    with pytest.raises(workdir.StorageFullError, match=r"metrics\.jsonl"):
        reporter.train(1, 0.1, {"loss": 1.0})
    reporter.close()


def test_resume_drops_log_records_the_checkpoint_does_not_know(tmp_path):
    records = [
        {"kind": "train", "step": 4}, {"kind": "eval", "step": 8}, {"kind": "train", "step": 8},
        {"kind": "eval", "step": 12}, {"kind": "train", "step": 12},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    setup._validate_resume_log(tmp_path, 12, [{"step": 8}])  # the evaluation of 12 was cut short
    assert workdir.read_log(tmp_path / "metrics.jsonl") == [records[0], records[1], records[2], records[4]]


def test_is_disk_full_sees_through_wrapped_errors():
    inner = OSError(errno.EDQUOT, "Disk quota exceeded")
    try:
        try:
            raise inner
        except OSError as error:
            raise RuntimeError("save failed") from error
    except RuntimeError as outer:
        assert workdir.is_disk_full(outer)
    assert workdir.is_disk_full(ValueError("Failed to write: No space left on device [os_error_code='28']"))
    assert not workdir.is_disk_full(ValueError("shape mismatch"))


def test_config_mistakes_are_errors():
    c = config()
    with pytest.raises(ConfigError, match=r"model\.descriptors has no effect with method proxy_anchor"):
        train.validate(c, overridden=("model.descriptors",))
    train.validate(c, overridden=("loss.alpha", "optimizer.lr"))  # fields the method uses
    from hdml_jax.config import parse_arg

    with pytest.raises(ConfigError, match="unknown option 'methd'"):
        parse_arg("methd=hpl_pa")


SECOND_SIGNAL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from hdml_jax import interrupts
interrupts.install()
os.kill(os.getpid(), signal.SIGINT)
print("first", interrupts.received(), flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still here", flush=True)
"""


def test_a_second_ctrl_c_exits_at_once():
    result = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL.format(root=str(ROOT))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130
    assert result.stdout.split() == ["first", str(int(signal.SIGINT))]
    assert "again: exiting at once" in result.stderr and "Traceback" not in result.stderr


CLI_ERRORS = [
    (["--config.batchsize=64"], 'Did you mean "batch_size"'),
    (["--config", "configs/cub.py:methd=hpl_pa"], "unknown option 'methd'"),
    (["--config.model.descriptors=XYZ"], "model.descriptors has no effect with method hpl_pa"),
    (["--config.batch_size=abc"], "flag --config.batch_size=abc"),
    (["--config", "configs/nope.py"], "config file configs/nope.py not found"),
    (["--config.eval_only=True"], "holds no checkpoint"),
    (["--config", "configs/custom.py"], "dataset.path is empty: set --config.dataset.path="),
    (["--config", "configs/custom.py", "--config.dataset.path=/nonexistent/items.csv"], "no such CSV file"),
]


def test_cli_mistakes_end_in_one_line_and_help_exits_0(tmp_path):
    """One interpreter parses every command line (main.parse_flags and main.main as the CLI runs them)."""
    script = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from absl import flags
from hdml_jax import main
results = []
for args in {[a for a, _ in CLI_ERRORS]!r}:
    flags.FLAGS.unparse_flags()
    try:
        sys.argv = ["hdml_jax.main", *args, "--workdir", {str(tmp_path / "w")!r}]  # config_flags reads it
        argv = main.parse_flags(sys.argv)
        main.main(argv)
        results.append((None, ""))
    except SystemExit as exit:
        results.append((exit.code, ""))
print(json.dumps(results))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    messages = [line for line in result.stderr.splitlines() if line.startswith(("config error:", "error:"))]
    assert [code for code, _ in codes] == [2] * len(CLI_ERRORS), result.stderr[-3000:]
    assert len(messages) == len(CLI_ERRORS), result.stderr[-3000:]
    for message, (_, expected) in zip(messages, CLI_ERRORS, strict=True):
        assert expected in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()
    help_run = subprocess.run([sys.executable, "-m", "hdml_jax.main", "--help"], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
    assert help_run.returncode == 0
    assert "configs/cub.py" in help_run.stdout and "hpl_pa" in help_run.stdout and "base_config" in help_run.stdout
