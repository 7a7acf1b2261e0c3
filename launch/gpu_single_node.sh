#!/usr/bin/env bash
# Single-node multi-GPU training: one process drives every visible GPU (JAX
# shards over all local devices itself), so there is no jax.distributed to set up.
# Usage: launch/gpu_single_node.sh [flags] [--config.key=value ...]; see usage().
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh [flags] [--config.KEY=VALUE ...] [-- EXTRA_TRAINER_ARGS ...]

Starts, in the foreground and from the repository root:
  python -m multistep_cm.main --config=CONFIG --workdir=WORKDIR [overrides]
as one process that uses every GPU in GPUS (default: all visible ones).
Install first: pip install -c constraints.txt -e '.[cuda12]' (CUDA 13: '.[cuda13]')

Flags (each also read from the environment variable named after it; flags win)
  --config CONFIG               configs/<name>.py[:variant] (required)
  --workdir WORKDIR             checkpoints, TensorBoard events, resolved config
                                (required; local path or gs://)
  --tfds-data-dir TFDS_DATA_DIR exported as TFDS_DATA_DIR to the trainer
  --gpus GPUS                   comma-separated GPU indices, exported as
                                CUDA_VISIBLE_DEVICES (e.g. 0,1,2,3)
  --python PYTHON               interpreter (default python)
  --dry-run                     DRY_RUN=1: print the command, run nothing
  -h, --help                    this text

Trainer overrides: every --config.KEY=VALUE argument, every argument after --, and
the whitespace-separated words of OVERRIDES go to multistep_cm.main unchanged.

Example:
  launch/gpu_single_node.sh --config=configs/imagenet64_diffusion.py:size=small \
      --workdir=/data/runs/in64_small --gpus=0,1,2,3 --config.batch_size=256
EOF
}

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
GPUS="${GPUS:-}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"
split_words "${OVERRIDES:-}"
OVERRIDE_ARGS=("${WORDS[@]}")

flag_target() {
  case "$1" in
    --gpus) echo GPUS ;;
    --python) echo PYTHON ;;
    *) trainer_flag_target "$1" ;;
  esac
}

main() {
  parse_flags "$@"
  ((${#POSITIONAL[@]} == 0)) || die "unexpected argument '${POSITIONAL[0]}' (see --help)"
  check_trainer_settings "DIR"
  [[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || add_error "gpus '${GPUS}' must be comma-separated indices such as 0,1,2,3"
  fail_if_errors
  WORKDIR="$(absolute_workdir "$WORKDIR")"
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Under SLURM, jax.distributed's auto-detection gives each process one GPU.
    warn "inside SLURM job ${SLURM_JOB_ID}: for several GPUs per node use launch/gpu_slurm.sbatch"
  fi

  gpu_env_command
  if [[ -n "$GPUS" ]]; then
    ENV_CMD+=("CUDA_VISIBLE_DEVICES=${GPUS}")
  fi
  main_command "$PYTHON" "$CONFIG" "$WORKDIR" "${OVERRIDE_ARGS[@]}"
  # Config paths are relative to the repository root.
  run cd "$REPO_DIR"
  run "${ENV_CMD[@]}" "${MAIN_CMD[@]}"
}

main "$@"
