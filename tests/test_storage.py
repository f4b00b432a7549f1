"""Remote workdirs and data dirs (``gs://``) through etils.epath, against a fake object store.

``tests/fake_remote.py`` puts a bucket-like store behind epath's ``gs://`` (whole-object uploads,
no append, no rename, no folders), so whatever works here uses only what a bucket offers. What it
cannot show: GCS itself (credentials, latency, its consistency) and orbax writing to it — in the
trainer run below orbax is handed the store's local folder instead (tensorstore has its own GCS
client, which no epath backend reaches). Local workdirs keep their tests elsewhere
(test_reliability.py, test_train.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from hdml_jax import storage, workdir
from hdml_jax.data import datasets, label_features
from hdml_jax.errors import ConfigError, UserError
from hdml_jax.training import checkpoints, reporting, train
from tests import fake_remote
from tests.test_train import tiny_config
from tests.tiny_data import tiny_dataset

RUN = "gs://bucket/run"


@pytest.fixture
def store(monkeypatch, tmp_path):
    """The fake gs://, in tmp_path/gcs; the current directory is tmp_path/cwd, where a mangled
    ``gs:/bucket/...`` would land."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake_remote.install(monkeypatch, tmp_path / "gcs")
    assert not list(cwd.iterdir()), "something wrote a local gs:/ folder"


def read_events(path: Path) -> list:
    """The ``Event`` records of a TensorBoard events file (TFRecord framing: length, its CRC, data, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        records.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return records


def objects(store: fake_remote.ObjectStore, prefix: str = RUN) -> list[str]:
    root = store.local(prefix)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_remote_paths_are_told_apart_and_never_mangled():
    assert str(Path(RUN)) == "gs:/bucket/run"  # the hazard: pathlib makes it a local folder
    assert storage.is_remote(RUN) and storage.is_remote("s3://b/x") and storage.is_remote(epath.Path(RUN))
    for local in ("/tmp/run", "runs/x", "gs:/bucket/run", "~/run", "C:\\run"):
        assert not storage.is_remote(local), local
    remote = storage.as_path(RUN + "/")
    assert isinstance(remote, epath.Path) and str(remote) == RUN and str(remote / "checkpoints") == RUN + "/checkpoints"
    assert storage.as_path(remote) is remote
    assert type(storage.as_path("runs/x")) is type(Path("runs/x"))  # local: pathlib, as before
    assert str(storage.resolve(RUN)) == RUN == storage.display(RUN)
    assert storage.display("runs/x") == str(Path("runs/x").resolve())
    with pytest.raises(UserError, match="unsupported URL scheme"):
        storage.as_path("memory://bucket/run")


def test_small_files_are_uploaded_whole_and_a_failed_write_leaves_the_old_object(store):
    run = storage.as_path(RUN)
    workdir.atomic_write_text(run / "config.json", "{}\n")
    workdir.atomic_write(run / "test_embeddings.npy", lambda tmp: np.save(tmp, np.arange(3.0)))
    np.testing.assert_array_equal(np.load(io.BytesIO((run / "test_embeddings.npy").read_bytes())), np.arange(3.0))
    workdir.atomic_write_text(run / "config.json", '{"seed": 1}\n')
    assert (run / "config.json").read_text() == '{"seed": 1}\n'

    def fails_half_way(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        workdir.atomic_write(run / "config.json", fails_half_way)
    assert (run / "config.json").read_text() == '{"seed": 1}\n'
    assert store.uploads == {f"{RUN}/config.json": 2, f"{RUN}/test_embeddings.npy": 1}
    assert objects(store) == ["config.json", "test_embeddings.npy"]
    # A full local disk while staging an upload is still one StorageFullError, without a local
    # free-space figure for a bucket.
    with pytest.raises(workdir.StorageFullError, match=f"in {RUN}\\. Free some space") as full:
        with workdir.storage_errors("writing x", run):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "MiB free" not in str(full.value)


def test_the_log_is_truncated_on_resume_by_rewriting_the_object(store):
    path = storage.as_path(f"{RUN}/metrics.jsonl")
    records = [{"kind": "train", "step": 4}, {"kind": "eval", "step": 8}, {"kind": "train", "step": 8}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    store.uploads.clear()
    assert workdir.read_log(f"{RUN}/metrics.jsonl") == records  # a gs:// string, as the CLI gives it
    assert workdir.truncate_log(path, 4, set()) == 3
    assert workdir.read_log(path) == records[:1] and store.uploads == {str(path): 1}


def test_a_remote_workdir_is_not_locked_and_says_so(store, capsys):
    with workdir.WorkdirLock(RUN), workdir.WorkdirLock(RUN):  # nothing stops a second one
        pass
    err = capsys.readouterr().err
    assert err.count("no locks") == 2 and err.startswith(f"note: {RUN} is in object storage")
    assert not store.uploads


def test_the_logs_grow_locally_and_go_up_whole_at_each_sync(store):
    remote = storage.as_path(f"{RUN}/metrics.jsonl")
    remote.write_text(json.dumps({"kind": "train", "step": 2, "loss": 3.0}) + "\n")  # an earlier attempt's
    store.uploads.clear()
    reporter = reporting.Reporter(storage.as_path(RUN), 8, 4, purge_step=3)
    staging = reporter.staging
    assert staging is not None and staging.is_dir() and not storage.is_remote(staging)
    reporter.train(4, 1.0, {"loss": 2.0})
    reporter.eval(4, 1.0, {"recall@1": 0.5})
    assert len(workdir.read_log(remote)) == 1 and not store.uploads  # nothing uploaded between syncs
    reporter.sync()
    assert [r["step"] for r in workdir.read_log(remote)] == [2, 4, 4]
    events = [name for name in objects(store) if name.startswith("events.out.tfevents.")]
    assert len(events) == 1 and store.uploads[str(remote)] == 1
    # What was logged before the sync is in the uploaded file (tensorboardX's queue was drained).
    uploaded = read_events(store.local(f"{RUN}/{events[0]}"))
    assert {(4, "train/loss"), (4, "eval/recall_at_1")} <= {(e.step, v.tag) for e in uploaded for v in e.summary.value}
    reporter.sync()  # unchanged: no new upload
    assert sum(store.uploads.values()) == 2
    reporter.train(6, 1.5, {"loss": 1.0})
    reporter.close()  # the last upload, and the staging folder is gone
    assert [r["step"] for r in workdir.read_log(remote)] == [2, 4, 4, 6] and not staging.exists()
    quiet = reporting.Reporter(storage.as_path(RUN), 8, 4, record=False)  # eval_only writes nothing
    quiet.train(8, 2.0, {"loss": 1.0})
    quiet.close()
    assert quiet.staging is None and store.uploads[str(remote)] == 2


def test_remote_checkpoints_count_only_when_committed_and_stubs_and_damage_are_handled(store):
    run = storage.as_path(RUN)
    for name in ("checkpoints/4/commit_success.txt", "checkpoints/4/state/a", "checkpoints/8/state/a",
                 "checkpoints/9.orbax-checkpoint-tmp-1/a"):
        (run / name).write_text("x")
    assert checkpoints.steps_in(RUN + "/checkpoints") == [4]  # 8: a save cut short (no commit file)
    manager = types.SimpleNamespace(directory=run / "checkpoints", reload=lambda: None)
    checkpoints.discard_partial_saves(manager)
    checkpoints._set_aside(manager, run, [4])  # damaged: copied over, then deleted
    assert objects(store) == ["checkpoints/8/state/a", "damaged_checkpoints/4/commit_success.txt",
                              "damaged_checkpoints/4/state/a"]
    # A run that stops before its first step removes the workdir it made, unless it holds results.
    assert workdir.first_missing_ancestor(RUN) is None
    stub = workdir.first_missing_ancestor("gs://bucket/new")
    assert str(stub) == "gs://bucket/new"
    (stub / "config.json").write_text("{}")
    workdir.remove_stub(stub, stub)
    assert not stub.exists()
    workdir.remove_stub(run, run)  # damaged_checkpoints/4 is no checkpoint, but checkpoints/8 is
    assert run.exists()


def test_a_data_dir_in_a_bucket_reaches_tfds_unmangled(store, monkeypatch):
    version = storage.as_path("gs://bucket/tfds/cub/1.0.0")
    (version / "cub-train.array_record-00000-of-00001").write_bytes(b"12345")
    (version / "dataset_info.json").write_text("{}")
    builder = types.SimpleNamespace(data_path=version)
    assert json.loads(label_features._shard_fingerprint(builder)) == [["cub-train.array_record-00000-of-00001", 5]]
    labels = {"label": np.arange(4)}
    monkeypatch.setattr(label_features, "_read_features", lambda *args: labels)
    assert label_features.read_label_features(builder, "train", ("label",))["label"].tolist() == [0, 1, 2, 3]
    assert store.uploads[f"{version}/{label_features.LABELS_CACHE}"] == 1  # the cache, uploaded whole
    monkeypatch.setattr(label_features, "_read_features", lambda *args: pytest.fail("the cache was not read"))
    assert label_features.read_label_features(builder, "train", ("label",))["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(datasets.DatasetNotFoundError, match="gs://bucket/tfds"):
        datasets.load_dataset("cub200", data_dir="gs://bucket/tfds")  # TFDS looked in the bucket
    custom = tiny_config("proxy_anchor")
    custom.dataset.name, custom.dataset.path = "custom", "gs://bucket/items.csv"
    with pytest.raises(ConfigError, match="local files"):
        train.load_data(custom)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading the config
def test_the_cli_passes_a_gs_workdir_through(monkeypatch, capsys):
    from absl import logging as absl_logging

    from hdml_jax import main

    received = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, path, **_: received.append(path) or {"recall@1": 0.5})
    verbosity = absl_logging.get_verbosity()
    try:
        main.parse_flags(["hdml_jax.main", f"--workdir={RUN}"])
        assert main.main(["hdml_jax.main"]) == 0
    finally:  # main() quiets absl and the flags are global: leave both as they were
        main.FLAGS.unparse_flags()
        absl_logging.set_verbosity(verbosity)
    assert received == [RUN] and f"results in {RUN};" in capsys.readouterr().out


# The default run: one uninterrupted run. The resume (the log continued from the bucket's copy, the
# checkpoint restored from gs://) adds a second run: exhaustive (test_reliability resumes locally,
# and the Reporter test above continues a log from the bucket).
@pytest.mark.parametrize("interrupted", [False, pytest.param(True, marks=pytest.mark.exhaustive)])
def test_a_run_on_a_gs_workdir_writes_everything_there_and_leaves_nothing_behind(
    interrupted, store, capsys, monkeypatch
):
    """The trainer end to end, every file but orbax's through the fake store (no append, no
    rename, no lock). Orbax gets the gs:// path; the test hands it the store's local folder, since
    tensorstore would reach the real GCS."""
    handed = []
    original = checkpoints.manager

    def manager(directory):
        handed.append(str(directory))
        return original(store.local(directory))

    monkeypatch.setattr(checkpoints, "manager", manager)
    staged = set(Path(tempfile.gettempdir()).glob("hdml_jax-*"))
    dataset = tiny_dataset()
    settings = {"num_epochs": 2, "eval_every_epochs": 1, "checkpoint_every_steps": 2}
    if interrupted:
        with pytest.raises(train.TrainingInterruptedError):
            train.train_and_evaluate(tiny_config("proxy_anchor", stop_after_steps=3, **settings), RUN, dataset=dataset)
    final = train.train_and_evaluate(tiny_config("proxy_anchor", **settings), RUN, dataset=dataset)
    err = capsys.readouterr().err
    attempts = 1 + interrupted
    assert handed == [f"{RUN}/checkpoints"] * attempts and err.count("no locks") == attempts
    assert (f"resumed from {RUN}/checkpoints/3 (step 3)" in err) == interrupted
    records = workdir.read_log(f"{RUN}/metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8)
    ]
    summary = json.loads(storage.as_path(f"{RUN}/final_metrics.json").read_text())
    # The float the run returned, written to JSON and read back through the store: the same bits.
    assert summary["step"] == 8 and summary["recall@1"] == final["recall@1"]
    names = objects(store)
    for name in ("config.json", "test_embeddings.npy", "test_labels.npy", "projector_config.pbtxt",
                 "projector/test_embeddings.tsv", "projector/metadata.tsv"):
        assert name in names, name
    # Every logged scalar is in the uploaded events files (one per sync: a closed file is whole).
    events = sorted(n for n in names if n.startswith("events.out.tfevents."))
    steps = {(event.step, value.tag) for n in events for event in read_events(store.local(f"{RUN}/{n}"))
             for value in event.summary.value}
    assert {(2, "train/loss"), (6, "train/loss"), (8, "train/loss"), (8, "eval/recall_at_1")} <= steps
    assert ".lock" not in names and {6, 8} <= set(checkpoints.steps_in(f"{RUN}/checkpoints"))
    assert set(Path(tempfile.gettempdir()).glob("hdml_jax-*")) == staged  # staging folders removed
    assert os.listdir(".") == []
