#!/usr/bin/env bash
# Train hdml_jax on one machine with one or more GPUs.
#
#   launch/gpu_node.sh [install|run] [flags] [-- extra trainer args]
#
# One process drives every local GPU: the trainer's 1-D 'data' mesh spans jax.devices(), so a
# single-host run needs no jax.distributed.initialize() and no launcher such as srun or torchrun.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$LAUNCH_DIR/_common.sh"

usage() {
    cat <<'EOF'
Usage: launch/gpu_node.sh [install|run] [flags] [-- extra trainer args]

  install   create the venv and pip install -e . "jax[cuda12]" (then lists the GPUs JAX sees)
  run       (default) run python -m hdml_jax.main in the foreground; --install installs first

Flags (environment variable in brackets; flags win):
  --config SPEC         configs/<dataset>.py[:method=...] [CONFIG]                  (required by run)
  --workdir DIR         checkpoints, metrics, pictures (or gs://BUCKET/RUN, with pip install -e
                        '.[gcs]'); rerun with the same DIR to resume [WORKDIR]
                                                                                    (required by run)
  --data-dir DIR        the TFDS data dir (python -m hdml_jax.data.prepare ...) [DATA_DIR]
  --extra-args "ARGS"   more trainer flags, split on spaces [EXTRA_ARGS]; or put them after --
  --gpus LIST           only these GPUs, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES) [GPUS] (all)
  --venv DIR            the virtual environment [VENV] (<repo>/.venv)
  --python EXE          the interpreter that creates the venv [PYTHON] (python3)
  --jax-package SPEC    what install adds to the venv [JAX_PACKAGE] ("jax[cuda12]")
  --install             install before running [INSTALL=1]
  --log FILE            also append the output to FILE [LOG]
  --dry-run             print the commands, run nothing
  -h, --help            this help

The trainer handles SIGTERM by saving a checkpoint and exiting 0; this script execs it, so a
signal sent to the script (kill, a scheduler's time limit) reaches it directly.

Example:
  launch/gpu_node.sh run --install --config configs/cub.py:method=hpl_pa --workdir runs/cub_hpl_pa \
      --data-dir ~/tensorflow_datasets -- --config.model.pretrained=$HOME/weights/resnet50
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
GPUS=${GPUS:-}
VENV=${VENV:-$REPO_ROOT/.venv}
PYTHON=${PYTHON:-python3}
JAX_PACKAGE=${JAX_PACKAGE:-'jax[cuda12]'}
INSTALL=${INSTALL:-0}
LOG=${LOG:-}

# shellcheck disable=SC2034 # read by parse_args (_common.sh)
FLAGS=(
    "--config CONFIG" "--workdir WORKDIR" "--data-dir DATA_DIR" "--extra-args EXTRA_ARGS" "--gpus GPUS"
    "--venv VENV" "--python PYTHON" "--jax-package JAX_PACKAGE" "--install INSTALL=1" "--log LOG"
)

cmd_install() {
    # Idempotent: an existing venv is reused, pip only adds what is missing.
    [[ -x $VENV/bin/python ]] || run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/pip" install --quiet --upgrade pip
    run "$VENV/bin/pip" install --quiet -e "$REPO_ROOT" "$JAX_PACKAGE"
    run "$VENV/bin/python" -c 'import jax; print(jax.devices())'
}

cmd_run() {
    require CONFIG "pass --config configs/<dataset>.py[:method=...] or set CONFIG"
    require WORKDIR "pass --workdir or set WORKDIR (rerunning with the same workdir resumes)"
    ((!INSTALL)) || cmd_install
    [[ -x $VENV/bin/python ]] || ((DRY_RUN)) || die "no venv at $VENV: run '$0 install' first (or pass --venv)"
    local extra=() env_args=(env)
    read -r -a extra <<<"$EXTRA_ARGS"
    # hdml_jax.main calls jax.distributed.initialize() whenever SLURM_JOB_ID is set. Inside an
    # salloc/sbatch allocation that would either fail (no srun step: no SLURM_STEP_NODELIST) or pin
    # this one process to GPU 0 (JAX maps SLURM_LOCALID to a single device). One process, all GPUs.
    [[ -z ${SLURM_JOB_ID:-} ]] || env_args+=(-u SLURM_JOB_ID)
    [[ -z $GPUS ]] || env_args+=("CUDA_VISIBLE_DEVICES=$GPUS")
    # The script runs the trainer from the repository root: make the user's relative paths absolute.
    VENV=$(abspath "$VENV")
    WORKDIR=$(abspath "$WORKDIR")
    [[ -z $DATA_DIR ]] || DATA_DIR=$(abspath "$DATA_DIR")
    [[ -z $LOG ]] || LOG=$(abspath "$LOG")
    CONFIG=$(resolve_config "$CONFIG" "$REPO_ROOT")
    local args=("$VENV/bin/python" -m hdml_jax.main --config "$CONFIG" --workdir "$WORKDIR")
    [[ -z $DATA_DIR ]] || args+=("--config.dataset.data_dir=$DATA_DIR")
    args+=("${extra[@]}" "${EXTRA[@]}")
    if [[ -n $LOG ]]; then
        run mkdir -p "$(dirname "$LOG")"
        printf '+ exec > >(tee -a %s) 2>&1\n' "$(quote "$LOG")"
        # Output goes through tee into the log; the trainer is still exec'd, so signals reach it.
        ((DRY_RUN)) || exec > >(tee -a "$LOG") 2>&1
    fi
    run cd "$REPO_ROOT" # configs/... resolve against the repository (paths above are absolute)
    if ((${#env_args[@]} > 1)); then
        run_exec "${env_args[@]}" "${args[@]}"
    fi
    run_exec "${args[@]}"
}

parse_args "$@"
((${#POSITIONAL[@]} <= 1)) || die "expected at most one command (install or run), got: ${POSITIONAL[*]@Q}"
COMMAND=${POSITIONAL[0]:-run}
case $COMMAND in
    install | run) "cmd_$COMMAND" ;;
    *) die "unknown command ${COMMAND@Q} (install or run)" ;;
esac
