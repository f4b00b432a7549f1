"""Input pipeline throughput per CPU core against a PyTorch-style reference, then by worker count.

Images: synthetic JPEGs of CUB's size (~500×375, both orientations; smooth random colour field
+ gradient + noise, quality 90), encoded in memory; ``--scale 2`` doubles their sides (the size
of many Cars196 / custom-data photos), which lets JPEG decode at a reduced scale more often.

Per core (one thread, this process; ours and the reference interleaved in rounds of 64 images,
so background load hits both alike; min and median of ``--repeats`` rounds):

* train, ours: ``transforms.proxy_anchor(224).train`` on the encoded bytes (``EncodedImage``: the
  crop is drawn, then the JPEG decodes (simplejpeg) at the largest reduction that keeps the crop
  at least 224 px on each axis and only down to the crop's bottom, then one bilinear resize that
  also flips (``resample``: the native kernel when built)), ``uint8 (224, 224, 3)`` out
  (normalised on the device); the header line says which decoder and resize ran;
* train, ours (Pillow decode and resize): the same with neither simplejpeg nor the native kernel,
  what an install without a C compiler runs;
* train, ours + colour jitter / + everything: the same with ``dataset.augment``'s
  ``ColorJitter(0.4, 0.4, 0.4, 0.1)``, then also greyscale (p 0.2), a ±10° rotation and a
  vertical flip, on the 224-px crop: what each costs on top of the default path;
* train, ours (decoded input): the same transform on an array PIL decoded in full, as a source
  without ``encoded`` feeds it;
* train, reference: what a torchvision ``ImageFolder`` + ``DataLoader`` worker does per image,
  written here in PIL + NumPy after torchvision's algorithms: ``Image.open(...).convert("RGB")``,
  ``RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3))`` (10 tries, central fallback;
  ``crop`` then ``resize`` bilinear), ``RandomHorizontalFlip``, ``ToTensor`` (CHW copy, float32,
  /255) and ``Normalize`` (ImageNet mean/std, on a copy), ``float32 (3, 224, 224)`` out;
* decode only: ``Image.open(...).convert("RGB")`` decoded in full and nothing else; its "× ref"
  is the most a pipeline that decodes at full scale with PIL could gain over the reference;
* entropy decoding of the crop's rows: the train crop's file shortened to the rows above the
  crop's bottom (``jpeg.truncated``) and decoded at 1/8 (inverse DCT and colour conversion then
  cost 1/64 of a full decode): the Huffman decoding that every libjpeg-based decoder must do for
  that crop, so its "× ref" bounds any CPU pipeline built on one;
* our decode of the crop's rows: what the train transform decodes (the file shortened to the rows
  its resize reads, simplejpeg or Pillow), nothing else;
* crop-window decode (when TensorFlow is installed; ``--skip-tf`` leaves it out): TensorFlow's
  ``decode_and_crop_jpeg`` on one thread, which also skips the inverse DCT and colour
  conversion outside the crop (libjpeg-turbo's ``jpeg_crop_scanline``), and no resize: what a
  pipeline built on such a decoder could reach if its resize cost nothing;
* eval: ``proxy_anchor(224).eval`` (resize shorter side 256, centre 224) against ``Resize(256)``,
  ``CenterCrop(224)``, ``ToTensor``, ``Normalize``;
* pipeline: ``pipeline.train_iterator(num_workers=0, num_threads=0)`` (synchronous: sampler,
  per-example generators, ``source.encoded``, batch assembly) against the reference loop over the
  same indices plus the default collate (``np.stack`` of the float32 tensors).

Then the train crops' resize alone, on pixels decoded beforehand: Pillow's one ``resize`` call
(the reference's), our Pillow fallback and the native kernel. Then (``--workers``, ``--threads``)
the pipeline's images/s by worker processes and threads.

    python benchmarks/input.py [--scale 1] [--images 300] [--repeats 10] [--workers 0 1 2 4] [--threads 0 1 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import math
import time

import numpy as np
import PIL.features
from _timing import cpu_count, describe_environment, print_table, time_call, time_interleaved
from PIL import Image

from hdml_jax.data import augment, encoded, jpeg, pipeline, resample, sampling, transforms
from hdml_jax.data.base import Split

BATCH, P, K, SIZE = 64, 16, 4, 224
ENTROPY_FLOOR = "entropy decoding of the crop's rows"
CROP_WINDOW = "crop-window decode (TF, nothing else)"
PILLOW_ONLY = "train ours (Pillow decode and resize)"
ROWS_DECODE = "our decode of the crop's rows, nothing else"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def synthetic_jpegs(count: int, seed: int = 0, scale: float = 1.0) -> list[bytes]:
    """``count`` JPEG files (quality 90): upsampled random colour fields + gradient + noise."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        height, width = (375, 500) if i % 3 else (500, 375)
        height, width = round(height * scale), round(width * scale)
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
    """Random access over encoded JPEGs: ``source[i]`` decodes with PIL, ``source.encoded(i)``
    hands the bytes on (what the pipeline reads, as from the prepared TFDS and custom data)."""

    def __init__(self, files: list[bytes], labels: np.ndarray):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with Image.open(io.BytesIO(self.files[index])) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": int(self.labels[index])}

    def encoded(self, index: int) -> dict:
        return {"image": encoded.EncodedImage(self.files[index]), "label": int(self.labels[index])}


# ----------------------------------------------------------------------------- the reference


def reference_load(data: bytes) -> Image.Image:
    """torchvision's ``pil_loader``."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def reference_crop_params(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = height * width
    low, high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(low, high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def reference_to_tensor_normalize(image: Image.Image) -> np.ndarray:
    """``ToTensor`` then ``Normalize(mean, std)`` (not in place): float32 ``(3, H, W)``."""
    pixels = np.array(image, np.uint8, copy=True)
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    tensor = chw.astype(np.float32) / 255
    tensor = tensor - MEAN[:, None, None]  # Normalize's clone + sub_
    tensor /= STD[:, None, None]
    return tensor


def reference_train(data: bytes, rng: np.random.Generator) -> np.ndarray:
    image = reference_load(data)
    top, left, h, w = reference_crop_params(image.width, image.height, rng)
    image = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return reference_to_tensor_normalize(image)


def reference_eval(data: bytes, resize: int = 256) -> np.ndarray:
    image = reference_load(data)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - SIZE) / 2), round((new_w - SIZE) / 2)
    return reference_to_tensor_normalize(image.crop((left, top, left + SIZE, top + SIZE)))


# ----------------------------------------------------------------------------- timing


def _pil_distribution() -> str:
    """Which distribution provides ``PIL``: Pillow or the Pillow-SIMD fork."""
    for name in ("pillow-simd", "pillow"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return "unknown"


def _single_threaded_tensorflow():
    """TensorFlow on one thread (for a per-core figure), or None when it is not installed."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    tf.config.set_visible_devices([], "GPU")  # the decode runs on the CPU; leave the GPU to JAX
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


# dataset.augment beyond the preset's crop and flip: torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1)
# (a common choice), then also RandomGrayscale(0.2), RandomRotation(10) and a vertical flip.
JITTER_AUGMENT = augment.Augmentation(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
ALL_AUGMENT = augment.Augmentation(
    brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale=0.2, rotation=10.0, vertical_flip=True
)
JITTER = "train ours + colour jitter (0.4, 0.4, 0.4, 0.1)"
ALL_AUG = "train ours + jitter, greyscale, rotation, v-flip"


def per_core(
    files: list[bytes], split: Split, labels: np.ndarray, repeats: int, use_tf: bool = True
) -> list[list[str]]:
    pair = transforms.proxy_anchor(SIZE)

    def rngs():
        return [np.random.default_rng(i) for i in range(BATCH)]

    jittered = transforms.preset("proxy_anchor", SIZE, augment=JITTER_AUGMENT).train
    everything = transforms.preset("proxy_anchor", SIZE, augment=ALL_AUGMENT).train
    calls = {
        "train ours": lambda: [
            pair.train(encoded.EncodedImage(files[i]), r) for i, r in enumerate(rngs())
        ],
        JITTER: lambda: [jittered(encoded.EncodedImage(files[i]), r) for i, r in enumerate(rngs())],
        ALL_AUG: lambda: [everything(encoded.EncodedImage(files[i]), r) for i, r in enumerate(rngs())],
        "train reference": lambda: [reference_train(files[i], r) for i, r in enumerate(rngs())],
        "eval ours": lambda: [pair.eval(encoded.EncodedImage(files[i])) for i in range(BATCH)],
        "eval reference": lambda: [reference_eval(files[i]) for i in range(BATCH)],
    }
    # The decode alone, at full scale: with no DCT reduction (see "decode scale" above) any
    # pipeline on PIL pays it, so reference / decode bounds the speed-up a faster crop, resize and
    # conversion could give.
    calls["decode only (PIL, full scale)"] = lambda: [reference_load(files[i]).load() for i in range(BATCH)]

    # Entropy decoding of the rows above the crop's bottom, nothing more: a 1/8-scale decode (the
    # inverse DCT and colour conversion then cost 1/64) of the file shortened to those rows. Every
    # libjpeg-based decoder pays it whatever it skips (a block's variable-length codes are found
    # only by decoding those before it), so reference / this bounds any such CPU pipeline at these crops.
    def entropy_floor(data: bytes, rng: np.random.Generator) -> None:
        height, width = encoded.EncodedImage(data).shape[:2]
        top, _, h, _ = pair.train.crop_params(height, width, rng)
        with Image.open(io.BytesIO(jpeg.truncated(data, top + h) or data)) as image:
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()

    calls[ENTROPY_FLOOR] = lambda: [entropy_floor(files[i], r) for i, r in enumerate(rngs())]

    # Our decode alone: the rows down to the train crop's bottom, as the transform decodes them.
    def rows_decode(data: bytes, rng: np.random.Generator) -> None:
        image = encoded.EncodedImage(data)
        top, left, h, w = pair.train.crop_params(*image.shape[:2], rng)
        image._decode_top(encoded.rows_reached((left, top, left + w, top + h), SIZE, 1), 1)

    calls[ROWS_DECODE] = lambda: [rows_decode(files[i], r) for i, r in enumerate(rngs())]
    # A decoder that skips the inverse DCT and colour conversion outside the crop as well
    # (libjpeg-turbo's jpeg_crop_scanline, as TensorFlow's decode_and_crop_jpeg uses it), and no
    # resize at all: the most a pipeline built on such a decoder could gain with a free resize.
    tf = _single_threaded_tensorflow() if use_tf else None
    if tf is not None:

        def crop_window(data: bytes, rng: np.random.Generator):
            height, width = encoded.EncodedImage(data).shape[:2]
            window = pair.train.crop_params(height, width, rng)
            return tf.io.decode_and_crop_jpeg(data, window, channels=3, dct_method="INTEGER_ACCURATE").numpy()

        calls[CROP_WINDOW] = lambda: [crop_window(files[i], r) for i, r in enumerate(rngs())]
    # Neither simplejpeg nor the native resize kernel: what an install without them runs.
    calls[PILLOW_ONLY] = lambda: pillow_only(
        lambda: [pair.train(encoded.EncodedImage(files[i]), r) for i, r in enumerate(rngs())]
    )
    # PIL's full decode, then the transform on the array: what a source without ``encoded`` gives.
    calls["train ours (decoded input)"] = lambda: [
        pair.train(np.asarray(reference_load(files[i])), r) for i, r in enumerate(rngs())
    ]
    sampler = sampling.PKSampler(labels, classes_per_batch=P, samples_per_class=K, seed=0)
    iterator = pipeline.train_iterator(
        split,
        sampler=sampler,
        transform=pair.train,
        global_batch_size=BATCH,
        seed=0,
        num_workers=0,
        num_threads=0,
        process_index=0,
        process_count=1,
    )
    steps = iter(range(1 << 30))

    def reference_pipeline():
        step = next(steps)
        indices = sampler.batch_indices(step)
        tensors = [
            reference_train(files[int(j)], pipeline.augmentation_rng(0, step, p))
            for p, j in enumerate(indices)
        ]
        return np.stack(tensors)

    calls["pipeline ours"] = lambda: next(iterator)
    calls["pipeline reference"] = reference_pipeline
    timings = time_interleaved(
        calls, repeats=repeats, warmup=1, per_round=1, syncs=dict.fromkeys(calls, lambda x: x)
    )
    iterator.close()
    rows = []
    for what in ("train", "eval", "pipeline"):
        reference = timings[f"{what} reference"]
        names = [f"{what} ours"] + (
            [
                JITTER,
                ALL_AUG,
                PILLOW_ONLY,
                "train ours (decoded input)",
                "decode only (PIL, full scale)",
                ROWS_DECODE,
                CROP_WINDOW,
                ENTROPY_FLOOR,
            ]
            if what == "train"
            else []
        )
        for name in [n for n in [*names, f"{what} reference"] if n in timings]:
            t = timings[name]
            is_reference = name == f"{what} reference"
            rows.append(
                [
                    name,
                    f"{BATCH / t.best:.0f}",
                    f"{BATCH / t.median:.0f}",
                    f"{t.median / BATCH * 1e3:.2f}",
                    "-" if is_reference else f"{reference.best / t.best:.2f}x",
                    "-" if is_reference else f"{reference.median / t.median:.2f}x",
                ]
            )
    return rows


def pillow_only(run):
    """``run()`` with neither simplejpeg nor the native resize kernel (Pillow decodes and resizes)."""
    saved = encoded._simplejpeg, resample._NATIVE
    encoded._simplejpeg, resample._NATIVE = None, None
    try:
        return run()
    finally:
        encoded._simplejpeg, resample._NATIVE = saved


def resize_kernels(files: list[bytes], repeats: int) -> list[list[str]]:
    """The train crops' resize alone (decoded beforehand, the rows the filter reads), by kernel."""
    pair = transforms.proxy_anchor(SIZE)
    rng = np.random.default_rng(0)
    work = []
    for data in files[:BATCH]:
        pixels = np.asarray(reference_load(data))
        top, left, h, w = pair.train.crop_params(*pixels.shape[:2], rng)
        box = (float(left), float(top), float(left + w), float(top + h))
        work.append((pixels[: encoded.rows_reached(box, SIZE, 1)], box))
    size = (SIZE, SIZE)
    calls = {
        "Pillow, one resize call (the reference's)": lambda: [
            Image.fromarray(p).resize(size, Image.Resampling.BILINEAR, box=b) for p, b in work
        ],
        "ours, Pillow fallback (two single-axis calls)": lambda: [
            resample._pillow(p, size, b) for p, b in work
        ],
    }
    if resample._NATIVE is not None:
        calls["ours, native kernel"] = lambda: [resample.bilinear(p, size, b) for p, b in work]
    timings = time_interleaved(
        calls, repeats=repeats, warmup=1, per_round=1, syncs=dict.fromkeys(calls, lambda x: x)
    )
    pillow = timings["Pillow, one resize call (the reference's)"]
    return [
        [name, f"{t.best / BATCH * 1e3:.3f}", f"{t.median / BATCH * 1e3:.3f}", f"{pillow.best / t.best:.2f}x"]
        for name, t in timings.items()
    ]


def draft_fractions(files: list[bytes], count: int = 2000) -> str:
    """How often the train crop (and the eval region) allow a reduced decode, by scale."""
    pair = transforms.proxy_anchor(SIZE)
    rng = np.random.default_rng(0)
    counts = {1: 0, 2: 0, 4: 0, 8: 0}
    for i in range(count):
        image = encoded.EncodedImage(files[i % len(files)])
        height, width = image.shape[:2]
        _, _, h, w = pair.train.crop_params(height, width, rng)
        counts[encoded.draft_scale(w, h, SIZE, SIZE)] += 1
    eval_counts = {1: 0, 2: 0, 4: 0, 8: 0}
    for data in files:
        height, width = encoded.EncodedImage(data).shape[:2]
        frame = transforms.resized_shorter_side(height, width, pair.eval.resize_shorter)
        side = SIZE * min(height / frame[0], width / frame[1])
        eval_counts[encoded.draft_scale(side, side, SIZE, SIZE)] += 1
    fmt = lambda c, n: ", ".join(f"1/{s}: {v / n:.0%}" for s, v in c.items() if v)  # noqa: E731
    return f"decode scale, train crops: {fmt(counts, count)}; eval: {fmt(eval_counts, len(files))}"


def by_workers(split: Split, labels: np.ndarray, args) -> list[list[str]]:
    transform = transforms.TRANSFORMS["proxy_anchor"](SIZE).train
    rows = []
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
            repeats=3,
            warmup=0,
            sync=lambda x: x,
        )
        iterator.close()
        per_second = args.batches * BATCH / timing.median
        name = f"workers={workers}" + (f" threads={threads}" if workers == 0 else "")
        rows.append(
            [name, f"{per_second:.0f}", f"{1e3 / per_second:.2f}", f"{first:.2f}", f"{timing.spread:.0%}"]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="image sides × this (1: ~500×375)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds per core measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2, 4])
    parser.add_argument(
        "--threads", type=int, nargs="*", default=[0, 1, 2], help="threads tried with workers=0"
    )
    parser.add_argument("--batches", type=int, default=6, help="batches per timed run (by workers)")
    parser.add_argument(
        "--skip-tf", action="store_true", help="leave out the crop-window decode row (TensorFlow)"
    )
    args = parser.parse_args()

    files = synthetic_jpegs(args.images, scale=args.scale)
    labels = np.arange(args.images) % 30
    split = Split(JpegSource(files, labels), labels, name="synthetic-jpeg")
    sides = sorted({encoded.EncodedImage(f).shape[:2] for f in files})
    print(
        describe_environment(
            [
                f"PIL {PIL.__version__} ({_pil_distribution()}), libjpeg-turbo "
                f"{PIL.features.version('libjpeg_turbo') or 'absent'}",
                f"{len(files)} JPEGs {' and '.join(f'{w}×{h}' for h, w in sides)}, mean "
                f"{np.mean([len(f) for f in files]) / 1024:.0f} KiB; {BATCH} images a round at {SIZE} px",
                draft_fractions(files),
                f"ours: resize {resample.BACKEND}, JPEG decode "
                + (
                    f"simplejpeg {importlib.metadata.version('simplejpeg')}"
                    if encoded._simplejpeg
                    else "Pillow"
                ),
            ]
        )
    )
    print_table(
        ["one core", "images/s (best)", "images/s (median)", "ms/image", "× ref (best)", "× ref (median)"],
        per_core(files, split, labels, args.repeats, use_tf=not args.skip_tf),
        title=f"per core: {args.repeats} interleaved rounds of {BATCH} images each (best: the fastest "
        "round, median: the median round)",
    )
    print_table(
        ["resize only (one core)", "ms/image (best)", "ms/image (median)", "× Pillow (best)"],
        resize_kernels(files, args.repeats),
        title=f"the train crops' bilinear resize to {SIZE} px alone, on pixels decoded beforehand",
    )
    if args.workers:
        print_table(
            ["pipeline", "images/s", "ms/image", "first batch s", "spread"],
            by_workers(split, labels, args),
            title=f"decode + augment by workers, {cpu_count()} usable CPUs (median of 3 runs of "
            f"{args.batches} batches)",
        )


if __name__ == "__main__":
    main()
