"""A newcomer's first mistakes on the command line: each ends in one ``error:`` line that says what
to set, exit 2, no traceback, and no workdir left behind.

The command lines run in one interpreter (``main.parse_flags`` + ``main.main``, as the CLI runs
them), as in ``tests/test_reliability.py``: JAX and TFDS are imported once for all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from hdml_jax.data import fits
from hdml_jax.data.base import ArraySource, MetricDataset, Split
from hdml_jax.errors import ConfigError
from hdml_jax.inference import embed
from hdml_jax.training import setup
from tests.custom_data import tiny_csv_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run_in_one_interpreter(cases: list[list[str]], workdir: Path, cwd: Path) -> tuple[list, str]:
    """Exit codes of ``python -m hdml_jax.main ARGS`` for every case, and the shared stderr."""
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from absl import flags
from hdml_jax import main
codes = []
for args in {cases!r}:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # a config file's override flags
        delattr(flags.FLAGS, name)
    try:
        sys.argv = ["hdml_jax.main", *args]  # config_flags reads it
        main.main(main.parse_flags(sys.argv))
        codes.append(None)
    except SystemExit as exit:
        codes.append(exit.code)
print(json.dumps(codes))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_newcomer_mistakes_end_in_one_line_that_says_what_to_set(tmp_path):
    data = tmp_path / "data"
    small_csv, _ = tiny_csv_dataset(data / "small", num_train_classes=6, num_test_classes=4, per_class=8)
    two_classes, _ = tiny_csv_dataset(data / "two", num_train_classes=2, num_test_classes=4, per_class=4)
    workdir = tmp_path / "w"
    common = ["--workdir", str(workdir), f"--config.dataset.data_dir={tmp_path / 'cache'}"]
    elsewhere = tmp_path / "elsewhere"  # the working directory: not the repository
    elsewhere.mkdir()
    cases = [
        # a flag without its value, and a misspelt flag
        (["--workdir"], "--workdir needs a value: --workdir="),
        (["--confg.seed=1", *common], "unknown flag --confg.seed. Did you mean --config.seed?"),
        (["--wrkdir=x"], "Did you mean --workdir?"),
        # a config path relative to the repository, from another folder: found (and then the
        # custom config asks for its data set), and one that exists nowhere
        (["--config", "configs/custom.py", *common], "dataset.path is empty"),
        (["--config", "nope.py", *common], f"config file nope.py not found in the working directory ({elsewhere})"),
        # a data set smaller than the recipe's batches
        (
            ["--config", "configs/custom.py", f"--config.dataset.path={small_csv}", *common],
            "batch_size 120 exceeds the 48 training images (6 classes): every step takes a full batch. "
            "Set --config.batch_size=48 or lower.",
        ),
        (
            ["--config", "configs/custom.py:method=cgd", f"--config.dataset.path={small_csv}", *common],
            "set --config.classes_per_batch=6 --config.batch_size=24",
        ),
        (
            ["--config", "configs/custom.py", f"--config.dataset.path={two_classes}", "--config.batch_size=8", *common],
            "hpl_pa needs at least 3 training classes for a coarse level",
        ),
    ]
    codes, stderr = _run_in_one_interpreter([args for args, _ in cases], workdir, elsewhere)
    messages = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert codes == [2] * len(cases), stderr[-3000:]
    assert len(messages) == len(cases), stderr[-3000:]
    for message, (args, expected) in zip(messages, cases, strict=True):
        assert expected in message, (args, message)
    assert "Traceback" not in stderr and "config error" not in stderr
    assert not workdir.exists()  # nothing written, not even an empty workdir


def test_evaluation_that_can_score_nothing_is_refused_before_training():
    def split(labels) -> Split:
        labels = np.asarray(labels, np.int64)
        images = np.zeros((len(labels), 4, 4, 3), np.uint8)
        return Split(ArraySource({"image": images, "label": labels}, "x"), labels)

    train_split = split([0, 0, 1, 1])
    singletons = MetricDataset("tiny", train_split, split([5, 6, 7]))
    with pytest.raises(ConfigError, match="none of the 3 evaluation queries has another image of its class"):
        fits.check_evaluation_fits(singletons)
    note = fits.check_evaluation_fits(MetricDataset("tiny", train_split, split([5, 6, 6])))  # one query scores
    assert note == (
        "note: 1 of the 3 evaluation queries have no other gallery image of their class and are left "
        "out of the retrieval scores."
    )
    is_query = np.array([True, True, False, False])
    disjoint = MetricDataset("tiny", train_split, split([5, 6, 7, 8]), is_query=is_query, is_gallery=~is_query)
    with pytest.raises(ConfigError, match="has a gallery image of its class"):
        fits.check_evaluation_fits(disjoint)


@pytest.mark.parametrize(
    ("fields", "devices", "expected"),
    [
        ({"batch_size": 64}, 1, "Set --config.batch_size=48 or lower."),
        ({"batch_size": 64}, 8, "Set --config.batch_size=48 or lower (a multiple of the 8 devices)."),
        ({"batch_size": 12}, 8, "must be a multiple of the 8 devices: set --config.batch_size=8."),
        ({"sampler": "pk", "classes_per_batch": 8, "samples_per_class": 4, "batch_size": 32}, 1,
         "set --config.classes_per_batch=6 --config.batch_size=24"),
        # P×K must stay a multiple of the 8 devices: 6×4 = 24 is, so is 4×4; 5×4 = 20 is not
        ({"sampler": "pk", "classes_per_batch": 8, "samples_per_class": 2, "batch_size": 16}, 8,
         "set --config.classes_per_batch=4 --config.batch_size=8"),
    ],
)  # fmt: skip
def test_batches_that_cannot_be_drawn_name_the_largest_that_can(fields, devices, expected):
    labels = np.repeat(np.arange(6), 8)  # 48 images of 6 classes
    train_split = Split(ArraySource({"image": np.zeros((48, 2, 2, 3), np.uint8), "label": labels}, "x"), labels)
    config = ml_collections.ConfigDict({"sampler": "shuffle", "eval_batch_size": 64, **fields})
    with pytest.raises(ConfigError) as info:
        fits.check_batches_fit(config, train_split, devices)
    assert expected in str(info.value)


def test_embed_images_given_a_csv_points_to_csv(tmp_path):
    listing = tmp_path / "items.csv"
    listing.write_text("path\na.png\n")
    with pytest.raises(embed.ImageListError, match=f"use --csv {listing}"):
        embed.list_images(listing)
    with pytest.raises(embed.ImageListError, match="nothing exists there"):
        embed.list_images(tmp_path / "missing")


def test_the_rerun_note_says_where_the_run_now_ends():
    by_epochs = ml_collections.ConfigDict({"num_steps": 0, "num_epochs": 50})
    assert setup._target_step_note(by_epochs, 200, 1000) == (
        "The run goes on from step 200 to step 1000 (num_steps 0: num_epochs 50 × 20 steps per epoch)."
    )
    by_steps = ml_collections.ConfigDict({"num_steps": 150, "num_epochs": 50})
    assert "ends at step 150 (num_steps 150); it is at step 200 already" in setup._target_step_note(
        by_steps, 200, 150
    )
