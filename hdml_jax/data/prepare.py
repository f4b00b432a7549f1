"""Prepare a data set once, from archives downloaded by hand, as TFDS ``array_record`` files.

    python -m hdml_jax.data.prepare cub200  --data_dir ~/tensorflow_datasets --manual_dir ~/archives/cub
    python -m hdml_jax.data.prepare cars196 --data_dir ~/tensorflow_datasets --manual_dir ~/archives/cars
    python -m hdml_jax.data.prepare sop     --data_dir ~/tensorflow_datasets --manual_dir ~/archives/sop
    python -m hdml_jax.data.prepare inshop  --data_dir ~/tensorflow_datasets --manual_dir ~/archives/inshop

``--help`` lists the files each data set needs. The TFDS catalogue builders (CUB, Cars, SOP) need
TensorFlow to prepare (``pip install tensorflow-cpu``; CUB also OpenCV); In-Shop does not, and
nothing needs TensorFlow afterwards. The archives are extracted under ``<data_dir>/downloads``
(``--download_dir``), which can be deleted afterwards. The command then loads the result, checks
the split sizes and caches the labels.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from hdml_jax.data.datasets import DATASETS, default_data_dir, load_dataset, tfds_builder

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name, spec = args.name, DATASETS[args.name]
    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else default_data_dir()
    manual_dir = os.path.expanduser(args.manual_dir or os.path.join(data_dir, "downloads", "manual"))

    missing = missing_manual_files(name, manual_dir)
    if missing:
        print(
            f"{name}: missing from the manual_dir {manual_dir}: {', '.join(missing)}\n\n{spec.instructions}",
            file=sys.stderr,
        )
        return 2
    packages = missing_modules(name)
    if packages:
        print(
            f"{name}: preparing this TFDS builder needs {', '.join(packages)}: pip install {' '.join(packages)}\n"
            "(only for preparing: reading the prepared data needs none of them)",
            file=sys.stderr,
        )
        return 3

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
    builder.download_and_prepare(
        download_dir=args.download_dir, download_config=download_config, file_format="array_record"
    )

    dataset = load_dataset(name, data_dir=data_dir, check_sizes="warn")
    for split_name in ("train", "test", "query", "gallery"):
        split = getattr(dataset, split_name)
        if split is not None:
            print(f"  {split_name:8s} {len(split):7,d} images {split.num_classes:6,d} classes")
    print(f"Done. Use it with: load_dataset({name!r}, data_dir={data_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
