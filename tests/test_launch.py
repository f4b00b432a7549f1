"""The launch scripts in launch/: syntax, dry runs, clear errors, the SLURM requeue logic, no secrets.

Fast and offline. The scripts run with ``--dry-run`` under a PATH whose gcloud, gsutil, sbatch, srun,
... are stubs that record the call and fail, so a dry run that executed anything is caught and nothing
can reach a cloud or a cluster. Two tests execute on purpose, with harmless local stand-ins: the
SLURM batch shell's signal handling, and the start/stop commands that tpu_vm.sh sends to a worker.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU = LAUNCH / "gpu_node.sh"
SUBMIT = LAUNCH / "slurm_submit.sh"
SBATCH = LAUNCH / "slurm.sbatch"
ENTRY_POINTS = (TPU, GPU, SUBMIT, SBATCH)
SHELL_FILES = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
# Everything a launch script might call that talks to the outside world.
EXTERNAL_TOOLS = (
    "gcloud",
    "gsutil",
    "gcsfuse",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "squeue",
    "ssh",
    "scp",
    "nvidia-smi",
    "curl",
    "git",
)

TPU_BASE = {"NAME": "hdml-test", "ZONE": "us-central2-b"}
RUN_FLAGS = [
    "--config",
    "configs/cub.py:method=hpl_pa",
    "--workdir",
    "runs/cub_hpl_pa",
    "--gcs-data",
    "gs://example-bucket/tfds",
]


@pytest.fixture
def sandbox(tmp_path):
    """A clean environment whose external tools are tripwires; ``calls`` lists what was invoked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in EXTERNAL_TOOLS:
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(calls))}\nexit 97\n')
        stub.chmod(0o755)
    (tmp_path / "home").mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    return {"env": env, "calls": calls, "tmp": tmp_path}


def launch(sandbox, script: Path, *args: str, env: dict | None = None, cwd: Path = ROOT, dry: bool = True):
    """Run a launch script; in a dry run nothing external may have been called."""
    argv = ["bash", str(script), *(["--dry-run"] if dry else []), *args]  # before any "--"
    result = subprocess.run(
        argv, env={**sandbox["env"], **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=30
    )
    if dry:
        assert not sandbox["calls"].exists(), f"a dry run executed: {sandbox['calls'].read_text()}"
    return result


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ("+ cmd args"), split like a shell would."""
    return [
        shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ") and "<<" not in line
    ]


def remote_commands(stdout: str) -> list[tuple[str, str]]:
    """(worker, command) of every gcloud tpu-vm ssh in a dry run."""
    found = []
    for argv in commands(stdout):
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            worker = next(a.split("=", 1)[1] for a in argv if a.startswith("--worker="))
            found.append((worker, argv[argv.index("--command") + 1]))
    return found


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fails(result, *words: str):
    assert result.returncode != 0, result.stdout + result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


# ----------------------------------------------------------------------------- every file


def test_launch_files_exist_are_executable_and_parse():
    assert set(ENTRY_POINTS) <= set(SHELL_FILES)
    for script in ENTRY_POINTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
    for path in SHELL_FILES:
        text = path.read_text()
        if path.name != "_common.sh":
            assert "set -euo pipefail" in text, path.name
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(
        ["shellcheck", "-x", *[p.name for p in SHELL_FILES]], cwd=LAUNCH, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_help(sandbox, script):
    out = ok(launch(sandbox, script, "--help", dry=False))
    assert "Usage" in out and "--dry-run" in out


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_unknown_option_is_an_error(sandbox, script):
    fails(launch(sandbox, script, "--no-such-flag", env=TPU_BASE), "unknown option --no-such-flag")


# ----------------------------------------------------------------------------- tpu_vm.sh

TPU_EXPECTED = {
    "create": [
        "gcloud compute tpus tpu-vm create hdml-test",
        "--zone=us-central2-b",
        "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ],
    "setup": [
        "tar -czf",
        "gcloud compute tpus tpu-vm scp",
        "--worker=all",
        "pip install --quiet -e",
        "jax[tpu]",
        "python3.11",
    ],
    "data": [
        "gcloud compute tpus tpu-vm ssh hdml-test",
        "--worker=all",
        "gsutil -m -q rsync -r gs://example-bucket/tfds",
    ],
    "run": [
        "--worker=all",
        "nohup",
        "/bin/python -m hdml_jax.main --config configs/cub.py:method=hpl_pa",
        "train.log",
        "train.pid",
    ],
    "resume": [
        "tpu-vm describe",
        "tpu-vm delete",
        "tpu-vm create",
        "tpu-vm scp",
        "gsutil -m -q rsync",
        "-m hdml_jax.main",
    ],
    "fetch": [
        "tar -czf",
        "--exclude=./checkpoints",
        "tpu-vm scp hdml-test:hdml_results.tar.gz",
        "--worker=0",
        "train.worker0.log",
    ],
    "logs": ["--worker=0", "tail -n 50"],
    "stop": ["--worker=all", "kill -TERM"],
    "delete": ["gcloud compute tpus tpu-vm delete hdml-test", "--quiet"],
}


@pytest.mark.parametrize("command", sorted(TPU_EXPECTED))
def test_tpu_dry_run(sandbox, command):
    out = ok(launch(sandbox, TPU, command, *RUN_FLAGS, env=TPU_BASE))
    printed = [" ".join(argv) for argv in commands(out)]
    assert printed, out
    assert all(line.startswith("+ ") for line in out.splitlines() if line), out
    for part in TPU_EXPECTED[command]:
        assert any(part in line for line in printed), f"{part!r} not in:\n{out}"
    for _, remote in remote_commands(out):  # what the workers' shells would run must parse
        result = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
        assert result.returncode == 0, f"{remote}\n{result.stderr}"
    assert not list(sandbox["tmp"].glob("*.tar.gz")), "a dry run wrote the source archive"


def test_tpu_flags_override_environment_and_pick_runtime(sandbox):
    out = ok(
        launch(
            sandbox,
            TPU,
            "create",
            "--name",
            "other",
            "--accelerator",
            "v5litepod-8",
            "--spot",
            env={**TPU_BASE, "PROJECT": "test-project"},
        )
    )
    (argv,) = commands(out)
    assert argv[5] == "other" and "--project=test-project" in argv
    assert "--version=v2-alpha-tpuv5-lite" in argv and "--spot" in argv
    out = ok(launch(sandbox, TPU, "create", "--accelerator=v6e-8", "--preemptible", env=TPU_BASE))
    assert "--version=v2-alpha-tpuv6e" in out and "--preemptible" in out
    out = ok(
        launch(
            sandbox, TPU, "create", "--runtime-version", "custom-v1", env={**TPU_BASE, "ACCELERATOR": "v5p-8"}
        )
    )
    assert "--version=custom-v1" in out and "--project" not in out


def test_tpu_pod_slice_needs_a_shared_workdir(sandbox):
    pod = [*RUN_FLAGS[:2], "--accelerator", "v4-32"]
    fails(
        launch(sandbox, TPU, "run", *pod, "--workdir", "/home/me/run", env=TPU_BASE),
        "same workdir",
        "--workdir-bucket",
    )
    shared = [*pod, "--workdir-bucket", "gs://example-bucket/runs", "--workdir", "/mnt/hdml_runs/cub"]
    ((worker, remote),) = remote_commands(ok(launch(sandbox, TPU, "run", *shared, env=TPU_BASE)))
    assert worker == "all"
    assert (
        "gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 --only-dir runs example-bucket /mnt/hdml_runs"
        in remote
    )
    assert "--workdir /mnt/hdml_runs/cub" in remote
    setup = ok(launch(sandbox, TPU, "setup", *shared, env=TPU_BASE))
    assert "apt-get install -y -qq gcsfuse" in setup
    fails(launch(sandbox, TPU, "run", *shared[:-1], "/elsewhere", env=TPU_BASE), "not under --workdir-mount")
    # The results of a bucket workdir come straight from GCS, checkpoints left out.
    fetch = commands(ok(launch(sandbox, TPU, "fetch", *shared, env=TPU_BASE)))
    assert [
        "gsutil",
        "-m",
        "rsync",
        "-r",
        "-x",
        "^checkpoints/.*",
        "gs://example-bucket/runs/cub",
        "results/hdml-test",
    ] in fetch
    ok(launch(sandbox, TPU, "run", *pod, "--workdir", "/nfs/run", "--shared-workdir", env=TPU_BASE))


def test_tpu_gs_workdir_goes_to_the_trainer_as_is_and_needs_no_mount(sandbox):
    bucket = "gs://example-bucket/runs/cub"
    flags = [*RUN_FLAGS, "--workdir", bucket]  # the later --workdir wins
    run = launch(sandbox, TPU, "run", *flags, "--accelerator", "v4-32", "--spot", env=TPU_BASE)
    ((worker, remote),) = remote_commands(ok(run))  # a pod slice on spot capacity: fine, no warning
    assert worker == "all" and f"--workdir {bucket} " in remote and "warning" not in run.stderr
    assert "gcsfuse" not in remote and "mkdir -p \"$HOME\"/hdml_logs &&" in remote  # no folder for the bucket
    ((_, setup),) = remote_commands(ok(launch(sandbox, TPU, "setup", *flags, env=TPU_BASE)))
    assert "pip install --quiet -e \"$HOME\"/hdml_jax'[gcs]' \"jax[tpu]\"" in setup and "gcsfuse" not in setup
    fetch = commands(ok(launch(sandbox, TPU, "fetch", *flags, env=TPU_BASE)))
    assert ["gsutil", "-m", "rsync", "-r", "-x", "^checkpoints/.*", bucket, "results/hdml-test"] in fetch
    fails(launch(sandbox, TPU, "run", *flags, "--workdir-bucket", "gs://b/runs", env=TPU_BASE), "one or the other")
    fails(launch(sandbox, TPU, "run", *flags, "--sync-to", "gs://b/sync", env=TPU_BASE), "in GCS already")
    fails(launch(sandbox, TPU, "run", *RUN_FLAGS, "--workdir", "s3://b/run", env=TPU_BASE), "gs:// URL")


def test_tpu_data_mode_gcs_reads_the_bucket_directly(sandbox):
    ((_, remote),) = remote_commands(ok(launch(sandbox, TPU, "run", *RUN_FLAGS, "--data-mode", "gcs", env=TPU_BASE)))
    assert "--config.dataset.data_dir=gs://example-bucket/tfds" in remote and "rsync" not in remote
    data = launch(sandbox, TPU, "data", *RUN_FLAGS, "--data-mode", "gcs", env=TPU_BASE)
    assert not remote_commands(ok(data)) and "nothing to copy" in data.stderr
    fails(launch(sandbox, TPU, "run", *RUN_FLAGS[:4], "--data-mode", "gcs", env=TPU_BASE), "--gcs-data")


def test_gpu_and_slurm_pass_a_gs_workdir_through(sandbox, tmp_path):
    bucket = "gs://example-bucket/runs/x"
    trainer = commands(ok(launch(sandbox, GPU, "--config", "c.py", "--workdir", bucket)))[-1]
    assert trainer[trainer.index("--workdir") + 1] == bucket
    fails(launch(sandbox, SUBMIT, "--config", "c.py", "--workdir", bucket), "--script")
    out = ok(launch(sandbox, SUBMIT, "--config", "c.py", "--workdir", bucket, "--script", str(tmp_path / "j.sbatch")))
    path = tmp_path / "job.sbatch"
    path.write_text(generated_script(out))
    srun = next(argv for argv in commands(ok(launch(sandbox, path, env=SLURM_ENV))) if argv[0] == "srun")
    assert srun[srun.index("--workdir") + 1] == bucket


def test_tpu_remote_paths_expand_on_the_worker(sandbox):
    extra = ["--", "--config.model.pretrained=~/weights/resnet50", "--config.num_epochs=2"]
    ((_, remote),) = remote_commands(
        ok(launch(sandbox, TPU, "run", *RUN_FLAGS, *extra, env={**TPU_BASE, "EXTRA_ARGS": "--config.seed=3"}))
    )
    assert '--config.model.pretrained="$HOME"/weights/resnet50' in remote
    assert '--config.dataset.data_dir="$HOME"/tensorflow_datasets' in remote
    assert '--workdir "$HOME"/hdml_jax/runs/cub_hpl_pa' in remote  # relative: inside the repository
    assert (
        "--config.seed=3 --config.model.pretrained" in remote and remote.count("--config.num_epochs=2") == 1
    )


def test_tpu_sync_mode_is_single_host(sandbox):
    flags = [*RUN_FLAGS[:2], "--workdir", "/home/me/run", "--sync-to", "gs://example-bucket/runs/cub"]
    ((_, remote),) = remote_commands(ok(launch(sandbox, TPU, "run", *flags, "--spot", env=TPU_BASE)))
    assert "gsutil -m -q rsync -r gs://example-bucket/runs/cub /home/me/run" in remote  # restore first
    assert 'rsync -r -x ".*orbax-checkpoint-tmp.*" /home/me/run gs://example-bucket/runs/cub' in remote
    fails(
        launch(sandbox, TPU, "run", *flags, "--accelerator", "v4-16", env=TPU_BASE),
        "--sync-to is for one host",
    )
    # A spot VM whose checkpoints live only on its own disk: allowed, but warned about.
    warning = launch(sandbox, TPU, "run", *RUN_FLAGS, "--spot", env=TPU_BASE)
    assert warning.returncode == 0 and "preemption deletes the checkpoints" in warning.stderr


def test_tpu_setup_from_git(sandbox):
    ((_, remote),) = remote_commands(
        ok(
            launch(
                sandbox,
                TPU,
                "setup",
                "--repo-url",
                "https://example.com/hdml_jax.git",
                "--repo-ref",
                "v1.0",
                env=TPU_BASE,
            )
        )
    )
    assert (
        "git clone --quiet -- https://example.com/hdml_jax.git" in remote
        and "checkout --quiet v1.0" in remote
    )


@pytest.mark.parametrize(
    ("state", "present", "absent"),
    [
        ("PREEMPTED", ["tpu-vm delete", "tpu-vm create", "tpu-vm scp", "-m hdml_jax.main"], []),
        ("MISSING", ["tpu-vm create", "-m hdml_jax.main"], ["tpu-vm delete"]),
        ("STOPPED", ["tpu-vm start", "-m hdml_jax.main"], ["tpu-vm create"]),
        ("READY", ["-m hdml_jax.main"], ["tpu-vm create", "tpu-vm delete", "tpu-vm scp"]),
    ],
)
def test_tpu_resume(sandbox, state, present, absent):
    out = ok(launch(sandbox, TPU, "resume", *RUN_FLAGS, "--assume-state", state, env=TPU_BASE))
    assert out.startswith("+ gcloud compute tpus tpu-vm describe hdml-test")
    for part in present:
        assert part in out, (part, out)
    for part in absent:
        assert part not in out, (part, out)


def test_tpu_errors_are_clear(sandbox):
    fails(launch(sandbox, TPU, "create", env={"ZONE": "z"}), "NAME is not set")
    fails(launch(sandbox, TPU, "create", env={"NAME": "n"}), "ZONE is not set")
    fails(launch(sandbox, TPU, "run", "--workdir", "/w", env=TPU_BASE), "CONFIG is not set")
    fails(launch(sandbox, TPU, "resume", "--config", "c", env=TPU_BASE), "WORKDIR is not set")
    fails(launch(sandbox, TPU, "data", env=TPU_BASE), "GCS_DATA is not set")
    fails(launch(sandbox, TPU, "explode", env=TPU_BASE), "unknown command 'explode'")
    fails(launch(sandbox, TPU, env=TPU_BASE), "expected one command")
    fails(launch(sandbox, TPU, "create", "--accelerator", "h100", env=TPU_BASE), "does not look like")
    fails(launch(sandbox, TPU, "resume", *RUN_FLAGS, "--assume-state", "CREATING", env=TPU_BASE), "CREATING")
    fails(launch(sandbox, TPU, "create", "--name", env=TPU_BASE), "--name needs a value")


def test_tpu_worker_commands_start_once_and_stop_cleanly(sandbox, tmp_path):
    """Run the worker side of `run` and `stop` in a local shell: nohup, pid file, idempotence, SIGTERM."""
    home = Path(sandbox["env"]["HOME"])
    (home / "hdml_jax").mkdir()
    python = home / "hdml_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/bash\necho \"args: $*\"\ntrap 'echo saved; exit 0' TERM\nwhile :; do sleep 0.05; done\n"
    )
    python.chmod(0o755)
    ((_, start),) = remote_commands(ok(launch(sandbox, TPU, "run", *RUN_FLAGS, env=TPU_BASE)))
    ((_, stop),) = remote_commands(ok(launch(sandbox, TPU, "stop", env=TPU_BASE)))
    shell = {**sandbox["env"], "USER": "tester"}
    log, pid_file = home / "hdml_logs" / "train.log", home / "hdml_logs" / "train.pid"
    try:
        first = subprocess.run(["bash", "-c", start], env=shell, capture_output=True, text=True, timeout=10)
        assert first.returncode == 0 and "started hdml_jax.main" in first.stdout, first.stdout + first.stderr
        second = subprocess.run(["bash", "-c", start], env=shell, capture_output=True, text=True, timeout=10)
        assert "already running" in second.stdout, second.stdout + second.stderr
        deadline = time.monotonic() + 5
        while "args:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"--workdir {home}/hdml_jax/runs/cub_hpl_pa" in log.read_text()
        stopped = subprocess.run(["bash", "-c", stop], env=shell, capture_output=True, text=True, timeout=10)
        assert "sent SIGTERM" in stopped.stdout, stopped.stdout + stopped.stderr
        while "saved" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "saved" in log.read_text()
    finally:  # never leave the stand-in running
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- gpu_node.sh


def test_gpu_node_dry_run(sandbox, tmp_path):
    out = ok(
        launch(
            sandbox,
            GPU,
            "--config",
            "configs/cub.py:method=hpl_pa",
            "--workdir",
            "runs/x",
            "--data-dir",
            "/data/tfds",
            "--",
            "--config.num_epochs=1",
        )
    )
    (*_, (cd, repo), trainer) = commands(out)
    assert (cd, repo) == ("cd", str(ROOT))
    assert trainer[1:3] == ["-m", "hdml_jax.main"] and trainer[0].endswith("/bin/python")
    assert trainer[3:] == [
        "--config",
        "configs/cub.py:method=hpl_pa",
        "--workdir",
        str(ROOT / "runs/x"),
        "--config.dataset.data_dir=/data/tfds",
        "--config.num_epochs=1",
    ]
    assert "srun" not in out and "coordinator_address" not in out  # one process: no distributed setup
    # Relative paths are the caller's, not the repository's.
    out = ok(launch(sandbox, GPU, "run", "--config", "c.py", "--workdir", "w", "--gpus", "0,1", cwd=tmp_path))
    assert (
        f"CUDA_VISIBLE_DEVICES=0,1 {ROOT}/.venv/bin/python -m hdml_jax.main --config c.py --workdir {tmp_path}/w"
        in out
    )


def test_gpu_node_inside_a_slurm_allocation_stays_single_process(sandbox):
    out = ok(launch(sandbox, GPU, "--config", "c", "--workdir", "/w", env={"SLURM_JOB_ID": "7"}))
    assert "+ env -u SLURM_JOB_ID " in out


def test_gpu_node_install(sandbox, tmp_path):
    out = ok(launch(sandbox, GPU, "install", "--venv", str(tmp_path / "venv")))
    assert (
        f"+ python3 -m venv {tmp_path}/venv" in out
        and '"jax[cuda12]"' in out
        and "pip install --quiet -e" in out
    )
    out = ok(launch(sandbox, GPU, "--install", "--config", "c", "--workdir", "/w", "--log", "/logs/x.log"))
    assert out.index("jax[cuda12]") < out.index("tee -a /logs/x.log") < out.index("-m hdml_jax.main")
    assert not (tmp_path / "venv").exists()
    fails(launch(sandbox, GPU, "--workdir", "/w"), "CONFIG is not set")
    fails(launch(sandbox, GPU, "--config", "c"), "WORKDIR is not set")
    fails(launch(sandbox, GPU, "train", "--config", "c", "--workdir", "/w"), "unknown command 'train'")


# ----------------------------------------------------------------------------- SLURM

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "32",
}


def generated_script(out: str) -> str:
    match = re.search(r"<<'HDML_SBATCH_EOF'\n(.*?)\nHDML_SBATCH_EOF\n", out, re.S)
    assert match, out
    return match.group(1)


def test_slurm_submit_dry_run(sandbox, tmp_path):
    workdir = tmp_path / "runs" / "sop"
    out = ok(
        launch(
            sandbox,
            SUBMIT,
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--partition",
            "gpu",
            "--time",
            "4:00:00",
            "--signal-lead",
            "300",
            "--sbatch-args",
            "--exclusive --mem=0",
            "--config",
            "configs/sop.py:method=hpl_pa",
            "--workdir",
            str(workdir),
            "--data-dir",
            "/shared/tfds",
            "--",
            "--config.num_epochs=3",
        )
    )
    script = generated_script(out)
    assert commands(out)[-1] == ["sbatch", f"{workdir}/slurm/hdml_jax.sbatch"]
    for directive in [
        "--job-name=hdml_sop_hpl_pa",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--cpus-per-task=32",
        "--time=4:00:00",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        f"--output={workdir}/slurm/%x-%j.out",
        "--partition=gpu",
        "--exclusive",
        "--mem=0",
    ]:
        assert f"#SBATCH {directive}\n" in script, directive
    assert f"REPO={ROOT}\n" in script and "TRAINER_ARGS=(--config.num_epochs=3)\n" in script
    assert not workdir.exists(), "a dry run created the workdir"
    # The generated script is itself valid and, run as the job would be, starts one srun step.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    job = ok(launch(sandbox, path, env=SLURM_ENV))
    assert "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in job and "+ export SRUN_CPUS_PER_TASK=32\n" in job
    srun = next(argv for argv in commands(job) if argv[0] == "srun")
    assert srun[1:3] == ["--kill-on-bad-exit=1", f"--chdir={ROOT}"]
    assert srun[4:] == [
        "-m",
        "hdml_jax.main",
        "--config",
        "configs/sop.py:method=hpl_pa",
        "--workdir",
        str(workdir),
        "--config.dataset.data_dir=/shared/tfds",
        "--config.num_epochs=3",
    ]
    assert "+ scancel --signal=TERM 4242\n+ scontrol requeue 4242\n" in job


def test_slurm_one_task_per_gpu(sandbox, tmp_path):
    out = ok(
        launch(
            sandbox,
            SUBMIT,
            "--gpus-per-node",
            "8",
            "--tasks",
            "per-gpu",
            "--config",
            "c.py",
            "--workdir",
            str(tmp_path / "w"),
        )
    )
    script = generated_script(out)
    assert "#SBATCH --ntasks-per-node=8\n" in script and "#SBATCH --cpus-per-task=8\n" in script
    job = ok(
        launch(
            sandbox,
            SBATCH,
            "--config",
            "c.py",
            "--workdir",
            "/w",
            env={**SLURM_ENV, "SLURM_NTASKS": "16", "SLURM_GPUS_ON_NODE": "8"},
        )
    )
    assert "JAX_LOCAL_DEVICE_IDS" not in job  # JAX's own default, GPU SLURM_LOCALID, is right here


def test_slurm_errors_are_clear(sandbox):
    fails(launch(sandbox, SUBMIT, "--config", "c"), "WORKDIR is not set")
    fails(launch(sandbox, SUBMIT, "--workdir", "/w"), "CONFIG is not set")
    fails(
        launch(sandbox, SUBMIT, "--config", "c", "--workdir", "/w", "--tasks", "per-core"),
        "per-node or per-gpu",
    )
    fails(
        launch(sandbox, SUBMIT, "--config", "c", "--workdir", "/w", "--nodes", "two"),
        "--nodes must be a whole number",
    )
    fails(launch(sandbox, SBATCH, "--workdir", "/w"), "CONFIG is not set")
    fails(launch(sandbox, SBATCH, "--config", "c", "--workdir", "/w", dry=False), "not inside a SLURM job")


@pytest.mark.parametrize(
    ("sig", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["time-limit", "scancel"]
)
def test_slurm_signal_checkpoints_then_requeues(sandbox, tmp_path, sig, requeued):
    """The batch shell for real, with stand-ins: srun (a trainer that saves on SIGTERM), scancel
    (delivers the signal to it, as slurmd would), scontrol (records the requeue)."""
    bin_dir = tmp_path / "job-bin"
    bin_dir.mkdir()
    log, pid = tmp_path / "job.log", tmp_path / "srun.pid"
    stand_ins = {
        "srun": f"#!/bin/bash\ntrap 'echo saved >> {log}; exit 0' TERM\necho $$ > {pid}\necho started >> {log}\nwhile :; do sleep 0.05; done\n",
        "scancel": f'#!/bin/sh\necho "scancel $*" >> {log}\nkill -TERM "$(cat {pid})"\n',
        "scontrol": f'#!/bin/sh\necho "scontrol $*" >> {log}\n',
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\n")
    (venv / "python").chmod(0o755)
    env = {**sandbox["env"], **SLURM_ENV, "PATH": f"{bin_dir}:{sandbox['env']['PATH']}"}
    argv = [
        "bash",
        str(SBATCH),
        "--config",
        "c.py",
        "--workdir",
        str(tmp_path / "w"),
        "--venv",
        str(venv.parent),
    ]
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 5
        while "started" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        job.send_signal(sig)
        if sig == signal.SIGTERM:  # scancel: SLURM signals the tasks as well as the batch shell
            os.kill(int(pid.read_text()), signal.SIGTERM)
        output, _ = job.communicate(timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
        if pid.exists():  # never leave the stand-in running
            try:
                os.kill(int(pid.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode == 0, output
    lines = log.read_text().splitlines()
    expected = (
        ["started", "scancel --signal=TERM 4242", "saved", "scontrol requeue 4242"]
        if requeued
        else ["started", "saved"]
    )
    assert lines == expected, (lines, output)


# ----------------------------------------------------------------------------- hygiene

SECRET_PATTERNS = {
    "Google API key": r"AIza[0-9A-Za-z_\-]{35}",
    "AWS access key": r"AKIA[0-9A-Z]{16}",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "service-account key field": r"\"private_key(_id)?\"\s*:",
    "GitHub token": r"gh[pousr]_[A-Za-z0-9]{36}",
    "Slack token": r"xox[abprs]-[A-Za-z0-9-]{10,}",
    "OAuth token": r"ya29\.[0-9A-Za-z_\-]{20,}",
}


def test_no_secrets_or_hard_coded_projects():
    for path in sorted(p for p in LAUNCH.rglob("*") if p.is_file()):
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            assert not re.search(pattern, text), f"{path.name}: looks like a {what}"
        # A project may only come from the caller (--project / $PROJECT), never a literal.
        for match in re.finditer(
            r"--project[= ]+[\"']?([a-z][a-z0-9-]{4,28}[a-z0-9])\b", text
        ):  # a GCP project id
            assert match.group(1).startswith(("my-", "example")), (
                f"{path.name}: hard-coded {match.group(0)!r}"
            )
        assert not re.search(r"(CLOUDSDK_CORE_PROJECT|GOOGLE_CLOUD_PROJECT|GCLOUD_PROJECT)=\S", text), (
            path.name
        )
        for match in re.finditer(r"config set (?:core/)?project\s+([a-z][a-z0-9-]{4,28}[a-z0-9])\b", text):
            assert match.group(1).startswith(("my-", "example")), (
                f"{path.name}: hard-coded {match.group(0)!r}"
            )
        # Buckets only as placeholders (my-bucket, BUCKET, example-...).
        for bucket in re.findall(r"gs://([A-Za-z0-9][A-Za-z0-9_.\-]*)", text):
            assert bucket in {"BUCKET", "bucket", "b"} or bucket.startswith(("my-", "example")), (
                f"{path.name}: gs://{bucket}"
            )


# ----------------------------------------------------------------------------- hostile values
# Every value must reach its target as one word, or be refused with a one-line error: none may run
# (each injection below would create a file named PWNED) or split a generated line.

# Trainer arguments after "--" arrive as the very same argv on every launcher.
HOSTILE_ARGS = [
    "--config.name=a b",
    'it\'s "quoted"',
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED #",
    "line one\nline two",
    "x\nHDML_SBATCH_EOF\ntouch PWNED",  # would end the dry run's here-document early
    "tab\there",
    "$HOME ~user * \\ !",
    "",
]
INJECTED = "PWNED"


def no_injection(*dirs: Path):
    for directory in dirs:
        assert not (directory / INJECTED).exists(), f"an injected command ran in {directory}"


def bash_words(line: str, cwd: Path) -> list[str]:
    """The words of a printed command line as bash reads them (shlex knows no $'...')."""
    result = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + line], cwd=cwd, capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, line + result.stderr
    return result.stdout.split("\0")[:-1]


def printed(stdout: str, cwd: Path) -> list[list[str]]:
    """Every "+ " command of a dry run, read by bash: one line each, whatever the values."""
    return [
        bash_words(line[2:], cwd)
        for line in stdout.splitlines()
        if line.startswith("+ ") and "<<" not in line
    ]


def argv_recorder(path: Path, out: Path):
    """An executable at PATH that writes its arguments, NUL-separated, to OUT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(out))}\n")
    path.chmod(0o755)


def recorded(out: Path, timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return out.read_bytes().decode().split("\0")[:-1]


def test_quote_round_trips(tmp_path):
    """quote (bash, one line), squote and rquote (POSIX sh) give back every word unchanged."""
    words = [*HOSTILE_ARGS, "plain", "a=b", "jax[tpu]", "'", '"', "\r\x1b[31m", "-n", "~", "a~/b"]

    def run(argv: list[str]) -> list[str]:  # bytes: text mode would read "\r" as "\n"
        result = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, timeout=10, env={"HOME": "/h", "PATH": "/usr/bin:/bin"}
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.decode().split("\0")[:-1]

    def quoted(func: str, *words: str) -> list[str]:
        script = 'source "$1"; shift; f=$1; shift; for w in "$@"; do "$f" "$w"; printf "\\0"; done'
        return run(["bash", "-c", script, "_", str(LAUNCH / "_common.sh"), func, *words])

    for func, shell in [("quote", "bash"), ("squote", "sh"), ("rquote", "sh")]:
        kept = [word for word in words if func != "rquote" or word != "~"]  # rquote: "~" is $HOME
        forms = quoted(func, *kept)
        if func == "quote":
            assert not any("\n" in form for form in forms), forms
        assert run([shell, "-c", "printf '%s\\0' " + " ".join(forms)]) == kept, (func, forms)
    # rquote turns a leading "~/" (also after "=") into the remote $HOME.
    forms = quoted("rquote", "~/w x", "--p=~/$(y)", "~")
    assert run(["sh", "-c", "printf '%s\\0' " + " ".join(forms)]) == ["/h/w x", "--p=/h/$(y)", "/h"]
    no_injection(tmp_path)


def test_gpu_node_passes_hostile_trainer_args_verbatim(sandbox, tmp_path):
    venv, out = tmp_path / "venv", tmp_path / "argv"
    argv_recorder(venv / "bin" / "python", out)
    flags = [
        "--config",
        "c.py",
        "--workdir",
        "my runs/$(touch PWNED)",
        "--venv",
        str(venv),
        "--",
        *HOSTILE_ARGS,
    ]
    expected = ["-m", "hdml_jax.main", "--config", "c.py", "--workdir", f"{tmp_path}/my runs/$(touch PWNED)"]
    dry = ok(launch(sandbox, GPU, *flags, cwd=tmp_path))
    assert printed(dry, tmp_path)[-1] == [str(venv / "bin" / "python"), *expected, *HOSTILE_ARGS]
    ok(launch(sandbox, GPU, *flags, cwd=tmp_path, dry=False))
    assert recorded(out) == [*expected, *HOSTILE_ARGS]
    no_injection(tmp_path, ROOT)


def test_slurm_hostile_trainer_args_and_a_workdir_with_spaces(sandbox, tmp_path):
    """Submit for real (sbatch records its argv), then run the written script as the job would."""
    bin_dir, submitted, srun_argv = tmp_path / "bin", tmp_path / "sbatch.argv", tmp_path / "srun.argv"
    argv_recorder(bin_dir / "sbatch", submitted)
    argv_recorder(bin_dir / "srun", srun_argv)
    venv = tmp_path / "venv"
    argv_recorder(venv / "bin" / "python", tmp_path / "unused")
    workdir = tmp_path / "my runs" / "sop #1 100%"
    flags = [
        "--config",
        "c.py",
        "--workdir",
        str(workdir),
        "--venv",
        str(venv),
        "--sbatch-args",
        "--comment=$(touch${IFS}PWNED) --constraint=a100|v100&ib",
        "--",
        *HOSTILE_ARGS,
    ]
    dry = ok(launch(sandbox, SUBMIT, *flags, cwd=tmp_path))
    assert dry.count("\nHDML_SBATCH_EOF\n") == 1  # the here-document ends where it should
    env = {"PATH": f"{bin_dir}:{sandbox['env']['PATH']}"}
    ok(launch(sandbox, SUBMIT, *flags, env=env, cwd=tmp_path, dry=False))
    script_path = workdir / "slurm" / "hdml_jax.sbatch"
    output = f"--output={str(workdir).replace('%', '%%')}/slurm/%x-%j.out"
    # The output path holds a space and a "#": it goes on sbatch's command line, one argv word.
    assert recorded(submitted) == [output, str(script_path)]
    script = script_path.read_text()
    assert script == generated_script(dry) + "\n"
    header, _, body = script.partition("set -euo pipefail\n")
    directives = [line for line in header.splitlines() if line.startswith("#SBATCH")]
    assert all(line.startswith("#") for line in header.splitlines()), header  # nothing but comments
    assert "#SBATCH --comment=$(touch${IFS}PWNED)" in directives  # verbatim; sbatch runs no shell
    assert not any(str(tmp_path) in line for line in directives), directives
    resubmit = next(line for line in body.splitlines() if "To resubmit" in line).split(": ", 1)[1]
    assert bash_words(resubmit, tmp_path) == ["sbatch", output, str(script_path)]
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    # The job, for real: srun gets the trainer's argv exactly.
    job_env = {**SLURM_ENV, "PATH": f"{bin_dir}:{sandbox['env']['PATH']}"}
    ok(launch(sandbox, script_path, env=job_env, cwd=tmp_path, dry=False))
    trainer = [
        str(venv / "bin" / "python"),
        "-m",
        "hdml_jax.main",
        "--config",
        "c.py",
        "--workdir",
        str(workdir),
    ]
    assert recorded(srun_argv) == ["--kill-on-bad-exit=1", f"--chdir={ROOT}", *trainer, *HOSTILE_ARGS]
    job = ok(launch(sandbox, script_path, env=SLURM_ENV, cwd=tmp_path))
    assert next(a for a in printed(job, tmp_path) if a[0] == "srun")[3:] == [*trainer, *HOSTILE_ARGS]
    no_injection(tmp_path, workdir, ROOT)


NEWLINE = "\ntouch PWNED"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        *[
            ([flag, value + NEWLINE], {}, f"{flag} must not contain a newline")
            for flag, value in [
                ("--partition", "gpu"),
                ("--time", "24:00:00"),
                ("--account", "a"),
                ("--qos", "q"),
                ("--job-name", "j"),
                ("--sbatch-args", "--exclusive"),
                ("--workdir", "/w"),
                ("--script", "/s.sbatch"),
                ("--modules", "cuda"),
            ]
        ],
        ([], {"PARTITION": "gpu" + NEWLINE}, "--partition must not contain a newline"),
        (["--partition", "gpu debug"], {}, "--partition must not contain spaces"),
        (["--account", "a;touch PWNED"], {}, "--account must not contain spaces, quotes or other shell"),
        (["--qos", "$(touch PWNED)"], {}, "--qos must not contain"),
        (["--job-name", "x`touch PWNED`"], {}, "--job-name must not contain"),
        (["--time", "1:00 #x"], {}, "--time must be a SLURM time"),
        (["--sbatch-args", '--comment="a b"'], {}, "--sbatch-args: '--comment=\"a' holds a quote"),
        (["--modules", "cuda;touch PWNED"], {}, "--modules must not contain"),
        (["--workdir", "/w\\x"], {}, "must not contain a backslash"),
        (["--nodes", "PATH[$(touch PWNED)0]"], {}, "--nodes must be a whole number"),
        ([], {"DRY_RUN": "PATH[$(touch PWNED)0]"}, "DRY_RUN must be 0 or 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_slurm_submit_refuses_unsafe_values(sandbox, tmp_path, args, env, message):
    base = {"CONFIG": "c.py", "WORKDIR": str(tmp_path / "w")}
    err = fails(launch(sandbox, SUBMIT, *args, env={**base, **env}, cwd=tmp_path, dry=False), message)
    assert err.count("\n") == 1, err  # one line, whatever the value
    assert not sandbox["calls"].exists() and not (tmp_path / "w").exists()
    no_injection(tmp_path)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--gpus-per-node", "PATH[$(touch PWNED)0]"], {}, "--gpus-per-node must be a whole number"),
        (["--max-restarts", "PATH[$(touch PWNED)0]"], {}, "--max-restarts must be a whole number"),
        ([], {"SLURM_GPUS_ON_NODE": "PATH[$(touch PWNED)0]"}, "SLURM_GPUS_ON_NODE must be a whole number"),
        (["--modules", "x $(touch PWNED)"], {}, "--modules must not contain"),
        (["--extra-args", "--a=1" + NEWLINE], {}, "--extra-args must not contain a newline"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_slurm_job_refuses_unsafe_values(sandbox, tmp_path, args, env, message):
    flags = ["--config", "c.py", "--workdir", str(tmp_path / "w"), *args]
    fails(launch(sandbox, SBATCH, *flags, env={**SLURM_ENV, **env}, cwd=tmp_path, dry=False), message)
    assert not sandbox["calls"].exists()
    no_injection(tmp_path)


def test_tpu_worker_gets_hostile_trainer_args_verbatim(sandbox, tmp_path):
    """The remote start command, run by bash and by a POSIX sh as the worker's login shell."""
    home = Path(sandbox["env"]["HOME"])
    (home / "hdml_jax").mkdir()
    out = tmp_path / "argv"
    argv_recorder(home / "hdml_venv" / "bin" / "python", out)
    flags = [*RUN_FLAGS[:2], "--workdir", "runs/a b $(touch PWNED)", "--", *HOSTILE_ARGS]
    lines = printed(ok(launch(sandbox, TPU, "run", *flags, env=TPU_BASE, cwd=tmp_path)), tmp_path)
    ((start,),) = [[a[a.index("--command") + 1]] for a in lines if a[4] == "ssh"]
    expected = [
        "-m",
        "hdml_jax.main",
        "--config",
        "configs/cub.py:method=hpl_pa",
        "--workdir",
        f"{home}/hdml_jax/runs/a b $(touch PWNED)",
        f"--config.dataset.data_dir={home}/tensorflow_datasets",
        *HOSTILE_ARGS,
    ]
    for shell in ("bash", "sh"):
        out.unlink(missing_ok=True)
        (home / "hdml_logs" / "train.pid").unlink(missing_ok=True)  # the stand-in may not have exited yet
        result = subprocess.run(
            [shell, "-c", start], env=sandbox["env"], cwd=tmp_path, capture_output=True, text=True, timeout=10
        )
        assert result.returncode == 0 and "started hdml_jax.main" in result.stdout, (
            result.stdout + result.stderr
        )
        assert recorded(out) == expected, shell
    assert (home / "hdml_jax" / "runs" / "a b $(touch PWNED)").is_dir()
    no_injection(tmp_path, home, home / "hdml_jax")


def test_tpu_gcsfuse_flags_are_words_not_code(sandbox, tmp_path):
    bin_dir, out = tmp_path / "worker-bin", tmp_path / "gcsfuse.argv"
    argv_recorder(bin_dir / "gcsfuse", out)
    (bin_dir / "mountpoint").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "mountpoint").chmod(0o755)
    env = {**TPU_BASE, "GCSFUSE_DATA_FLAGS": "-o ro; touch PWNED"}
    flags = ["--gcs-data", "gs://example-bucket/tfds", "--data-mode", "gcsfuse"]
    ((_, remote),) = remote_commands(ok(launch(sandbox, TPU, "data", *flags, env=env)))
    worker_env = {**sandbox["env"], "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", remote], env=worker_env, cwd=tmp_path, check=True, timeout=10)
    home = sandbox["env"]["HOME"]
    assert recorded(out) == [
        "-o",
        "ro;",
        "touch",
        "PWNED",
        "--only-dir",
        "tfds",
        "example-bucket",
        f"{home}/tensorflow_datasets",
    ]
    no_injection(tmp_path, Path(home))


@pytest.mark.parametrize(
    ("command", "args", "env", "message"),
    [
        ("create", ["--name", "hdml" + NEWLINE], {}, "--name must not contain a newline"),
        ("create", ["--name", "a;touch PWNED"], {}, "--name must be a Cloud TPU name"),
        ("create", ["--zone", "z" + NEWLINE], {}, "--zone must not contain a newline"),
        ("setup", [], {"PYTHON_VERSION": "3.11; touch PWNED"}, "PYTHON_VERSION must look like 3.11"),
        ("setup", ["--repo-url", "--upload-pack=touch PWNED"], {}, "must not start with '-'"),
        ("run", [*RUN_FLAGS, "--sync-every", "1; touch PWNED"], {}, "--sync-every must be a whole number"),
        ("run", RUN_FLAGS, {"LOG_DIR": "~/logs $(touch PWNED)"}, "LOG_DIR must not contain spaces"),
        (
            "run",
            RUN_FLAGS,
            {"GCSFUSE_WORKDIR_FLAGS": "-o" + NEWLINE},
            "GCSFUSE_WORKDIR_FLAGS must not contain",
        ),
        ("run", [*RUN_FLAGS, "--extra-args", "--a" + NEWLINE], {}, "--extra-args must not contain a newline"),
        (
            "fetch",
            RUN_FLAGS,
            {"FETCH_CHECKPOINTS": "PATH[$(touch PWNED)0]"},
            "FETCH_CHECKPOINTS must be 0 or 1",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_tpu_refuses_unsafe_values(sandbox, tmp_path, command, args, env, message):
    err = fails(
        launch(sandbox, TPU, command, *args, env={**TPU_BASE, **env}, cwd=tmp_path, dry=False), message
    )
    assert err.count("\n") == 1, err
    assert not sandbox["calls"].exists()
    no_injection(tmp_path)


def test_gpu_node_refuses_unsafe_values(sandbox, tmp_path):
    flags = ["--config", "c", "--workdir", "/w"]
    fails(
        launch(sandbox, GPU, *flags, env={"INSTALL": "PATH[$(touch PWNED)0]"}, cwd=tmp_path),
        "INSTALL must be 0 or 1",
    )
    fails(
        launch(sandbox, GPU, *flags, "--extra-args", "--a" + NEWLINE, cwd=tmp_path),
        "--extra-args must not contain",
    )
    no_injection(tmp_path)


# ----------------------------------------------------------------------------- MLRC folds


def test_mlrc_array_task_trains_its_fold(sandbox):
    mlrc = LAUNCH / "mlrc.sbatch"
    run = ["--config", "configs/mlrc/cub.py:method=hpl_pa", "--workdir", "/shared/runs/mlrc"]
    srun = [c for c in commands(ok(launch(sandbox, mlrc, *run, env={"SLURM_ARRAY_TASK_ID": "2"}))) if c[0] == "srun"]
    assert srun and srun[0][-3:] == ["--workdir", "/shared/runs/mlrc", "--config.mlrc.fold=2"]
    # Trainer arguments after -- stay; without an array every fold runs (-1).
    out = ok(launch(sandbox, mlrc, *run, "--", "--config.seed=1"))
    srun = [c for c in commands(out) if c[0] == "srun"]
    assert srun[0][-2:] == ["--config.seed=1", "--config.mlrc.fold=-1"]
    fails(launch(sandbox, mlrc, *run, env={"SLURM_ARRAY_TASK_ID": "2;x"}), "must be a fold number")
