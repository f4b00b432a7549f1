"""Your own data: an Open Metric Learning CSV or an image folder (``hdml_jax/data/custom.py``).

    python -m hdml_jax.main --config configs/custom.py:method=hpl_pa --config.dataset.path=/data/items.csv
    python -m hdml_jax.main --config configs/custom.py --config.dataset.path=/data/images  # a folder

The CSV (columns ``label``, ``path``, ``split`` = train/validation; optional ``is_query``,
``is_gallery``, ``category``, ``x_1, x_2, y_1, y_2``) or the folder
(``<split>/[<category>/]<class>/<image>``) is checked in full before anything is trained — every
problem in one message — and prepared once into ``$HDML_JAX_CACHE/datasets/custom/`` (or
``dataset.data_dir``); a changed CSV or image is prepared again. ``python -m hdml_jax.data.custom
PATH`` checks and prepares without training.

Evaluation: Open Metric Learning's query/gallery semantics when the CSV has ``is_query`` /
``is_gallery`` (any mix of query-only, gallery-only and both rows; a query never matches its own
row; queries with nothing to find are left out, with a note), self-retrieval otherwise, with
``dataset.recall_ks``. ``category`` gives ``coarse_recall@1`` and, with
``loss.coarse_from_labels=True``, HPL's coarse level. ``python -m hdml_jax.evaluate --workdir RUN
--csv OTHER.csv`` scores the trained run on another labelled CSV.

Augmentation (``dataset.augment``, the train transform only; the defaults are the preset's)::

    --config.dataset.augment.horizontal_flip=False      # text, digits, logos, arrows, documents
    --config.dataset.augment.vertical_flip=True
    --config.dataset.augment.crop_scale="(0.2, 1.0)"    # RandomResizedCrop's area range, in (0, 1]
    --config.dataset.augment.crop_ratio="(0.75, 1.33)"  # and its aspect-ratio range
    --config.dataset.augment.brightness=0.4             # ColorJitter: also contrast, saturation, hue
    --config.dataset.augment.grayscale=0.2              # probability
    --config.dataset.augment.rotation=10                # ± degrees

The recipe is our starting point for a small fine-grained data set, not a published one: the
Proxy-Anchor family uses the official ResNet-50 CUB command (PA README.md:64-75, as
``configs/cub.py``) from torchvision's ImageNet weights, except 40 epochs with the learning rate
halved every 10 and 1 warm-up epoch (our choices; tune ``num_epochs``, ``optimizer.lr``,
``batch_size`` to your data). The other methods keep their own recipes (``hdml_jax.config``).

* Baselines (``contrastive``, ``triplet_margin``, ``multi_similarity``, ``margin``, ``ntxent``,
  ``lifted_structure``, ``circle``, ``normalized_softmax``, ``cosface``, ``arcface``, ``soft_triple``,
  ``hpl_normalized_softmax``/``hpl_cosface``/``hpl_arcface``): this config's Proxy-Anchor-family recipe
  with MLRC's best loss hyper-parameters for CUB (borrowed): KevinMusgrave/powerful-benchmarker,
  metric-learning branch, docs/papers/mlrc.md l.35-50 (values and per-row lines in
  ``hdml_jax.methods.baselines.MLRC_BEST``); the pair losses in P×K batches of the same size.
"""

from hdml_jax.config import apply_proxy_anchor_command, base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg)
    c = base_config("custom", args.pop("method", "hpl_pa"))
    c.dataset.path = ""  # required: the CSV file or the image folder
    c.dataset.root = ""  # what the CSV's relative paths start from; empty: the CSV's folder
    c.dataset.recall_ks = (1, 2, 4, 8)
    # batch 120, lr 1e-4, bn-freeze: PA README.md:64-75; warm 1, decay every 10 of 40 epochs: ours
    apply_proxy_anchor_command(
        c, batch_size=120, lr=1e-4, warm=1, bn_freeze=True, lr_decay_step=10, epochs=40
    )
    c.loss.num_coarse_groups = (0,)  # about C / 8 groups (or the CSV's categories: coarse_from_labels)
    return c
