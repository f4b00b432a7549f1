"""Export a trained run's embedding network with ``jax.export``: ``python -m hdml_jax.export
--workdir RUN --output DIR [--batch-size N] [--step N]``.

Writes (each file atomically)::

    DIR/model.jax_export   the serialized ``jax.export.Exported``: uint8 (B, S, S, 3) RGB images in,
                           values 0-255 as decoded (not rescaled, not normalised), float32 (B, d)
                           L2-normalised embeddings out; the weights are constants inside, and so
                           is the backbone's normalisation (as in training: ImageNet mean/std on
                           RGB for ResNet; BGR, mean only for BN-Inception)
    DIR/metadata.json      S, d, the batch size (or "symbolic"), the platforms, the input (dtype,
                           channel order, value range 0-255), the host-side preprocessing recipe
                           (the run's eval transform, in words and numbers), the normalisation
                           applied inside (backbone, channel order, value range and mean/std, all
                           on the input's 0-255 scale), step, source workdir, checkpoint id,
                           JAX version

Running it needs JAX only (no hdml_jax, no Flax)::

    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open("DIR/model.jax_export", "rb").read()))
    embeddings = exported.call(np.zeros((4, S, S, 3), np.uint8))

Without ``--batch-size`` the batch dimension is symbolic (any ``B >= 1``); the artifact is
lowered for CPU, CUDA and TPU at once (``--platforms`` to change), so one file serves all three.
A JAX that cannot lower for one of them falls back to the current platform, and
``metadata.json`` says so.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hdml_jax.inference.cli import CliParser, run_command
from hdml_jax.inference.embedder import Embedder, describe_transform
from hdml_jax.inference.errors import UsageError

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
MODEL_FILE = "model.jax_export"
METADATA_FILE = "metadata.json"


def export_embedder(
    embedder: Embedder, batch_size: int | None = None, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> tuple[Any, list[str], str | None]:
    """``(exported, platforms, note)``: ``jax.export`` of the embedder's inference function.

    ``batch_size`` None: a symbolic batch dimension ``b``. If lowering for every one of
    ``platforms`` fails, the function is exported for the current platform only and ``note``
    says why (None otherwise).
    """
    import jax
    import jax.numpy as jnp

    size = embedder.image_size
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    infer = jax.jit(embedder.inference_function())
    platforms = [p.lower() for p in platforms]
    try:
        return jax.export.export(infer, platforms=platforms)(spec), platforms, None
    except Exception as error:
        current = jax.default_backend()
        current = "cuda" if current == "gpu" else current
        if platforms == [current]:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        note = f"lowering for {', '.join(platforms)} failed ({reason}); exported for {current} only."
        return jax.export.export(infer, platforms=[current])(spec), [current], note


def metadata(
    embedder: Embedder, batch_size: int | None, platforms: Sequence[str], note: str | None
) -> dict[str, Any]:
    """What a user of ``model.jax_export`` needs to know (``metadata.json``)."""
    import jax

    from hdml_jax.evaluation.ranking import curvature_of
    from hdml_jax.models import preprocessing

    backbone = preprocessing.backbone_of(embedder.model.backbone)
    size, dim = embedder.image_size, embedder.embedding_dim
    curvature = curvature_of(embedder.config)
    if curvature > 0:
        output_note = (
            f"points of the Poincaré ball of curvature {curvature} (norm < 1/√c): rank by the Poincaré "
            "distance d(x, y) = 2/√c · artanh(√c ‖(−x) ⊕ y‖), nearest first (hdml_jax.hyperbolic)"
        )
        retrieval = {"distance": "poincare", "curvature": curvature}
    else:
        output_note = "L2-normalised rows: cosine similarity is the dot product"
        retrieval = {"distance": "cosine"}
    result = {
        "format": "jax.export serialized Exported (jax.export.deserialize(bytearray(bytes)).call(images))",
        "input": {
            "shape": ["B" if batch_size is None else batch_size, size, size, 3],
            "dtype": "uint8",
            "channel_order": "RGB",
            "value_range": [0, 255],
            "layout": "NHWC, RGB, 0-255 pixel values as decoded; resize/crop each image on the host as "
            "in 'preprocessing', and neither rescale nor normalise it: the artifact applies "
            "'normalization' itself",
        },
        "output": {
            "shape": ["B" if batch_size is None else batch_size, dim],
            "dtype": "float32",
            "note": output_note,
        },
        "retrieval": retrieval,
        "batch_size": "symbolic" if batch_size is None else batch_size,
        "image_size": size,
        "embedding_dim": dim,
        "platforms": list(platforms),
        "preprocessing": describe_transform(embedder.transform),
        # The backbone's input convention (hdml_jax.models.preprocessing), applied inside, on the
        # same 0-255 scale as the input.
        "normalization": {"backbone": backbone, **preprocessing.convention(backbone).describe()},
        "step": embedder.step,
        "workdir": str(embedder.workdir),
        "checkpoint_id": embedder.checkpoint_id,
        "method": embedder.config.get("method"),
        "dataset": embedder.config.dataset.get("name"),
        "jax_version": jax.__version__,
    }
    if note:
        result["note"] = note
    return result


def write_export(output: Path, serialized: bytes, meta: dict[str, Any]) -> None:
    """Both files into ``output`` (created if needed), each replaced atomically."""
    from hdml_jax.workdir import atomic_write, atomic_write_text

    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / MODEL_FILE, lambda tmp: tmp.write_bytes(serialized))
    atomic_write_text(output / METADATA_FILE, json.dumps(meta, indent=2) + "\n")


def build_parser() -> CliParser:
    parser = CliParser(
        prog="hdml_jax.export",
        description="Export a trained run's embedding network with jax.export (runs with JAX alone).",
        epilog=f"Writes DIR/{MODEL_FILE} and DIR/{METADATA_FILE}. Load: "
        "jax.export.deserialize(bytearray(open(path, 'rb').read())).call(uint8_images).",
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--batch-size", type=int, help="a fixed batch size (default: symbolic, any size)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the best by Recall@1)")
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help=f"comma-separated lowering platforms (default {','.join(DEFAULT_PLATFORMS)})",
    )
    return parser


def run(args) -> int:
    from hdml_jax.inference import embedder as inference

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    platforms = [p.strip().lower() for p in args.platforms.split(",") if p.strip()]
    unknown = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
    if not platforms or unknown:
        raise UsageError(f"--platforms takes cpu, cuda, rocm, tpu; got {args.platforms!r}.")
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {args.output} is a file; name a folder.")
    embedder = inference.load_embedder(args.workdir, args.step)
    exported, platforms, note = export_embedder(embedder, args.batch_size, platforms)
    if note:
        print(f"note: {note}", file=sys.stderr)
    serialized = bytes(exported.serialize())
    write_export(output, serialized, metadata(embedder, args.batch_size, platforms, note))
    batch = "any batch size" if args.batch_size is None else f"batch {args.batch_size}"
    print(
        f"wrote {output / MODEL_FILE} ({len(serialized) / 2**20:.1f} MiB; step {embedder.step}, {batch}, "
        f"{embedder.image_size} px → {embedder.embedding_dim}-d, {', '.join(platforms)}) and {METADATA_FILE}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (user mistakes exit 2 via ``SystemExit``)."""
    return run_command(build_parser, run, argv, interrupted="interrupted; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
