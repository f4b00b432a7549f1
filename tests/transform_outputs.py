"""The presets' outputs as hashes: the record that a change to the transforms keeps every preset
bit for bit the same when ``dataset.augment`` overrides nothing.

``tests/data/transform_outputs.json`` was written before ``dataset.augment`` existed; for each
preset, size (16, 32) and bbox mode, the sha256 of its train outputs (4 seeds per image) and eval
outputs over ``images()``. An intended change to a preset rewrites it::

    .venv/bin/python -m tests.transform_outputs --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL

from hdml_jax.data import transforms

FIXTURE = Path(__file__).resolve().parent / "data" / "transform_outputs.json"


def images() -> list[np.ndarray]:
    """Four gradient-and-noise images of different shapes (landscape, portrait, square, larger)."""
    rng = np.random.default_rng(2026)
    out = []
    for h, w in ((48, 64), (64, 40), (37, 37), (120, 90)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
        out.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
    return out


def hashes() -> dict[str, str]:
    bbox = np.array([0.1, 0.05, 0.9, 0.8])
    result = {}
    for name, preset in sorted(transforms.TRANSFORMS.items()):
        for size in (16, 32):
            for crop in (False, True):
                pair = preset(size, crop_to_bbox=crop)
                digest = hashlib.sha256()
                for i, image in enumerate(images()):
                    for seed in range(4):
                        digest.update(
                            pair.train(image, np.random.default_rng([seed, i]), bbox=bbox).tobytes()
                        )
                    digest.update(pair.eval(image, bbox=bbox).tobytes())
                result[f"{name}/{size}/{'bbox' if crop else 'full'}"] = digest.hexdigest()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {FIXTURE.name}")
    args = parser.parse_args(argv)
    record = {"pillow": PIL.__version__, "cases": hashes()}
    if args.write:
        FIXTURE.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {FIXTURE}")
        return 0
    same = json.loads(FIXTURE.read_text())["cases"] == record["cases"]
    print("the presets match the record" if same else "the presets differ from the record")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
