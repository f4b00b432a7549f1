"""TensorBoard's embedding projector files: config, tensor, metadata and sprite agree point by point."""

from __future__ import annotations

import types

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from PIL import Image

from hdml_jax.data.base import MetricDataset, Split
from hdml_jax.evaluation import projector, visualize
from hdml_jax.training import outputs

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)


def _mirrored_projector_config():
    """``ProjectorConfig`` built from tensorboard/plugins/projector/projector_config.proto
    (the same field names, numbers and types), for when tensorboard is not installed."""
    fields = {
        "SpriteMetadata": [
            ("image_path", 1, "STRING", "OPTIONAL"),
            ("single_image_dim", 2, "UINT32", "REPEATED"),
        ],
        "EmbeddingInfo": [
            ("tensor_name", 1, "STRING", "OPTIONAL"),
            ("metadata_path", 2, "STRING", "OPTIONAL"),
            ("bookmarks_path", 3, "STRING", "OPTIONAL"),
            ("tensor_shape", 4, "UINT32", "REPEATED"),
            ("sprite", 5, ".mirror.SpriteMetadata", "OPTIONAL"),
            ("tensor_path", 6, "STRING", "OPTIONAL"),
        ],
        "ProjectorConfig": [
            ("model_checkpoint_path", 1, "STRING", "OPTIONAL"),
            ("embeddings", 2, ".mirror.EmbeddingInfo", "REPEATED"),
            ("model_checkpoint_dir", 3, "STRING", "OPTIONAL"),
        ],
    }
    file = descriptor_pb2.FileDescriptorProto(
        name="mirror_projector_config.proto", package="mirror", syntax="proto3"
    )
    for message_name, message_fields in fields.items():
        message = file.message_type.add(name=message_name)
        for name, number, kind, label in message_fields:
            field = message.field.add(
                name=name, number=number, label=getattr(descriptor_pb2.FieldDescriptorProto, f"LABEL_{label}")
            )
            if kind.startswith("."):
                field.type, field.type_name = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, kind
            else:
                field.type = getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{kind}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mirror.ProjectorConfig"))


def _config_classes():
    classes = [pytest.param(_mirrored_projector_config(), id="mirrored-proto")]
    try:
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    except ImportError:
        classes.append(
            pytest.param(None, id="tensorboard-proto", marks=pytest.mark.skip("tensorboard not installed"))
        )
    else:
        classes.append(pytest.param(ProjectorConfig, id="tensorboard-proto"))
    return classes


def _solid(k: int, shape=(20, 12)) -> np.ndarray:
    """A solid image of colour ``k`` (tall, so its thumbnail has transparent side margins)."""
    return np.broadcast_to(COLOURS[k % len(COLOURS)], (*shape, 3)).copy()


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(3)
    n = 50
    embeddings = rng.normal(size=(n, 7)).astype(np.float32)
    labels, coarse = np.arange(n) % 9, np.arange(n) % 4
    calls = []

    def image(i: int) -> np.ndarray:
        calls.append(i)
        return _solid(i)

    chosen = projector.write_projector(
        tmp_path, embeddings, labels, coarse, image, max_points=30, seed=5, thumbnail=16
    )
    return types.SimpleNamespace(
        dir=tmp_path, embeddings=embeddings, labels=labels, coarse=coarse, chosen=chosen, calls=calls
    )


@pytest.mark.parametrize("config_class", _config_classes())
def test_config_parses_as_a_projector_config_with_paths_inside_the_logdir(written, config_class):
    config = text_format.Parse((written.dir / "projector_config.pbtxt").read_text(), config_class())
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "test_embeddings"
    assert embedding.tensor_path == "projector/test_embeddings.tsv"
    assert embedding.metadata_path == "projector/metadata.tsv"
    assert embedding.sprite.image_path == "projector/sprite.png"
    assert list(embedding.sprite.single_image_dim) == [16, 16]
    for path in (embedding.tensor_path, embedding.metadata_path, embedding.sprite.image_path):
        # The plugin joins them to the config file's folder and refuses anything outside it.
        resolved = (written.dir / path).resolve()
        assert resolved.is_file() and resolved.is_relative_to(written.dir.resolve())


def test_tensor_and_metadata_rows_are_the_sampled_points(written):
    assert len(written.chosen) == 30 and np.all(np.diff(written.chosen) > 0)
    tensor = np.loadtxt(written.dir / "projector" / "test_embeddings.tsv", delimiter="\t", dtype=np.float32)
    np.testing.assert_array_equal(tensor, written.embeddings[written.chosen])  # float32-exact
    header, *rows = (written.dir / "projector" / "metadata.tsv").read_text().splitlines()
    assert header == "label\tcoarse_label"
    expected = [f"{written.labels[i]}\t{written.coarse[i]}" for i in written.chosen]
    assert rows == expected
    assert written.calls == written.chosen.tolist()  # an image read per sampled point, in order


def test_sprite_cell_k_holds_the_image_of_point_k(written):
    sprite = np.asarray(Image.open(written.dir / "projector" / "sprite.png"))
    side, cell = projector.sprite_layout(30, 16)
    assert (side, cell) == (6, 16) and sprite.shape == (96, 96, 4)
    for k in (0, 7, 29):
        row, column = divmod(k, side)
        pixels = sprite[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]
        centre = pixels[cell // 2, cell // 2]
        assert centre.tolist() == [*COLOURS[written.chosen[k] % len(COLOURS)].tolist(), 255], k
        # A 20×12 image in a 16-pixel cell: 16×10 (rounded), 3 transparent columns either side.
        assert pixels[:, 0, 3].max() == 0 and pixels[:, -1, 3].max() == 0
        assert pixels[:, 3:13, 3].min() == 255
    assert sprite[5 * cell :, 0:cell, 3].max() == 0  # cell 30 and later: empty


def test_sample_is_deterministic_and_bounded():
    a, b = projector.sample_indices(1000, 100, seed=1), projector.sample_indices(1000, 100, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, projector.sample_indices(1000, 100, seed=2))
    np.testing.assert_array_equal(projector.sample_indices(40, 100, seed=1), np.arange(40))


def test_one_column_of_metadata_has_no_header_and_no_images_no_sprite(tmp_path):
    embeddings = np.eye(4, dtype=np.float32)
    (tmp_path / "projector").mkdir()
    (tmp_path / "projector" / "sprite.png").write_bytes(b"stale")
    projector.write_projector(tmp_path, embeddings, np.array([3, 1, 4, 1]), None, None)
    assert (tmp_path / "projector" / "metadata.tsv").read_text() == "3\n1\n4\n1\n"
    assert not (tmp_path / "projector" / "sprite.png").exists()
    assert "sprite" not in (tmp_path / "projector_config.pbtxt").read_text()


def test_large_samples_shrink_the_thumbnails_to_fit_the_sprite_limit():
    side, cell = projector.sprite_layout(100_000, 32)
    assert side == 317 and side * cell <= projector.MAX_SPRITE_PX and cell == 25
    assert projector.sprite_layout(2000, 32) == (45, 32)


def test_write_outputs_writes_the_projector(tmp_path, monkeypatch):
    n = 12
    source = [{"image": _solid(i, (8, 8)), "label": i % 3} for i in range(n)]
    test = Split(source, np.arange(n) % 3, np.arange(n) % 2, name="tiny/test")
    dataset = MetricDataset("tiny", train=test, test=test)
    embeddings = {"test": np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)}
    config = types.SimpleNamespace(
        batch_size=4, best_metric="recall@1", pictures=True, seed=0, tsne_max_points=10
    )

    def fake_picture(path, *args, **kwargs):
        path.write_bytes(b"png")

    monkeypatch.setattr(visualize, "plot_tsne", fake_picture)
    monkeypatch.setattr(visualize, "plot_curves", fake_picture)
    monkeypatch.setattr(outputs, "write_retrieval_picture", fake_picture)
    outputs.write_outputs(tmp_path, config, dataset, {"recall@1": 0.5}, embeddings, 8, [])
    assert (tmp_path / "projector_config.pbtxt").is_file()
    tensor = np.loadtxt(tmp_path / "projector" / "test_embeddings.tsv", delimiter="\t", dtype=np.float32)
    np.testing.assert_array_equal(tensor, embeddings["test"])
    sprite = Image.open(tmp_path / "projector" / "sprite.png")
    assert sprite.size == (4 * 32, 4 * 32)
    config.pictures = False
    outputs.write_outputs(tmp_path, config, dataset, {"recall@1": 0.5}, embeddings, 8, [])
    assert not (tmp_path / "projector" / "sprite.png").exists()
    assert (tmp_path / "projector" / "metadata.tsv").read_text().startswith("label\tcoarse_label\n")
