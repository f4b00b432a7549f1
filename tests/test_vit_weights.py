"""Named ViT weights (``hdml_jax.models.vit_weights``): each publisher's file format downloaded from a
local HTTP server, checked, converted and cached, the result equal to an independent PyTorch ViT
on the same state dict; and the offline message a user gets instead.

The weights are a ViT of width 32 and 2 blocks laid out as each publisher lays out its file (a
test size, ``SIZES["test"]``), so the files stay small while every name, wrapper and format is
the real one: DINO's plain ``torch.save`` state dict, DeiT's ``{"model": ...}`` with its
distillation token and the hash in its name, timm's ``model.safetensors`` with its classifier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hdml_jax.models import vit, vit_weights, weights
from hdml_jax.models.convert import load_pretrained
from hdml_jax.models.errors import WeightsMismatchError
from tests import test_weights
from tests.test_vit import assert_features_equal
from tests.torch_vit import TorchViT, randomized

ROOT = Path(__file__).resolve().parents[1]
server = test_weights.server  # the HTTP server on 127.0.0.1 (a fixture)
DIM, DEPTH, HEADS = 32, 2, 4


def _write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    """The safetensors layout by hand (8-byte header length, JSON header, raw little-endian data)."""
    header, offset, blobs = {}, 0, []
    for name, value in state.items():
        blob = np.ascontiguousarray(value, "<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _publish(name: str, tmp_path: Path) -> tuple[bytes, TorchViT]:
    """The file ``name``'s publisher would serve (a test-size network) and its PyTorch model."""
    entry = vit_weights.VIT_WEIGHTS[name]
    model = randomized(
        TorchViT(
            entry.patch_size,
            DIM,
            DEPTH,
            HEADS,
            224 // entry.patch_size,
            distilled=entry.distilled,
            pooling="cls+dist" if entry.pooling == "deit" else entry.pooling,  # evaluation's pooling
            position_interpolation=entry.position_interpolation,
        ),
        seed=7,
    )
    state = model.state_dict()
    path = tmp_path / "published"
    if name.startswith("deit"):  # DeiT: {"model": state dict with its two classifier heads}
        torch.save(
            {
                "model": {
                    **state,
                    "head.weight": torch.zeros(10, DIM),
                    "head_dist.weight": torch.zeros(10, DIM),
                }
            },
            path,
        )
    elif entry.filename.endswith(".safetensors"):  # timm's hub file keeps its ImageNet classifier
        arrays = {k: v.numpy() for k, v in state.items()}
        _write_safetensors(path, arrays | {"head.weight": np.zeros((10, DIM), np.float32)})
    else:
        torch.save(state, path)
    return path.read_bytes(), model


@pytest.fixture
def test_size(monkeypatch):
    monkeypatch.setitem(vit.SIZES, "test", (DIM, DEPTH, HEADS))


@pytest.mark.parametrize("name", ["vit_s16_dino", "deit_s16_distilled", "vit_s16_augreg"])
def test_named_vit_weights_are_downloaded_converted_cached_and_equal_pytorchs(
    name,
    server,
    tmp_path,
    monkeypatch,
    test_size,
):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path / "cache"))
    body, torch_model = _publish(name, tmp_path)
    entry = vit_weights.VIT_WEIGHTS[name]
    prefix = hashlib.sha256(body).hexdigest()[:8]
    served = f"/{prefix}-{entry.filename}" if entry.sha256_prefix else f"/files/{entry.filename}"
    sha = prefix if entry.sha256_prefix else None
    server.files[served] = body
    test_entry = dataclasses.replace(entry, url=server.url + served, size="test", sha256_prefix=sha)
    monkeypatch.setitem(vit_weights.VIT_WEIGHTS, name, test_entry)

    checkpoint = weights.resolve_pretrained(name, 50, backbone="vit")
    assert checkpoint.name == (f"{name}-{prefix}-flax" if sha else f"{name}-flax")
    assert weights.resolve_pretrained(name, 50, backbone="vit") == checkpoint
    assert server.requests == [served]  # downloaded once, then cached
    module = test_entry.module()
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    ours = np.asarray(module.apply(load_pretrained(checkpoint), jnp.asarray(images)))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert_features_equal(ours, theirs)
    if entry.pooling == "deit":  # training pools the class token alone
        trained = module.apply(load_pretrained(checkpoint), jnp.asarray(images), train=True)
        assert not np.allclose(np.asarray(trained), ours)


def test_weights_of_another_architecture_are_named(server, tmp_path, monkeypatch, test_size):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path / "cache"))
    body, _ = _publish("vit_s16_dino", tmp_path)  # no distillation token
    server.files["/deit.pth"] = body
    entry = dataclasses.replace(
        vit_weights.VIT_WEIGHTS["deit_s16_distilled"],
        url=server.url + "/deit.pth",
        size="test",
        sha256_prefix=None,
    )
    monkeypatch.setitem(vit_weights.VIT_WEIGHTS, "deit_s16_distilled", entry)
    with pytest.raises(WeightsMismatchError, match=r"dist_token missing"):
        weights.resolve_pretrained("deit_s16_distilled", 50, backbone="vit")
    assert not (tmp_path / "cache" / "deit_s16_distilled-flax").exists()


def test_vit_urls_and_conventions_are_the_publishers():
    table = vit_weights.VIT_WEIGHTS
    assert table["vit_s16_dino"].url == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    assert table["vit_b16_dino"].url.endswith("/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")
    assert weights.hash_prefix(table["deit_s16_distilled"].url) == table["deit_s16_distilled"].sha256_prefix
    assert table["vit_s16_augreg"].preprocessing == "vit_augreg"
    assert {name for name, w in table.items() if w.preprocessing == "vit"} == {
        "vit_s16_dino", "vit_s8_dino", "vit_b16_dino", "vit_b8_dino", "deit_s16_distilled",
    }  # fmt: skip


def test_offline_the_cli_names_the_url_the_cache_path_and_the_manual_route(tmp_path):
    """configs/cub.py:...,backbone=vit_s16_dino's weights on a synthetic run (no data set to
    download), the URL pointed at a closed port: one error message, exit 2, nothing cached."""
    url = f"http://127.0.0.1:{test_weights._closed_port()}/dino_deitsmall16_pretrain.pth"
    script = f"""
import dataclasses, sys
sys.path.insert(0, {str(ROOT)!r})
from hdml_jax.models import vit_weights
entry = vit_weights.VIT_WEIGHTS["vit_s16_dino"]
vit_weights.VIT_WEIGHTS["vit_s16_dino"] = dataclasses.replace(entry, url={url!r})
from hdml_jax import main
sys.argv = ["hdml_jax.main", "--config", "configs/synthetic.py:method=proxy_anchor",
            "--config.model.backbone=vit", "--config.model.pooling=none",
            "--config.model.pretrained=vit_s16_dino", "--workdir", {str(tmp_path / "run")!r}]
main.main(main.parse_flags(sys.argv))
"""
    cache = tmp_path / "cache"
    env = {"HDML_JAX_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error:") :]
    assert url in message
    assert str(cache / "dino_deitsmall16_pretrain.pth") in message
    assert "no SHA-256 is published" in message
    assert "python -m hdml_jax.models.convert FILE --arch vit --output DIR" in message
    assert test_weights._files_under(cache) == []
