"""benchmarks/hpl_ablation.py: the grid, the resumable runner, the report, launch/hpl_ablation.sbatch.

No training: a fake trainer (a small script in tmp_path, given by the hidden ``--trainer`` option)
parses the command the runner built and writes a ``final_metrics.json`` whose metrics are a known
function of the method, the seed and ``loss.level_weights``, so every mean, standard deviation and
paired difference of the report can be recomputed here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "hpl_ablation.sbatch"


def _load():
    spec = importlib.util.spec_from_file_location("hpl_ablation", ROOT / "benchmarks" / "hpl_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


hpl = _load()

# The fake trainer. fake_metrics is also used here to write results directly and to compute the
# expected numbers. HPL gains exactly 2 points of R@1 (1 of MAP@R) over its base loss for every
# seed, except with w1 >= 0.5, where the gain grows with the seed (a CI of non-zero width).
FAKE_SOURCE = r"""
import json, os, signal, sys, time
from pathlib import Path


def fake_metrics(method, seed, overrides):
    weights = overrides.get("loss.level_weights")
    w1 = float(weights.strip("()").split(",")[1]) if weights else 0.1
    gain = 0.0
    if method.startswith("hpl") and w1 > 0:
        gain = 0.02 + (0.01 * seed**2 if w1 >= 0.5 else 0.0)
    top = {
        "recall@1": 0.5 + 0.01 * seed + gain,
        "recall@10": 0.8 + 0.002 * seed,
        "recall@100": 0.95,
        "map@r": 0.2 + 0.005 * seed + gain / 2,
        "r_precision": 0.3 + 0.004 * seed,
        "nmi": 0.7,
    }
    return {"step": 100, "epoch": 2.0, **top, "best": {**top, "recall@1": 0.99}, "best_by": "recall@1"}


def main(args):
    value = lambda flag: args[args.index(flag) + 1]
    path, _, spec = value("--config").partition(":")
    options = dict(part.split("=", 1) for part in spec.split(","))
    seed, method = int(options["seed"]), options["method"]
    workdir = Path(value("--workdir"))
    overrides = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        calls.write(json.dumps({
            "workdir": str(workdir), "argv": args, "cwd": os.getcwd(),
            "cache": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        }) + "\n")
    print(f"fake trainer: {method} seed {seed}")
    if os.environ.get("FAKE_WAIT_SIGNAL"):
        got = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: got.append(signum))
        Path(os.environ["FAKE_WAIT_SIGNAL"]).write_text("started")
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # "saving a checkpoint"; a second signal would be recorded in got
        Path(os.environ["FAKE_WAIT_SIGNAL"]).write_text(json.dumps(got))
        return 130 if got and got[0] == signal.SIGINT else 0
    if os.environ.get("FAKE_FAIL_SEED") == str(seed):
        print("error: boom", file=sys.stderr)
        return int(os.environ.get("FAKE_FAIL_CODE", "1"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "final_metrics.json").write_text(json.dumps(fake_metrics(method, seed, overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""
_namespace: dict = {}
exec(FAKE_SOURCE, _namespace)
fake_metrics = _namespace["fake_metrics"]
KEYS = ("recall@1", "recall@10", "recall@100", "map@r", "r_precision")
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``--trainer`` for the fake trainer, and a reader of its invocations."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_SOURCE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL_SEED", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def invocations() -> list[dict]:
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return {"trainer": f"{sys.executable} {script}", "calls": invocations, "root": tmp_path / "study"}


def cli(fake, *args: str) -> int:
    common = ["--root", str(fake["root"]), "--config", "configs/synthetic.py", "--trainer", fake["trainer"]]
    return hpl.main([*common, *args])


def finished(root: Path) -> set[str]:
    return {str(p.parent.relative_to(root)) for p in root.rglob("final_metrics.json")}


# ----------------------------------------------------------------------------- the grid


def test_runs_shared_by_studies_share_a_workdir():
    """An override equal to the config file's own value is no different run."""
    sop = hpl.build_studies("configs/synthetic_sop.py")
    key = {(v.study, v.name): hpl.run_key(v) for study in sop.values() for v in study}
    assert key["methods", "hpl_pa"] == key["w1", "w1_0.1"] == key["coarse", "groups_12"] == "hpl_pa"
    assert key["design", "default"] == key["hierarchy", "kmeans"] == "hpl_pa"
    assert key["w1", "w1_0.05"] == "hpl_pa__level_weights=1.0_0.05"
    assert key["design", "refresh_5"] == "hpl_pa__hierarchy_refresh_epochs=5"
    assert key["hierarchy", "proxy_anchor"] == key["coarse", "proxy_anchor"] == "proxy_anchor"
    synthetic = {v.name: hpl.run_key(v) for v in hpl.build_studies("configs/synthetic.py")["coarse"]}
    assert synthetic["groups_12"] == "hpl_pa__num_coarse_groups=12"  # synthetic.py has 16 groups
    assert len(set(key.values())) == 24  # hier: hier_pa and hpl_hier_pa are new runs


def test_grid_names_baselines_and_commands():
    assert list(hpl.STUDIES) == ["methods", "w1", "coarse", "hierarchy", "design", "hier"]
    for study, variants in hpl.STUDIES.items():
        names = [v.name for v in variants]
        assert len(names) == len(set(names)), study
        for v in variants:
            assert v.study == study and v.config == hpl.CONFIG
            assert v.name.replace("_", "").replace(".", "").isalnum(), v.name  # filesystem-safe
            assert v.baseline is None or (v.baseline in names and v.baseline != v.name), (study, v.name)
    w1 = {v.name: v for v in hpl.STUDIES["w1"]}
    assert list(w1) == ["w1_0", "w1_0.01", "w1_0.05", "w1_0.1", "w1_0.2", "w1_0.5", "w1_1"]
    assert w1["w1_0.05"].overrides == {"loss.level_weights": "(1.0,0.05)"} and w1["w1_0.05"].x == 0.05
    assert w1["w1_0"].baseline is None and w1["w1_1"].baseline == "w1_0"
    coarse = {v.name: v for v in hpl.STUDIES["coarse"]}
    assert coarse["groups_12"].overrides == {"loss.num_coarse_groups": "(12,)"}
    assert coarse["proxy_anchor"].x is None and coarse["groups_384"].baseline == "proxy_anchor"
    assert {v.name: v.baseline for v in hpl.STUDIES["methods"]} == {
        "proxy_anchor": None,
        "hpl_pa": "proxy_anchor",
        "proxy_nca": None,
        "hpl_nca": "proxy_nca",
    }
    assert {v.name for v in hpl.STUDIES["design"]} == {
        "default",
        "centroids",
        "raw_kmeans",
        "refresh_0",
        "refresh_1",
        "refresh_5",
    }
    assert hpl.build_studies("configs/synthetic.py")["hierarchy"][1].config == "configs/synthetic.py"

    for variants in hpl.STUDIES.values():
        for v in variants:
            argv = hpl.command(v, 3, "/w/d", python="/py", sets=[("num_epochs", "2")])
            assert argv[:3] == ["/py", "-m", "hdml_jax.main"]
            assert argv.count(f"{v.config}:method={v.method},seed=3") == 1
            assert argv[argv.index("--config") + 1] == f"{v.config}:method={v.method},seed=3"
            assert argv[argv.index("--workdir") + 1] == "/w/d"
            for key, value in v.overrides.items():
                assert argv.count(f"--config.{key}={value}") == 1
            assert argv[-1] == "--config.num_epochs=2"
    assert hpl.command(hpl.STUDIES["methods"][0], 0, "w", trainer=["fake"])[:2] == ["fake", "--config"]


def test_seed_and_set_syntax():
    assert hpl.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert hpl.parse_seeds("0,2,5") == [0, 2, 5]
    assert hpl.parse_seeds("3") == [3]
    assert hpl.parse_seeds("5,0-1") == [0, 1, 5]
    assert hpl.parse_set("optimizer.lr=1e-4") == ("optimizer.lr", "1e-4")
    for bad in (["--seeds", "x"], ["--seeds", "4-1"], ["--seeds", ""], ["--set", "num_epochs"]):
        with pytest.raises(SystemExit) as error:
            hpl.main([*bad, "--count"])
        assert error.value.code == 2, bad
    for bad in (
        ["--set", "seed=1"],
        ["--study", "nope"],
        ["--study", "w1", "--set", "loss.level_weights=(1.0,0.0)"],
    ):
        with pytest.raises(SystemExit) as error:
            hpl.main([*bad, "--count"])
        assert error.value.code == 2, bad


# ----------------------------------------------------------------------------- running


def test_run_writes_every_run_then_skips_them(fake, capfd):
    assert cli(fake, "--study", "methods", "--seeds", "0-1", "--set", "num_epochs=2") == 0
    out = capfd.readouterr().out
    root = fake["root"]
    methods = ("proxy_anchor", "hpl_pa", "proxy_nca", "hpl_nca")
    expected = {f"synthetic/{m}/seed{s}" for m in methods for s in (0, 1)}
    assert finished(root) == expected
    calls = fake["calls"]()
    assert len(calls) == 8
    assert all(c["cwd"] == str(ROOT) for c in calls)  # the trainer runs in the repository root
    assert all(c["cache"] == str(root.resolve() / ".jax_cache") for c in calls)
    assert all(c["argv"][-1] == "--config.num_epochs=2" for c in calls)
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 8 and lines[0].startswith("[1/8] methods/proxy_anchor seed 0: done in ")
    assert "(R@1 50.0, MAP@R 20.0)" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]
    assert "(R@1 53.0, MAP@R 21.5)" in lines[5]  # hpl_pa seed 1: 0.51 + 0.02, 0.205 + 0.01
    assert "fake trainer" not in out  # the trainer's output goes to the log, not the terminal
    log = root / "synthetic" / "hpl_pa" / "seed1.log"
    assert "fake trainer: hpl_pa seed 1" in log.read_text()
    record = json.loads((root / "synthetic" / "hpl_pa" / "seed1.run.json").read_text())
    assert record["returncode"] == 0 and record["sets"] == {"num_epochs": "2"}
    assert (root / "synthetic" / "methods.md").exists() and not (root / "synthetic" / "methods.png").exists()  # no x axis

    assert cli(fake, "--study", "methods", "--seeds", "0-1") == 0
    out = capfd.readouterr().out
    assert len(fake["calls"]()) == 8
    assert out.count("skip (finished)") == 8


def test_a_failed_run_does_not_stop_the_others_and_is_rerun(fake, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_SEED", "1")
    assert cli(fake, "--study", "methods", "--seeds", "0-2") == 1
    out = capfd.readouterr().out
    assert out.count("failed (exit 1), see ") == 4 and "seed1.log" in out
    assert "4 run(s) failed" in out
    assert len(fake["calls"]()) == 12
    assert all("/seed1" not in done for done in finished(fake["root"])) and len(finished(fake["root"])) == 8
    assert "error: boom" in (fake["root"] / "synthetic" / "hpl_nca" / "seed1.log").read_text()
    md = (fake["root"] / "synthetic" / "methods.md").read_text()  # reported anyway, the failures as missing
    assert "- `hpl_pa` seed 1: failed (exit 1)" in md

    monkeypatch.delenv("FAKE_FAIL_SEED")
    assert cli(fake, "--study", "methods", "--seeds", "0-2") == 0
    out = capfd.readouterr().out
    again = fake["calls"]()[12:]
    assert sorted(Path(c["workdir"]).parent.name for c in again) == sorted(
        v.name for v in hpl.STUDIES["methods"]
    )
    assert all(Path(c["workdir"]).name == "seed1" for c in again)
    assert out.count("skip (finished)") == 8 and len(finished(fake["root"])) == 12


def test_stop_on_error(fake, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_SEED", "0")
    assert cli(fake, "--study", "methods", "--seeds", "0-1", "--stop-on-error") == 1
    assert len(fake["calls"]()) == 1 and not finished(fake["root"])


def test_child_exit_130_stops_the_runner(fake, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_SEED", "1")
    monkeypatch.setenv("FAKE_FAIL_CODE", "130")
    assert cli(fake, "--study", "methods", "--seeds", "0-2") == 130
    out = capfd.readouterr().out
    assert len(fake["calls"]()) == 5  # seed 0 (4 runs), then the first run of seed 1
    assert "interrupted (exit 130)" in out
    assert not (fake["root"] / "synthetic" / "methods.md").exists()


def test_index_count_and_list(fake, capfd):
    args = ("--study", "w1", "--study", "hierarchy", "--seeds", "0,2")
    assert cli(fake, *args, "--count") == 0
    count = int(capfd.readouterr().out)
    assert count == (7 + 3) * 2
    assert cli(fake, *args, "--list") == 0
    listing = capfd.readouterr().out.splitlines()
    numbered = [line for line in listing if line[:4].strip().isdigit()]
    assert len(numbered) == count and numbered[-1].split()[0] == str(count - 1)
    assert "hierarchy/proxy_anchor seed 2" in numbered[-1]
    assert not fake["calls"]()

    runs = hpl.plan(hpl.build_studies("configs/synthetic.py"), [0, 2], fake["root"].resolve())
    runs = [r for r in runs if r.variant.study in ("w1", "hierarchy")]
    assert cli(fake, *args, "--index", "9") == 0
    calls = fake["calls"]()
    assert [c["workdir"] for c in calls] == [str(runs[9].workdir)]
    assert finished(fake["root"]) == {"synthetic/hpl_pa__level_weights=1.0_0.05/seed2"}
    assert f"[10/{count}] w1/w1_0.05 seed 2: done" in capfd.readouterr().out
    assert not list(fake["root"].rglob("*.md"))  # array tasks leave the report to --report
    with pytest.raises(SystemExit) as error:
        cli(fake, *args, "--index", str(count))
    assert error.value.code == 2


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_group_lets_the_trainer_checkpoint_then_stops(fake, tmp_path, sig, code):
    """Ctrl-C (or SIGTERM) reaches runner and trainer; the runner waits for the trainer's own exit."""
    marker = tmp_path / "marker"
    env = {**os.environ, "FAKE_WAIT_SIGNAL": str(marker)}
    argv = [sys.executable, str(ROOT / "benchmarks" / "hpl_ablation.py"), "--root", str(fake["root"])]
    argv += ["--config", "configs/synthetic.py", "--trainer", fake["trainer"]]
    argv += ["--study", "methods", "--seeds", "0"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 8
        while (marker.read_text() if marker.exists() else "") != "started":
            assert time.monotonic() < deadline and process.poll() is None, "the fake trainer did not start"
            time.sleep(0.01)
        os.killpg(process.pid, sig)  # as a terminal's Ctrl-C: the whole foreground group
        out, _ = process.communicate(timeout=8)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, out
    assert json.loads(marker.read_text()) == [sig]  # one signal, and the trainer ended by itself
    assert len(fake["calls"]()) == 1
    assert "rerun the same command to resume" in out


# ----------------------------------------------------------------------------- the report


def write_results(root: Path, variants, seeds, skip=()) -> None:
    for v in variants:
        for seed in seeds:
            if (v.name, seed) in skip:
                continue
            workdir = hpl.Run(v, seed, root).workdir
            workdir.mkdir(parents=True, exist_ok=True)  # runs shared by studies: written twice, equal
            (workdir / "final_metrics.json").write_text(json.dumps(fake_metrics(v.method, seed, v.overrides)))


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_report_means_paired_differences_missing_runs_and_figure(tmp_path, capsys):
    root = tmp_path / "study"
    seeds = [0, 1, 2, 3]
    w1 = hpl.build_studies("configs/synthetic.py")["w1"]
    write_results(root, w1, seeds, skip={("w1_0.05", 2)})
    args = ["--root", str(root), "--config", "configs/synthetic.py", "--study", "w1", "--seeds", "0-3"]
    assert hpl.main([*args, "--report"]) == 0
    assert "w1.md" in capsys.readouterr().out
    text = (root / "synthetic" / "w1.md").read_text()
    summary, rest = text.split("## Paired differences")
    paired, missing = rest.split("## Missing runs")
    header = next(line for line in summary.splitlines() if line.startswith("| variant"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[3:] == ["runs", "R@1", "R@10", "R@100", "MAP@R", "R-Precision"]
    assert "seeds: 0–3 (4 per variant); finished runs: 27 of 28" in summary
    assert "`--set` overrides of every run: unknown" in summary  # not started by the runner

    def values(v, key, present):
        return np.array([100 * fake_metrics(v.method, s, v.overrides)[key] for s in present])

    rows, diffs = table_rows(summary), table_rows(paired)
    by_name = {v.name: v for v in w1}
    for v in w1:
        present = [s for s in seeds if (v.name, s) != ("w1_0.05", 2)]
        row = rows[v.name]
        assert row[2] == hpl._number(v.x) and row[3] == f"{len(present)}/4"
        for column, key in zip(row[4:], KEYS, strict=True):
            x = values(v, key, present)
            assert column == f"{x.mean():.2f} ± {x.std(ddof=1):.2f}", (v.name, key)
        if v.baseline is None:
            assert v.name not in diffs
            continue
        base = by_name[v.baseline]
        d_row = diffs[v.name]
        assert d_row[1] == "`w1_0`" and d_row[2] == str(len(present))
        for column, key in zip(d_row[3:], KEYS, strict=True):
            d = values(v, key, present) - values(base, key, present)
            mean, half = d.mean(), T_975[len(present) - 1] * d.std(ddof=1) / math.sqrt(len(present))
            assert column == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]", (v.name, key)
    assert rows["w1_0.1"][4] == "53.50 ± 1.29"  # 52, 53, 54, 55
    assert diffs["w1_0.1"][3] == "+2.00 [+2.00, +2.00]"  # the same gain for every seed: zero width
    assert diffs["w1_0.05"][2] == "3"  # seed 2 missing: 3 pairs
    assert diffs["w1_0.5"][3] == "+5.50 [-0.93, +11.93]"  # 2, 3, 6, 11 points; t(3) = 3.182
    assert "- `w1_0.05` seed 2: not started" in missing
    assert "w1_0.05` seed" not in summary + paired

    png = (root / "synthetic" / "w1.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(root / "synthetic" / "w1.png") as image:
        assert image.size[0] > image.size[1] > 100  # two panels side by side


def test_report_of_other_data_sets_and_of_nothing(tmp_path):
    sop_like = {"recall@1": 0.5, "recall@8": 0.9, "recall@2": 0.6}
    records = [
        hpl.Record("coarse", "proxy_anchor", 0, tmp_path, sop_like, None),
        hpl.Record("coarse", "groups_3", 0, tmp_path, {"recall@4": 0.7, "coarse_recall@1": 0.9}, {}),
    ]
    assert hpl.metric_columns(records) == ["recall@1", "recall@2", "recall@4", "recall@8"]
    assert hpl.mean_std([]) == "–" and hpl.mean_std([0.5]) == "50.00 ± –"
    assert hpl.format_paired(hpl.paired_difference([1.5])) == "+1.50 [–]"
    assert hpl.format_paired(hpl.paired_difference([])) == "–"
    root = tmp_path / "empty"
    coarse = {"coarse": hpl.build_studies()["coarse"]}
    written = hpl.report(root, coarse, [0, 1])
    assert written == [root / "synthetic_sop" / "coarse.md"]  # nothing finished: no figure
    text = (root / "synthetic_sop" / "coarse.md").read_text()
    assert "finished runs: 0 of 16" in text and "- `groups_384` seed 1: not started" in text


def test_t_quantile():
    for df, value in T_975.items():
        assert hpl.t_critical(df) == pytest.approx(value, abs=1e-6)
    assert round(hpl.t_critical(1), 3) == 12.706
    assert round(hpl.t_critical(4), 3) == 2.776
    assert round(hpl.t_critical(9), 3) == 2.262
    assert hpl.t_critical(10**6) == pytest.approx(1.959966, abs=1e-5)
    assert hpl.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)
    assert hpl.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert hpl.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/π


# ----------------------------------------------------------------------------- SLURM


def test_sbatch_parses_and_passes_its_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    assert os.access(SBATCH, os.X_OK)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", "SLURM_ARRAY_TASK_ID": "7"}
    args = ["--root", "/shared/a b", "--study", "w1", "--seeds", "0-4", "--set", "num_epochs=2"]
    result = subprocess.run(
        ["bash", str(SBATCH), "--dry-run", *args], env=env, capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, result.stderr
    step = result.stdout.splitlines()[0]
    assert step.startswith("+ srun --ntasks=1 --chdir=") and "benchmarks/hpl_ablation.py" in step
    assert step.endswith('--root "/shared/a b" --study w1 --seeds 0-4 --set num_epochs=2 --index 7')
    no_job = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=10)
    assert no_job.returncode == 2 and "not inside a SLURM job" in no_job.stderr


# ----------------------------------------------------------------------------- hpl_groups.py


def test_group_purity_and_skipped_workdirs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hpl_groups", ROOT / "benchmarks" / "hpl_groups.py")
    groups = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(groups)
    true = np.array([0, 0, 0, 1, 1, 2])
    assert groups.purity(true, np.array([5, 5, 5, 7, 7, 9])) == 1.0  # the taxonomy, renamed
    assert groups.purity(true, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(4 / 6)  # 2 of {0,0} + 2 of {0,1,1,2}
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text(json.dumps({"method": "proxy_anchor", "dataset": {"name": "synthetic"}}))
    (tmp_path / "flat.log").write_text("")  # a glob's stray match: ignored
    assert groups.main([str(flat), str(tmp_path / "flat.log"), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method proxy_anchor has no hierarchy" in out and "no config.json" in out and "flat.log" not in out
