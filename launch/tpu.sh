#!/usr/bin/env bash
# Cloud TPU pod launcher: create a TPU VM slice (or queued resource), install the
# pinned environment on every worker, start `python -m multistep_cm.main` on all
# workers at once, follow logs, stop, delete. `--dry-run` prints the commands.
# Usage: launch/tpu.sh COMMAND [flags] [--config.key=value ...]; see usage().
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [flags] [--config.KEY=VALUE ...] [-- EXTRA_TRAINER_ARGS ...]

Commands
  create       create the TPU VM slice, or a queued resource with --queued
  setup        copy the code to every worker and install the pinned versions
               (pip install -c constraints.txt -e '.[tpu]' in a fresh venv), then
               check that every worker sees the whole slice
  train        start python -m multistep_cm.main on all workers at once, detached,
               one log file per worker (LOG_DIR/worker-<hostname>.log)
  logs         follow the log of one worker (--worker, default 0) or of all
  tensorboard  run TensorBoard on WORKDIR locally (or on worker 0 with --remote,
               forwarded to localhost:TB_PORT)
  status       describe the TPU and say on each worker whether training runs
  stop         SIGTERM the trainer on all workers (it saves a checkpoint and
               exits), wait up to STOP_TIMEOUT seconds, then SIGKILL
  delete       delete the TPU VM, or the queued resource and its TPU (--queued)

Flags (each also read from the environment variable named after it; flags win)
  --project PROJECT_ID          Google Cloud project (default: gcloud's configured one)
  --zone ZONE                   zone, e.g. us-west4-a (required)
  --tpu-name TPU_NAME           TPU VM name, the queued resource's node id (required)
  --accelerator-type ACCELERATOR_TYPE
                                v4-32, v5litepod-64, v5p-128, v6e-256, ... (create)
  --runtime-version RUNTIME_VERSION
                                default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                                v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                                v6e v2-alpha-tpuv6e
  --queued                      QUEUED=1: use a queued resource (create, delete, status)
  --qr-name QR_NAME             queued resource name (default: TPU_NAME-qr)
  --spot                        SPOT=1: Spot VMs (may be preempted; stop/train resume)
  --preemptible                 PREEMPTIBLE=1: preemptible VMs (not with --queued)
  --repo-url REPO_URL           setup: clone this git URL on every worker instead of
                                copying the local checkout (git archive of HEAD)
  --repo-commit REPO_COMMIT     setup: commit (or tag) to check out; needs --repo-url
  --remote-dir REMOTE_DIR       code on the workers (default multistep_cm, under $HOME)
  --venv VENV_DIR               virtualenv on the workers (default multistep_cm_venv)
  --python-version PYTHON_VERSION
                                Python of the venv (default 3.11, as constraints.txt)
  --config CONFIG               train: configs/<name>.py[:variant] (required)
  --workdir WORKDIR             train, tensorboard: gs://bucket/path (required)
  --tfds-data-dir TFDS_DATA_DIR train: gs://bucket/tensorflow_datasets, exported
                                as TFDS_DATA_DIR to the trainer
  --env KEY=VALUE               train: extra environment for the trainer, repeatable
                                (EXTRA_ENV: space-separated KEY=VALUE words)
  --log-dir LOG_DIR             logs and pid file on the workers (default multistep_cm_logs)
  --worker WORKER               logs, tensorboard --remote: worker index or all (default 0)
  --lines LOG_LINES             logs: lines of history before following (default 100)
  --stop-timeout STOP_TIMEOUT   stop: seconds between SIGTERM and SIGKILL (default 300)
  --port TB_PORT                tensorboard port (default 6006)
  --remote                      TB_REMOTE=1: tensorboard on worker 0, port-forwarded
  --yes                         YES=1: delete without gcloud's confirmation prompt
  --dry-run                     DRY_RUN=1: print the commands, one per line, run nothing
  -h, --help                    this text

Trainer overrides: every --config.KEY=VALUE argument, every argument after --, and
the whitespace-separated words of OVERRIDES go to multistep_cm.main unchanged.
Other environment: GCLOUD (gcloud binary, default gcloud), TENSORBOARD (local
tensorboard binary, default tensorboard).

Example (small model, 64 v5e chips, batch 2048):
  export PROJECT_ID=my-project ZONE=us-west4-a TPU_NAME=mcm-small
  launch/tpu.sh create --accelerator-type=v5litepod-64 --queued --spot
  launch/tpu.sh setup
  launch/tpu.sh train --config=configs/imagenet64_diffusion.py:size=small \
      --workdir=gs://my-bucket/mcm/in64_small --tfds-data-dir=gs://my-bucket/tfds \
      --config.batch_size=2048
  launch/tpu.sh logs
  launch/tpu.sh stop && launch/tpu.sh delete --queued
EOF
}

# ----------------------------------------------------------------------------
# Settings: the environment first, then flags.
PROJECT_ID="${PROJECT_ID:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED="${QUEUED:-0}"
QR_NAME="${QR_NAME:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
REPO_URL="${REPO_URL:-}"
REPO_COMMIT="${REPO_COMMIT:-}"
REMOTE_DIR="${REMOTE_DIR:-multistep_cm}"
VENV_DIR="${VENV_DIR:-multistep_cm_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
LOG_DIR="${LOG_DIR:-multistep_cm_logs}"
WORKER="${WORKER:-0}"
LOG_LINES="${LOG_LINES:-100}"
STOP_TIMEOUT="${STOP_TIMEOUT:-300}"
TB_PORT="${TB_PORT:-6006}"
TB_REMOTE="${TB_REMOTE:-0}"
YES="${YES:-0}"
DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"
TENSORBOARD="${TENSORBOARD:-tensorboard}"
# EXTRA_ENV starts as the environment's string and becomes the list --env adds to.
split_words "${EXTRA_ENV:-}"
EXTRA_ENV=("${WORDS[@]}")
split_words "${OVERRIDES:-}"
OVERRIDE_ARGS=("${WORDS[@]}")

flag_target() {
  case "$1" in
    --queued) echo QUEUED=1 ;;
    --spot) echo SPOT=1 ;;
    --preemptible) echo PREEMPTIBLE=1 ;;
    --remote) echo TB_REMOTE=1 ;;
    --yes) echo YES=1 ;;
    --project) echo PROJECT_ID ;;
    --zone) echo ZONE ;;
    --tpu-name) echo TPU_NAME ;;
    --accelerator-type) echo ACCELERATOR_TYPE ;;
    --runtime-version) echo RUNTIME_VERSION ;;
    --qr-name) echo QR_NAME ;;
    --repo-url) echo REPO_URL ;;
    --repo-commit) echo REPO_COMMIT ;;
    --remote-dir) echo REMOTE_DIR ;;
    --venv) echo VENV_DIR ;;
    --python-version) echo PYTHON_VERSION ;;
    --env) echo +EXTRA_ENV ;;
    --log-dir) echo LOG_DIR ;;
    --worker) echo WORKER ;;
    --lines) echo LOG_LINES ;;
    --stop-timeout) echo STOP_TIMEOUT ;;
    --port) echo TB_PORT ;;
    *) trainer_flag_target "$1" ;;
  esac
}

# ----------------------------------------------------------------------------
# Validation: each missing or malformed setting is one error line.

default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

require_tpu() {
  require "$TPU_NAME" "missing TPU name: pass --tpu-name NAME or set TPU_NAME"
  require "$ZONE" "missing zone: pass --zone ZONE or set ZONE (e.g. us-west4-a)"
}

# Remote paths go into the worker commands without quoting (so "$HOME" can
# expand there) and `setup` runs `rm -rf` on REMOTE_DIR: only plain paths other
# than ., .. and / are accepted.
check_remote_path() {
  local name="$1" value="$2"
  if [[ ! "$value" =~ ^[A-Za-z0-9._/-]+$ || "$value" =~ ^(\.\.?/?|/)$ ]]; then
    add_error "${name} '${value}' must be a plain path other than ., .. or / (letters, digits, . _ - /)"
  fi
}

check_gs() {
  local what="$1" value="$2"
  [[ -z "$value" || "$value" == gs://?* ]] \
    || add_error "${what} '${value}' must be a gs:// path: every worker must read and write the same files"
}

validate() {
  case "$COMMAND" in
    create)
      require_tpu
      require "$ACCELERATOR_TYPE" "missing accelerator type: pass --accelerator-type TYPE or set ACCELERATOR_TYPE (e.g. v5litepod-64)"
      if [[ -n "$ACCELERATOR_TYPE" && -z "$RUNTIME_VERSION" ]]; then
        RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" \
          || add_error "no default runtime for accelerator type '${ACCELERATOR_TYPE}': pass --runtime-version"
      fi
      if is_true "$SPOT" && is_true "$PREEMPTIBLE"; then
        add_error "--spot and --preemptible exclude each other"
      fi
      if is_true "$QUEUED" && is_true "$PREEMPTIBLE"; then
        add_error "queued resources take --spot, not --preemptible"
      fi
      ;;
    setup)
      require_tpu
      if [[ -n "$REPO_URL" ]]; then
        require "$REPO_COMMIT" "missing commit: pass --repo-commit SHA or set REPO_COMMIT (every worker must run the same code)"
      elif [[ -n "$REPO_COMMIT" ]]; then
        add_error "--repo-commit needs --repo-url; without it setup ships the local checkout's HEAD"
      fi
      [[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] \
        || add_error "python version '${PYTHON_VERSION}' must look like 3.11"
      ;;
    train)
      require_tpu
      check_trainer_settings "gs://BUCKET/PATH"
      check_gs "workdir" "$WORKDIR"
      check_gs "TFDS data dir" "$TFDS_DATA_DIR"
      local item
      for item in "${EXTRA_ENV[@]}"; do
        [[ "$item" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || add_error "--env '${item}' is not KEY=VALUE"
      done
      ;;
    logs)
      require_tpu
      [[ "$WORKER" =~ ^([0-9]+|all)$ ]] || add_error "worker '${WORKER}' must be an index or all"
      [[ "$LOG_LINES" =~ ^[0-9]+$ ]] || add_error "lines '${LOG_LINES}' must be a number"
      ;;
    tensorboard)
      require "$WORKDIR" "missing workdir: pass --workdir gs://BUCKET/PATH or set WORKDIR"
      [[ "$TB_PORT" =~ ^[0-9]+$ ]] || add_error "port '${TB_PORT}' must be a number"
      if is_true "$TB_REMOTE"; then
        require_tpu
        [[ "$WORKER" =~ ^[0-9]+$ ]] || add_error "tensorboard --remote runs on one worker, not '${WORKER}'"
      fi
      ;;
    stop)
      require_tpu
      [[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || add_error "stop timeout '${STOP_TIMEOUT}' must be a number of seconds"
      ;;
    status | delete)
      require_tpu
      ;;
    "") die "missing command: create, setup, train, logs, tensorboard, status, stop or delete (see --help)" ;;
    *) die "unknown command '${COMMAND}' (see --help)" ;;
  esac
  check_remote_path "remote dir" "$REMOTE_DIR"
  check_remote_path "venv" "$VENV_DIR"
  check_remote_path "log dir" "$LOG_DIR"
  fail_if_errors
  QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
}

# ----------------------------------------------------------------------------
# Command builders.

gcloud_setup() {
  if ! is_true "$DRY_RUN" && ! command -v "$GCLOUD" >/dev/null 2>&1; then
    die "'${GCLOUD}' not found: install the Google Cloud CLI or set GCLOUD"
  fi
  TPU_VM=("$GCLOUD" compute tpus tpu-vm)
  QR=("$GCLOUD" compute tpus queued-resources)
  WHERE=("--zone=${ZONE}")
  if [[ -n "$PROJECT_ID" ]]; then
    WHERE+=("--project=${PROJECT_ID}")
  fi
}

# remote_path PATH: the path as the worker's shell should read it; relative
# paths live under the worker's $HOME (expanded there, not here).
remote_path() {
  if [[ "$1" == /* ]]; then
    printf '%s\n' "$1"
  else
    # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand.
    printf '"$HOME"/%s\n' "$1"
  fi
}

remote_paths() {
  R_REPO="$(remote_path "$REMOTE_DIR")"
  R_VENV="$(remote_path "$VENV_DIR")"
  R_LOGS="$(remote_path "$LOG_DIR")"
  R_PIDFILE="${R_LOGS}/train.pid"
  # One log per worker, named by the worker's hostname (which ends in -w-<index>
  # on TPU VMs), so logs copied off the workers stay apart.
  R_LOG="${R_LOGS}/worker-\"\$(hostname)\".log"
  # Shell functions for the worker: `running` is true when the pid file names a
  # live trainer (its pid then in $pid); checking the command line guards
  # against a pid reused after a reboot (Spot VMs come back).
  # shellcheck disable=SC2016  # expanded by the worker's shell.
  R_FUNCS='alive() { kill -0 "$1" 2>/dev/null && grep -qa multistep_cm.main "/proc/$1/cmdline"; }; '
  R_FUNCS+="running() { [ -f ${R_PIDFILE} ] && pid=\$(cat ${R_PIDFILE}) && alive \"\$pid\"; }"
  # Installing or starting under a running trainer would change its code or
  # start a second one on the same chips.
  R_GUARD="if running; then echo \"\$(hostname): training is running (pid \$pid); stop it first\" >&2; exit 1; fi"
}

# ssh_all STEP...: runs the steps, as one command line, on every worker at the
# same time (gcloud connects in parallel), which multi-host JAX needs: every
# host must join before the slice starts.
ssh_all() {
  run "${TPU_VM[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" "--command=$(join_steps "$@")"
}

cmd_create() {
  local capacity=()
  if is_true "$SPOT"; then
    capacity=(--spot)
  elif is_true "$PREEMPTIBLE"; then
    capacity=(--preemptible)
  fi
  if is_true "$QUEUED"; then
    # A queued resource waits for capacity instead of failing; once ACTIVE its
    # node is an ordinary TPU VM named TPU_NAME, so the other commands apply.
    run "${QR[@]}" create "$QR_NAME" "${WHERE[@]}" "--node-id=${TPU_NAME}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--runtime-version=${RUNTIME_VERSION}" \
      "${capacity[@]}"
  else
    run "${TPU_VM[@]}" create "$TPU_NAME" "${WHERE[@]}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}" "${capacity[@]}"
  fi
}

cmd_setup() {
  local python="python${PYTHON_VERSION}" fetch revision tarball remote_tarball
  local apt='sudo apt-get -o DPkg::Lock::Timeout=600 -qq'
  # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand.
  remote_tarball='"$HOME"/multistep_cm-src.tar.gz'
  if [[ -n "$REPO_URL" ]]; then
    fetch="git clone -q $(shell_quote "$REPO_URL") ${R_REPO} && git -C ${R_REPO} checkout -q $(shell_quote "$REPO_COMMIT")"
    fetch+=" && git -C ${R_REPO} rev-parse HEAD > ${R_REPO}/REVISION"
  else
    # Ship exactly the committed HEAD: the same bytes on every worker, and a
    # REVISION file that names them.
    revision="$(git -C "$REPO_DIR" rev-parse --verify HEAD 2>/dev/null)" \
      || die "${REPO_DIR} is not a git checkout with a commit: commit it, or pass --repo-url and --repo-commit"
    if [[ -n "$(git -C "$REPO_DIR" status --porcelain 2>/dev/null)" ]]; then
      warn "uncommitted changes in ${REPO_DIR} are not shipped; setup copies HEAD ${revision:0:12}"
    fi
    tarball="${TMPDIR:-/tmp}/multistep_cm-${revision:0:12}.tar.gz"
    run git -C "$REPO_DIR" archive --format=tar.gz "--output=${tarball}" HEAD
    run "${TPU_VM[@]}" scp "$tarball" "${TPU_NAME}:multistep_cm-src.tar.gz" --worker=all "${WHERE[@]}"
    run rm -f "$tarball"
    fetch="mkdir -p ${R_REPO} && tar -xzf ${remote_tarball} -C ${R_REPO} && rm -f ${remote_tarball}"
    fetch+=" && echo ${revision} > ${R_REPO}/REVISION"
  fi
  local steps=(
    "set -e"
    "${R_FUNCS}"
    "${R_GUARD}"
    # TPU runtime images ship Ubuntu's Python; constraints.txt was resolved for
    # PYTHON_VERSION, so install that interpreter where it is missing.
    "if ! command -v ${python} >/dev/null 2>&1; then ${apt} update && ${apt} install -y software-properties-common && sudo add-apt-repository -y ppa:deadsnakes/ppa && ${apt} install -y ${python} ${python}-venv; fi"
    "rm -rf ${R_REPO}"
    "${fetch}"
    # --clear: a fresh venv each time, so nothing from an older install lingers.
    "${python} -m venv --clear ${R_VENV}"
    "cd ${R_REPO}"
    "${R_VENV}/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'"
    # Every worker prints one line: a hash of its installed versions (equal
    # everywhere when setup worked) and what JAX sees of the slice.
    # The JAX check needs every worker; `timeout` ends it where one failed.
    "echo \"\$(hostname): revision \$(cat REVISION), packages \$(${R_VENV}/bin/python -m pip freeze --exclude-editable | sha256sum | cut -c1-12), jax process/processes local/global devices: \$(timeout 600 ${R_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())')\""
  )
  ssh_all "${steps[@]}"
}

# join_steps STEP...: one command line for `ssh --command`, steps separated by
# "; " (after a backgrounding "&" a separator would be a syntax error).
join_steps() {
  local out="$1" step
  shift
  for step in "$@"; do
    if [[ "$out" == *'&' ]]; then
      out+=" ${step}"
    else
      out+="; ${step}"
    fi
  done
  printf '%s\n' "$out"
}

cmd_train() {
  local env_words=() main
  if [[ -n "$TFDS_DATA_DIR" ]]; then
    env_words+=("TFDS_DATA_DIR=${TFDS_DATA_DIR}")
  fi
  env_words+=("${EXTRA_ENV[@]}")
  main_command python "$CONFIG" "$WORKDIR" "${OVERRIDE_ARGS[@]}"
  # The interpreter path holds "$HOME", for the worker to expand; the rest is quoted.
  main="${R_VENV}/bin/python $(shell_quote "${MAIN_CMD[@]:1}")"
  if ((${#env_words[@]})); then
    main="env $(shell_quote "${env_words[@]}") ${main}"
  fi
  local steps=(
    "set -e"
    "${R_FUNCS}"
    "${R_GUARD}"
    "mkdir -p ${R_LOGS}"
    "if [ ! -x ${R_VENV}/bin/python ]; then echo \"\$(hostname): no ${R_VENV}/bin/python; run setup first\" >&2; exit 1; fi"
    # The config path is relative to the repository.
    "cd ${R_REPO}"
    # Append, so a resumed run (same workdir) keeps the earlier log.
    "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start, revision \$(cat REVISION 2>/dev/null)\" >> ${R_LOG}"
    # setsid + nohup + no terminal fds: the trainer outlives the ssh session and
    # leads its own process group, which `stop` signals as a whole.
    "setsid nohup ${main} >> ${R_LOG} 2>&1 < /dev/null &"
    "echo \$! > ${R_PIDFILE}"
    "echo \"\$(hostname): started pid \$!, log ${R_LOG}\""
  )
  ssh_all "${steps[@]}"
}

cmd_logs() {
  local follow="tail -n ${LOG_LINES} -F ${R_LOG}"
  if [[ "$WORKER" == all ]]; then
    # Interleaved output from many workers: prefix each line with its worker.
    ssh_all "${follow} | sed -u \"s/^/\$(hostname): /\""
  else
    run "${TPU_VM[@]}" ssh "$TPU_NAME" "--worker=${WORKER}" "${WHERE[@]}" "--command=${follow}"
  fi
}

cmd_tensorboard() {
  if is_true "$TB_REMOTE"; then
    # TensorBoard from the worker's venv, reachable here through an ssh tunnel.
    local tb
    tb="${R_VENV}/bin/tensorboard $(shell_quote "--logdir=${WORKDIR}" "--port=${TB_PORT}" --host=localhost)"
    echo "TensorBoard will be at http://localhost:${TB_PORT}" >&2
    run "${TPU_VM[@]}" ssh "$TPU_NAME" "--worker=${WORKER}" "${WHERE[@]}" "--command=${tb}" \
      -- -L "${TB_PORT}:localhost:${TB_PORT}"
  else
    if ! is_true "$DRY_RUN" && ! command -v "$TENSORBOARD" >/dev/null 2>&1; then
      die "'${TENSORBOARD}' not found: pip install -c constraints.txt -e . (TensorFlow gives it gs:// access), or use --remote"
    fi
    run "$TENSORBOARD" "--logdir=${WORKDIR}" "--port=${TB_PORT}"
  fi
}

cmd_status() {
  if is_true "$QUEUED"; then
    run "${QR[@]}" describe "$QR_NAME" "${WHERE[@]}"
  fi
  run "${TPU_VM[@]}" describe "$TPU_NAME" "${WHERE[@]}"
  local steps=(
    "${R_FUNCS}"
    "if running; then state=\"running (pid \$pid)\"; else state=\"not running\"; fi"
    "echo \"\$(hostname): \${state}; last log line: \$(tail -n 1 ${R_LOG} 2>/dev/null)\""
  )
  ssh_all "${steps[@]}"
}

cmd_stop() {
  # The trainer saves a checkpoint when it receives SIGTERM and then exits (the
  # same path that handles a Spot/maintenance preemption). All workers get the
  # signal at once so they agree on the step to save. SIGKILL only after
  # STOP_TIMEOUT seconds, when a save must have hung; then wait for the exit, so
  # that a `train` or `delete` right after finds the chips free.
  local t="$STOP_TIMEOUT"
  local steps=(
    "${R_FUNCS}"
    "if running; then kill -s TERM -- \"-\$pid\" 2>/dev/null || kill -s TERM \"\$pid\"; i=0; while alive \"\$pid\" && [ \"\$i\" -lt ${t} ]; do sleep 1; i=\$((i + 1)); done; if alive \"\$pid\"; then echo \"\$(hostname): still running ${t} s after SIGTERM, sending SIGKILL\"; kill -s KILL -- \"-\$pid\" 2>/dev/null || kill -s KILL \"\$pid\"; i=0; while alive \"\$pid\" && [ \"\$i\" -lt 10 ]; do sleep 1; i=\$((i + 1)); done; else echo \"\$(hostname): stopped \$i s after SIGTERM\"; fi; else echo \"\$(hostname): not running\"; fi"
    "rm -f ${R_PIDFILE}"
  )
  ssh_all "${steps[@]}"
}

cmd_delete() {
  local confirm=()
  if is_true "$YES"; then
    confirm=(--quiet)
  fi
  if is_true "$QUEUED"; then
    # --force also deletes the queued resource's TPU VM.
    run "${QR[@]}" delete "$QR_NAME" "${WHERE[@]}" --force "${confirm[@]}"
  else
    run "${TPU_VM[@]}" delete "$TPU_NAME" "${WHERE[@]}" "${confirm[@]}"
  fi
}

main() {
  parse_flags "$@"
  ((${#POSITIONAL[@]} <= 1)) || die "unexpected argument '${POSITIONAL[1]}' (see --help)"
  COMMAND="${POSITIONAL[0]:-}"
  validate
  gcloud_setup
  remote_paths
  "cmd_${COMMAND}"
}

main "$@"
