#!/usr/bin/env bash
# Train hdml_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8, ...) or a pod slice (v4-32, ...).
#
#   launch/tpu_vm.sh create|setup|data|run|resume|fetch|logs|stop|delete [flags] [-- trainer args]
#
# Every step is a plain gcloud/gsutil command, printed before it runs; --dry-run only prints them.
# What runs on the workers is one command string per step (gcloud ... ssh --command), which their
# login shell parses: every value in it is quoted for a POSIX shell (squote/rquote, _common.sh), and
# values that cannot be quoted there (a number after sleep, an scp path) are checked instead.
# On a pod slice every command that touches the workers uses --worker=all, because JAX is
# multi-controller: the same program runs on every host and they meet in jax.distributed.initialize()
# (auto-detected on TPU VMs by hdml_jax.main). The workdir is best a bucket, --workdir gs://BUCKET/RUN:
# the trainer writes there itself (etils.epath, orbax), every host sees it, nothing to mount.
# See launch/README.md for the whole story.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$LAUNCH_DIR/_common.sh"

usage() {
    cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [flags] [-- extra trainer args]

Commands (each prints the commands it runs; --dry-run prints them without running anything):
  create   create the TPU VM (gcloud compute tpus tpu-vm create)
  setup    copy this working tree (or clone --repo-url) to every worker, make a venv, pip install
           -e ".[gcs]" "jax[tpu]" (and gcsfuse when a bucket is mounted)
  data     on every worker: gsutil -m rsync the prepared TFDS dir (and --gcs-weights) to local
           disk, or mount it read-only with gcsfuse (--data-mode gcsfuse); --data-mode gcs: the
           trainer reads the bucket itself, nothing to copy
  run      start python -m hdml_jax.main on every worker in the background (nohup, log file);
           a no-op on workers where it is already running
  resume   after a preemption: recreate the VM if it is gone/PREEMPTED, then setup, data, run;
           the trainer resumes from the last checkpoint in the workdir
  fetch    copy the results (metrics, pictures, events, embeddings; not checkpoints unless
           --with-checkpoints) and worker 0's log to --to DIR
  logs     tail worker 0's log (process 0 prints the progress line)
  stop     SIGTERM the trainer on every worker: it saves a checkpoint and exits
  delete   delete the TPU VM

Flags (environment variable in brackets; flags win):
  --name NAME             TPU VM name [NAME]                                    (required)
  --zone ZONE             e.g. us-central2-b [ZONE]                             (required)
  --project ID            GCP project; default: gcloud's configured one [PROJECT]
  --accelerator TYPE      v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ... [ACCELERATOR] (v4-8)
  --runtime-version V     TPU software version [RUNTIME_VERSION] (chosen from the accelerator)
  --spot | --preemptible  cheaper capacity that can be preempted [CAPACITY=spot|preemptible]
  --repo-url URL          setup clones URL instead of copying this working tree [REPO_URL]
  --repo-ref REF          commit/tag/branch to check out with --repo-url [REPO_REF]
  --remote-dir DIR        the repository on the workers [REMOTE_DIR] ('~/hdml_jax')
  --remote-venv DIR       the venv on the workers [REMOTE_VENV] ('~/hdml_venv')
  --gcs-data URL          gs:// URL of a prepared TFDS data dir [GCS_DATA]
  --data-dir DIR          the TFDS data dir on the workers [DATA_DIR] ('~/tensorflow_datasets')
  --data-mode MODE        rsync (copy to each worker's disk), gcsfuse (mount) or gcs (the trainer
                          reads --gcs-data directly) [DATA_MODE] (rsync)
  --gcs-weights URL       gs:// URL of converted ImageNet weights, copied to --weights-dir [GCS_WEIGHTS]
  --weights-dir DIR       [WEIGHTS_DIR] ('~/weights'); pass --config.model.pretrained=~/weights/resnet50
  --config SPEC           configs/<dataset>.py[:method=...] [CONFIG]                (required by run)
  --workdir DIR|URL       the run's workdir: gs://BUCKET/RUN, written by the trainer directly and
                          shared by all hosts (best on pod slices and spot VMs), or a path as
                          the workers see it [WORKDIR]                              (required by run)
  --extra-args "ARGS"     more trainer flags, split on spaces [EXTRA_ARGS]; or put them after --
  --workdir-bucket URL    optional: gs://bucket[/prefix] mounted with gcsfuse at --workdir-mount on
                          every worker, for a --workdir path under it [WORKDIR_BUCKET]
  --workdir-mount DIR     [WORKDIR_MOUNT] (/mnt/hdml_runs); --workdir must lie under it
  --shared-workdir        --workdir is on storage all hosts share already (NFS, Filestore) [SHARED_WORKDIR=1]
  --sync-to URL           single host, local workdir: restore it from URL before run and mirror it
                          there every --sync-every seconds while training [SYNC_URI]
  --sync-every SECONDS    [SYNC_EVERY] (600)
  --to DIR                where fetch puts the results [FETCH_TO] (results/NAME)
  --with-checkpoints      fetch the checkpoints too [FETCH_CHECKPOINTS=1]
  --assume-state STATE    dry runs of resume: the VM state to pretend (PREEMPTED, READY, STOPPED,
                          MISSING) [ASSUME_STATE] (PREEMPTED)
  --dry-run               print the commands, run nothing
  -h, --help              this help

Examples:
  NAME=hdml ZONE=us-central2-b launch/tpu_vm.sh create --accelerator v4-8 --spot
  NAME=hdml ZONE=us-central2-b launch/tpu_vm.sh setup
  NAME=hdml ZONE=us-central2-b launch/tpu_vm.sh data --gcs-data gs://my-bucket/tensorflow_datasets
  NAME=hdml ZONE=us-central2-b launch/tpu_vm.sh run --config configs/cub.py:method=hpl_pa \
      --workdir gs://my-bucket/runs/cub_hpl_pa
  NAME=hdml ZONE=us-central2-b launch/tpu_vm.sh resume ...same flags as create, setup, data, run...
EOF
}

# --------------------------------------------------------------------------- settings
# Remote paths keep a literal "~/" (quoted here so it is not expanded on this machine); rquote
# turns it into "$HOME"/ in the remote commands.
# shellcheck disable=SC2088
{
    REMOTE_DIR=${REMOTE_DIR:-'~/hdml_jax'}
    REMOTE_VENV=${REMOTE_VENV:-'~/hdml_venv'}
    DATA_DIR=${DATA_DIR:-'~/tensorflow_datasets'}
    WEIGHTS_DIR=${WEIGHTS_DIR:-'~/weights'}
    LOG_DIR=${LOG_DIR:-'~/hdml_logs'}
}
NAME=${NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
CAPACITY=${CAPACITY:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11} # pyproject.toml: requires-python >= 3.11
JAX_PACKAGE=${JAX_PACKAGE:-'jax[tpu]'}
GCS_DATA=${GCS_DATA:-}
DATA_MODE=${DATA_MODE:-rsync}
GCS_WEIGHTS=${GCS_WEIGHTS:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
WORKDIR_BUCKET=${WORKDIR_BUCKET:-}
WORKDIR_MOUNT=${WORKDIR_MOUNT:-/mnt/hdml_runs}
SHARED_WORKDIR=${SHARED_WORKDIR:-0}
SYNC_URI=${SYNC_URI:-}
SYNC_EVERY=${SYNC_EVERY:-600}
FETCH_TO=${FETCH_TO:-}
FETCH_CHECKPOINTS=${FETCH_CHECKPOINTS:-0}
ASSUME_STATE=${ASSUME_STATE:-PREEMPTED}
# Several hosts write one workdir through gcsfuse: no metadata caching, so every host sees the
# checkpoints the others (process 0) just wrote, and all agree on the latest step when resuming.
GCSFUSE_WORKDIR_FLAGS=${GCSFUSE_WORKDIR_FLAGS:---implicit-dirs --metadata-cache-ttl-secs=0}
GCSFUSE_DATA_FLAGS=${GCSFUSE_DATA_FLAGS:---implicit-dirs -o ro}

# shellcheck disable=SC2034 # read by parse_args (_common.sh)
FLAGS=(
    "--name NAME" "--zone ZONE" "--project PROJECT" "--accelerator ACCELERATOR"
    "--runtime-version RUNTIME_VERSION" "--spot CAPACITY=spot" "--preemptible CAPACITY=preemptible"
    "--repo-url REPO_URL" "--repo-ref REPO_REF" "--remote-dir REMOTE_DIR" "--remote-venv REMOTE_VENV"
    "--gcs-data GCS_DATA" "--data-dir DATA_DIR" "--data-mode DATA_MODE" "--gcs-weights GCS_WEIGHTS"
    "--weights-dir WEIGHTS_DIR" "--config CONFIG" "--workdir WORKDIR" "--extra-args EXTRA_ARGS"
    "--workdir-bucket WORKDIR_BUCKET" "--workdir-mount WORKDIR_MOUNT" "--shared-workdir SHARED_WORKDIR=1"
    "--sync-to SYNC_URI" "--sync-every SYNC_EVERY" "--to FETCH_TO" "--with-checkpoints FETCH_CHECKPOINTS=1"
    "--assume-state ASSUME_STATE"
)

# --------------------------------------------------------------------------- helpers

gcloud_common() {
    # --zone (and --project when given) for every gcloud tpu-vm command; no project is hard-coded.
    GC=(--zone="$ZONE")
    [[ -z $PROJECT ]] || GC+=(--project="$PROJECT")
}

default_runtime_version() {
    # The TPU software image each generation expects (cloud.google.com/tpu/docs/runtimes).
    case $ACCELERATOR in
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v6e-*) echo v2-alpha-tpuv6e ;;
        *) echo tpu-ubuntu2204-base ;;
    esac
}

is_multi_host() {
    # Slices with more than 8 chips/cores (v4-16, v4-32, v5litepod-16, ...) span several hosts;
    # every "-8" or smaller type of every generation is one host.
    local size=${ACCELERATOR##*-}
    [[ $size =~ ^[0-9]+$ ]] || die "cannot read the slice size from --accelerator $ACCELERATOR (expected e.g. v4-8)"
    ((size > 8))
}

ssh_workers() {
    # ssh_workers WORKER COMMAND: COMMAND in the login shell of one worker (0) or all of them.
    run gcloud compute tpus tpu-vm ssh "$NAME" "${GC[@]}" --worker="$1" --command "$2"
}

and_join() {
    # The remote steps joined with " && ", so a worker stops at its first failing step.
    local out="" step
    for step in "$@"; do
        out+=${out:+ && }$step
    done
    printf '%s' "$out"
}

remote_path() {
    # A path as the worker's shell sees it: absolute or "~/..." as given, relative to the repository;
    # a URL (gs://...) as given.
    local path=$1
    # shellcheck disable=SC2088 # a literal "~/" is meant: it expands on the worker
    if [[ $path == /* || $path == "~" || $path == "~/"* ]] || is_url "$path"; then
        printf '%s' "$path"
    else
        printf '%s/%s' "${REMOTE_DIR%/}" "$path"
    fi
}

scp_path() {
    # gcloud tpu-vm scp wants remote paths relative to the home directory, not "~/...".
    local path=$1
    # shellcheck disable=SC2088 # a literal "~/" is meant
    [[ $path == "~/"* ]] && path=${path#"~/"}
    printf '%s' "$path"
}

gs_bucket() { local rest=${1#gs://}; printf '%s' "${rest%%/*}"; }
gs_prefix() {
    local rest=${1#gs://}
    if [[ $rest == */* ]]; then printf '%s' "${rest#*/}"; fi
}

check_gs() {
    local var=$1
    [[ ${!var} == gs://?* ]] || die "$var must be a gs:// URL (got '${!var}')"
}

gcsfuse_mount_step() {
    # gcsfuse_mount_step URL MOUNTPOINT FLAGS SUDO: mount URL (gs://bucket[/prefix]) unless mounted.
    # Mount points outside $HOME need sudo to create; the mount itself runs as the user. FLAGS is
    # split on spaces, each word quoted.
    local url=$1 dir=$2 flag_words=() flags use_sudo=$4 prefix mkdir_cmd
    read -r -a flag_words <<<"$3"
    flags=$(join_quoted squote "${flag_words[@]}")
    prefix=$(gs_prefix "$url")
    mkdir_cmd="mkdir -p $(rquote "$dir")"
    if ((use_sudo)); then
        mkdir_cmd="sudo mkdir -p $(rquote "$dir") && sudo chown \"\$USER\" $(rquote "$dir")"
    fi
    printf 'if ! mountpoint -q %s; then %s && gcsfuse %s%s %s %s; fi' \
        "$(rquote "$dir")" "$mkdir_cmd" "$flags" "${prefix:+ --only-dir $(squote "$prefix")}" \
        "$(squote "$(gs_bucket "$url")")" "$(rquote "$dir")"
}

uses_gcsfuse() { [[ -n $WORKDIR_BUCKET || $DATA_MODE == gcsfuse ]]; }

validate_common() {
    require NAME "pass --name or set NAME (the TPU VM's name)"
    require ZONE "pass --zone or set ZONE (e.g. us-central2-b)"
    # NAME also makes scp's NAME:path and the default --to results/NAME: a plain Cloud TPU name.
    [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
        die "--name must be a Cloud TPU name: lowercase letters, digits and -, starting with a letter (got ${NAME@Q})"
    # Settings without a flag (the checks of parse_args do not see them).
    check_line JAX_PACKAGE GCSFUSE_WORKDIR_FLAGS GCSFUSE_DATA_FLAGS
    [[ $PYTHON_VERSION =~ ^[0-9]+(\.[0-9]+)*$ ]] || die "PYTHON_VERSION must look like 3.11 (got ${PYTHON_VERSION@Q})"
    # LOG_DIR is also a remote path of scp, which some scp versions hand to the remote shell unquoted.
    check_chars LOG_DIR 'A-Za-z0-9_./~+@%,=-'
    check_whole SYNC_EVERY
    [[ $REPO_URL != -* && $REPO_REF != -* ]] || die "--repo-url and --repo-ref must not start with '-'"
    [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator $ACCELERATOR does not look like v4-8 or v5litepod-16"
    [[ $CAPACITY =~ ^(|spot|preemptible)$ ]] || die "CAPACITY must be spot, preemptible or empty (got '$CAPACITY')"
    [[ $DATA_MODE =~ ^(rsync|gcsfuse|gcs)$ ]] || die "--data-mode must be rsync, gcsfuse or gcs (got '$DATA_MODE')"
    RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version)}
    [[ -z $WORKDIR_BUCKET ]] || check_gs WORKDIR_BUCKET
    [[ -z $SYNC_URI ]] || check_gs SYNC_URI
    gcloud_common
}

validate_run() {
    require CONFIG "pass --config configs/<dataset>.py[:method=...] or set CONFIG"
    require WORKDIR "pass --workdir or set WORKDIR (checkpoints live there; the same path resumes)"
    if [[ $DATA_MODE == gcs ]]; then
        require GCS_DATA "--data-mode gcs reads the prepared data from the bucket: pass --gcs-data gs://BUCKET/tensorflow_datasets"
        check_gs GCS_DATA
    fi
    if is_url "$WORKDIR"; then
        # Written by the trainer itself (etils.epath, orbax): shared by all hosts, kept after a preemption.
        check_gs WORKDIR
        [[ -z $WORKDIR_BUCKET ]] ||
            die "--workdir $WORKDIR is a bucket the trainer writes directly; --workdir-bucket mounts one for a" \
                "--workdir path under --workdir-mount: use one or the other"
        [[ -z $SYNC_URI ]] || die "--sync-to mirrors a local workdir; --workdir $WORKDIR is in GCS already"
        return 0
    fi
    local workdir
    workdir=$(remote_path "$WORKDIR")
    if [[ -n $WORKDIR_BUCKET && $workdir != "${WORKDIR_MOUNT%/}/"* ]]; then
        die "--workdir $WORKDIR is not under --workdir-mount $WORKDIR_MOUNT, where $WORKDIR_BUCKET is mounted"
    fi
    if [[ -n $SYNC_URI && -n $WORKDIR_BUCKET ]]; then
        die "--sync-to and --workdir-bucket exclude each other: a mounted workdir is already in GCS"
    fi
    if [[ -n $CAPACITY && -z $WORKDIR_BUCKET && -z $SYNC_URI ]] && ((!SHARED_WORKDIR)); then
        warn "a $CAPACITY VM with a workdir on its own disk: a preemption deletes the checkpoints;" \
            "resume then starts over. Use --workdir gs://BUCKET/RUN (or --sync-to on one host)."
    fi
    if is_multi_host; then
        [[ -z $SYNC_URI ]] || die "--sync-to is for one host; a pod slice ($ACCELERATOR) needs --workdir gs://BUCKET/RUN"
        if [[ -z $WORKDIR_BUCKET ]] && ((!SHARED_WORKDIR)); then
            die "$ACCELERATOR spans several hosts and orbax writes checkpoints collectively: every host" \
                "must see the same workdir. Pass --workdir gs://BUCKET/runs/<run> (or mount one with" \
                "--workdir-bucket gs://BUCKET/runs, gcsfuse at $WORKDIR_MOUNT), or --shared-workdir if" \
                "$WORKDIR is on NFS/Filestore."
        fi
    fi
}

# --------------------------------------------------------------------------- commands

cmd_create() {
    local args=(gcloud compute tpus tpu-vm create "$NAME" "${GC[@]}"
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
    case $CAPACITY in
        spot) args+=(--spot) ;;
        preemptible) args+=(--preemptible) ;;
    esac
    run "${args[@]}"
}

cmd_setup() {
    local repo venv steps=()
    repo=$(rquote "$REMOTE_DIR")
    venv=$(rquote "$REMOTE_VENV")
    if [[ -n $REPO_URL ]]; then
        # A clone is exactly a commit; fine when the code is pushed (private repos need a deploy key).
        local update="git -C $repo pull --quiet --ff-only"
        [[ -z $REPO_REF ]] || update="git -C $repo fetch --quiet origin && git -C $repo checkout --quiet $(squote "$REPO_REF")"
        local clone
        clone="git clone --quiet -- $(squote "$REPO_URL") $repo"
        [[ -z $REPO_REF ]] || clone+=" && git -C $repo checkout --quiet $(squote "$REPO_REF")"
        steps+=("if [ -d $repo/.git ]; then $update; else $clone; fi")
    else
        # The working tree as it is (uncommitted edits included), minus caches, venvs and runs.
        local archive="${TMPDIR:-/tmp}/hdml_jax_src.tar.gz"
        # COPYFILE_DISABLE: no macOS "._*" metadata files in the archive.
        run env COPYFILE_DISABLE=1 tar -czf "$archive" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=venv \
            --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
            --exclude=.hypothesis --exclude=runs --exclude=results --exclude=workdir .
        run gcloud compute tpus tpu-vm scp "$archive" "$NAME:hdml_jax_src.tar.gz" "${GC[@]}" --worker=all
        run rm -f "$archive"
        steps+=("mkdir -p $repo" "tar -xzf \"\$HOME\"/hdml_jax_src.tar.gz -C $repo" "rm \"\$HOME\"/hdml_jax_src.tar.gz")
    fi
    # TPU images ship Ubuntu 22.04's Python 3.10; the package needs >= 3.11. Use python3.X when the
    # image has it, else let uv fetch a standalone interpreter. Skipped when the venv exists.
    local py="python$PYTHON_VERSION"
    steps+=("if [ ! -x $venv/bin/python ]; then if command -v $py >/dev/null 2>&1; then $py -m venv $venv; else python3 -m pip install --user --quiet uv && \"\$HOME\"/.local/bin/uv venv --quiet --seed --python $PYTHON_VERSION $venv; fi; fi")
    # [gcs]: gcsfs, through which etils.epath (the trainer, orbax, TFDS) reaches a gs:// workdir or
    # data dir; the TPU images have no TensorFlow, epath's other route.
    steps+=("$venv/bin/pip install --quiet --upgrade pip" "$venv/bin/pip install --quiet -e $repo'[gcs]' $(squote "$JAX_PACKAGE")")
    if uses_gcsfuse; then
        # Not on the TPU images; Google's apt repository (cloud.google.com/storage/docs/gcsfuse-install).
        steps+=("if ! command -v gcsfuse >/dev/null 2>&1; then echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi")
    fi
    ssh_workers all "$(and_join "${steps[@]}")"
}

data_steps() {
    # The steps that make the data (and weights) visible on a worker; run by data and, for mounts
    # (which vanish with a reboot or a recreated VM), again by run.
    local only_mounts=$1 steps=()
    if [[ -n $GCS_DATA && $DATA_MODE != gcs ]]; then # gcs: the trainer reads the bucket itself
        if [[ $DATA_MODE == gcsfuse ]]; then
            steps+=("$(gcsfuse_mount_step "$GCS_DATA" "$DATA_DIR" "$GCSFUSE_DATA_FLAGS" 0)")
        elif ((!only_mounts)); then
            # Every host needs the whole training set (the sampler draws from all of it), so each
            # gets a full copy; rsync makes a rerun after a resume cheap.
            steps+=("mkdir -p $(rquote "$DATA_DIR")" "gsutil -m -q rsync -r $(squote "${GCS_DATA%/}") $(rquote "$DATA_DIR")")
        fi
    fi
    if [[ -n $GCS_WEIGHTS ]] && ((!only_mounts)); then
        steps+=("mkdir -p $(rquote "$WEIGHTS_DIR")" "gsutil -m -q rsync -r $(squote "${GCS_WEIGHTS%/}") $(rquote "$WEIGHTS_DIR")")
    fi
    ((${#steps[@]} == 0)) || and_join "${steps[@]}"
}

cmd_data() {
    [[ -n $GCS_DATA || -n $GCS_WEIGHTS ]] || die "GCS_DATA is not set: pass --gcs-data gs://BUCKET/tensorflow_datasets (a dir made by python -m hdml_jax.data.prepare)"
    [[ -z $GCS_DATA ]] || check_gs GCS_DATA
    [[ -z $GCS_WEIGHTS ]] || check_gs GCS_WEIGHTS
    local steps
    steps=$(data_steps 0)
    if [[ -z $steps ]]; then
        note "--data-mode gcs: the trainer reads $GCS_DATA directly; nothing to copy"
        return 0
    fi
    ssh_workers all "$steps"
}

trainer_command() {
    # The exact trainer command line, quoted for the worker's shell.
    local extra=() args data_dir=$DATA_DIR
    read -r -a extra <<<"$EXTRA_ARGS"
    [[ $DATA_MODE != gcs ]] || data_dir=${GCS_DATA%/}
    args=("$REMOTE_VENV/bin/python" -m hdml_jax.main --config "$CONFIG" --workdir "$(remote_path "$WORKDIR")"
        "--config.dataset.data_dir=$data_dir")
    join_quoted rquote "${args[@]}" "${extra[@]}" "${EXTRA[@]}"
}

cmd_run() {
    validate_run
    local steps=() workdir log start sync
    workdir=$(rquote "$(remote_path "$WORKDIR")")
    log=$(rquote "$LOG_DIR")
    [[ -z $WORKDIR_BUCKET ]] || steps+=("$(gcsfuse_mount_step "$WORKDIR_BUCKET" "$WORKDIR_MOUNT" "$GCSFUSE_WORKDIR_FLAGS" 1)")
    local mounts
    mounts=$(data_steps 1)
    [[ -z $mounts ]] || steps+=("$mounts")
    if is_url "$WORKDIR"; then
        steps+=("mkdir -p $log") # a bucket needs no folder
    else
        steps+=("mkdir -p $log $workdir")
    fi
    # Idempotent: a worker whose trainer still runs is left alone (resume may call run on a live VM).
    # The trainer is started with nohup and all of stdin/stdout/stderr redirected, so it outlives
    # this ssh session; $! is the python process itself, so `stop` can SIGTERM it.
    start="cd $(rquote "$REMOTE_DIR") || exit 1"
    if [[ -n $SYNC_URI ]]; then
        # Local workdir on one host: bring back what an earlier (preempted) VM mirrored to GCS.
        start+="; if gsutil -q ls $(squote "${SYNC_URI%/}") >/dev/null 2>&1; then gsutil -m -q rsync -r $(squote "${SYNC_URI%/}") $workdir; fi"
    fi
    start+="; nohup $(trainer_command) >> $log/train.log 2>&1 < /dev/null & pid=\$!; echo \$pid > $log/train.pid"
    if [[ -n $SYNC_URI ]]; then
        # Mirror the workdir while the trainer lives and once more after it exits, from a subshell
        # that ignores the hang-up of the ssh session; orbax's unfinished *.orbax-checkpoint-tmp-*
        # directories are never copied.
        sync="gsutil -m -q rsync -r -x \".*orbax-checkpoint-tmp.*\" $workdir $(squote "${SYNC_URI%/}")"
        start+="; (trap \"\" HUP; while kill -0 \$pid 2>/dev/null; do sleep $SYNC_EVERY; $sync; done; $sync) >> $log/sync.log 2>&1 < /dev/null & sync_pid=\$!"
    fi
    start+="; echo \"\$(hostname): started hdml_jax.main, pid \$(cat $log/train.pid), log\" $log/train.log"
    steps+=("if [ -f $log/train.pid ] && kill -0 \"\$(cat $log/train.pid)\" 2>/dev/null; then echo \"\$(hostname): hdml_jax.main is already running (pid \$(cat $log/train.pid))\"; else $start; fi")
    ssh_workers all "$(and_join "${steps[@]}")"
}

tpu_state() {
    # READY, PREEMPTED, STOPPED, CREATING, ... or MISSING. A dry run cannot ask, so it pretends
    # ASSUME_STATE (printed on stderr) to show one path through resume.
    local query=(gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format=value\(state\))
    if ((DRY_RUN)); then
        print_command "${query[@]}" >&3
        note "dry run: assuming the VM is $ASSUME_STATE (--assume-state)"
        printf '%s' "$ASSUME_STATE"
        return 0
    fi
    print_command "${query[@]}" >&3
    local state
    state=$("${query[@]}" 2>/dev/null) || state=""
    printf '%s' "${state:-MISSING}"
}

cmd_resume() {
    validate_run # fail before touching the VM when the run flags are incomplete
    local state
    state=$(tpu_state)
    note "TPU VM $NAME is $state"
    case $state in
        READY) ;; # still there: the trainer may have crashed or finished; run is a no-op if it runs
        STOPPED)
            run gcloud compute tpus tpu-vm start "$NAME" "${GC[@]}"
            ;;
        PREEMPTED | TERMINATED | MISSING)
            # Spot/preemptible TPU VMs cannot be restarted: delete what is left, create it anew.
            [[ $state == MISSING ]] || run gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
            cmd_create
            cmd_setup
            [[ -z $GCS_DATA && -z $GCS_WEIGHTS ]] || cmd_data
            ;;
        *) die "TPU VM $NAME is $state; try again when it is READY, PREEMPTED or gone" ;;
    esac
    # The same command as the first time: hdml_jax.main finds the workdir's checkpoints and resumes.
    cmd_run
}

cmd_fetch() {
    require WORKDIR "pass the --workdir of the run to fetch"
    local to=${FETCH_TO:-results/$NAME} exclude=() workdir
    # scp and tar read a local "a:b" as host:path; "./a:b" is a local path to both.
    [[ $to != *:* || $to == /* ]] || to=./$to
    ((FETCH_CHECKPOINTS)) || exclude=(-x '^checkpoints/.*')
    workdir=$(remote_path "$WORKDIR")
    if [[ -n $WORKDIR_BUCKET && $workdir != "${WORKDIR_MOUNT%/}/"* ]]; then
        die "--workdir $WORKDIR is not under --workdir-mount $WORKDIR_MOUNT, where $WORKDIR_BUCKET is mounted"
    fi
    run mkdir -p "$to"
    if is_url "$WORKDIR"; then
        # The trainer wrote the workdir to GCS: read it there, no VM needed (it may be gone).
        run gsutil -m rsync -r "${exclude[@]}" "${WORKDIR%/}" "$to"
    elif [[ -n $WORKDIR_BUCKET ]]; then
        # The workdir is in GCS already: read it there, no VM needed (it may be gone).
        local url="${WORKDIR_BUCKET%/}/${workdir#"${WORKDIR_MOUNT%/}/"}"
        run gsutil -m rsync -r "${exclude[@]}" "$url" "$to"
    elif [[ -n $SYNC_URI ]]; then
        run gsutil -m rsync -r "${exclude[@]}" "${SYNC_URI%/}" "$to"
    else
        # Process 0 (worker 0) wrote the metrics, pictures and events; pack them there, copy, unpack.
        local tar_exclude=""
        ((FETCH_CHECKPOINTS)) || tar_exclude=" --exclude=./checkpoints"
        ssh_workers 0 "tar -czf \"\$HOME\"/hdml_results.tar.gz -C $(rquote "$workdir")$tar_exclude ."
        run gcloud compute tpus tpu-vm scp "$NAME:hdml_results.tar.gz" "$to/" "${GC[@]}" --worker=0
        run tar -xzf "$to/hdml_results.tar.gz" -C "$to"
        run rm "$to/hdml_results.tar.gz"
    fi
    # Worker 0's log holds process 0's progress lines (and any traceback); the VM may be gone already.
    run gcloud compute tpus tpu-vm scp "$NAME:$(scp_path "$LOG_DIR")/train.log" "$to/train.worker0.log" "${GC[@]}" --worker=0 ||
        warn "could not copy worker 0's log (is the VM gone?)"
}

cmd_logs() {
    ssh_workers 0 "tail -n 50 $(rquote "$LOG_DIR")/train.log"
}

cmd_stop() {
    # The trainer's SIGTERM handler saves a checkpoint at the next step and exits 0.
    local log
    log=$(rquote "$LOG_DIR")
    ssh_workers all "if [ -f $log/train.pid ] && kill -0 \"\$(cat $log/train.pid)\" 2>/dev/null; then kill -TERM \"\$(cat $log/train.pid)\" && echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): not running\"; fi"
}

cmd_delete() {
    run gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
}

# --------------------------------------------------------------------------- main

exec 3>&1 # tpu_state prints its query here, to stdout, although it runs inside $(...)
parse_args "$@"
((${#POSITIONAL[@]} == 1)) || { usage >&2; die "expected one command (create, setup, data, run, resume, fetch, logs, stop, delete), got: ${POSITIONAL[*]:-none}"; }
COMMAND=${POSITIONAL[0]}
case $COMMAND in
    create | setup | data | run | resume | fetch | logs | stop | delete) ;;
    *) die "unknown command ${COMMAND@Q} (create, setup, data, run, resume, fetch, logs, stop, delete)" ;;
esac
validate_common
"cmd_$COMMAND"
