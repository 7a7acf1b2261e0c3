"""Config validation before anything compiles: one line naming the key and what is allowed.

`validate_run` is what the main job calls first, for a single-run config or every
stage of a staged one, so a mistake in a later stage fails before the first trains.
Checks that need files (the teacher checkpoint, the dataset) run in the trainer,
still before anything is allocated or compiled (train.py, step 1).
"""
import math

import jax

from multistep_cm import config_build
from multistep_cm import models
from multistep_cm import optim
from multistep_cm import sharding
from multistep_cm.data import digits
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules

DATASETS = config_build.DATASETS
NONFINITE = ("skip", "stop")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _one_of(key: str, value, allowed):
  if value not in allowed:
    raise ConfigError(f"config.{key} must be one of {tuple(allowed)}, got {value!r}")


def validate_run(config, num_devices: int | None = None, num_processes: int | None = None):
  """`validate` for a single-run config, or for every stage of a staged one."""
  if "stages" not in config:
    validate(config, num_devices, num_processes)
    return
  for name in config.stage_order:
    if name not in config.stages:
      raise ConfigError(f"config.stage_order names {name!r}, which is not in config.stages "
                        f"({sorted(config.stages)})")
    try:
      validate(config.stages[name], num_devices, num_processes)
    except ConfigError as e:
      raise ConfigError(f"{e} (in config.stages.{name})") from None


def _check_image_size(config):
  """The data's image size against what the model preset and the dataset can take."""
  preset = config.model.preset
  size = config.data.image_size
  if models.PRESETS[preset]["arch"] != "uvit":
    return
  channels = config.model.get("channels", models.PRESETS[preset]["channels"])
  factor = 2 ** len(channels)  # one 2x pooling per level
  if not isinstance(size, int) or size < factor or size % factor:
    raise ConfigError(f"config.data.image_size must be a positive multiple of {factor} for "
                      f"model.preset={preset!r} ({len(channels)} pooling levels), got {size!r}")
  if config.data.dataset == "digits" and size not in digits.IMAGE_SIZES:
    raise ConfigError(f"config.data.image_size must be one of {digits.IMAGE_SIZES} for "
                      f"data.dataset='digits', got {size}")


def validate(config, num_devices: int | None = None, num_processes: int | None = None):
  """Raises ConfigError on the first inconsistent key."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  lc = config.loss

  dataset = config.data.dataset
  if not (dataset in DATASETS or str(dataset).startswith("tfds:")):
    raise ConfigError(f"config.data.dataset must be one of {DATASETS} or 'tfds:<name>', "
                      f"got {dataset!r}")
  if config.batch_size < 1 or config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size must be a positive multiple of the {num_devices} "
                      f"devices, got {config.batch_size}")
  if config.batch_size % num_processes:
    raise ConfigError(f"config.batch_size must be a multiple of the {num_processes} processes, "
                      f"got {config.batch_size}")
  if config.num_train_steps < 1:
    raise ConfigError(f"config.num_train_steps must be >= 1, got {config.num_train_steps}")
  try:
    sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f"{e} (-1 in one of them takes the rest)") from None
  for key in ("log_every_steps", "checkpoint_every_steps", "checkpoint_keep"):
    if config[key] < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {config[key]}")

  _one_of("loss.mode", lc.mode, ("diffusion",) + losses.MODES)
  _one_of("loss.weighting", lc.weighting, losses.WEIGHTINGS)
  _one_of("loss.huber_reduction", lc.huber_reduction, losses.HUBER_REDUCTIONS)
  _one_of("loss.teacher_solver", lc.teacher_solver, losses.TEACHER_SOLVERS)
  _one_of("loss.direct_x_var", lc.direct_x_var, losses.DIRECT_X_VAR_RULES)
  _one_of("schedule.name", config.schedule.name, schedules.NAMES)
  try:
    config_build.get_schedule(config)
  except ValueError as e:
    raise ConfigError(f"config.schedule.kwargs: {e}") from None
  _one_of("sample_sampler", config.sample_sampler, sampling.SAMPLERS)
  _one_of("optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  _one_of("optimizer.schedule", config.optimizer.schedule, optim.LR_SCHEDULES)
  _one_of("nonfinite", config.nonfinite, NONFINITE)
  lr = config.optimizer.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
    raise ConfigError(f"config.optimizer.learning_rate must be a finite number >= 0, got {lr!r}")
  if not config.ema_decays or not all(0.0 <= d < 1.0 for d in config.ema_decays):
    raise ConfigError(f"config.ema_decays must be a non-empty list of decays in [0, 1), got "
                      f"{tuple(config.ema_decays)}")

  if config_build.is_student(config):
    s = lc.student_steps
    if s < 1 or lc.teacher_steps_end % s or s > lc.teacher_steps_start:
      raise ConfigError(
          f"config.loss.student_steps must divide loss.teacher_steps_end "
          f"({lc.teacher_steps_end}) and be at most loss.teacher_steps_start "
          f"({lc.teacher_steps_start}) so every segment holds whole teacher steps, got {s}")
    if lc.huber_epsilon <= 0:
      raise ConfigError(f"config.loss.huber_epsilon must be > 0, got {lc.huber_epsilon}")
  for key in ("teacher_weights", "init_weights"):  # which EMAs exist, their checkpoint says
    value = config[key]
    if value != "params" and not (value.startswith("ema") and value[3:].isdigit()):
      raise ConfigError(f"config.{key} must be 'params' or an EMA name ('ema0', 'ema1', ...), "
                        f"got {value!r}")
  if config_build.needs_teacher(config) and not config.teacher_checkpoint:
    raise ConfigError(f"config.teacher_checkpoint must name a diffusion run's workdir or "
                      f"checkpoint for loss.mode={lc.mode!r}")
  if lc.guidance_scale and not config.data.num_classes:
    raise ConfigError("config.loss.guidance_scale needs a class-conditional model "
                      "(config.data.num_classes > 0)")

  _one_of("model.preset", config.model.preset, sorted(models.PRESETS))
  _check_image_size(config)
  try:
    config_build.get_model(config)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
