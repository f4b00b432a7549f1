"""Custom data sets (``hdml_jax.data.custom``): preparing a CSV, then reading examples back.

Writes ``--images`` realistic JPEGs (``benchmarks/input.py``'s ~500×375 images, quality 90) in
class folders with an Open Metric Learning CSV, then times:

* **prepare**: read the CSV, check it, decode every image fully (the check), write the bytes into
  one ``array_record`` file and the index — the one-off cost of a new or changed CSV;
* **reuse**: a second ``load_custom`` of the unchanged CSV (fingerprint only: a stat per file);
* **read**: random ``source[i]`` (decoded RGB example) from the prepared file, against decoding
  the same files from the folder with PIL — what the input pipeline's workers pay per image.

    python benchmarks/custom_data.py [--images 600] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import describe_environment, print_table
from input import synthetic_jpegs

from hdml_jax.data import custom


def write_dataset(folder: Path, count: int) -> Path:
    """``count`` JPEGs in 10-image classes, alternately train and validation; the CSV's path."""
    rows = []
    for i, data in enumerate(synthetic_jpegs(count)):
        label = i // 10
        relative = f"images/class {label}/{i}.jpg"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
        rows.append({"label": label, "path": relative, "split": "train" if label % 2 else "validation"})
    path = folder / "items.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["label", "path", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    print(describe_environment())
    work = Path(tempfile.mkdtemp(prefix="hdml_custom_bench_"))
    try:
        csv_path = write_dataset(work, args.images)
        megabytes = sum(p.stat().st_size for p in work.rglob("*.jpg")) / 2**20
        print(f"{args.images} JPEGs, {megabytes:.1f} MiB, in {work}")
        rows = []
        for threads in args.threads:
            cache = work / f"cache{threads}"
            table = custom.read_csv(csv_path)
            took = seconds(custom.prepare, table, cache, num_threads=threads, progress=None)
            rows.append([f"prepare, {threads} thread(s)", f"{took:.2f} s", f"{args.images / took:.0f} img/s"])
        took = seconds(lambda: custom.load_custom(csv_path, cache_dir=work / f"cache{args.threads[0]}"))
        rows.append(["reuse (unchanged CSV)", f"{took * 1e3:.0f} ms", f"{args.images / took:.0f} img/s"])
        dataset = custom.load_custom(csv_path, cache_dir=work / f"cache{args.threads[0]}")
        source = dataset.train.source
        order = np.random.default_rng(0).integers(0, len(source), args.reads)
        took = seconds(lambda: [source[int(i)] for i in order])
        rows.append(
            [
                "read prepared (random, decoded)",
                f"{took / args.reads * 1e3:.2f} ms/img",
                f"{args.reads / took:.0f} img/s",
            ]
        )
        files = [
            custom.read_csv(csv_path).resolved(int(i))
            for i in np.flatnonzero(custom.read_csv(csv_path).splits == "train")
        ]
        took = seconds(lambda: [custom.load_rgb(files[int(i)]) for i in order])
        rows.append(
            [
                "read files (random, decoded)",
                f"{took / args.reads * 1e3:.2f} ms/img",
                f"{args.reads / took:.0f} img/s",
            ]
        )
        print_table(["what", "time", "rate"], rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
