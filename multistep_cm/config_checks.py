"""Config validation before anything compiles: one line naming the key and what is allowed."""
import jax

from multistep_cm import models
from multistep_cm import optim
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules

DATASETS = ("digits", "mixture") + tuple(pipeline_lib.TFDS_DATASETS)
NONFINITE = ("skip", "stop")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _one_of(key: str, value, allowed):
  if value not in allowed:
    raise ConfigError(f"config.{key} must be one of {tuple(allowed)}, got {value!r}")


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

  _one_of("loss.mode", lc.mode, ("diffusion",) + losses.MODES)
  _one_of("loss.weighting", lc.weighting, losses.WEIGHTINGS)
  _one_of("loss.huber_reduction", lc.huber_reduction, losses.HUBER_REDUCTIONS)
  _one_of("loss.teacher_solver", lc.teacher_solver, losses.TEACHER_SOLVERS)
  _one_of("loss.direct_x_var", lc.direct_x_var, losses.DIRECT_X_VAR_RULES)
  _one_of("schedule.name", config.schedule.name, schedules.NAMES)
  try:
    schedules.get_schedule(config.schedule.name, **config.schedule.kwargs.to_dict())
  except ValueError as e:
    raise ConfigError(f"config.schedule.kwargs: {e}") from None
  _one_of("sample_sampler", config.sample_sampler, sampling.SAMPLERS)
  _one_of("optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  _one_of("optimizer.schedule", config.optimizer.schedule, optim.LR_SCHEDULES)
  _one_of("nonfinite", config.nonfinite, NONFINITE)
  if not config.ema_decays or not all(0.0 <= d < 1.0 for d in config.ema_decays):
    raise ConfigError(f"config.ema_decays must be a non-empty list of decays in [0, 1), got "
                      f"{tuple(config.ema_decays)}")

  if lc.mode != "diffusion":
    s = lc.student_steps
    if s < 1 or lc.teacher_steps_end % s or s > lc.teacher_steps_start:
      raise ConfigError(
          f"config.loss.student_steps must divide loss.teacher_steps_end "
          f"({lc.teacher_steps_end}) and be at most loss.teacher_steps_start "
          f"({lc.teacher_steps_start}) so every segment holds whole teacher steps, got {s}")
    if lc.huber_epsilon <= 0:
      raise ConfigError(f"config.loss.huber_epsilon must be > 0, got {lc.huber_epsilon}")
  if lc.mode in ("cd", "direct") and not config.teacher_checkpoint:
    raise ConfigError(f"config.teacher_checkpoint must name a diffusion run's workdir or "
                      f"checkpoint for loss.mode={lc.mode!r}")
  if lc.guidance_scale and not config.data.num_classes:
    raise ConfigError("config.loss.guidance_scale needs a class-conditional model "
                      "(config.data.num_classes > 0)")

  try:
    models.get_model_for_config(config)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
