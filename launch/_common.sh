# Shared helpers of the launch scripts; sourced, never executed.
#
#   run CMD ARGS...      print "+ CMD ARGS" (shell-quoted, copy-pasteable); execute it unless --dry-run
#   run_exec CMD ARGS... the same, but exec (the last command of a script: signals reach it directly)
#   parse_args "$@"      --dry-run, -h/--help, the script's own flags (FLAGS), the rest in POSITIONAL
#   die MSG              print "<script>: error: MSG" to stderr and exit 2
#   require VAR "why"    die unless $VAR is set
#   quote WORD           WORD quoted for bash, on one line (only when needed, so dry runs stay readable)
#   squote WORD          WORD quoted for any POSIX shell (a worker's login shell); may span lines
#   rquote WORD          like squote, but a leading "~/" (or "--flag=~/") still expands on the remote host
#   check_line VAR...    die if $VAR holds a newline or another control character
#   check_whole VAR...   die unless $VAR is a whole number (before it meets bash arithmetic)
#   check_chars VAR SET  die unless $VAR is non-empty and made of the characters of SET only
#   check_modules        die unless MODULES holds only plain module names
#   is_url WORD          WORD starts with a URL scheme (gs://...); abspath PATH leaves those alone
#
# Every command a script runs goes through run/run_exec, so a dry run prints exactly what a real
# run would do, one command per line, prefixed with "+ " like `set -x`.
#
# User values never become code: what a script writes into a generated script or a remote command
# string is quoted with quote/squote/rquote, or checked first where quoting cannot work (#SBATCH
# lines). Values that meet bash arithmetic are checked to be numbers first: (( )) evaluates a
# variable's value as an expression, and an array subscript in it runs $(...).

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
    # For bash (the dry-run lines, the script slurm_submit.sh writes): a word with a control
    # character is written as $'...' (printf %q), so every word, and every printed command, stays
    # on one line and no line of it can end a here-document or start a command.
    if [[ $1 == *[[:cntrl:]]* ]]; then
        printf '%q' "$1"
    else
        squote "$1"
    fi
}

squote() {
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
    # "=", never be expanded at all; "$HOME"/x expands in both places. POSIX quoting (squote):
    # the worker's login shell need not be bash.
    local word=$1
    if [[ $word =~ ^([^~]*=)?~/(.*)$ ]]; then
        local prefix=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
        [[ -n $prefix ]] && squote "$prefix"
        # shellcheck disable=SC2016 # a literal $HOME: it expands on the remote host
        printf '"$HOME"/'
        [[ -n $rest ]] && squote "$rest"
        return 0
    fi
    if [[ $word == "~" ]]; then
        # shellcheck disable=SC2016
        printf '"$HOME"'
        return 0
    fi
    squote "$word"
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

flag_name() {
    # The option that sets VAR ("--partition" for PARTITION), for error messages; else VAR itself.
    local var=$1 entry
    for entry in "${FLAGS[@]}"; do
        if [[ ${entry#* } == "$var" ]]; then
            printf '%s' "${entry%% *}"
            return 0
        fi
    done
    printf '%s' "$var"
}

check_line() {
    local var
    for var in "$@"; do
        [[ ${!var} != *[[:cntrl:]]* ]] ||
            die "$(flag_name "$var") must not contain a newline or other control character (got ${!var@Q})"
    done
}

check_whole() {
    local var
    for var in "$@"; do
        [[ ${!var} =~ ^[0-9]+$ ]] || die "$(flag_name "$var") must be a whole number (got ${!var@Q})"
    done
}

check_chars() {
    # check_chars VAR SET: SET is the inside of a bracket expression, letters and digits first,
    # e.g. "A-Za-z0-9_.-"; the error message lists what follows "0-9".
    local var=$1 set=$2
    [[ ${!var} =~ ^[$set]+$ ]] ||
        die "$(flag_name "$var") must not contain spaces, quotes or other shell metacharacters" \
            "(only letters, digits and ${set#*0-9}; got ${!var@Q})"
}

check_modules() {
    # MODULES: environment module names (cuda/12.4, openmpi@4.1), split on spaces in the job and
    # handed to `module load`, whose shell function evals what the module command prints.
    local names='^[A-Za-z0-9_.,:@+=/%~ -]*$'
    [[ $MODULES =~ $names ]] ||
        die "--modules must not contain quotes or other shell metacharacters (module names:" \
            "letters, digits and _.,:@+=/%~-, separated by spaces; got ${MODULES@Q})"
}

# parse_args "$@" fills POSITIONAL and sets variables from the script's FLAGS table, whose entries
# read "--flag VAR" (takes a value: --flag X or --flag=X) or "--flag VAR=VALUE" (a switch).
# Everything after "--" is appended to EXTRA (extra arguments of the trainer, passed through verbatim).
# Each script defines usage() (printed by -h/--help) and FLAGS before calling it. Then every setting
# of FLAGS (from a flag or the environment) is checked: no control characters in a value (a
# newline would split a generated line), 0 or 1 for a switch such as --dry-run (it meets (( ))).
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
    [[ $DRY_RUN =~ ^[01]$ ]] || die "DRY_RUN must be 0 or 1 (got ${DRY_RUN@Q})"
    for entry in "${FLAGS[@]}"; do
        target=${entry#* }
        if [[ $target != *=* ]]; then
            check_line "$target"
        elif [[ ${target#*=} == 1 ]]; then
            name=${target%%=*}
            [[ ${!name} =~ ^[01]$ ]] || die "$name must be 0 or 1 (got ${!name@Q})"
        fi
    done
}

is_url() {
    # is_url WORD: WORD starts with a URL scheme (gs://bucket/run), which the trainer opens itself.
    [[ $1 =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]
}

abspath() {
    # The absolute form of a local path, without requiring it to exist; a URL as it is.
    local path=$1
    [[ $path == /* ]] || is_url "$path" || path="$PWD/$path"
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
