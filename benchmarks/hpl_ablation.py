"""Ablations of the Hierarchical Proxy-based Loss (HPL): a grid of (variant × seed) training runs.

Every run is an ordinary trainer run (``python -m hdml_jax.main``) in its own workdir,
``<root>/<config stem>/<run key>/seed<seed>`` (the run key is the method and the overrides that
differ from the config file's values, e.g. ``hpl_pa__level_weights=1.0_0.05``, so a run that
several studies hold — Proxy-Anchor, the default HPL-PA, w1 = 0.1 — is trained once); its output
goes to ``seed<seed>.log`` next to the workdir and the runner prints one line per run. A run whose ``final_metrics.json`` exists (the trainer
writes it last, atomically) is finished and skipped; any other run is started again with the same
command, which resumes it from its last checkpoint. So the same command can be rerun after a crash,
a Ctrl-C or a failed run: only what is missing is trained. Then one Markdown report and (for
studies with a numeric axis) one figure per study are written:

    <root>/<config stem>/<study>.md    mean ± std per variant, paired differences, missing runs
    <root>/<config stem>/<study>.png   R@1 and MAP@R against the study's variable (w1, coarse)

Local, sequential (one run after the other on this machine; rerun the same command to resume)::

    python benchmarks/hpl_ablation.py --root runs/hpl_study --config configs/synthetic_sop.py \\
        --study methods --study w1 --seeds 0-4
    python benchmarks/hpl_ablation.py ... --set num_epochs=2     # a quick try: every run 2 epochs
    python benchmarks/hpl_ablation.py ... --list                 # the numbered runs and commands
    python benchmarks/hpl_ablation.py ... --report               # only the reports, no training

SLURM, one array task per run (``--index I`` runs the I-th run of the list; give every call the
same ``--config/--study/--seeds/--set``: they define the list)::

    ARGS="--root /shared/runs/hpl_study --config configs/synthetic_sop.py --study w1 --seeds 0-4"
    N=$(.venv/bin/python benchmarks/hpl_ablation.py --count $ARGS)
    JOB=$(sbatch --parsable --array=0-$((N-1)) launch/hpl_ablation.sbatch $ARGS)
    sbatch --dependency=afterany:${JOB%%;*} --time=0:15:00 --cpus-per-task=2 \\
        --wrap ".venv/bin/python benchmarks/hpl_ablation.py --report $ARGS"

(or run ``--report`` by hand once the array is done; see launch/hpl_ablation.sbatch.)

Studies (``--study``, repeatable; default: all, in this order; ``--config`` picks the data set):

    methods    proxy_anchor, hpl_pa (vs proxy_anchor), proxy_nca, hpl_nca (vs proxy_nca)
    w1         hpl_pa with loss.level_weights=(1.0,w1), w1 in 0 … 1 (vs w1=0: Proxy-Anchor)
    coarse     hpl_pa with loss.num_coarse_groups=(K,), K in 3 … 384 (vs proxy_anchor)
    hierarchy  hpl_pa with k-means groups / the data set's coarse labels (vs proxy_anchor)
    design     hpl_pa: centroid coarse proxies, raw k-means, refresh every 0/1/5 epochs (vs default)
    hier       the two hierarchies: hpl_pa, hier_pa (HIER's LCA proxies in the Poincaré ball) and
               hpl_hier_pa (both), each vs proxy_anchor

Pairing. A seed fixes the initialisation and the order of the training data, whatever the method
(``configs/<x>.py:seed=S``), so the runs of two variants with the same seed differ only by the
variant. The report therefore compares a variant with its baseline seed by seed: the differences
variant − baseline over the seeds finished for both, their mean and a two-sided 95% confidence
interval from Student's t with n − 1 degrees of freedom. The seed-to-seed spread, which both share,
drops out; the unpaired ``mean ± std`` columns keep it. What pairing cannot remove is chaos: two runs
whose losses differ only by float rounding drift apart within tens of steps when training from
scratch, and end as far apart as two seeds (docs/hpl_study.md measures this noise floor; run such
a control — e.g. w1 = 0 against proxy_anchor — before reading small differences).

The values are those of the last evaluation (the top level of ``final_metrics.json``, no selection on
the test set), in percent. Runs that are missing (not started, unfinished, failed) are listed as
such and never enter a mean.

Order of the runs: the studies in the order given, within a study seed by seed, and within a seed
the variants in the study's order (so a sequential run completes whole seeds early: a partial
``--report`` already pairs). Runs that occur in several studies are trained once (see above).

Exit codes: 0 all selected runs finished; 1 some run failed (the others still ran, unless
``--stop-on-error``; see its log); 2 wrong arguments; 130 stopped by Ctrl-C (the interrupted run
saved a checkpoint: rerun to resume); 143 stopped by SIGTERM (likewise). The trainer runs in the
repository root with ``JAX_COMPILATION_CACHE_DIR`` set (default ``<root>/.jax_cache``) so that runs
of the same shapes reuse the compiled code.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_sop.py"
DEFAULT_ROOT = "runs/hpl_study"
DEFAULT_SEEDS = "0-4"
FINAL = "final_metrics.json"
# Fields the runner sets itself: a --set of them would break the grid.
RESERVED_FIELDS = ("seed", "method")
EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143


# ----------------------------------------------------------------------------- the grid


@dataclass
class Variant:
    """One setting of a study: a config file, a method and config overrides.

    ``overrides`` maps dotted config fields to their command-line values (``"(1.0,0.1)"``,
    ``"True"``, ``"centroids"``); ``x`` places the variant on the study's figure (None: not
    plotted as a point); ``baseline`` names the variant of the same study it is paired against.
    """

    study: str
    name: str
    config: str
    method: str
    overrides: dict[str, str] = field(default_factory=dict)
    x: float | None = None
    baseline: str | None = None


@dataclass(frozen=True)
class StudyInfo:
    title: str
    description: str
    x_label: str | None = None  # the figure's x axis; None: no figure
    x_scale: str = "linear"  # "log", or "symlog" (linear around 0, so that x = 0 shows)


STUDY_INFO: dict[str, StudyInfo] = {
    "methods": StudyInfo(
        "HPL against its flat base losses",
        "HPL-PA and HPL-NCA (hierarchical: fine proxies plus k-means coarse proxies) against "
        "Proxy-Anchor and Proxy-NCA, each with its method's default recipe.",
    ),
    "w1": StudyInfo(
        "weight of the coarse level",
        "HPL-PA with `loss.level_weights=(1.0, w1)`. w1 = 0 switches the coarse level off: it is "
        "Proxy-Anchor, the baseline of every other w1.",
        x_label="coarse level weight w1",
        x_scale="symlog",
    ),
    "coarse": StudyInfo(
        "number of coarse groups",
        "HPL-PA with `loss.num_coarse_groups=(K,)` (k-means over the fine proxies), against Proxy-Anchor.",
        x_label="number of coarse groups K",
        x_scale="log",
    ),
    "hierarchy": StudyInfo(
        "where the hierarchy comes from",
        "HPL-PA with coarse groups from k-means over the learned proxies (default) or from the "
        "data set's own coarse labels (`loss.coarse_from_labels=True`), against Proxy-Anchor.",
    ),
    "hier": StudyInfo(
        "HPL against HIER",
        "The two published ways to learn a hierarchy of proxies, on the same backbone, data and "
        "seeds: HPL-PA (k-means levels over the fine proxies), HIER-PA (learned LCA proxies in "
        "the Poincaré ball, λ₂ = 0.5) and both at once (`hpl_hier_pa`), each against Proxy-Anchor.",
    ),
    "design": StudyInfo(
        "design choices of HPL-PA",
        "Coarse proxies recomputed as group centroids instead of learned, k-means on raw instead "
        "of L2-normalised proxies, class → group assignments refreshed every 0 (never) / 1 / 5 "
        "epochs; each against the default HPL-PA.",
    ),
}


def _number(value: float) -> str:
    """``0.05`` → ``"0.05"``, ``1.0`` → ``"1"``: short, filesystem-safe."""
    return f"{value:g}"


def methods_study(config: str = CONFIG) -> list[Variant]:
    return [
        Variant("methods", "proxy_anchor", config, "proxy_anchor"),
        Variant("methods", "hpl_pa", config, "hpl_pa", baseline="proxy_anchor"),
        Variant("methods", "proxy_nca", config, "proxy_nca"),
        Variant("methods", "hpl_nca", config, "hpl_nca", baseline="proxy_nca"),
    ]


W1_VALUES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


def w1_study(config: str = CONFIG) -> list[Variant]:
    base = f"w1_{_number(W1_VALUES[0])}"
    return [
        Variant(
            "w1",
            f"w1_{_number(w1)}",
            config,
            "hpl_pa",
            {"loss.level_weights": f"(1.0,{float(w1)!r})"},
            x=float(w1),
            baseline=None if w1 == W1_VALUES[0] else base,
        )
        for w1 in W1_VALUES
    ]


COARSE_GROUPS = (3, 6, 12, 24, 48, 96, 384)


def coarse_study(config: str = CONFIG) -> list[Variant]:
    return [
        Variant("coarse", "proxy_anchor", config, "proxy_anchor"),
        *(
            Variant(
                "coarse",
                f"groups_{k}",
                config,
                "hpl_pa",
                {"loss.num_coarse_groups": f"({k},)"},
                x=float(k),
                baseline="proxy_anchor",
            )
            for k in COARSE_GROUPS
        ),
    ]


def hierarchy_study(config: str = CONFIG) -> list[Variant]:
    return [
        Variant("hierarchy", "kmeans", config, "hpl_pa", baseline="proxy_anchor"),
        Variant(
            "hierarchy",
            "labels",
            config,
            "hpl_pa",
            {"loss.coarse_from_labels": "True"},
            baseline="proxy_anchor",
        ),
        Variant("hierarchy", "proxy_anchor", config, "proxy_anchor"),
    ]


def design_study(config: str = CONFIG) -> list[Variant]:
    changes = {
        "centroids": {"loss.coarse_proxies": "centroids"},
        "raw_kmeans": {"loss.kmeans_normalize": "False"},
        "refresh_0": {"loss.hierarchy_refresh_epochs": "0"},
        "refresh_1": {"loss.hierarchy_refresh_epochs": "1"},
        "refresh_5": {"loss.hierarchy_refresh_epochs": "5"},
    }
    return [
        Variant("design", "default", config, "hpl_pa"),
        *(
            Variant("design", name, config, "hpl_pa", dict(o), baseline="default")
            for name, o in changes.items()
        ),
    ]


def hier_study(config: str = CONFIG) -> list[Variant]:
    return [
        Variant("hier", "proxy_anchor", config, "proxy_anchor"),
        Variant("hier", "hpl_pa", config, "hpl_pa", baseline="proxy_anchor"),
        Variant("hier", "hier_pa", config, "hier_pa", baseline="proxy_anchor"),
        Variant("hier", "hpl_hier_pa", config, "hpl_hier_pa", baseline="proxy_anchor"),
    ]


STUDY_BUILDERS: dict[str, Callable[[str], list[Variant]]] = {
    "methods": methods_study,
    "w1": w1_study,
    "coarse": coarse_study,
    "hierarchy": hierarchy_study,
    "design": design_study,
    "hier": hier_study,
}


def build_studies(config: str = CONFIG) -> dict[str, list[Variant]]:
    """Every study's variants for one config file (one data set)."""
    return {name: builder(config) for name, builder in STUDY_BUILDERS.items()}


STUDIES: dict[str, list[Variant]] = build_studies(CONFIG)


def trainer_command(python: str = sys.executable) -> list[str]:
    return [python, "-m", "hdml_jax.main"]


def command(
    variant: Variant,
    seed: int,
    workdir: Path | str,
    python: str = sys.executable,
    *,
    sets: Sequence[tuple[str, str]] = (),
    trainer: Sequence[str] | None = None,
) -> list[str]:
    """The trainer command of one run: the variant's overrides, then the ``--set`` ones of the call.

    ``trainer`` replaces ``python -m hdml_jax.main`` (the tests use a fake trainer).
    """
    argv = list(trainer) if trainer is not None else trainer_command(python)
    argv += ["--config", f"{variant.config}:method={variant.method},seed={seed}", "--workdir", str(workdir)]
    argv += [f"--config.{key}={value}" for key, value in variant.overrides.items()]
    argv += [f"--config.{key}={value}" for key, value in sets]
    return argv


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string on the command line (e.g. centroids)


def _same_value(override: str, default: Any) -> bool:
    value = _literal(override)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return len(value) == len(default) and all(
            _same_value(repr(v), d) for v, d in zip(value, default, strict=True)
        )
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) == float(default)
    return value == default


@functools.lru_cache(maxsize=64)
def _config_defaults(config: str, method: str) -> Any:
    """The config file's own values for ``method`` (None when the file cannot be loaded)."""
    path = Path(config) if Path(config).is_absolute() else REPO / config
    try:
        spec = importlib.util.spec_from_file_location(f"_hpl_ablation_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(f"method={method}")
    except Exception:  # any failure: keep every override (runs are then not shared)
        return None


def effective_overrides(variant: Variant) -> dict[str, str]:
    """The variant's overrides without those equal to the config file's own value.

    So ``w1 = 0.1`` (the default weights) or ``K = 12`` (configs/synthetic_sop.py's default) is the
    same run as the plain method, trained once and shared by every study that holds it.
    """
    defaults = _config_defaults(variant.config, variant.method)
    if defaults is None:
        return dict(variant.overrides)
    kept = {}
    for key, value in variant.overrides.items():
        node = defaults
        try:
            for part in key.split("."):
                node = node[part]
        except (KeyError, AttributeError):
            kept[key] = value
            continue
        if not _same_value(value, node):
            kept[key] = value
    return kept


def run_key(variant: Variant) -> str:
    """A run's directory name: the method and its non-default overrides, e.g.
    ``hpl_pa__level_weights=1.0_0.05``. Equal settings give equal keys whatever the study."""
    parts = [variant.method]
    for key, value in sorted(effective_overrides(variant).items()):
        slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", str(value)).strip("_")
        parts.append(f"{key.split('.')[-1]}={slug}")
    return "__".join(parts)


@dataclass
class Run:
    """One (variant, seed) of the grid and where its files go."""

    variant: Variant
    seed: int
    root: Path

    @property
    def workdir(self) -> Path:
        """``<root>/<config stem>/<run key>/seed<seed>``: shared by the studies that hold this run."""
        return self.root / Path(self.variant.config).stem / run_key(self.variant) / f"seed{self.seed}"

    @property
    def log(self) -> Path:
        return self.workdir.parent / f"seed{self.seed}.log"

    @property
    def record(self) -> Path:
        """What the runner started: command, ``--set`` overrides, exit code, duration."""
        return self.workdir.parent / f"seed{self.seed}.run.json"

    @property
    def label(self) -> str:
        return f"{self.variant.study}/{self.variant.name} seed {self.seed}"

    def finished(self) -> bool:
        return (self.workdir / FINAL).is_file()


def plan(studies: Mapping[str, Sequence[Variant]], seeds: Sequence[int], root: Path) -> list[Run]:
    """The runs in order: study by study, within a study seed by seed, then variant by variant."""
    return [
        Run(variant, seed, Path(root))
        for variants in studies.values()
        for seed in seeds
        for variant in variants
    ]


# ----------------------------------------------------------------------------- running


def child_env(root: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The trainer's environment: a persistent JIT cache shared by all runs (unless already set)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(root) / ".jax_cache"))
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log fills as the run goes (tail -f)
    return env


class _Stop:
    """SIGINT/SIGTERM while the runner waits for a trainer: note it, keep waiting.

    The trainer is in the runner's process group, so Ctrl-C (and a scheduler's signal to the
    group) reaches it too: it saves a checkpoint at its next step and exits; killing it here (as
    ``subprocess.run`` does on KeyboardInterrupt) would lose that checkpoint. Nothing is forwarded
    (it would be a second signal, on which the trainer exits at once). A third signal kills a
    trainer that has not stopped yet.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.child: subprocess.Popen | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        child = self.child
        if self.count >= 3 and child is not None and child.poll() is None:
            child.kill()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Stop]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 100:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def _summary(metrics: Mapping[str, Any]) -> str:
    parts = [
        f"{label} {100 * metrics[key]:.1f}"
        for key, label in (("recall@1", "R@1"), ("map@r", "MAP@R"))
        if isinstance(metrics.get(key), int | float)
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def run(
    runs: Sequence[Run],
    *,
    sets: Sequence[tuple[str, str]] = (),
    trainer: Sequence[str] | None = None,
    python: str = sys.executable,
    stop_on_error: bool = False,
    env: Mapping[str, str] | None = None,
    first: int = 0,
    total: int | None = None,
    out=None,
) -> int:
    """Train every run that is not finished, one after the other; returns the exit code.

    ``first``/``total`` only number the progress lines (``--index``: ``[first+1/total]``).
    Returns 0 when every run finished, 1 when some failed, 130/143 when stopped by SIGINT/SIGTERM
    (or when a trainer exited 130: it was interrupted; rerunning resumes it).
    """
    out = out or sys.stdout
    total = len(runs) if total is None else total
    if not runs:
        return 0
    env = dict(env) if env is not None else child_env(runs[0].root)
    durations: list[float] = []
    failed: list[Run] = []
    stop = _Stop()

    def say(text: str, end: str = "\n") -> None:
        print(text, end=end, file=out, flush=True)

    with stop.installed():
        for k, item in enumerate(runs):
            if stop.signum is not None:
                break
            head = f"[{first + k + 1}/{total}] {item.label}: "
            if item.finished():
                say(head + "skip (finished)")
                continue
            argv = command(item.variant, item.seed, item.workdir, python, sets=sets, trainer=trainer)
            item.log.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "study": item.variant.study,
                "variant": item.variant.name,
                "seed": item.seed,
                "command": argv,
                "sets": dict(sets),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            }
            _write_json(item.record, record)
            say(head, end="")
            start = time.monotonic()
            with open(item.log, "a") as log:
                log.write(f"\n=== {record['started']} hpl_ablation.py runs: {shlex.join(argv)}\n")
                log.flush()
                try:
                    child = subprocess.Popen(
                        argv,
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                except OSError as error:  # no such trainer executable, ...
                    log.write(f"hpl_ablation.py: cannot start the trainer: {error}\n")
                    child = None
                    returncode = 127
                if child is not None:
                    stop.child = child
                    try:
                        returncode = child.wait()
                    finally:
                        stop.child = None
            elapsed = time.monotonic() - start
            _write_json(item.record, {**record, "returncode": returncode, "duration_s": round(elapsed, 1)})
            metrics = read_json(item.workdir / FINAL) if returncode == 0 else None
            if isinstance(metrics, dict):
                durations.append(elapsed)
                left = sum(1 for later in runs[k + 1 :] if not later.finished())
                eta = f"; ETA {_duration(left * statistics.fmean(durations))}" if left else ""
                say(f"done in {_duration(elapsed)}{_summary(metrics)}{eta}")
                continue
            if returncode == EXIT_SIGINT or stop.signum == signal.SIGINT:
                say(
                    f"interrupted ({_exit_text(returncode)}); rerun the same command to resume, see {item.log}"
                )
                return EXIT_SIGINT
            if stop.signum == signal.SIGTERM:
                say(f"stopped by SIGTERM ({_exit_text(returncode)}); rerun the same command to resume")
                return EXIT_SIGTERM
            failed.append(item)
            why = _exit_text(returncode) if returncode else f"exit 0 without {FINAL}"
            say(f"failed ({why}), see {item.log}")
            if stop_on_error:
                break
    if stop.signum is not None and not all(item.finished() for item in runs):
        name = "Ctrl-C" if stop.signum == signal.SIGINT else "SIGTERM"
        say(f"stopped by {name}; rerun the same command to resume")
        return EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)}")
        return EXIT_FAILED
    return 0


# ----------------------------------------------------------------------------- collecting


@dataclass
class Record:
    """One (variant, seed) as found on disk. ``metrics`` is None when the run is missing."""

    study: str
    variant: str
    seed: int
    workdir: Path
    metrics: dict[str, float] | None
    sets: dict[str, str] | None  # the run's --set overrides as recorded; None: unknown
    problem: str | None = None  # why it is missing

    @property
    def done(self) -> bool:
        return self.metrics is not None


def collect(root: Path, studies: Mapping[str, Sequence[Variant]], seeds: Sequence[int]) -> list[Record]:
    """Every (study, variant, seed) of the grid: the metrics of its ``final_metrics.json`` (top
    level: the last evaluation), or why it is missing. Nothing is filled in for a missing run."""
    records = []
    for item in plan(studies, seeds, Path(root)):
        started = read_json(item.record)
        started = started if isinstance(started, dict) else {}
        sets = started.get("sets")
        summary = read_json(item.workdir / FINAL) if item.finished() else None
        problem = None
        metrics = None
        if isinstance(summary, dict):
            metrics = {
                key: float(value)
                for key, value in summary.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        elif item.finished():
            problem = f"unreadable {FINAL}"
        elif isinstance(started.get("returncode"), int) and started["returncode"] != 0:
            problem = f"failed ({_exit_text(started['returncode'])}), log {item.log}"
        elif item.workdir.exists():
            problem = "unfinished (no final_metrics.json yet)"
        else:
            problem = "not started"
        records.append(
            Record(
                item.variant.study,
                item.variant.name,
                item.seed,
                item.workdir,
                metrics,
                dict(sets) if isinstance(sets, dict) else None,
                problem,
            )
        )
    return records


# ----------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF; |error| < 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-11 * max(1.0, high):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided critical value: df=1 → 12.706, df=4 → 2.776, df=9 → 2.262, df → ∞: 1.960."""
    return t_quantile(0.5 + confidence / 2.0, df)


@dataclass(frozen=True)
class Paired:
    """Mean of the differences (variant − baseline) and its confidence interval; None with n < 2."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def paired_difference(differences: Sequence[float], confidence: float = 0.95) -> Paired:
    n = len(differences)
    if n == 0:
        return Paired(0, None, None, None)
    mean = statistics.fmean(differences)
    if n == 1:
        return Paired(1, mean, None, None)
    half = t_critical(n - 1, confidence) * statistics.stdev(differences) / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half)


# ----------------------------------------------------------------------------- the report

DASH = "–"


def metric_columns(records: Sequence[Record]) -> list[str]:
    """recall@K (every K found, ascending), then map@r and r_precision when present."""
    keys = {key for r in records if r.metrics for key in r.metrics}
    recalls = sorted((k for k in keys if re.fullmatch(r"recall@\d+", k)), key=lambda k: int(k.split("@")[1]))
    return recalls + [k for k in ("map@r", "r_precision") if k in keys]


def metric_label(key: str) -> str:
    if key.startswith("recall@"):
        return "R@" + key.split("@")[1]
    return {"map@r": "MAP@R", "r_precision": "R-Precision"}.get(key, key)


def mean_std(values: Sequence[float]) -> str:
    """Percent, two decimals (small metrics such as MAP@R ≈ 2 need them): ``"41.20 ± 0.31"``;
    ``"41.20 ± –"`` for one value; ``"–"`` for none."""
    if not values:
        return DASH
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f} ± {DASH}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def format_paired(paired: Paired) -> str:
    """Percentage points, two decimals: ``"+2.00 [+1.52, +2.48]"``."""
    if paired.mean is None:
        return DASH
    if paired.low is None or paired.high is None:
        return f"{paired.mean:+.2f} [{DASH}]"
    return f"{paired.mean:+.2f} [{paired.low:+.2f}, {paired.high:+.2f}]"


def _values(records: Sequence[Record], variant: str, key: str) -> dict[int, float]:
    return {
        r.seed: r.metrics[key]
        for r in records
        if r.variant == variant and r.metrics is not None and key in r.metrics
    }


def _seeds_text(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _sets_text(records: Sequence[Record]) -> str:
    found = Counter(json.dumps(r.sets, sort_keys=True) for r in records if r.done and r.sets is not None)
    unknown = sum(1 for r in records if r.done and r.sets is None)

    def words(encoded: str) -> str:
        sets = json.loads(encoded)
        return " ".join(f"`--set {k}={v}`" for k, v in sets.items()) or "none"

    if not found:
        return "unknown (not started by this runner)" if unknown else "none"
    if len(found) == 1 and not unknown:
        return words(next(iter(found)))
    parts = [f"{words(encoded)} ({n} runs)" for encoded, n in found.most_common()]
    if unknown:
        parts.append(f"unknown ({unknown} runs)")
    return "MIXED, the runs differ: " + "; ".join(parts)


def _reference(variants: Sequence[Variant]) -> str | None:
    """The baseline most variants of the study are paired against (the figure's dashed line)."""
    counts = Counter(v.baseline for v in variants if v.baseline is not None)
    return counts.most_common(1)[0][0] if counts else None


def study_markdown(
    study: str, variants: Sequence[Variant], seeds: Sequence[int], records: Sequence[Record]
) -> str:
    info = STUDY_INFO.get(study, StudyInfo(study, ""))
    columns = metric_columns(records)
    done = [r for r in records if r.done]
    configs = sorted({v.config for v in variants})
    has_x = any(v.x is not None for v in variants)
    lines = [
        f"# HPL ablation `{study}`: {info.title}",
        "",
        info.description,
        "",
        f"- config: {', '.join(f'`{c}`' for c in configs)}",
        f"- seeds: {_seeds_text(seeds)} ({len(seeds)} per variant); finished runs: {len(done)} of {len(records)}",
        f"- `--set` overrides of every run: {_sets_text(records)}",
        "- values: the last evaluation of each run (top level of `final_metrics.json`, no selection on "
        "the test set), in percent, mean ± sample standard deviation over the finished seeds "
        f"({DASH} with fewer than 2)",
        "",
    ]
    header = [
        "variant",
        "setting",
        *([info.x_label or "x"] if has_x else []),
        "runs",
        *map(metric_label, columns),
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        setting = " ".join([v.method, *(f"{k}={val}" for k, val in v.overrides.items())])
        n = sum(1 for r in done if r.variant == v.name)
        row = [f"`{v.name}`", f"`{setting}`"]
        if has_x:
            row.append(DASH if v.x is None else _number(v.x))
        row.append(f"{n}/{len(seeds)}")
        row += [mean_std(list(_values(records, v.name, key).values())) for key in columns]
        lines.append("| " + " | ".join(row) + " |")

    paired = [v for v in variants if v.baseline is not None]
    if paired:
        lines += [
            "",
            "## Paired differences",
            "",
            "Variant − baseline for the same seed (same initialisation and data order), in percentage "
            "points: mean [95% confidence interval, Student's t with n − 1 degrees of freedom] over "
            f"the seeds finished for both; n = the number of pairs ({DASH}: no pair; [{DASH}]: one pair, "
            "no interval).",
            "",
        ]
        header = ["variant", "baseline", "n", *(f"Δ{metric_label(k)}" for k in columns)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for v in paired:
            row = [f"`{v.name}`", f"`{v.baseline}`"]
            counts, cells = set(), []
            for key in columns:
                mine, base = _values(records, v.name, key), _values(records, v.baseline or "", key)
                common = sorted(set(mine) & set(base))
                counts.add(len(common))
                cells.append(format_paired(paired_difference([100 * (mine[s] - base[s]) for s in common])))
            row.append("/".join(map(str, sorted(counts))) if counts else "0")
            lines.append("| " + " | ".join(row + cells) + " |")

    missing = [r for r in records if not r.done]
    lines += ["", "## Missing runs", ""]
    if missing:
        lines.append("Not in any mean or difference above:")
        lines.append("")
        lines += [f"- `{r.variant}` seed {r.seed}: {r.problem}" for r in missing]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def plot_study(
    path: Path, study: str, variants: Sequence[Variant], seeds: Sequence[int], records: Sequence[Record]
) -> bool:
    """R@1 and MAP@R (two panels) against the study's variable; False when there is nothing to draw."""
    info = STUDY_INFO.get(study, StudyInfo(study, "", "x"))
    points = [v for v in variants if v.x is not None]
    keys = [k for k in ("recall@1", "map@r") if k in metric_columns(records)]
    if not points or not keys or not any(_values(records, v.name, keys[0]) for v in points):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    reference = _reference(variants)
    figure, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        if reference is not None and (base := list(_values(records, reference, key).values())):
            mean = 100 * statistics.fmean(base)
            std = 100 * statistics.stdev(base) if len(base) > 1 else 0.0
            ax.axhline(mean, color="grey", linestyle="--", label=f"{reference} (baseline, n={len(base)})")
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2, linewidth=0)
        xs, means, stds = [], [], []
        for v in points:
            values = list(_values(records, v.name, key).values())
            if values:
                xs.append(v.x)
                means.append(100 * statistics.fmean(values))
                stds.append(100 * statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"{points[0].method} (mean ± std)")
        positive = [x for x in xs if x > 0]
        if info.x_scale == "symlog" and positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        elif info.x_scale == "log" and positive and len(positive) == len(xs):
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.set_xticklabels([_number(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(info.x_label or "x")
        ax.set_ylabel(f"{metric_label(key)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    configs = ", ".join(sorted({v.config for v in variants}))
    figure.suptitle(
        f"HPL ablation {study}: {info.title} ({configs}, seeds {_seeds_text(seeds)})", fontsize="medium"
    )
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return True


def report(
    root: Path,
    studies: Mapping[str, Sequence[Variant]],
    seeds: Sequence[int],
    records: Sequence[Record] | None = None,
) -> list[Path]:
    """Write ``<root>/<config stem>/<study>.md`` for every study and ``<study>.png`` next to it
    where the study has an x axis (one folder per data set: the same study on two configs does
    not overwrite itself); returns the files written."""
    root = Path(root)
    records = collect(root, studies, seeds) if records is None else records
    written = []
    for study, variants in studies.items():
        mine = [r for r in records if r.study == study]
        folder = root / Path(variants[0].config).stem if variants else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{study}.md"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(study_markdown(study, variants, seeds, mine))
        os.replace(tmp, path)
        written.append(path)
        figure = folder / f"{study}.png"
        if plot_study(figure, study, variants, seeds, mine):
            written.append(figure)
    return written


# ----------------------------------------------------------------------------- command line


def parse_seeds(text: str) -> list[int]:
    """``"0-4"``, ``"0,2,5"``, ``"3"`` or a mix (``"0-2,7"``) → sorted distinct seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"bad seeds {text!r}: write 0-4, 0,2,5 or 3")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise argparse.ArgumentTypeError(f"bad seed range {part.strip()!r}: the end is below the start")
        seeds.update(range(low, high + 1))
    return sorted(seeds)


def parse_set(text: str) -> tuple[str, str]:
    """``"num_epochs=2"`` → ``("num_epochs", "2")``: a config field, without ``--config.``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key) or key.startswith("config."):
        raise argparse.ArgumentTypeError(
            f"bad --set {text!r}: write FIELD=VALUE with a config field, e.g. num_epochs=2 or optimizer.lr=1e-4"
        )
    if key in RESERVED_FIELDS:
        raise argparse.ArgumentTypeError(
            f"--set {key}=... is not allowed: the runner sets {key} for every run"
        )
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpl_ablation.py",
        description="HPL ablation studies: a resumable grid of (variant x seed) trainer runs, then "
        "<root>/<config stem>/<study>.md and .png. More: the module docstring.",
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"where the runs go (default {DEFAULT_ROOT})")
    parser.add_argument("--config", default=CONFIG, help=f"the config file of every run (default {CONFIG})")
    parser.add_argument(
        "--study",
        action="append",
        choices=list(STUDY_BUILDERS),
        help="a study to run (repeatable; default: all)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=parse_seeds(DEFAULT_SEEDS),
        help=f"0-4, 0,2,5 or 3 (default {DEFAULT_SEEDS})",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=parse_set,
        default=[],
        metavar="FIELD=VALUE",
        help="a config override for every run, e.g. --set num_epochs=2 (repeatable)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the numbered runs and their commands")
    mode.add_argument("--count", action="store_true", help="print the number of runs (for --array)")
    mode.add_argument(
        "--index", type=int, metavar="I", help="run only the I-th run (0-based; SLURM arrays); no report"
    )
    mode.add_argument("--report", action="store_true", help="only write the reports from the finished runs")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    # The tests' fake trainer: a command line replacing "python -m hdml_jax.main".
    parser.add_argument("--trainer", type=shlex.split, default=None, help=argparse.SUPPRESS)
    return parser


def _resolve_config(config: str) -> str:
    """A path relative to the current directory still names the same file from the repository root
    (where the trainer runs)."""
    path = Path(config)
    if not path.is_absolute() and path.is_file() and Path.cwd().resolve() != REPO:
        return str(path.resolve())
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _resolve_config(args.config)
    every = build_studies(config)
    selected = {name: every[name] for name in dict.fromkeys(args.study or every)}
    for key, _ in args.sets:
        varied = sorted({v.study for vs in selected.values() for v in vs if key in v.overrides})
        if varied:
            parser.error(f"--set {key}=... conflicts with study {', '.join(varied)}, which varies {key}")
    root = Path(args.root).resolve()  # absolute: the trainer runs in the repository root
    runs = every_run = plan(selected, args.seeds, root)
    if args.count:
        print(len(runs))
        return 0
    if args.list:
        for i, item in enumerate(runs):
            state = "finished" if item.finished() else "to run"
            print(f"{i:4d}  {item.label}  ({state})")
            argv_ = command(item.variant, item.seed, item.workdir, sets=args.sets, trainer=args.trainer)
            print(f"      {shlex.join(argv_)}")
        return 0
    if args.report:
        for path in report(root, selected, args.seeds):
            print(f"wrote {path}")
        return 0
    first = 0
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            parser.error(
                f"--index {args.index} is out of range: the selection has {len(runs)} runs (0-{len(runs) - 1})"
            )
        first, runs = args.index, [runs[args.index]]
    config_file = Path(config) if Path(config).is_absolute() else REPO / config
    if not config_file.is_file():
        parser.error(f"config file {config} not found (relative paths start at {REPO})")
    code = run(
        runs,
        sets=args.sets,
        trainer=args.trainer,
        stop_on_error=args.stop_on_error,
        first=first,
        total=len(every_run),
    )
    if args.index is None and code in (0, EXIT_FAILED):
        for path in report(root, selected, args.seeds):
            print(f"wrote {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
