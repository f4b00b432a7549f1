"""Entry point of the main job: ``python -m hdml_jax.main [--config configs/<dataset>.py]``.

The trainer (configs, input pipeline, models, train/eval loop) is not part of the package yet;
this entry point says so instead of pretending. What exists today is the library layer:
``hdml_jax.losses``, ``hdml_jax.metrics`` and ``hdml_jax.cluster``.
"""

from __future__ import annotations

import sys

MISSING = """\
hdml_jax: the training job is not available yet.

Available now (import them from your own JAX code):
  hdml_jax.losses   proxy_anchor_loss, proxy_nca_loss, hierarchical_proxy_loss (HPL),
                    batch_hard_triplet_loss, softmax_cross_entropy, build_hierarchy, ...
  hdml_jax.metrics  retrieval_metrics (Recall@K, P@1, R-Precision, MAP@R), nmi
  hdml_jax.cluster  kmeans (k-means++), normalized_mutual_info

Not yet written: backbones and descriptor heads (hdml_jax.models), data sets and the input
pipeline (hdml_jax.data, including the embedded 'synthetic' data set), the train/eval loop and
the configs it reads. Until they exist, `python -m hdml_jax.main` exits with status 2.
"""


def main(argv: list[str] | None = None) -> int:
    del argv
    sys.stderr.write(MISSING)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
