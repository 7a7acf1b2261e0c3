# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run.
#
# Every script builds each command as a bash array and hands it to `run`, so
# `--dry-run` prints exactly what would otherwise be executed.

# Name used in error messages: the script that sourced this file.
LAUNCH_SCRIPT_NAME="${LAUNCH_SCRIPT_NAME:-$(basename "$0")}"

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

# check_config PATH: the trainer takes `configs/<name>.py`, optionally followed
# by `:variant` (config-as-code variants chosen by an argument string).
check_config() {
  [[ -z "$1" || "${1%%:*}" == *.py ]] \
    || add_error "config '$1' is not a Python config file (configs/<name>.py[:variant])"
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
