"""Does HPL's k-means hierarchy find the data set's own taxonomy? One line per finished HPL run.

HPL builds its coarse level by k-means over the learned fine proxies (``loss.num_coarse_groups``
groups). When the data set has coarse labels (``synthetic``'s families, SOP's super-classes), the
class → group map of a run's last checkpoint can be compared with the true class → coarse-label
map:

* **NMI** (arithmetic normaliser, ``hdml_jax.cluster.normalized_mutual_info``): 1 when the groups
  are the coarse classes (up to renaming), about 0 when they are unrelated to them;
* **purity**: the share of classes whose group's most common coarse label is their own.

Usage::

    python benchmarks/hpl_groups.py runs/hpl_study/synthetic_sop/hpl_pa*/seed*

Each argument is a trainer workdir; runs that are not hierarchical or have no checkpoint are
listed as skipped. The data set is loaded as the run's ``config.json`` names it (prepared data
only: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hdml_jax import methods
from hdml_jax.evaluation.cluster import normalized_mutual_info
from hdml_jax.training.checkpoints import steps_in


def purity(true: np.ndarray, groups: np.ndarray) -> float:
    """Σ_g max_c |{i : group_i = g, true_i = c}| / N: classes whose group's majority label is theirs."""
    table: dict[int, np.ndarray] = {}
    for t, g in zip(true.tolist(), groups.tolist(), strict=True):
        table.setdefault(g, np.zeros(int(true.max()) + 1, np.int64))[t] += 1
    return float(sum(counts.max() for counts in table.values()) / len(true))


def class_groups(workdir: Path) -> tuple[np.ndarray, int] | None:
    """The class → group map ``a^0`` (real classes only) of the newest checkpoint, and its step."""
    import orbax.checkpoint as ocp

    steps = steps_in(workdir / "checkpoints")
    if not steps:
        return None
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore((workdir / "checkpoints" / str(steps[-1]) / "state").resolve())
    hierarchy = state.get("hierarchy") or {}
    if not hierarchy or float(np.asarray(hierarchy["active"])) <= 0:
        return None
    return np.asarray(hierarchy["assignments"][0]), steps[-1]


def true_coarse(dataset_name: str, data_dir: str | None) -> np.ndarray | None:
    """The train split's class → coarse label map (None without coarse labels)."""
    from hdml_jax.data.datasets import load_dataset
    from hdml_jax.training.train import class_to_coarse

    split = load_dataset(dataset_name, data_dir=data_dir).train
    return None if split.coarse_labels is None else class_to_coarse(split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="trainer workdirs (with config.json)")
    args = parser.parse_args(argv)
    truth: dict[tuple[str, str | None], np.ndarray | None] = {}
    print(f"{'run':<64} {'step':>6} {'groups':>6} {'NMI':>6} {'purity':>7}")
    for workdir in args.workdirs:
        if not workdir.is_dir():  # a shell glob also matches the logs next to the workdirs
            continue
        config_file = workdir / "config.json"
        if not config_file.is_file():
            print(f"{workdir!s:<64} skipped: no config.json")
            continue
        config = json.loads(config_file.read_text())
        if not methods.get(config["method"]).hierarchical:
            print(f"{workdir!s:<64} skipped: method {config['method']} has no hierarchy")
            continue
        key = (config["dataset"]["name"], config["dataset"].get("data_dir"))
        if key not in truth:
            truth[key] = true_coarse(*key)
        coarse = truth[key]
        found = class_groups(workdir)
        if coarse is None or found is None:
            print(f"{workdir!s:<64} skipped: {'no coarse labels' if coarse is None else 'no hierarchy yet'}")
            continue
        groups, step = found
        groups = groups[: len(coarse)]  # padding proxies (sharded runs) sit past the real classes
        nmi = normalized_mutual_info(coarse, groups)
        print(f"{workdir!s:<64} {step:>6} {len(np.unique(groups)):>6} {nmi:>6.3f} {purity(coarse, groups):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
