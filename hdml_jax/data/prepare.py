"""Prepare a data set once, from archives downloaded by hand, as TFDS ``array_record`` files.

    python -m hdml_jax.data.prepare cub200  --data_dir ~/tensorflow_datasets --manual_dir ~/archives/cub
    python -m hdml_jax.data.prepare cars196 --data_dir ~/tensorflow_datasets --manual_dir ~/archives/cars
    python -m hdml_jax.data.prepare sop     --data_dir ~/tensorflow_datasets --manual_dir ~/archives/sop
    python -m hdml_jax.data.prepare inshop  --data_dir ~/tensorflow_datasets --manual_dir ~/archives/inshop

``--help`` lists the files each data set needs. The TFDS catalogue builders (CUB, Cars, SOP) need
TensorFlow to prepare (``pip install -e '.[prepare]'``; CUB also OpenCV, Cars SciPy); In-Shop does
not, and nothing needs TensorFlow afterwards. The archives are extracted under
``<data_dir>/downloads`` (``--download_dir``), which can be deleted afterwards. The command then
loads the result, checks the split sizes and caches the labels.

A missing file, an archive that is not the expected one or a missing package stops the command
with one message (``error: ...``, exit status 2) that names the file and the expected layout;
``HDML_JAX_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys
import tarfile
import zipfile
from collections.abc import Sequence

from hdml_jax.data.datasets import (
    DATASETS,
    PREPARE_INSTALL,
    BadManualFilesError,
    ManualFilesError,
    default_data_dir,
    load_dataset,
    tfds_builder,
)
from hdml_jax.errors import UserError, exit_with_message

# Besides TensorFlow, what each TFDS builder imports while preparing: module → pip package.
_EXTRA_MODULES = {
    "cub200": {"cv2": "opencv-python-headless"},
    "cars196": {"scipy": "scipy"},
}


def missing_manual_files(name: str, manual_dir: str) -> list[str]:
    """The files of ``DATASETS[name].manual_files`` that ``manual_dir`` lacks (required ones only)."""
    if name == "inshop":
        from hdml_jax.data.inshop import InShopFiles

        return InShopFiles.find(manual_dir).missing
    return [f for f in DATASETS[name].manual_files if not os.path.exists(os.path.join(manual_dir, f))]


class MissingPackagesError(UserError, ImportError):
    """Preparing a TFDS catalogue builder needs packages that are not installed."""


def _module_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_modules(name: str) -> list[str]:
    """pip packages that preparing ``name`` needs and that are not installed."""
    needed = dict(_EXTRA_MODULES.get(name, {}))
    if DATASETS[name].needs_tensorflow:
        needed["tensorflow"] = "tensorflow-cpu"
    return [package for module, package in needed.items() if not _module_available(module)]


def _skip_checksum_validation(builder) -> None:
    """Accept manual files whose checksums differ from the ones TFDS registered.

    Mirrors of dead-URL data sets (Cars196) often re-pack the archives. TFDS offers no switch for
    this, so the download manager's validation is replaced by recording only (private API; the
    prepare tests cover it).
    """
    make_manager = builder._make_download_manager

    def make_lenient_manager(*args, **kwargs):
        manager = make_manager(*args, **kwargs)

        def record_only(url, url_info, path):
            manager._recorded_url_infos[url] = url_info

        manager._register_or_validate_checksums = record_only
        return manager

    builder._make_download_manager = make_lenient_manager


def _parser() -> argparse.ArgumentParser:
    files = "\n".join(f"  {name}: {'  '.join(spec.manual_files)}" for name, spec in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m hdml_jax.data.prepare",
        description="Prepare a data set as TFDS array_record files from archives downloaded by hand.",
        epilog=f"Files to put into --manual_dir:\n{files}\n(In-Shop's list_bbox_inshop.txt is optional.)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(DATASETS), help="the data set")
    parser.add_argument(
        "--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    parser.add_argument(
        "--manual_dir", default=None, help="the downloaded files (default <data_dir>/downloads/manual)"
    )
    parser.add_argument(
        "--download_dir", default=None, help="where archives are extracted (default <data_dir>/downloads)"
    )
    parser.add_argument(
        "--skip_checksums", action="store_true", help="accept archives whose checksums differ from TFDS's"
    )
    parser.add_argument("--overwrite", action="store_true", help="prepare again even if prepared data exist")
    return parser


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(": ") if text else type(error).__name__


def _caused_by(error: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """``error`` or an exception it was raised from (TFDS wraps extraction errors) is one of ``types``."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 10:
        if isinstance(current, types):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


def explain_failure(name: str, manual_dir: str, error: Exception) -> UserError | None:
    """The user's mistake behind an exception of the TFDS builder, or None (a bug: re-raise it).

    Checksums that differ, archives that cannot be unpacked, files missing inside them and files
    of unexpected content are the files' fault; the message says which and what the layout is.
    """
    if isinstance(error, UserError):
        return error
    layout = f"What {name} needs in the manual_dir:\n{DATASETS[name].instructions}".rstrip()
    detail = _first_line(error)
    if type(error).__name__ == "NonMatchingChecksumError" or "wrong checksum" in str(error):
        return BadManualFilesError(
            f"{name}: a file in {manual_dir} differs from the one TFDS registered (checksum): {detail}\n"
            "Mirrors often re-pack the archives: if yours are complete, run again with --skip_checksums."
        )
    if type(error).__name__ == "ExtractError" or _caused_by(
        error, (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError)
    ):
        return BadManualFilesError(
            f"{name}: an archive in {manual_dir} cannot be unpacked: {detail}\n"
            f"An incomplete download, or not the original archive?\n{layout}"
        )
    if isinstance(error, FileNotFoundError | KeyError) or type(error).__name__ == "NotFoundError":
        return ManualFilesError(
            f"{name}: a file that the TFDS builder reads from the archives in {manual_dir} is "
            f"missing: {detail}\nAre these the original, unmodified archives?\n{layout}"
        )
    if isinstance(error, ValueError):
        return BadManualFilesError(
            f"{name}: the files in {manual_dir} do not have the expected content: {detail}\n{layout}"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the data set; 0 when done. A user's mistake exits with one message (status 2)."""
    args = _parser().parse_args(argv)
    try:
        return _prepare(args)
    except UserError as error:
        exit_with_message(error)
    return 2  # not reached: exit_with_message exits


def _check_manual_dir(name: str, manual_dir: str) -> None:
    spec = DATASETS[name]
    if not os.path.isdir(manual_dir):
        raise ManualFilesError(
            f"{name}: the manual_dir {manual_dir} is not a folder (--manual_dir; default "
            f"<data_dir>/downloads/manual). It must hold {', '.join(spec.manual_files)}:\n"
            f"{spec.instructions}".rstrip()
        )
    missing = missing_manual_files(name, manual_dir)
    if missing:
        raise ManualFilesError(
            f"{name}: missing from the manual_dir {manual_dir}: {', '.join(missing)}\n{spec.instructions}".rstrip()
        )


def _prepare(args: argparse.Namespace) -> int:
    name, spec = args.name, DATASETS[args.name]
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else default_data_dir()
    manual_dir = os.path.expanduser(args.manual_dir or os.path.join(data_dir, "downloads", "manual"))

    _check_manual_dir(name, manual_dir)
    packages = missing_modules(name)
    if packages:
        raise MissingPackagesError(
            f"{name}: preparing this TFDS builder needs {', '.join(packages)} (not installed): "
            f"{PREPARE_INSTALL} in the hdml_jax checkout, or pip install {' '.join(packages)}. "
            "Only preparing needs them: reading the prepared data does not."
        )

    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir)
    if args.skip_checksums:
        _skip_checksum_validation(builder)
    mode = tfds.download.GenerateMode
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if args.overwrite else mode.REUSE_DATASET_IF_EXISTS,
        try_download_gcs=False,
    )
    print(f"{name}: preparing {spec.tfds_name} from {manual_dir} into {builder.data_path} ...")
    try:
        builder.download_and_prepare(
            download_dir=args.download_dir, download_config=download_config, file_format="array_record"
        )
    except Exception as error:
        explained = explain_failure(name, manual_dir, error)
        if explained is None or explained is error:
            raise
        raise explained from error

    dataset = load_dataset(name, data_dir=data_dir, check_sizes="warn")
    for split_name in ("train", "test", "query", "gallery"):
        split = getattr(dataset, split_name)
        if split is not None:
            print(f"  {split_name:8s} {len(split):7,d} images {split.num_classes:6,d} classes")
    print(f"Done. Use it with: load_dataset({name!r}, data_dir={data_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
