"""Input pipeline throughput: JPEG decode + Proxy-Anchor train augmentation, by worker count.

A few hundred synthetic JPEGs of realistic size (~500×375, both orientations, smooth content
plus noise, quality 90) are encoded in memory; the source decodes them with PIL in
``__getitem__``; batches of 64 at 224 px come from ``pipeline.train_iterator`` with a P×K
sampler (16 × 4). Also timed, single-threaded in this process: decode alone and the transform
alone (the per-image cost the workers divide).

    python benchmarks/input.py [--workers 0 1 2 4] [--threads 0 1 2] [--images 300] [--batches 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from _timing import cpu_count, describe_environment, print_table, time_call
from PIL import Image

from hdml_jax.data import pipeline, sampling, transforms
from hdml_jax.data.base import Split

BATCH, P, K, SIZE = 64, 16, 4, 224


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG files (quality 90): upsampled random colour fields + gradient + noise."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        height, width = (375, 500) if i % 3 else (500, 375)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32
        )
        gradient = np.linspace(-40, 40, width, dtype=np.float32)[None, :, None]
        noise = rng.normal(0, 10, (height, width, 3)).astype(np.float32)
        image = np.clip(field + gradient + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


class JpegSource:
    """Random access over encoded JPEGs, decoded with PIL on every access."""

    def __init__(self, files: list[bytes], labels: np.ndarray):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with Image.open(io.BytesIO(self.files[index])) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": int(self.labels[index])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0, 1, 2], help="threads tried with workers=0"
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batches", type=int, default=6, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    files = synthetic_jpegs(args.images)
    labels = np.arange(args.images) % 30
    split = Split(JpegSource(files, labels), labels, name="synthetic-jpeg")
    transform = transforms.TRANSFORMS["proxy_anchor"](SIZE).train
    print(
        describe_environment(
            [
                f"{len(files)} JPEGs, mean {np.mean([len(f) for f in files]) / 1024:.0f} KiB, "
                f"batch {BATCH} ({P}×{K}) at {SIZE} px, Proxy-Anchor train transform"
            ]
        )
    )

    rows = []
    decoded = [split.source[i]["image"] for i in range(16)]
    decode = time_call(
        lambda: [split.source[i] for i in range(64)], repeats=args.repeats, warmup=1, sync=lambda x: x
    )
    rows.append(
        ["decode only (1 thread)", f"{64 / decode.median:.0f}", f"{decode.median / 64 * 1e3:.2f}", "-", "-"]
    )
    rng = np.random.default_rng(0)
    augment = time_call(
        lambda: [transform(decoded[i % 16], rng) for i in range(64)],
        repeats=args.repeats,
        warmup=1,
        sync=lambda x: x,
    )
    rows.append(
        [
            "augment only (1 thread)",
            f"{64 / augment.median:.0f}",
            f"{augment.median / 64 * 1e3:.2f}",
            "-",
            "-",
        ]
    )

    configs = [(0, t) for t in args.threads if 0 in args.workers] + [(w, 0) for w in args.workers if w > 0]
    for workers, threads in configs:
        sampler = sampling.PKSampler(labels, classes_per_batch=P, samples_per_class=K, seed=0)
        iterator = pipeline.train_iterator(
            split,
            sampler=sampler,
            transform=transform,
            global_batch_size=BATCH,
            seed=0,
            num_workers=workers,
            num_threads=threads,
            process_index=0,
            process_count=1,
        )
        start = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - start
        timing = time_call(
            lambda it=iterator: [next(it) for _ in range(args.batches)],
            repeats=args.repeats,
            warmup=0,
            sync=lambda x: x,
        )
        iterator.close()
        per_second = args.batches * BATCH / timing.median
        name = f"workers={workers}" + (f" threads={threads}" if workers == 0 else "")
        rows.append(
            [name, f"{per_second:.0f}", f"{1e3 / per_second:.2f}", f"{first:.2f}", f"{timing.spread:.0%}"]
        )

    print_table(
        ["pipeline", "images/s", "ms/image", "first batch s", "spread"],
        rows,
        title=f"decode + augment, {cpu_count()} usable CPUs (median of {args.repeats} runs of {args.batches} batches)",
    )


if __name__ == "__main__":
    main()
