"""Torch-free ``.pth`` reading and ``pretrained="torchvision"``: download, hash check, cache, conversion.

The downloads go to a local HTTP server on 127.0.0.1, never to the network.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from hdml_jax.errors import ConfigError, UserError
from hdml_jax.models import (
    WeightsUnavailableError,
    convert,
    load_pretrained,
    resolve_pretrained,
    torch_pickle,
    torchvision_resnet_to_flax,
    weights,
)
from tests.torch_resnet import TorchResNet, randomized

ROOT = Path(__file__).resolve().parents[1]


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _assert_same_as_torch_load(path: Path) -> None:
    ours = convert.read_torch_zip(path)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        expected = _as_numpy(tensor)
        assert ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision-layout ResNet-18 state dict saved by ``torch.save``: (bytes, path, NumPy state)."""
    model = randomized(TorchResNet(18), seed=3)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    return SimpleNamespace(body=path.read_bytes(), path=path, state=state)


def test_zip_reader_matches_torch_load_on_views_and_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = OrderedDict(
        transposed=base.t(),  # non-contiguous, shares base's storage
        sliced=base[1:3, 2:],  # storage offset and row stride 6
        strided=base[:, ::2],
        half=torch.randn(3, 5).half(),
        double=torch.randn(2, 2, dtype=torch.float64),
        bfloat=torch.randn(7).bfloat16(),
        long=torch.tensor([1, -2, 3], dtype=torch.int64),
        int=torch.tensor([[4, 5]], dtype=torch.int32),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(2, 3)),
    )
    torch.save(tensors, tmp_path / "tensors.pth")
    _assert_same_as_torch_load(tmp_path / "tensors.pth")
    torch.save({"state_dict": tensors}, tmp_path / "wrapped.pth")
    np.testing.assert_array_equal(convert.read_state_dict(tmp_path / "wrapped.pth")["sliced"], base[1:3, 2:])


def test_zip_reader_matches_torch_load_on_a_resnet18(resnet18_file):
    _assert_same_as_torch_load(resnet18_file.path)


def test_malformed_strides_are_refused_before_reading_memory():
    storage = torch_pickle._Storage(np.arange(6, dtype=np.float32))
    with pytest.raises(ValueError, match="malformed"):
        torch_pickle._rebuild_tensor(storage, 0, (3, 3), (3, 1))
    with pytest.raises(ValueError, match="malformed"):
        torch_pickle._rebuild_tensor(storage, 0, (2,), (-1,))


class _Payload:
    """Pickles as a call of ``function(argument)``: what a malicious checkpoint would contain."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_a_pickle_calling_anything_else_is_refused_and_runs_nothing(tmp_path, attack):
    marker = tmp_path / "executed"
    payload = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }[attack]
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(OrderedDict(weight=payload), protocol=2))
        archive.writestr("evil/byteorder", "little")
    with pytest.raises(ValueError, match="not a plain state dict") as error:
        convert.read_state_dict(path)
    assert attack.split(".")[1] in str(error.value)
    assert not marker.exists()


def test_a_pickle_that_torch_save_did_not_write_is_refused_without_torch(tmp_path, monkeypatch):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"weight": 1}))  # not a zip file: read as the legacy format
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails; the reader needs none
    with pytest.raises(ValueError, match=r"not one written by torch\.save") as error:
        convert.read_state_dict(path)
    assert isinstance(error.value, UserError)


@pytest.fixture
def server():
    """An HTTP server on an ephemeral port serving ``files`` (path → bytes), recording requests."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", files=files, requests=requests)
    httpd.shutdown()
    httpd.server_close()


def _files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def test_torchvision_is_downloaded_converted_once_and_then_cached(
    server, resnet18_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path))
    prefix = hashlib.sha256(resnet18_file.body).hexdigest()[:8]
    name = f"/models/resnet18-{prefix}.pth"
    server.files[name] = resnet18_file.body
    monkeypatch.setitem(weights.TORCHVISION_RESNET_URLS, 18, server.url + name)

    first = resolve_pretrained("torchvision", 18)
    assert first == tmp_path / f"resnet18-{prefix}-flax"
    assert server.requests == [name]
    restored = load_pretrained(first)
    jax.tree.map(np.testing.assert_array_equal, restored, torchvision_resnet_to_flax(resnet18_file.state, 18))
    progress = capsys.readouterr().err
    assert "downloading" in progress and "100%" in progress and len(progress.splitlines()) <= 7

    assert resolve_pretrained("torchvision", 18) == first
    assert server.requests == [name]  # no second request
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"resnet18-{prefix}-flax", f"resnet18-{prefix}.pth"]


def test_a_wrong_hash_raises_and_leaves_nothing_in_the_cache(server, resnet18_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path))
    name = "/models/resnet34-00000000.pth"
    server.files[name] = resnet18_file.body
    monkeypatch.setitem(weights.TORCHVISION_RESNET_URLS, 34, server.url + name)
    with pytest.raises(ValueError, match="does not start with 00000000"):
        resolve_pretrained("torchvision", 34)
    assert server.requests == [name]
    assert _files_under(tmp_path) == []


def test_a_wrong_file_copied_into_the_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path))
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="Delete it"):
        resolve_pretrained("torchvision", 50)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", ["server down", "HTTP 404"])
def test_network_failures_explain_the_manual_route(server, tmp_path, monkeypatch, failure):
    monkeypatch.setenv("HDML_JAX_CACHE", str(tmp_path))
    base = f"http://127.0.0.1:{_closed_port()}" if failure == "server down" else server.url
    url = base + "/models/resnet50-0676ba61.pth"
    monkeypatch.setitem(weights.TORCHVISION_RESNET_URLS, 50, url)
    with pytest.raises(WeightsUnavailableError) as error:
        resolve_pretrained("torchvision", 50)
    assert isinstance(error.value, UserError) and isinstance(error.value, RuntimeError)
    message = str(error.value)
    assert url in message
    assert str(tmp_path / "resnet50-0676ba61.pth") in message
    assert "python -m hdml_jax.models.convert FILE --depth 50 --output DIR" in message
    assert "--config.model.pretrained=DIR" in message
    assert message.rstrip().endswith("--config.model.pretrained=none")  # what works at once, offline
    assert _files_under(tmp_path) == []


def test_specs_without_download(tmp_path, monkeypatch):
    assert resolve_pretrained("none", 50) is None
    assert resolve_pretrained(None, 50) is None
    assert resolve_pretrained("", 18) is None
    with pytest.raises(ConfigError, match=r"width=64"):
        resolve_pretrained("torchvision", 18, width=32)
    with pytest.raises(ConfigError, match="ResNet-152"):
        resolve_pretrained("torchvision", 152)
    with pytest.raises(convert.WeightsFileNotFoundError, match=r"hdml_jax\.models\.convert") as error:
        resolve_pretrained(str(tmp_path / "missing"), 50)
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, UserError)
    (tmp_path / "ckpt").mkdir()
    assert resolve_pretrained(str(tmp_path / "ckpt"), 50) == tmp_path / "ckpt"
    monkeypatch.delenv("HDML_JAX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache" / "hdml_jax"


def test_torchvision_urls_carry_their_hash():
    assert sorted(weights.TORCHVISION_RESNET_URLS) == [18, 34, 50, 101]
    assert weights.hash_prefix(weights.TORCHVISION_RESNET_URLS[50]) == "0676ba61"


def test_convert_cli_names_itself_and_imports_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "hdml_jax.models.convert", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m hdml_jax.models.convert")
    assert "found in sys.modules" not in result.stderr and "RuntimeWarning" not in result.stderr


def test_convert_cli_mistakes_are_one_message(resnet18_file, tmp_path, convert_fails):
    out = str(tmp_path / "out")
    missing = convert_fails(str(tmp_path / "resnet50.pth"), "--depth", "50", "--output", out)
    assert f"no weights at {tmp_path / 'resnet50.pth'}" in missing
    for name, body in [
        ("bad.pth", b"<html>not found</html>"),
        ("bad.npz", b"garbage"),
        ("bad.safetensors", b"\x01"),
    ]:
        (tmp_path / name).write_bytes(body)
        assert name in convert_fails(str(tmp_path / name), "--depth", "18", "--output", out)
    (tmp_path / "cut.pth").write_bytes(resnet18_file.body[:4096])  # an interrupted download
    assert "cut.pth" in convert_fails(str(tmp_path / "cut.pth"), "--depth", "18", "--output", out)
    depth = convert_fails(str(resnet18_file.path), "--depth", "34", "--output", out)
    assert "ResNet-18 of width 64, but ResNet-34" in depth and "depth/width differ" in depth
    assert "--depth 18" in depth
    (tmp_path / "exists").mkdir()
    exists = convert_fails(str(resnet18_file.path), "--depth", "18", "--output", str(tmp_path / "exists"))
    assert "exists" in exists
    assert not (tmp_path / "out").exists()


def test_weights_errors_are_user_errors_of_the_expected_builtin_class(resnet18_file, tmp_path):
    with pytest.raises(convert.WeightsMismatchError, match="depth/width differ") as mismatch:
        torchvision_resnet_to_flax(resnet18_file.state, 34)
    assert isinstance(mismatch.value, ValueError)
    with pytest.raises(convert.WeightsFileNotFoundError) as missing:
        load_pretrained(tmp_path / "nowhere")
    assert isinstance(missing.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(convert.BadWeightsFileError, match="not a checkpoint written by") as bad:
        load_pretrained(tmp_path / "empty")
    assert isinstance(bad.value, ValueError)
    with pytest.raises(convert.OutputExistsError) as exists:
        convert.save_pretrained({}, tmp_path / "empty")
    assert isinstance(exists.value, FileExistsError)
    for error in (mismatch, missing, bad, exists):
        assert isinstance(error.value, UserError) and error.value.exit_code == 2
