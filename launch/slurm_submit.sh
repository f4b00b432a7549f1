#!/usr/bin/env bash
# Fill in launch/slurm.sbatch for one run (nodes, GPUs, time, the run's settings) and sbatch it.
#
#   launch/slurm_submit.sh --nodes 2 --gpus-per-node 8 --config configs/sop.py:method=hpl_pa \
#       --workdir /shared/runs/sop_hpl_pa --data-dir /shared/tensorflow_datasets
#
# The filled-in script is written to <workdir>/slurm/hdml_jax.sbatch: it needs no environment, so
# `sbatch <workdir>/slurm/hdml_jax.sbatch` later resumes the same run. --dry-run prints the script
# and the sbatch command instead.
#
# Values reach the script in two ways. The run's settings and the trainer arguments after -- are
# bash assignments, quoted (quote, _common.sh): any value is safe there. #SBATCH lines are read by
# sbatch, not by bash, and cannot be quoted: sbatch splits them at whitespace, a "#" starts a
# comment, and how quotes and backslashes are read differs between Slurm versions; only a newline
# could make bash run part of one. So the values of #SBATCH lines are checked instead (names and
# times: a conservative character set), and the output path, which may well hold a space, goes on
# sbatch's command line when it holds a character that an #SBATCH line cannot carry verbatim.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$LAUNCH_DIR/_common.sh"

usage() {
    cat <<'EOF'
Usage: launch/slurm_submit.sh [flags] [-- extra trainer args]

Resources (environment variable in brackets; flags win):
  --nodes N             nodes [NODES] (1)
  --gpus-per-node G     [GPUS_PER_NODE] (8)
  --tasks MODE          per-node: one process drives all GPUs of a node (default; one data
                        pipeline per node); per-gpu: one process per GPU [TASKS]
  --cpus-per-gpu C      CPUs requested per GPU, for the data pipeline [CPUS_PER_GPU] (8)
  --time T              time limit, e.g. 24:00:00 [TIME] (24:00:00); the job requeues itself
  --signal-lead S       seconds before the limit the trainer is told to checkpoint [SIGNAL_LEAD]
                        (120; raise it when an evaluation takes longer)
  --partition P         [PARTITION]     --account A  [ACCOUNT]     --qos Q  [QOS]
  --job-name NAME       [JOB_NAME] (hdml_<config>)
                        (time, partition, account, qos, job name: letters, digits and _.,:@+=-)
  --sbatch-args "ARGS"  more sbatch options, one #SBATCH line each, e.g. "--exclusive --mem=0" [SBATCH_ARGS]
                        (split on spaces; no quotes, backslashes or "#")
Run:
  --config SPEC         configs/<dataset>.py[:method=...] [CONFIG]                        (required)
  --workdir DIR         shared by all nodes, or gs://BUCKET/RUN (then --script too); the same
                        path resumes [WORKDIR]                                            (required)
  --data-dir DIR        the TFDS data dir, readable on every node [DATA_DIR]
  --extra-args "ARGS"   more trainer flags, split on spaces [EXTRA_ARGS]; or put them after --
                        (those after -- pass verbatim, one argument each: spaces, quotes, anything)
  --venv DIR            venv on shared storage [VENV] (<repo>/.venv; launch/gpu_node.sh install)
  --modules "M ..."     environment modules to load in the job [MODULES]
  --max-restarts N      [MAX_RESTARTS] (50)
  --script FILE         where to write the filled-in script [SCRIPT] (<workdir>/slurm/hdml_jax.sbatch)
  --dry-run             print the script and the sbatch command, submit nothing
  -h, --help            this help
EOF
}

NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS=${TASKS:-per-node}
CPUS_PER_GPU=${CPUS_PER_GPU:-8}
TIME=${TIME:-24:00:00}
SIGNAL_LEAD=${SIGNAL_LEAD:-120}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
QOS=${QOS:-}
JOB_NAME=${JOB_NAME:-}
SBATCH_ARGS=${SBATCH_ARGS:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
VENV=${VENV:-$REPO_ROOT/.venv}
MODULES=${MODULES:-}
MAX_RESTARTS=${MAX_RESTARTS:-50}
SCRIPT=${SCRIPT:-}

# shellcheck disable=SC2034 # read by parse_args (_common.sh)
FLAGS=(
    "--nodes NODES" "--gpus-per-node GPUS_PER_NODE" "--tasks TASKS" "--cpus-per-gpu CPUS_PER_GPU"
    "--time TIME" "--signal-lead SIGNAL_LEAD" "--partition PARTITION" "--account ACCOUNT" "--qos QOS"
    "--job-name JOB_NAME" "--sbatch-args SBATCH_ARGS" "--config CONFIG" "--workdir WORKDIR"
    "--data-dir DATA_DIR" "--extra-args EXTRA_ARGS" "--venv VENV" "--modules MODULES"
    "--max-restarts MAX_RESTARTS" "--script SCRIPT"
)
parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die "unexpected arguments: ${POSITIONAL[*]@Q} (trainer flags go after --)"
require CONFIG "pass --config configs/<dataset>.py[:method=...] or set CONFIG"
require WORKDIR "pass --workdir or set WORKDIR (on storage all nodes share; the same path resumes)"
check_whole NODES GPUS_PER_NODE CPUS_PER_GPU SIGNAL_LEAD MAX_RESTARTS
((NODES >= 1 && GPUS_PER_NODE >= 1)) || die "--nodes and --gpus-per-node must be at least 1"
case $TASKS in
    per-node) tasks_per_node=1 cpus_per_task=$((CPUS_PER_GPU * GPUS_PER_NODE)) ;;
    per-gpu) tasks_per_node=$GPUS_PER_NODE cpus_per_task=$CPUS_PER_GPU ;;
    *) die "--tasks must be per-node or per-gpu (got '$TASKS')" ;;
esac

# #SBATCH values (see the top of this file). Slurm's own names and times use none of the others.
SBATCH_CHARS='A-Za-z0-9_.,:@+=-'
[[ ${TIME,,} =~ ^([0-9]+([:-][0-9]+)*|unlimited|infinite)$ ]] ||
    die "--time must be a SLURM time such as 24:00:00, 90 or 2-00:00:00 (got ${TIME@Q})"
for var in PARTITION ACCOUNT QOS JOB_NAME; do
    [[ -z ${!var} ]] || check_chars "$var" "$SBATCH_CHARS"
done
check_modules

# The job runs elsewhere, later, maybe requeued: bake in absolute paths and every setting.
WORKDIR=$(abspath "$WORKDIR")
[[ -z $DATA_DIR ]] || DATA_DIR=$(abspath "$DATA_DIR")
VENV=$(abspath "$VENV")
CONFIG=$(resolve_config "$CONFIG" "$REPO_ROOT")
if [[ -z $JOB_NAME ]]; then
    JOB_NAME=$(basename "${CONFIG%%:*}" .py)
    [[ $CONFIG != *:method=* ]] || JOB_NAME+="_${CONFIG##*:method=}"
    JOB_NAME="hdml_${JOB_NAME%%,*}"
    JOB_NAME=${JOB_NAME//[^$SBATCH_CHARS]/_} # from --config: made safe rather than refused
fi
if [[ -z $SCRIPT ]] && is_url "$WORKDIR"; then
    die "--workdir $WORKDIR is a bucket, where SLURM can write neither the job script nor its output:" \
        "pass --script FILE on storage the nodes share (e.g. --script /shared/jobs/run.sbatch)"
fi
SCRIPT=$(abspath "${SCRIPT:-$WORKDIR/slurm/hdml_jax.sbatch}")
# abspath may have added the current directory, which the checks of parse_args did not see.
check_line WORKDIR DATA_DIR VENV SCRIPT
output_dir=$(dirname "$SCRIPT") # SLURM does not create the output file's directory
# In SLURM's file name patterns "%%" is a "%", and a backslash anywhere turns the patterns off.
[[ $output_dir != *\\* ]] ||
    die "the job's output directory ${output_dir@Q} (next to --script) must not contain a backslash"
output="${output_dir//%/%%}/%x-%j.out"
sbatch_options=()
if [[ $output == *[[:space:]\"\'#]* ]]; then
    # Not expressible on an #SBATCH line (see the top): on the command line it is one argv word.
    sbatch_options+=("--output=$output")
fi
resubmit=$(join_quoted quote sbatch "${sbatch_options[@]}" "$SCRIPT")

generate() {
    # The template with its #SBATCH values replaced and the two marker lines filled in.
    local line key extra_directives=() arg words=()
    [[ -z $PARTITION ]] || extra_directives+=("--partition=$PARTITION")
    [[ -z $ACCOUNT ]] || extra_directives+=("--account=$ACCOUNT")
    [[ -z $QOS ]] || extra_directives+=("--qos=$QOS")
    read -r -a words <<<"$SBATCH_ARGS"
    for arg in "${words[@]}"; do
        [[ $arg == --?* ]] || die "--sbatch-args: ${arg@Q} is not an sbatch option (--name=value)"
        [[ $arg != *[\"\'\\#]* ]] ||
            die "--sbatch-args: ${arg@Q} holds a quote, a backslash or a \"#\", which an #SBATCH line" \
                "does not carry verbatim; give that option to sbatch yourself"
    done
    extra_directives+=("${words[@]}")
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line =~ ^#SBATCH\ --([a-z-]+)= ]]; then
            key=${BASH_REMATCH[1]}
            case $key in
                job-name) line="#SBATCH --job-name=$JOB_NAME" ;;
                nodes) line="#SBATCH --nodes=$NODES" ;;
                ntasks-per-node) line="#SBATCH --ntasks-per-node=$tasks_per_node" ;;
                gpus-per-node) line="#SBATCH --gpus-per-node=$GPUS_PER_NODE" ;;
                cpus-per-task) line="#SBATCH --cpus-per-task=$cpus_per_task" ;;
                time) line="#SBATCH --time=$TIME" ;;
                signal) line="#SBATCH --signal=B:USR1@$SIGNAL_LEAD" ;;
                # On the command line instead, which wins; the template's line stays as a fallback.
                output) ((${#sbatch_options[@]})) || line="#SBATCH --output=$output" ;;
            esac
            printf '%s\n' "$line"
        elif [[ $line == "#@EXTRA_SBATCH@"* ]]; then
            for arg in "${extra_directives[@]}"; do
                printf '#SBATCH %s\n' "$arg"
            done
        elif [[ $line == "#@SETTINGS@"* ]]; then
            printf '# Written by launch/slurm_submit.sh. To resubmit (and resume) this run: %s\n' "$resubmit"
            local var
            for var in REPO CONFIG WORKDIR DATA_DIR EXTRA_ARGS VENV MODULES GPUS_PER_NODE MAX_RESTARTS; do
                if [[ $var == REPO ]]; then
                    printf 'REPO=%s\n' "$(quote "$REPO_ROOT")"
                else
                    printf '%s=%s\n' "$var" "$(quote "${!var}")"
                fi
            done
            # The trainer arguments given after --, one word each, exactly as given.
            printf 'TRAINER_ARGS=(%s)\n' "$(join_quoted quote "${EXTRA[@]}")"
        else
            printf '%s\n' "$line"
        fi
    done <"$LAUNCH_DIR/slurm.sbatch"
}

script_text=$(generate)
run mkdir -p "$output_dir"
if ((DRY_RUN)); then
    printf "+ cat > %s <<'HDML_SBATCH_EOF'\n%s\nHDML_SBATCH_EOF\n" "$(quote "$SCRIPT")" "$script_text"
else
    printf '+ cat > %s\n' "$(quote "$SCRIPT")"
    printf '%s\n' "$script_text" >"$SCRIPT"
fi
run sbatch "${sbatch_options[@]}" "$SCRIPT"
