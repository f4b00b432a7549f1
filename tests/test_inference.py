"""Using a trained run: hdml_jax.inference.embedder and the embed / search / export command-line tools.

One tiny run is trained once for the module, on a CSV data set of generated images through
``python -m hdml_jax.main --config tests/tiny_custom_config.py`` (``configs/custom.py`` shrunk;
checkpoints at steps 4 and 8; step 8 is the final and only evaluated one, so the best). The tools run in-process through ``main([...])``; the
exported artifact is checked in a fresh Python that imports JAX and NumPy only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hdml_jax.data import custom
from hdml_jax.data.base import MetricDataset
from hdml_jax.inference import embed, export, search, trained_run
from hdml_jax.inference import embedder as inference
from tests.custom_data import tiny_csv_dataset
from tests.numerics import assert_best_within, assert_close, rounding_atol
from tests.test_train import tiny_network_terms

# Test-split images written as files: a few of each of the six classes (index → class index // 8).
CHOSEN = (0, 1, 2, 8, 9, 10, 16, 17, 24, 25, 32, 40)
RGBA_INDEX = 9  # saved with an alpha channel (dropped on loading, as transforms.as_rgb does)
DIM = 16  # the run's embedding size
F32 = float(np.finfo(np.float32).eps)


def assert_same_embeddings(actual: np.ndarray, desired: np.ndarray) -> None:
    """Unit embeddings of the same images by two programs (another batch shape or padding, an
    exported function): equal up to the round-off of the run's network (``tiny_network_terms``)."""
    assert_close(actual, desired, n_terms=tiny_network_terms(), scale=1.0)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, MetricDataset]:
    """``(root, dataset)``: a CSV data set of generated images (``tests.custom_data``: mixed
    query/gallery flags, a three-level taxonomy), trained on by the command a user runs,
    ``python -m hdml_jax.main --config ...custom...`` (HPL-PA on the taxonomy's levels, no flips),
    into ``root / 'run'``; ``dataset`` is that CSV loaded as the trainer loaded it."""
    root = tmp_path_factory.mktemp("inference")
    csv_path, _ = tiny_csv_dataset(root / "data", mixed_flags=True, taxonomy=True)
    cache = root / "cache"
    command = [
        sys.executable, "-m", "hdml_jax.main",
        # HPL-PA on the CSV's taxonomy (department → aisle → class), flips off.
        "--config", "tests/tiny_custom_config.py:method=hpl_pa",
        "--config.loss.coarse_from_labels=True", "--config.loss.level_weights=(1.0, 0.1, 0.1)",
        "--config.dataset.augment.horizontal_flip=False",
        f"--config.dataset.path={csv_path}", f"--config.dataset.data_dir={cache}",
        "--config.eval_every_epochs=2", "--config.checkpoint_every_steps=4",
        "--config.dataset.num_threads=2",  # loader threads, through the CLI
        "--workdir", str(root / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: recall@1" in result.stdout
    # The last validation class is all queries: 8 of the 35 queries have nothing to find.
    assert "note: 8 of the 35 evaluation queries have no other gallery image of their class" in result.stderr
    return root, custom.load_custom(csv_path, cache_dir=cache)


@pytest.fixture(scope="module")
def run_dir(workspace) -> Path:
    return workspace[0] / "run"


@pytest.fixture(scope="module")
def image_folder(workspace) -> Path:
    """``CHOSEN`` test images as PNGs in per-class subfolders (one RGBA), a grey image and a
    non-image file (ignored). Sorted by path, the PNGs come in ``CHOSEN`` order, the grey one last."""
    root, dataset = workspace
    folder = root / "images"
    for index in CHOSEN:
        image = dataset.test.source[index]["image"]
        path = folder / f"class_{int(dataset.test.labels[index])}" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if index == RGBA_INDEX:
            alpha = np.random.default_rng(0).integers(0, 256, image.shape[:2], dtype=np.uint8)
            Image.fromarray(np.dstack([image, alpha])).save(path)  # RGBA
        else:
            Image.fromarray(image).save(path)
    grey = dataset.test.source[3]["image"][:, :, 1]
    (folder / "zz_grey").mkdir()
    Image.fromarray(grey).save(folder / "zz_grey" / "grey.PNG")  # mode L
    (folder / "notes.txt").write_text("not an image")
    assert Image.open(folder / "zz_grey" / "grey.PNG").mode == "L"
    assert Image.open(folder / "class_1" / f"{RGBA_INDEX:02d}.png").mode == "RGBA"
    return folder


@pytest.fixture(scope="module")
def labelled_gallery(workspace, image_folder) -> Path:
    """``embed --csv`` of the ``CHOSEN`` images with their labels (paths relative to the CSV)."""
    root, dataset = workspace
    lines = ["path,label"] + [
        f"class_{int(dataset.test.labels[i])}/{i:02d}.png,class_{int(dataset.test.labels[i])}" for i in CHOSEN
    ]
    (image_folder / "list.csv").write_text("\n".join(lines) + "\n")
    output = root / "labelled.npz"
    assert embed.main(["--workdir", str(root / "run"), "--csv", str(image_folder / "list.csv"),
                       "--output", str(output), "--batch-size", "8"]) == 0  # fmt: skip
    return output


@pytest.fixture(scope="module")
def embedder(run_dir) -> inference.Embedder:
    return inference.load_embedder(run_dir)


def run_cli(capsys, main, *argv: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of an in-process ``main(argv)``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_embed_folder_equals_the_trainers_embeddings(workspace, image_folder, embedder, capsys, tmp_path):
    root, dataset = workspace
    output = tmp_path / "out" / "folder.npz"
    code, _, err = run_cli(capsys, embed.main, "--workdir", root / "run", "--images", image_folder,
                           "--output", output, "--batch-size", 8)  # fmt: skip
    assert code == 0, err
    assert "embedded 13/13 images" in err and "img/s" in err and "ETA" in err
    with np.load(output, allow_pickle=False) as npz:
        result = {key: npz[key] for key in npz.files}
    assert "labels" not in result
    assert int(result["step"]) == 8 and Path(str(result["workdir"])) == (root / "run").resolve()
    paths = [Path(p) for p in result["paths"]]
    assert [p.name for p in paths] == [f"{i:02d}.png" for i in CHOSEN] + ["grey.PNG"]
    assert all(p.is_absolute() for p in paths)
    embeddings = result["embeddings"]
    assert embeddings.dtype == np.float32 and embeddings.shape == (13, 16)
    trainer = np.load(root / "run" / "test_embeddings.npy")
    assert_same_embeddings(embeddings[:12], trainer[list(CHOSEN)])
    grey = dataset.test.source[3]["image"][:, :, 1]
    want = embedder.embed(embedder.preprocess(np.repeat(grey[:, :, None], 3, axis=2))[None], pad_to=8)
    assert_same_embeddings(embeddings[12], want[0])  # same padded shape, another row of the batch
    # Unit vectors: 1 to the round-off of two 16-term sums of squares (the normalisation's, this one's).
    assert_close(np.linalg.norm(embeddings, axis=1), np.ones(13, np.float32), n_terms=2 * DIM)


def test_embedder_defaults_to_the_best_checkpoint_and_pads_for_the_devices(embedder, workspace):
    root, dataset = workspace
    assert embedder.step == json.loads((root / "run" / "final_metrics.json").read_text())["best"]["step"] == 8
    images = np.stack([embedder.preprocess(dataset.test.source[i]["image"]) for i in range(5)])
    trainer = np.load(root / "run" / "test_embeddings.npy")
    assert_same_embeddings(embedder.embed(images, pad_to=8), trainer[:5])
    assert embedder.embed(images[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="preprocess"):
        embedder.embed(images.astype(np.float32))


def test_export_runs_with_jax_alone(run_dir, embedder, workspace, tmp_path):
    _, dataset = workspace
    assert export.main(["--workdir", str(run_dir), "--output", str(tmp_path / "symbolic")]) == 0
    exported, platforms, note = export.export_embedder(embedder, 4, ("cpu",))  # the library route
    export.write_export(
        tmp_path / "fixed", bytes(exported.serialize()), export.metadata(embedder, 4, platforms, note)
    )
    meta = json.loads((tmp_path / "symbolic" / "metadata.json").read_text())
    assert (meta["image_size"], meta["embedding_dim"], meta["batch_size"], meta["step"]) == (
        32,
        16,
        "symbolic",
        8,
    )
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and "note" not in meta
    assert meta["preprocessing"]["name"] == "Resize" and "32×32" in meta["preprocessing"]["description"]
    assert meta["workdir"] == str(run_dir.resolve()) and meta["jax_version"]
    # 255 × the float32 constant: two float32 roundings (≤ ε), then 6 decimals (5e-7, far inside).
    assert_close(meta["normalization"]["mean"], [123.675, 116.28, 103.53], n_terms=1, k=2.0, eps=F32)
    fixed = json.loads((tmp_path / "fixed" / "metadata.json").read_text())
    assert (fixed["batch_size"], fixed["input"]["shape"], fixed["platforms"]) == (4, [4, 32, 32, 3], ["cpu"])

    images = np.stack([embedder.preprocess(dataset.test.source[i]["image"]) for i in range(5)])
    np.save(tmp_path / "images.npy", images)
    script = """
import json, sys
import jax, numpy as np
images = np.load(sys.argv[1])
load = lambda d: jax.export.deserialize(bytearray(open(d + "/model.jax_export", "rb").read()))
symbolic, fixed = load(sys.argv[2]), load(sys.argv[3])
np.savez(sys.argv[4], three=np.asarray(symbolic.call(images[:3])), five=np.asarray(symbolic.call(images)))
print(json.dumps({"imported": sorted(m for m in sys.modules if m.split(".")[0] in ("hdml_jax", "flax")),
                  "fixed": [str(a.shape) for a in fixed.in_avals]}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images.npy"), str(tmp_path / "symbolic"),
         str(tmp_path / "fixed"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"imported": [], "fixed": ["(4, 32, 32, 3)"]}
    want = embedder.embed(images, pad_to=8)
    with np.load(tmp_path / "out.npz") as out:
        assert_same_embeddings(out["three"], want[:3])
        assert_same_embeddings(out["five"], want)


def test_search_prints_the_nearest_gallery_images_and_draws_them(
    run_dir, labelled_gallery, image_folder, capsys, tmp_path
):
    with np.load(labelled_gallery) as npz:
        gallery, paths, labels = npz["embeddings"], list(npz["paths"]), list(npz["labels"])
    queries = [image_folder / "class_0" / "02.png", image_folder / "class_1" / f"{RGBA_INDEX:02d}.png"]
    picture = tmp_path / "pictures" / "search.png"
    code, out, err = run_cli(capsys, search.main, "--workdir", run_dir, "--gallery", labelled_gallery,
                             "--query", queries[0], "--query", queries[1], "-k", 4, "--picture", picture)  # fmt: skip
    assert code == 0, err
    blocks = out.split("query ")[1:]
    assert len(blocks) == 2
    # The query is embedded again (another batch than the gallery's): its cosines to the gallery
    # carry √d × the embeddings' round-off (Σ|g_i| ≤ √d for a unit g), plus the product's own.
    embedding_atol = rounding_atol(1.0, tiny_network_terms(), eps=F32)
    similarity_atol = np.sqrt(DIM) * embedding_atol + rounding_atol(1.0, DIM, eps=F32)
    for block, query in zip(blocks, queries, strict=True):
        lines = block.strip().splitlines()
        assert lines[0].endswith(f": {query.resolve()}")
        rows = [line.split() for line in lines[2:]]
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
        self_index = paths.index(str(query.resolve()))
        similarity = gallery @ gallery[self_index]
        listed = np.array([paths.index(r[2]) for r in rows])
        assert len(set(listed)) == 4
        # The 4 nearest in order, up to round-off: a near-tie may list either image first.
        assert_best_within(listed, similarity, atol=similarity_atol)
        assert [r[3] for r in rows] == [labels[j] for j in listed]
        # Itself, at ~1: for unit vectors q·g = 1 - ‖q - g‖²/2, second order in the round-off.
        assert rows[0][2] == str(query.resolve()) and float(rows[0][1]) > 0.9999
        assert all(float(a[1]) >= float(b[1]) for a, b in itertools.pairwise(rows))
    assert picture.stat().st_size > 0 and Image.open(picture).format == "PNG"


def test_step_picks_that_checkpoint_and_search_keeps_to_the_gallerys(
    run_dir, image_folder, labelled_gallery, capsys, tmp_path
):
    early = tmp_path / "step4.npz"
    code, _, err = run_cli(capsys, embed.main, "--workdir", run_dir, "--csv", image_folder / "list.csv",
                           "--output", early, "--step", 4, "--batch-size", 8)  # fmt: skip
    assert code == 0, err
    with np.load(early) as a, np.load(labelled_gallery) as b:
        assert int(a["step"]) == 4 and a["checkpoint_id"] != b["checkpoint_id"]
        # Other weights: far beyond the round-off of one network's embeddings (assert_same_embeddings).
        assert np.abs(a["embeddings"] - b["embeddings"]).max() > 1e-3
    query = image_folder / "class_2" / "16.png"
    code, out, err = run_cli(
        capsys, search.main, "--workdir", run_dir, "--gallery", early, "--query", query, "-k", 1
    )
    assert code == 0, err
    assert str(query.resolve()) in out.splitlines()[2] and float(out.splitlines()[2].split()[1]) > 0.9999
    code, _, err = run_cli(
        capsys, search.main, "--workdir", run_dir, "--gallery", early, "--query", query, "--step", 8
    )
    assert code == 2 and "embedded with the checkpoint of step 4, not step 8" in err


def _npz_like(source: Path, target: Path, **changes) -> Path:
    with np.load(source) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    np.savez(target, **arrays)
    return target


def test_mistakes_end_in_one_line_and_leave_no_output(
    run_dir, image_folder, labelled_gallery, capsys, tmp_path
):
    output = tmp_path / "out.npz"
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((run_dir / "config.json").read_text())
    images = ["--images", image_folder, "--output", output]
    cases = [
        ((embed.main, "--workdir", tmp_path / "missing", *images), "workdir"),
        ((embed.main, "--workdir", tmp_path, *images), "has no config.json"),
        ((embed.main, "--workdir", no_checkpoint, *images), "holds no checkpoint. Train first"),
        ((embed.main, "--workdir", run_dir, *images, "--step", 5),
         "no checkpoint of step 5; the checkpoints on disk are steps 4, 8"),
        ((embed.main, "--workdir", run_dir, "--images", tmp_path / "missing", "--output", output), "is not a folder"),
        ((embed.main, "--workdir", run_dir, "--output", output), "one of the arguments --images --csv is required"),
        ((export.main, "--workdir", run_dir, "--output", tmp_path / "export", "--step", 3), "no checkpoint of step 3"),
        ((search.main, "--workdir", run_dir, "--gallery", _npz_like(labelled_gallery, tmp_path / "narrow.npz",
          embeddings=np.ones((12, 8), np.float32)), "--query", image_folder / "class_0" / "00.png"),
         "holds 8-d embeddings but the run"),
        ((search.main, "--workdir", run_dir, "--gallery", _npz_like(labelled_gallery, tmp_path / "other.npz",
          workdir=np.array(str(tmp_path / "other_run"))), "--query", image_folder / "class_0" / "00.png"),
         "was embedded by the run in"),
        ((search.main, "--workdir", run_dir, "--gallery", labelled_gallery, "--query", tmp_path / "nope.png",
          "--picture", tmp_path / "p.png"), "nope.png: no such image file"),
    ]  # fmt: skip
    for (main, *argv), message in cases:
        code, _, err = run_cli(capsys, main, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
        assert "Traceback" not in err
    assert not output.exists() and not (tmp_path / "export").exists() and not (tmp_path / "p.png").exists()
    assert not no_checkpoint.joinpath("checkpoints").exists()


def test_unreadable_image_is_named_and_nothing_is_written(run_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "out.npz"
    code, _, err = run_cli(capsys, embed.main, "--workdir", run_dir, "--images", folder, "--output", output,
                           "--batch-size", 8)  # fmt: skip
    assert code == 2 and f"error: {(folder / 'b.png').resolve()}: not a readable image" in err
    assert "Traceback" not in err and not output.exists() and os.listdir(tmp_path) == ["images"]


def test_ctrl_c_while_writing_exits_130_and_leaves_nothing(
    run_dir, image_folder, capsys, tmp_path, monkeypatch
):
    def interrupted_savez(handle, **arrays):
        handle.write(b"PK half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(embed.np, "savez", interrupted_savez)
    code, _, err = run_cli(capsys, embed.main, "--workdir", run_dir, "--images", image_folder,
                           "--output", tmp_path / "emb.npz", "--batch-size", 8)  # fmt: skip
    assert code == 130 and "interrupted; nothing was written" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_help_and_usage_errors(capsys):
    for main in (embed.main, search.main, export.main):
        code, out, _ = run_cli(capsys, main, "--help")
        assert code == 0 and "--workdir" in out
    code, _, err = run_cli(
        capsys, search.main, "--workdir", "x", "--gallery", "g.npz", "--query", "q", "-k", "0"
    )
    assert code == 2 and err.strip() == "error: -k must be >= 1, got 0."


def test_select_step_prefers_the_best_then_the_newest():
    assert trained_run.select_step([4, 8, 12], best=8) == (8, None)
    step, note = trained_run.select_step([8, 12], best=4)
    assert step == 12 and "best checkpoint (step 4) is no longer on disk; using the newest, step 12" in note
    step, note = trained_run.select_step([8, 12], best=None)
    assert step == 12 and "no evaluation" in note
    assert trained_run.select_step([4, 8], best=8, requested=4) == (4, None)
    with pytest.raises(trained_run.StepNotFoundError, match="steps 4, 8"):
        trained_run.select_step([4, 8], best=8, requested=6)


def test_best_step_reads_the_checkpoints_evaluations_and_final_metrics(tmp_path):
    evaluations = [{"step": 4, "recall@1": 0.5}, {"step": 8, "recall@1": 0.7}, {"step": 12, "recall@1": 0.7}]
    assert trained_run.best_step(tmp_path, evaluations, "recall@1") == 8  # a tie goes to the earlier step
    final = {"step": 16, "recall@1": 0.9, "best": {"step": 16, "recall@1": 0.9}, "best_by": "recall@1"}
    (tmp_path / "final_metrics.json").write_text(json.dumps(final))
    assert (
        trained_run.best_step(tmp_path, evaluations, "recall@1") == 16
    )  # the final evaluation is only there
    assert trained_run.best_step(tmp_path / "missing", [], "recall@1") is None


def test_picture_frames_are_neutral_where_the_query_label_is_unknown(tmp_path, monkeypatch):
    """Label-less gallery, or a query that is not a labelled gallery image: no green/red frames
    (``plot_retrieval`` draws a neutral frame when a label comparison gives None)."""
    from types import SimpleNamespace

    from hdml_jax.evaluation import visualize

    drawn = []

    def plot_retrieval(path, *args):
        drawn.append(args)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(visualize, "plot_retrieval", plot_retrieval)
    fake = SimpleNamespace(image_size=4, preprocess=lambda image: image)
    image = np.zeros((4, 4, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "g.png")
    paths = [str(tmp_path / "g.png"), str(tmp_path / "missing.png")]
    order = np.array([[0, 1]])
    for labels, query in (
        (None, paths[0]),
        (["a", "b"], str(tmp_path / "elsewhere.png")),
        (["a", "b"], paths[0]),
    ):
        gallery = {"paths": paths, "labels": labels}
        search.write_picture(tmp_path / "p.png", fake, [query], [image], gallery, order)
        _, query_labels, neighbours, neighbour_labels = drawn[-1]
        frames = [neighbour_labels[0][j] == query_labels[0] for j in range(2)]
        assert frames == ([True, False] if labels and query == paths[0] else [None, None])
        assert neighbours[0][1].shape == (4, 4, 3)  # an unreadable gallery file is drawn grey


def test_evaluate_scores_the_trained_run_on_a_csv_as_the_trainer_did(workspace, capsys, tmp_path):
    """``python -m hdml_jax.evaluate`` on the training CSV (mixed query/gallery flags, one class of
    queries only): the same metrics as the run's own final evaluation of that checkpoint, the
    note about the 8 unmatched queries, every mean and count in the JSON, written atomically."""
    from hdml_jax.inference import scoring

    root, dataset = workspace
    final = json.loads((root / "run" / "final_metrics.json").read_text())
    # The run trained HPL on the CSV's two levels above the classes, without flips.
    assert [len(np.unique(level)) for level in dataset.train.coarse_levels] == [4, 2]
    run_config = json.loads((root / "run" / "config.json").read_text())
    assert run_config["dataset"]["augment"]["horizontal_flip"] is False
    assert run_config["loss"]["coarse_from_labels"] is True
    output, picture = tmp_path / "scores" / "items.json", tmp_path / "pictures" / "retrieval.png"
    code, out, err = run_cli(capsys, scoring.main, "--workdir", root / "run", "--csv", root / "data" / "items.csv",
                             "--output", output, "--picture", picture, "--batch-size", 16)  # fmt: skip
    assert code == 0, err
    assert "note: 8 of the 35 evaluation queries have no other gallery image of their class" in err
    record = json.loads(output.read_text())
    assert record["step"] == final["step"] == 8
    assert (record["images"], record["queries"], record["unmatched_queries"], record["classes"]) == (
        48,
        35,
        8,
        6,
    )
    assert record["gallery"] == 27  # the 14 both-rows and 13 gallery-only rows of classes 0-4
    # Another batch shape than the trainer's: the embeddings agree to round-off, which can swap two
    # neighbours tied within it; one query's swap moves a mean over the 27 scored queries by ≤ 1/27.
    for name in (
        "recall@1",
        "recall@2",
        "precision@1",
        "map@r",
        "r_precision",
        "coarse_recall@1",
        "coarse2_recall@1",
    ):
        assert abs(record["metrics"][name] - final[name]) <= 1 / 27 + 1e-12, name
    assert "coarse3_recall@1" not in record["metrics"]  # two levels above the classes
    assert f"{100 * record['metrics']['recall@1']:6.2f}" in out
    assert picture.stat().st_size > 0
    assert not list(output.parent.glob(".*")) and not list(picture.parent.glob(".*"))  # no temporary left


def test_evaluate_an_image_folder_and_its_mistakes(workspace, capsys, tmp_path):
    from hdml_jax.inference import scoring

    root, dataset = workspace
    folder = tmp_path / "by class"
    for index in CHOSEN:
        image = dataset.test.source[index]["image"]
        aisle, dept = (int(level[index]) for level in dataset.test.coarse_levels)
        target = folder / f"dept {dept}" / f"aisle {aisle}" / f"class {dataset.test.labels[index]}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{index:02d}.png")
    code, _, err = run_cli(capsys, scoring.main, "--workdir", root / "run", "--images", folder, "--ks", 1, 3)
    assert code == 0, err
    written = root / "run" / "evaluations" / "by class-step8.json"
    record = json.loads(written.read_text())
    assert set(record["metrics"]) == {
        "recall@1", "recall@3", "precision@1", "r_precision", "map@r", "nmi", "coarse_recall@1", "coarse2_recall@1"
    }  # fmt: skip
    assert (record["images"], record["queries"], record["gallery"], record["classes"]) == (12, 12, 12, 6)
    assert record["unmatched_queries"] == 2  # classes 4 and 5: one image each (32, 40)
    lone = tmp_path / "lone"
    for index in (0, 8, 16):  # one image per class: nothing can be scored
        (lone / f"c{index}").mkdir(parents=True)
        Image.fromarray(dataset.test.source[index]["image"]).save(lone / f"c{index}" / "a.png")
    mixed = tmp_path / "mixed depths"
    (mixed / "c0").mkdir(parents=True)
    Image.fromarray(dataset.test.source[0]["image"]).save(mixed / "c0" / "a.png")
    Image.fromarray(dataset.test.source[1]["image"]).save(mixed / "loose.png")
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("label,file\na,x.png\n")
    train_only = tmp_path / "train_only.csv"
    train_only.write_text("label,path,split\na,x.png,train\n")
    for argv, message in (
        (("--images", lone), "none of the 3 queries has another gallery image of its class"),
        (("--images", mixed), r"expected <class>/<image> or <category>/\.\.\./<class>/<image> throughout"),
        (("--csv", no_path), r"missing column\(s\) path"),
        (("--csv", train_only), "no row has split=validation .* pass --all-rows"),
        (("--images", folder, "--step", 5), "no checkpoint of step 5"),
        (("--images", folder, "--root", tmp_path), "--root and --all-rows go with --csv only"),
        (("--images", folder, "--picture", tmp_path / "p.jpg"), "name a .png file"),
    ):
        code, _, err = run_cli(capsys, scoring.main, "--workdir", root / "run", *argv)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
