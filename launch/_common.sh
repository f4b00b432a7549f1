# Shared helpers of the launch scripts; sourced, never executed.
#
#   run CMD ARGS...      print "+ CMD ARGS" (shell-quoted, copy-pasteable); execute it unless --dry-run
#   run_exec CMD ARGS... the same, but exec (the last command of a script: signals reach it directly)
#   parse_args "$@"      --dry-run, -h/--help, the script's own flags (FLAGS), the rest in POSITIONAL
#   die MSG              print "<script>: error: MSG" to stderr and exit 2
#   require VAR "why"    die unless $VAR is set
#   quote WORD           WORD quoted for a POSIX shell (only when needed, so dry runs stay readable)
#   rquote WORD          like quote, but a leading "~/" (or "--flag=~/") still expands on the remote host
#
# Every command a script runs goes through run/run_exec, so a dry run prints exactly what a real
# run would do, one command per line, prefixed with "+ " like `set -x`.

# shellcheck shell=bash

# bash >= 4.4: empty arrays under `set -u` and `printf -v` behave (macOS ships 3.2: brew install bash).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    printf 'these launch scripts need bash >= 4.4 (this is %s); on macOS: brew install bash\n' "$BASH_VERSION" >&2
    exit 2
fi

DRY_RUN=${DRY_RUN:-0}
SCRIPT_NAME=$(basename "${BASH_SOURCE[1]:-$0}")
POSITIONAL=()

die() {
    printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 2
}

warn() {
    printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2
}

note() {
    # Progress notes go to stderr so that stdout of a dry run holds only the commands.
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

require() {
    local var=$1 why=$2
    [[ -n ${!var:-} ]] || die "$var is not set: $why"
}

quote() {
    local word=$1
    if [[ -z $word ]]; then
        printf "''"
    elif [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$word"
    elif [[ $word != *[\"\$\`\\!]* ]]; then
        # Double quotes read better than single quotes for words like jax[tpu] or "a b", and
        # nest cleanly inside the single-quoted --command of a dry run.
        printf '"%s"' "$word"
    else
        local escaped=${word//\'/\'\\\'\'}
        printf "'%s'" "$escaped"
    fi
}

rquote() {
    # "~/x" and "--flag=~/x" would reach the remote shell quoted (no tilde expansion) or, after an
    # "=", never be expanded at all; "$HOME"/x expands in both places.
    local word=$1
    if [[ $word =~ ^([^~]*=)?~/(.*)$ ]]; then
        local prefix=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
        [[ -n $prefix ]] && quote "$prefix"
        # shellcheck disable=SC2016 # a literal $HOME: it expands on the remote host
        printf '"$HOME"/'
        [[ -n $rest ]] && quote "$rest"
        return 0
    fi
    if [[ $word == "~" ]]; then
        # shellcheck disable=SC2016
        printf '"$HOME"'
        return 0
    fi
    quote "$word"
}

join_quoted() {
    # join_quoted FUNC WORDS... -> the words quoted by FUNC (quote or rquote), separated by spaces.
    local func=$1 first=1 word
    shift
    for word in "$@"; do
        ((first)) || printf ' '
        first=0
        "$func" "$word"
    done
}

print_command() {
    printf '+ %s\n' "$(join_quoted quote "$@")"
}

run() {
    print_command "$@"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

run_exec() {
    print_command "$@"
    if ((DRY_RUN)); then
        exit 0
    fi
    exec "$@"
}

# parse_args "$@" fills POSITIONAL and sets variables from the script's FLAGS table, whose entries
# read "--flag VAR" (takes a value: --flag X or --flag=X) or "--flag VAR=VALUE" (a switch).
# Everything after "--" is appended to EXTRA (extra arguments of the trainer, passed through verbatim).
# Each script defines usage() (printed by -h/--help) and FLAGS before calling it.
EXTRA=()
parse_args() {
    local arg flag value entry name target found
    while (($#)); do
        arg=$1
        shift
        case $arg in
            --dry-run) DRY_RUN=1; continue ;;
            -h | --help) usage; exit 0 ;;
            --) EXTRA+=("$@"); break ;;
            --*) ;;
            *) POSITIONAL+=("$arg"); continue ;;
        esac
        flag=${arg%%=*}
        found=0
        for entry in "${FLAGS[@]}"; do
            name=${entry%% *}
            target=${entry#* }
            [[ $name == "$flag" ]] || continue
            found=1
            if [[ $target == *=* ]]; then
                [[ $arg == *=* ]] && die "$flag takes no value"
                printf -v "${target%%=*}" '%s' "${target#*=}"
            else
                if [[ $arg == *=* ]]; then
                    value=${arg#*=}
                else
                    (($#)) || die "$flag needs a value"
                    value=$1
                    shift
                fi
                printf -v "$target" '%s' "$value"
            fi
            break
        done
        ((found)) || die "unknown option $flag (see --help)"
    done
}

abspath() {
    # The absolute form of a local path, without requiring it to exist.
    local path=$1
    [[ $path == /* ]] || path="$PWD/$path"
    printf '%s' "$path"
}

resolve_config() {
    # resolve_config SPEC REPO: "configs/x.py[:args]" made absolute when the file exists relative to
    # the current directory, so it still names the same file once the trainer runs from REPO.
    local spec=$1 repo=$2 file=${1%%:*}
    if [[ $file != /* && -f $file && ! $PWD -ef $repo ]]; then
        spec="$(abspath "$file")${spec#"$file"}"
    fi
    printf '%s' "$spec"
}
