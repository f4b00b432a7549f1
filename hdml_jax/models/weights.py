"""``config.model.pretrained``: a converted checkpoint directory, a name of published weights, or
nothing.

The names: ``"torchvision"`` (ResNet), ``"bninception"`` (BN-Inception) and the ViTs of
``hdml_jax.models.vit_weights.VIT_WEIGHTS`` (``"vit_s16_dino"``, ``"deit_s16_distilled"``,
``"vit_s16_augreg"``, ...). Each downloads its file once into the cache (``$HDML_JAX_CACHE``,
default ``~/.cache/hdml_jax``), checks it against the SHA-256 prefix its publisher states (the
hash in a torch.hub file name; DINO's and timm's files state none, and then the conversion's
check of every tensor name and shape is the check) and converts it once (``hdml_jax.models.convert``,
no torch needed); later runs reuse the converted directory without touching the network. Every
step writes to a temporary name first and renames, so an interrupted run or several processes
sharing the cache never leave a partial file under a final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from hdml_jax.errors import ConfigError, UserError
from hdml_jax.models.convert import (
    WeightsFileNotFoundError,
    load_bn_inception,
    load_torchvision_resnet,
    save_pretrained,
)
from hdml_jax.models.preprocessing import check_named_weights
from hdml_jax.models.vit_weights import VIT_WEIGHTS, load_vit

# torchvision's IMAGENET1K_V1 ResNet weights (ResNet{18,34,50,101}_Weights.IMAGENET1K_V1). The same
# four URLs appear in pytorch/vision, torchvision/prototype/models/resnet.py at commit
# aabcd2162c45791995ba92c92737b7da30e97b5f (the weights API that became torchvision.models in
# 0.13), e.g. `url="https://download.pytorch.org/models/resnet18-f37072fd.pth"`. These files are
# the 2021 re-saves in torch's zip format (pytorch/vision#3620, fixing #2068), which replaced the
# legacy-format resnet18-5c106cde.pth & co. The hex part of each name is the start of the file's
# SHA-256, as torch.hub's check_hash expects. Tests replace entries of this dict.
TORCHVISION_RESNET_URLS: dict[int, str] = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

# Cadene's BN-Inception ImageNet weights (pretrainedmodels, bninception.py's
# pretrained_settings['bninception']['imagenet']['url']), the file Proxy-Anchor's
# code/net/bn_inception.py loads too. Its name carries 9 hex digits, 52deb4733, which torch.hub's
# HASH_REGEX takes as the file's SHA-256 prefix. That could not be checked against the file here
# (no network); the evidence that it is one: before torch 1.3 (pytorch/pytorch#25980 made
# check_hash optional, default off) model_zoo.load_url verified that prefix on every download,
# and pretrainedmodels loaded this URL through it, so its users of that time checked it. The
# check below is the same; a file it refuses can still be converted by hand (--arch
# bn_inception), which checks every tensor's name and shape instead. Tests replace this value.
BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"

DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


class WeightsUnavailableError(UserError, RuntimeError):
    """The weights could not be downloaded; the message says where to put them by hand."""


class WeightsHashError(UserError, ValueError):
    """A downloaded or cached weights file is not the expected one (its SHA-256 differs)."""


def cache_dir() -> Path:
    """Where downloaded and converted weights live: ``$HDML_JAX_CACHE`` or ``~/.cache/hdml_jax``."""
    return Path(os.environ.get("HDML_JAX_CACHE") or "~/.cache/hdml_jax").expanduser()


def hash_prefix(url: str) -> str:
    """The SHA-256 prefix in a torchvision file name (``resnet18-f37072fd.pth`` → ``f37072fd``)."""
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"{url}: the file name carries no hash (expected NAME-<hex>.pth).")
    return match.group(1)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (the files are up to a few hundred MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_steps(
    url: str, destination: Path, depth: int | None, arch: str = "resnet", sha256_prefix: str | None = None
) -> str:
    arch_args = f"--arch {arch}" if arch != "resnet" else f"--depth {depth or 'N'}"
    expected = (
        f"its SHA-256 starts with {sha256_prefix}"
        if sha256_prefix
        else "no SHA-256 is published for it; the conversion checks every tensor's name and shape"
    )
    return (
        f"Without network access here, download {url} on another machine ({expected}) and either "
        f"copy it to {destination} (the next run converts it) or copy it anywhere and convert it once with\n"
        f"  python -m hdml_jax.models.convert FILE {arch_args} --output DIR\n"
        "then pass --config.model.pretrained=DIR.\n"
        "Or train from scratch at once (lower accuracy than from ImageNet weights): "
        "--config.model.pretrained=none"
    )


class _Progress:
    """Download progress on stderr: one ``\\r`` line on a terminal, else at most five lines."""

    def __init__(self, url: str, total: int | None, stream: TextIO | None = None):
        self._stream = stream or sys.stderr
        self._total = total
        self._interactive = self._stream.isatty()
        self._last_time = 0.0
        self._next_quarter = 1
        print(f"downloading {url} ({_megabytes(total)})", file=self._stream, flush=True)

    def update(self, done: int) -> None:
        if self._interactive:
            now = time.monotonic()
            if now - self._last_time >= 0.2 or done == self._total:
                self._last_time = now
                print(f"\r  {self._fraction(done)}", end="", file=self._stream, flush=True)
        elif self._total and done * 4 >= self._next_quarter * self._total:
            self._next_quarter = done * 4 // self._total + 1
            print(f"  {self._fraction(done)}", file=self._stream, flush=True)

    def close(self, done: int) -> None:
        if self._interactive:
            print(f"\r  {self._fraction(done)}", file=self._stream, flush=True)
        elif not self._total:
            print(f"  {_megabytes(done)} done", file=self._stream, flush=True)

    def _fraction(self, done: int) -> str:
        if not self._total:
            return _megabytes(done)
        return f"{_megabytes(done)} / {_megabytes(self._total)} ({100 * done // self._total}%)"


def _megabytes(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e6:.1f} MB"


def _stream_to(response: BinaryIO, out: BinaryIO, total: int | None, progress: _Progress) -> str:
    """Copy the response body to ``out``; return its SHA-256."""
    digest, done = hashlib.sha256(), 0
    while chunk := response.read(_CHUNK_BYTES):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        progress.update(done)
    progress.close(done)
    if total is not None and done != total:
        raise http.client.IncompleteRead(b"", total - done)
    return digest.hexdigest()


def download(
    url: str,
    destination: str | Path,
    sha256_prefix: str | None,
    *,
    depth: int | None = None,
    arch: str = "resnet",
) -> Path:
    """Download ``url`` to ``destination`` if its SHA-256 starts with ``sha256_prefix`` (None: a
    file whose publisher states no hash; its SHA-256 is printed, for the record).

    The bytes go to a temporary file next to ``destination`` that is renamed only after the hash
    matched, so ``destination`` either does not exist or holds the complete, verified file (also
    with concurrent downloads: the rename is atomic and they write identical bytes).

    Raises:
      WeightsUnavailableError: on any network error (no connection, timeout, HTTP error, cut-off
        transfer); the message names the URL, ``destination`` and how to supply the file by hand
        (``depth`` fills in the ResNet depth of the conversion command, ``arch`` its backbone).
      WeightsHashError: (a ``ValueError``) when the downloaded bytes do not match
        ``sha256_prefix`` (nothing is kept).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "hdml_jax"})
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    digest = _stream_to(response, out, total, _Progress(url, total))
            except _NETWORK_ERRORS as error:
                raise WeightsUnavailableError(
                    f"could not download {url} ({error}). "
                    f"The file belongs at {destination}.\n"
                    + _manual_steps(url, destination, depth, arch, sha256_prefix)
                ) from error
        if sha256_prefix is None:
            print(f"  SHA-256 {digest} (no published hash to compare with)", file=sys.stderr, flush=True)
        elif not digest.startswith(sha256_prefix):
            raise WeightsHashError(
                f"{url} downloaded, but its SHA-256 is {digest}, which does not start with "
                f"{sha256_prefix}; the file was discarded. Retry, or check the URL."
                + _unconfirmed(destination.name)
            )
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination


def resolve_pretrained(
    spec: str | None, depth: int, *, width: int = 64, backbone: str = "resnet"
) -> Path | None:
    """Turn ``config.model.pretrained`` into a checkpoint directory for ``load_pretrained``.

    Args:
      spec: ``None``, ``""`` or ``"none"``: train from scratch (returns ``None``).
        ``"torchvision"``: torchvision's IMAGENET1K_V1 weights for ``depth``, downloaded and
        converted on first use, then read from the cache. ``"bninception"``: Cadene's
        BN-Inception weights (``BNINCEPTION_URL``), the same way. Anything else: a directory
        written by ``python -m hdml_jax.models.convert`` (``~`` expanded).
      depth: the ResNet depth (18, 34, 50 or 101); ignored for BN-Inception.
      width: the ResNet stem width; torchvision's weights exist only for 64.
      backbone: ``config.model.backbone``, ``"resnet"`` or ``"bn_inception"``.

    Raises:
      ConfigError: ``"torchvision"`` with a width or depth torchvision has no weights for, or
        named weights of the other backbone.
      WeightsHashError: a downloaded or cached file whose hash is wrong.
      WeightsUnavailableError: the download failed (the message explains the manual route).
      WeightsFileNotFoundError: a path that does not exist.
      WeightsMismatchError, BadWeightsFileError (``hdml_jax.models.convert``): the cached file
        cannot be converted to the requested ResNet.

    All are ``hdml_jax.errors.UserError`` and derive from ``ValueError``, ``RuntimeError`` or
    ``FileNotFoundError`` as before.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    name = spec.strip().lower()
    owner = check_named_weights(name, backbone)
    if owner == "resnet":
        return _torchvision_checkpoint(depth, width)
    if owner == "bn_inception":
        return _bninception_checkpoint()
    if owner == "vit":
        return _vit_checkpoint(name)
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise WeightsFileNotFoundError(
            f"no converted weights at {path}. Use --config.model.pretrained=torchvision to download "
            "and convert torchvision's ImageNet weights automatically, or create the directory once "
            "with `python -m hdml_jax.models.convert WEIGHTS --depth N --output DIR`."
        )
    return path


def _torchvision_checkpoint(depth: int, width: int) -> Path:
    """The cached conversion of torchvision's weights for ``depth``; made on first use."""
    if width != 64:
        raise ConfigError(
            f"pretrained='torchvision' needs model.width=64 (torchvision's ResNets), got {width}; "
            "set model.width=64 or pretrained=None."
        )
    if depth not in TORCHVISION_RESNET_URLS:
        raise ConfigError(
            f"no torchvision weights for ResNet-{depth}; depths with weights: {sorted(TORCHVISION_RESNET_URLS)}."
        )
    url = TORCHVISION_RESNET_URLS[depth]
    return _cached_conversion(
        url,
        f"resnet{depth}",
        lambda path: load_torchvision_resnet(path, depth),
        expected_hash=hash_prefix(url),
        depth=depth,
    )


def _bninception_checkpoint() -> Path:
    """The cached conversion of Cadene's BN-Inception weights; made on first use."""
    return _cached_conversion(
        BNINCEPTION_URL,
        "bn_inception",
        load_bn_inception,
        expected_hash=hash_prefix(BNINCEPTION_URL),
        arch="bn_inception",
    )


def _vit_checkpoint(name: str) -> Path:
    """The cached conversion of the published ViT weights ``name`` (``VIT_WEIGHTS``)."""
    weights = VIT_WEIGHTS[name]
    return _cached_conversion(
        weights.url,
        name,
        lambda path: load_vit(path, weights.module()),
        expected_hash=weights.sha256_prefix,
        filename=weights.filename,
        arch="vit",
    )


def _cached_conversion(
    url: str, name: str, load, *, expected_hash: str | None, filename: str | None = None, **download_kwargs
) -> Path:
    """``<cache>/<name>-<hash>-flax`` (``<name>-flax`` for a file without a published hash),
    converted once from ``url``'s file (downloaded once into ``<cache>/<filename>``, its SHA-256
    prefix ``expected_hash`` checked) with ``load(path) -> variables``."""
    cache = cache_dir()
    checkpoint = cache / (f"{name}-{expected_hash}-flax" if expected_hash else f"{name}-flax")
    if checkpoint.exists():
        return checkpoint
    weights_file = cache / (filename or url.rsplit("/", 1)[-1])
    if weights_file.exists():
        if expected_hash:
            _check_cached_hash(weights_file, expected_hash)
    else:
        download(url, weights_file, expected_hash, **download_kwargs)
    _convert_into(weights_file, checkpoint, load)
    return checkpoint


def _check_cached_hash(path: Path, expected_hash: str) -> None:
    """A file copied into the cache by hand gets the same check as a download, before conversion."""
    digest = sha256_of(path)
    if not digest.startswith(expected_hash):
        raise WeightsHashError(
            f"{path} has SHA-256 {digest}, which does not start with {expected_hash}: it is not "
            "the file its name promises (or is incomplete). Delete it and run again."
            + _unconfirmed(path.name)
        )


def _unconfirmed(name: str) -> str:
    """For BN-Inception, whose file-name prefix is not confirmed as a SHA-256 (see BNINCEPTION_URL):
    the manual route, which checks the tensors instead."""
    if name != BNINCEPTION_URL.rsplit("/", 1)[-1]:
        return ""
    return (
        " (The prefix in this file name could not be confirmed as its SHA-256: if you trust the file, "
        "convert it by hand with `python -m hdml_jax.models.convert FILE --arch bn_inception --output "
        "DIR`, which checks every tensor, and pass --config.model.pretrained=DIR.)"
    )


def _convert_into(weights_file: Path, checkpoint: Path, load: Callable[[Path], dict[str, Any]]) -> None:
    """Convert into a private temporary directory, then rename it to ``checkpoint`` atomically.

    When several processes convert at once, the first rename wins; the others find ``checkpoint``
    present (renaming onto a non-empty directory fails) and discard their copy.
    """
    print(f"converting {weights_file} to {checkpoint}", file=sys.stderr, flush=True)
    workspace = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f".{checkpoint.name}."))
    try:
        staged = save_pretrained(load(weights_file), workspace / "ckpt")
        try:
            os.rename(staged, checkpoint)
        except OSError:
            if not checkpoint.exists():
                raise
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
