# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run.
#
# Every script builds each command as a bash array and hands it to `run`, so
# `--dry-run` prints exactly what would otherwise be executed.

# Name used in error messages: the script that sourced this file.
LAUNCH_SCRIPT_NAME="${LAUNCH_SCRIPT_NAME:-$(basename "$0")}"
# The repository root: config paths (configs/<name>.py) are relative to it.
# shellcheck disable=SC2034  # used by the scripts that source this file.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Errors collected by `require`, reported together by `fail_if_errors`, so one
# run names every missing setting (one line each) instead of one per attempt.
LAUNCH_ERRORS=()

die() {
  echo "${LAUNCH_SCRIPT_NAME}: error: $*" >&2
  exit 2
}

warn() {
  echo "${LAUNCH_SCRIPT_NAME}: warning: $*" >&2
}

# require VALUE MESSAGE: records MESSAGE when VALUE is empty.
require() {
  if [[ -z "$1" ]]; then
    LAUNCH_ERRORS+=("$2")
  fi
}

# add_error MESSAGE: records MESSAGE; callers write `[[ test ]] || add_error ...`.
add_error() {
  LAUNCH_ERRORS+=("$1")
}

fail_if_errors() {
  local e
  if ((${#LAUNCH_ERRORS[@]})); then
    for e in "${LAUNCH_ERRORS[@]}"; do
      echo "${LAUNCH_SCRIPT_NAME}: error: ${e}" >&2
    done
    exit 2
  fi
}

# shell_quote ARG...: prints the arguments as one line a POSIX shell reads back
# as the same words. Plain words stay bare so the output stays readable; the
# rest are single-quoted ('\'' for an embedded quote).
shell_quote() {
  local words=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$a")
    else
      words+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

is_true() {
  [[ "${1:-}" =~ ^(1|true|yes)$ ]]
}

# run CMD...: executes the command, or under DRY_RUN=1 prints it (shell-quoted,
# one line) and executes nothing.
run() {
  if is_true "${DRY_RUN:-0}"; then
    shell_quote "$@"
  else
    "$@"
  fi
}

# parse_flags ARG...: the flag parser every launcher shares. The calling script
# defines `flag_target FLAG`, printing what FLAG sets: VAR (takes a value),
# VAR=1 (a switch) or +ARRAY (takes a value, appended; repeatable); it returns 1
# for an unknown flag. Both `--flag value` and `--flag=value` are accepted.
# `--config.*` arguments and everything after `--` go to OVERRIDE_ARGS (the
# trainer's overrides), other words to POSITIONAL; -h/--help calls usage.
parse_flags() {
  local flag value target inline
  POSITIONAL=()
  while (($#)); do
    flag="$1"
    shift
    case "$flag" in
      --)
        OVERRIDE_ARGS+=("$@")
        return
        ;;
      --config.*)
        OVERRIDE_ARGS+=("$flag")
        continue
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*) ;;
      *)
        POSITIONAL+=("$flag")
        continue
        ;;
    esac
    inline=0
    if [[ "$flag" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
      inline=1
    fi
    target="$(flag_target "$flag")" || die "unknown flag '${flag}' (see --help)"
    if [[ "$target" == *=1 ]]; then
      ((!inline)) || die "flag ${flag} takes no value"
      printf -v "${target%=1}" '%s' 1
      continue
    fi
    if ((!inline)); then
      (($#)) || die "flag ${flag} needs a value"
      value="$1"
      shift
    fi
    if [[ "$target" == +* ]]; then
      local -n list="${target#+}"
      list+=("$value")
      unset -n list
    else
      printf -v "$target" '%s' "$value"
    fi
  done
}

# split_words STRING: the whitespace-separated words of STRING, into WORDS.
# For list-valued environment variables (OVERRIDES, SRUN_ARGS); values holding
# spaces must be passed as arguments instead.
split_words() {
  WORDS=()
  if [[ -n "${1:-}" ]]; then
    # shellcheck disable=SC2034  # WORDS is this function's result.
    read -r -a WORDS <<<"$1"
  fi
}

# trainer_flag_target FLAG: the flags every launcher takes for the trainer
# itself (see parse_flags); scripts fall back to it from their flag_target.
trainer_flag_target() {
  case "$1" in
    --config) echo CONFIG ;;
    --workdir) echo WORKDIR ;;
    --tfds-data-dir) echo TFDS_DATA_DIR ;;
    --dry-run) echo DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# check_trainer_settings WORKDIR_EXAMPLE: CONFIG and WORKDIR are set, and the
# config is `configs/<name>.py`, optionally with `:variant` (config-as-code
# variants chosen by an argument string).
check_trainer_settings() {
  require "$CONFIG" "missing config: pass --config configs/<name>.py or set CONFIG"
  # shellcheck disable=SC2153  # CONFIG and WORKDIR are the sourcing script's settings.
  require "$WORKDIR" "missing workdir: pass --workdir $1 or set WORKDIR"
  [[ -z "$CONFIG" || "${CONFIG%%:*}" == *.py ]] \
    || add_error "config '${CONFIG}' is not a Python config file (configs/<name>.py[:variant])"
}

# absolute_workdir DIR: DIR made absolute against the caller's working directory
# (the launchers cd to the repository root); URLs such as gs:// stay as they are.
absolute_workdir() {
  if [[ -z "$1" || "$1" == /* || "$1" == *://* ]]; then
    printf '%s\n' "$1"
  else
    printf '%s/%s\n' "$PWD" "$1"
  fi
}

# gpu_env_command: the `env` prefix of the GPU launchers' trainer command, into
# ENV_CMD. They decide the process layout themselves (one process, or SLURM's
# tasks), so stray coordinator variables, which the trainer would obey, are
# removed; TFDS_DATA_DIR is passed when set.
gpu_env_command() {
  ENV_CMD=(env -u JAX_COORDINATOR_ADDRESS -u JAX_NUM_PROCESSES -u JAX_PROCESS_ID)
  if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
    ENV_CMD+=("TFDS_DATA_DIR=${TFDS_DATA_DIR}")
  fi
}

# main_command PYTHON CONFIG WORKDIR OVERRIDE...: the trainer's command line,
# into MAIN_CMD. Every launcher starts exactly this on every host/process.
main_command() {
  local python="$1" config="$2" workdir="$3"
  shift 3
  # shellcheck disable=SC2034  # MAIN_CMD is this function's result.
  MAIN_CMD=("$python" -m multistep_cm.main "--config=${config}" "--workdir=${workdir}" "$@")
}

# Empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2 as /bin/bash).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  die "needs bash >= 4.4, this is ${BASH_VERSION} (on macOS: brew install bash)"
fi
