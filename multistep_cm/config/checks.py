"""Config validation before anything compiles: one line naming the key and what is allowed.

Every key a run reads has one row in `SCHEMA`: its type and allowed range or set (the
model's keys come from `MODEL_SCHEMA`, a schedule's keyword arguments must be finite
numbers that the schedule accepts). `validate` checks each leaf of a config against its
row, refuses keys no row names (a typo would otherwise be ignored), then checks what
involves several keys (divisibility, the mesh, the segment grid, the model as built).
Allowed but suspicious values are refused or warned about, as `SCHEMA` says.

`validate_run` is what the main job calls first, for a single-run config or every
stage of a staged one, so a mistake in a later stage fails before the first trains.
Checks that need files (the teacher checkpoint, the dataset) run in the trainer,
still before anything is allocated or compiled (training/loop.py, step 1).
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.data import captions
from multistep_cm.data import digits
from multistep_cm.data import image_folder
from multistep_cm.data import latents
from multistep_cm.data import sources
from multistep_cm.data import pipeline
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments
from multistep_cm import models
from multistep_cm.models import layers
from multistep_cm.models import uvit
from multistep_cm.runtime import sharding
from multistep_cm import teachers
from multistep_cm.teachers import module as teacher_module

DATASETS = config_build.DATASETS
NONFINITE = ("skip", "stop")
MAX_INT = 2**31 - 1  # steps and counters are int32 on the device


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# --- the schema: one row per key ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key allows: `check(value)` returns None if allowed, else what is allowed
  (the text of the error); `warn(value)` returns a warning for an allowed but suspicious
  value, else None."""
  check: Callable[[Any], str | None]
  warn: Callable[[Any], str | None] = lambda value: None


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int, hi: int = MAX_INT, also=()) -> Rule:
  allowed = f"an integer in [{lo}, {hi}]" + "".join(f" or {a}" for a in also)
  return Rule(lambda v: None if (_is_int(v) and (lo <= v <= hi or v in also)) else allowed)


def number(lo: float, hi: float, lo_open=False, hi_open=False, warn_above=None) -> Rule:
  allowed = (f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
             f"{')' if hi_open else ']'}")

  def check(v):
    ok = _is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return None if ok else allowed

  warn = lambda v: (f"{v:g} is above {warn_above:g}, which is unusual" if warn_above is not None
                    and v > warn_above else None)
  return Rule(check, warn)


def boolean() -> Rule:
  return Rule(lambda v: None if isinstance(v, bool) else "true or false")


def one_of(*values) -> Rule:
  return Rule(lambda v: None if isinstance(v, str) and v in values else f"one of {values}")


def text(empty: bool = True, none: bool = False) -> Rule:
  allowed = "a string" + ("" if empty else " (not empty)") + (" or None" if none else "")
  return Rule(lambda v: None if ((v is None and none) or (isinstance(v, str) and (empty or v)))
              else allowed)


def sequence(item: Rule, min_len: int = 1, max_len: int = 64, what: str = "") -> Rule:
  allowed = f"a list of {min_len} to {max_len} {what or 'values'}"

  def check(v):
    if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
      return allowed
    return allowed if any(item.check(x) for x in v) else None

  return Rule(check)


def either(*rules: Rule) -> Rule:
  def check(v):
    found = [r.check(v) for r in rules]
    return None if any(f is None for f in found) else " or ".join(found)
  return Rule(check)


def _remat_policy(v):
  """One policy name, or comma-separated names (one per UViT level, then the mid stack;
  the model checks the count)."""
  if isinstance(v, str):
    try:
      layers.remat_policy_names(v)
      return None
    except ValueError:
      pass
  names = ("none", *sorted(layers.REMAT_POLICIES))
  return f"one of {names}, or such names comma-separated (one per level, then the mid stack)"


def _dataset(v):
  if isinstance(v, str) and (v in DATASETS or (v.startswith("tfds:") and len(v) > 5)
                             or (v.startswith("folder:") and len(v) > 7)
                             or latents.latent_name(v) is not None):
    return None
  return (f"one of {DATASETS}, 'tfds:<name>', 'folder:<name>' (your images, docs/data.md) or "
          "'latent:<name>' (VAE latents of a dataset)")


def _check_folder_data(config):
  """The user's prepared images (data/image_folder.py) or latents (data/latents.py) against
  the config's data shape, by the dataset's record: no TFDS, no decoding, seconds before
  anything compiles."""
  folder = image_folder.folder_name(config.data.dataset)
  latent = latents.latent_name(config.data.dataset)
  if latent is not None:
    if config.data.random_flip:
      raise ConfigError(f"config.data.random_flip=True with data.dataset="
                        f"{config.data.dataset!r}: a flipped latent is not the latent of the "
                        "flipped image; set it False (or encode flipped images as well)")
    if config.data.text_dim:
      raise ConfigError("config.data.text_dim > 0: latent datasets hold images and labels, "
                        "not text (data/latents.py)")
  if folder is None and latent is None:
    return
  keys = ("image_size", "num_channels", "num_classes")
  values = {f"data.{k}": config.data[k] for k in keys}
  values.update({f"model.{k}": config.model[k] for k in keys if k in config.model})
  problem = (image_folder.config_disagreement(folder, config.data.data_dir, values)
             if folder is not None
             else latents.config_disagreement(latent, config.data.data_dir, values))
  if problem:
    raise ConfigError(problem)


def _weights(v):
  if isinstance(v, str) and (v == "params" or (v.startswith("ema") and v[3:].isdigit())):
    return None
  return "'params' or an EMA name ('ema0', 'ema1', ...)"


def _boundaries(v):
  if isinstance(v, str):
    return None if v in segments.KINDS else f"one of {segments.KINDS} or S + 1 times"
  return sequence(number(0.0, 1.0), 2, 1025).check(v) and (
      f"one of {segments.KINDS} or S + 1 increasing times from 0 to 1")


def _guidance_range(v):
  if isinstance(v, (list, tuple)) and (len(v) == 0 or (
      len(v) == 2 and all(number(0.0, 100.0).check(w) is None for w in v) and v[0] < v[1])):
    return None
  return "empty (off) or (w_min, w_max), 0 <= w_min < w_max <= 100"


_STEPS = integer(0)  # an interval in steps; 0: off
SCHEMA: dict[str, Rule] = {
    "seed": integer(0),
    "data.dataset": Rule(_dataset),
    "data.split": text(empty=False),
    "data.image_size": integer(0, 4096),  # 0: vector data (the mixture)
    "data.num_channels": integer(1, 4),
    "data.num_classes": integer(0, 100_000),
    "data.text_dim": integer(0, 65_536),  # text-image data: embedding width D (0: no text)
    "data.text_len": integer(0, 4096),  # text-image data: padded tokens L
    "data.partial_captions": number(0.0, 1.0),  # captioned_digits: share of partial captions
    "data.data_dir": text(none=True),
    "data.random_flip": boolean(),
    "data.fast_decode": boolean(),
    "data.data_dim": integer(1, 65_536),
    "data.mixture_size": integer(1, 10_000_000),
    "data.num_threads": integer(0, 1024),
    "data.prefetch": integer(0, 64),
    "data.workers": one_of(*pipeline.WORKERS),
    "batch_size": integer(1, 2**24),
    "grad_accum_steps": integer(1, 4096),
    "num_train_steps": integer(1),
    "schedule.name": one_of(*schedules.NAMES),
    "loss.mode": one_of("diffusion", *losses.MODES),
    "loss.label_dropout": number(0.0, 1.0, hi_open=True),
    "loss.prediction": one_of(*losses.DIFFUSION_PREDICTIONS),
    "loss.diffusion_weighting": one_of(*losses.DIFFUSION_WEIGHTINGS),
    "loss.student_steps": integer(1, 4096),
    "loss.teacher_steps_start": integer(1, 1 << 20),
    "loss.teacher_steps_end": integer(1, 1 << 20),
    "loss.anneal_steps": integer(0),
    "loss.eta": number(0.0, 1.0),
    "loss.teacher_solver": one_of(*losses.TEACHER_SOLVERS),
    "loss.guidance_scale": number(0.0, 100.0, warn_above=20.0),
    "loss.guidance_range": Rule(_guidance_range),
    "loss.huber_epsilon": number(0.0, 1e3, lo_open=True),
    "loss.huber_reduction": one_of(*losses.HUBER_REDUCTIONS),
    "loss.weighting": one_of(*losses.WEIGHTINGS),
    "loss.direct_x_var": one_of(*losses.DIRECT_X_VAR_RULES),
    "loss.pd_midpoint_x_var": one_of(*losses.PD_MIDPOINT_X_VAR),
    "loss.pd_weighting": one_of(*losses.PD_WEIGHTINGS),
    "loss.boundaries": Rule(_boundaries),
    "loss.anystep_counts": sequence(integer(1, 4096), 0, 16, "step counts"),  # empty: off
    "loss.anystep_probs": sequence(number(0.0, 1.0), 0, 16, "probabilities"),  # empty: equal
    "teacher_checkpoint": text(),
    "teacher_weights": Rule(_weights),
    "init_from": text(),
    "init_weights": Rule(_weights),
    "teacher.kind": one_of("run", "module"),
    "teacher.module": text(),
    "teacher.frame": one_of(*teachers.FRAMES),
    "teacher.prediction": one_of(*teachers.PREDICTIONS),
    "teacher.time_scale": number(0.0, 1e6, lo_open=True),
    "teacher.flow_time": one_of("", *teacher_module.FLOW_TIMES),
    "teacher.schedule": one_of("", *schedules.NAMES),
    "teacher.student": one_of("model", "teacher"),
    "optimizer.name": one_of(*config_base.OPTIMIZERS),
    # Above 1 warned about, not refused: almost always a typo, but the reliability tests
    # (and anyone provoking a divergence on purpose) use one.
    "optimizer.learning_rate": number(0.0, math.inf, warn_above=1.0),
    "optimizer.warmup_steps": integer(0),
    "optimizer.schedule": one_of(*config_base.LR_SCHEDULES),
    "optimizer.end_lr_fraction": number(0.0, 1.0),
    "optimizer.b1": number(0.0, 1.0, hi_open=True),
    "optimizer.b2": number(0.0, 1.0, hi_open=True),
    "optimizer.eps": number(0.0, 1.0, lo_open=True),
    "optimizer.weight_decay": number(0.0, 1.0),
    "optimizer.grad_clip_norm": number(0.0, 1e6),  # 0: no clipping
    # An EMA decay outside [0, 1) is refused (1 would freeze the EMA at the initialisation).
    "ema_decays": sequence(number(0.0, 1.0, hi_open=True), 1, 8, "decays in [0, 1)"),
    "ema_warmup": boolean(),
    "nonfinite": one_of(*NONFINITE),
    "mesh.data": integer(1, 1 << 20, also=(-1,)),
    "mesh.fsdp": integer(1, 1 << 20, also=(-1,)),
    "log_every_steps": _STEPS,
    "checkpoint_every_steps": _STEPS,
    "checkpoint_keep": integer(0, 10_000),
    "checkpoint_keep_period": _STEPS,
    "async_checkpoints": boolean(),
    "sample_every_steps": _STEPS,
    "sample_num": integer(1, 4096),
    "sample_steps": integer(1, 4096),
    "sample_sampler": one_of(*sampling.SAMPLERS),
    "profile_steps": integer(0, 10_000),
    "record_example_ids": boolean(),
    "evals.every_steps": _STEPS,
    "evals.num_samples": integer(1, 1_000_000),
    "evals.batch_size": integer(1, 1 << 16),
    "evals.sample_steps": integer(0, 4096),
    "evals.metric": one_of(*config_base.METRIC_KINDS),
    "evals.ode_error": boolean(),
    "evals.ode_steps": integer(1, 4096),
    "evals.inception_weights": text(),
    "evals.reference_stats": text(),
    "evals.dinov2_weights": text(),
}

# The model's keys: attributes of the UViT and the MLP (models/uvit.py, models/mlp.py).
_WIDTH = integer(1, 1 << 16)
MODEL_SCHEMA: dict[str, Rule] = {
    "preset": one_of(*sorted(models.PRESETS)),
    "image_size": integer(1, 4096), "num_channels": integer(1, 4),
    "num_classes": integer(0, 100_000), "data_dim": integer(1, 65_536),
    "block_types": sequence(one_of("res", "attn"), 1, 8, "'res' or 'attn'"),
    "channels": sequence(_WIDTH, 1, 8, "widths"), "num_blocks": sequence(integer(0, 64), 1, 8),
    "mid_channels": _WIDTH, "mid_blocks": integer(0, 256), "emb_dim": _WIDTH,
    "head_dim": integer(1, 4096), "mlp_ratio": integer(1, 64), "num_groups": integer(1, 1024),
    "width": _WIDTH, "depth": integer(1, 256),
    "dropout": either(number(0.0, 1.0, hi_open=True),
                      sequence(number(0.0, 1.0, hi_open=True), 1, 9, "rates in [0, 1)")),
    "dtype": one_of("float32", "bfloat16", "float16"),
    "remat": boolean(), "remat_policy": Rule(_remat_policy),
    "scan_blocks": boolean(), "attention_impl": one_of(*uvit.ATTENTION_IMPLS),
    "segment_cond": one_of(*layers.SEGMENT_CONDITIONS), "num_step_values": integer(0, 64),
    "guidance_cond": boolean(),
    "text_dim": integer(0, 65_536), "text_len": integer(0, 4096),
    "text_route": one_of(*layers.TEXT_ROUTES),
}


def leaves(tree, prefix=""):
  """`(dotted key, value)` of every leaf of a nested dict (a config's `to_dict()`); lists and
  tuples are leaves."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def rule_for(key: str) -> Rule | None:
  """The row of `SCHEMA` (or `MODEL_SCHEMA`, or the schedule's kwargs) for `key`."""
  if key in SCHEMA:
    return SCHEMA[key]
  if key.startswith("model."):
    return MODEL_SCHEMA.get(key[len("model."):])
  if key.startswith(("schedule.kwargs.", "teacher.schedule_kwargs.")):
    return number(-1e6, 1e6)
  return None


def check_keys(config) -> list[str]:
  """Raises ConfigError on the first key whose value its row does not allow, or that no row
  names; returns the warnings for allowed but suspicious values."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  warnings = []
  for key, value in leaves(tree):
    rule = rule_for(key)
    if rule is None:
      raise ConfigError(f"config.{key} is not a key this framework reads (a typo?); "
                        "the keys are listed in multistep_cm/config/base.py")
    allowed = rule.check(value)
    if allowed is not None:
      raise ConfigError(f"config.{key} must be {allowed}, got {value!r}")
    warning = rule.warn(value)
    if warning:
      warnings.append(f"config.{key}: {warning}")
  return warnings


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


# The teacher keys that describe a module of your own (teacher.kind='module'), at their
# defaults for a run of ours.
_MODULE_KEYS = ("module", "frame", "prediction", "time_scale", "flow_time", "schedule",
                "schedule_kwargs", "student")


# What a resume may not change: the checkpoint's arrays, or what they mean, depend on it
# (a key equal to one of these, or under one ending in ".").
RESUME_FIXED = ("model.", "schedule.", "loss.mode", "data.image_size", "data.num_channels",
                "data.num_classes", "teacher.student", "loss.prediction")
# Also fixed when the student is the teacher's own module: what that module is and means.
RESUME_FIXED_TEACHER_STUDENT = tuple(f"teacher.{k}" for k in _MODULE_KEYS) + (
    "teacher.schedule_kwargs.",)


def _json_leaves(config) -> dict[str, Any]:
  """`{dotted key: value}` of a config (or its `config.json` dict), every default filled,
  the values as JSON has them (tuples as lists)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  config = config_base.with_defaults(config)
  return dict(leaves(json.loads(config.to_json_best_effort())))


def config_changes(old, new) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (old value, new value)}` where two single-run configs differ (either a
  ConfigDict or a `config.json` dict), compared as JSON values; a key one of them lacks is
  None there. Sorted by key."""
  a, b = _json_leaves(old), _json_leaves(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(changes: dict[str, tuple[Any, Any]], workdir: str,
                 student_is_teacher: bool = False):
  """Raises ConfigError, one line, if `changes` (`config_changes` of the config a workdir's
  checkpoints were trained with and the one resuming them) touches a `RESUME_FIXED` key (or,
  for a student of the teacher's own module, a `RESUME_FIXED_TEACHER_STUDENT` one)."""
  prefixes = RESUME_FIXED + (RESUME_FIXED_TEACHER_STUDENT if student_is_teacher else ())
  fixed = [k for k in changes
           if any(k == p or (p.endswith(".") and k.startswith(p)) for p in prefixes)]
  if not fixed:
    return
  described = [f"config.{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed]
  raise ConfigError(
      f"{described[0]}{''.join('; ' + d for d in described[1:])}: the checkpoints in "
      f"{workdir!r} were trained with the old value, and a resume cannot change the model, "
      f"the schedule, the objective or the data's shape. Resume with the config it was "
      f"trained with (--config={workdir}/config.json), or train this config in a new "
      "workdir")


def _check_image_size(config):
  """The data's image size against what the model preset and the dataset can take."""
  preset = config.model.preset
  size = config.data.image_size
  if models.PRESETS[preset]["arch"] != "uvit":
    return
  # A model attribute the config does not override is the preset's (models/presets.py).
  channels = config.model.get("channels", models.PRESETS[preset]["channels"])
  factor = 2 ** len(channels)  # one 2x pooling per level
  if not isinstance(size, int) or size < factor or size % factor:
    raise ConfigError(f"config.data.image_size must be a positive multiple of {factor} for "
                      f"model.preset={preset!r} ({len(channels)} pooling levels), got {size!r}")
  if config.data.dataset == "digits" and size not in digits.IMAGE_SIZES:
    raise ConfigError(f"config.data.image_size must be one of {digits.IMAGE_SIZES} for "
                      f"data.dataset='digits', got {size}")


def validate(config, num_devices: int | None = None, num_processes: int | None = None):
  """Raises ConfigError on the first key that is not allowed, alone or with the others;
  logs a warning for each allowed but suspicious value."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  config = config_base.with_defaults(config)
  for warning in check_keys(config):
    logging.warning("%s", warning)
  lc = config.loss

  # What involves several keys, or what the keys build.
  if config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size must be a positive multiple of the {num_devices} "
                      f"devices, got {config.batch_size}")
  accum = int(config.grad_accum_steps)
  if config.batch_size % (accum * num_devices):
    raise ConfigError(f"config.batch_size must be a multiple of grad_accum_steps ({accum}) x "
                      f"the {num_devices} devices (every micro-batch spans every device), got "
                      f"{config.batch_size}")
  if config.batch_size % num_processes:
    raise ConfigError(f"config.batch_size must be a multiple of the {num_processes} processes, "
                      f"got {config.batch_size}")
  try:
    sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f"{e} (-1 in one of them takes the rest)") from None
  try:
    schedule = config_build.get_schedule(config)
  except ValueError as e:
    raise ConfigError(f"config.schedule.kwargs: {e}") from None
  if config.data.dataset != "mixture" and config.data.image_size < 1:
    raise ConfigError(f"config.data.image_size must be >= 1 for image data "
                      f"(data.dataset={config.data.dataset!r}), got {config.data.image_size}")

  if lc.mode == "pd":
    _check_pd(config)
  elif lc.mode != "diffusion":
    _check_segments(config, schedule)
  check_anystep_probs(lc)
  if lc.mode in losses.TEACHER_MODES and not config.teacher_checkpoint:
    what = ("the weights of config.teacher.module (.npz, .safetensors or an orbax directory)"
            if config.teacher.kind == "module" else "a diffusion run's workdir or checkpoint")
    raise ConfigError(f"config.teacher_checkpoint must name {what} for loss.mode={lc.mode!r}")
  _check_teacher(config)
  text = config.data.text_dim > 0
  if lc.guidance_scale and not (config.data.num_classes or text):
    raise ConfigError("config.loss.guidance_scale needs a class- or text-conditional model "
                      "(config.data.num_classes > 0 or config.data.text_dim > 0)")
  _check_guidance_range(config, text)
  if text and config.data.num_classes:
    raise ConfigError(f"config.data.num_classes must be 0 for text-image data "
                      f"(data.text_dim={config.data.text_dim}): a model takes one kind of "
                      f"conditioning, got {config.data.num_classes}")
  if text and config.data.dataset in ("digits", "mixture"):
    raise ConfigError(f"config.data.text_dim > 0 needs text-image data (captioned_digits or a "
                      f"prepared 'tfds:text_images/<name>'), got data.dataset="
                      f"{config.data.dataset!r}")
  if config.data.dataset == "captioned_digits" and (
      config.data.text_dim, config.data.text_len) != (
          captions.TEXT_DIM, captions.TEXT_LEN):
    raise ConfigError(f"config.data.text_dim and data.text_len must be {captions.TEXT_DIM} and "
                      f"{captions.TEXT_LEN} for captioned_digits (its shipped encoder), got "
                      f"{config.data.text_dim} and {config.data.text_len}")
  if text != (config.data.text_len > 0):
    raise ConfigError(f"config.data.text_dim and data.text_len must both be > 0 (text-image "
                      f"data) or both 0, got {config.data.text_dim} and "
                      f"{config.data.text_len}")

  _check_folder_data(config)
  _check_evals(config)
  _check_image_size(config)
  try:
    config_build.get_model(config)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None


def _check_teacher(config):
  """A teacher of your own (config.teacher): a loss that calls it, a module that imports, a
  frame, prediction and time convention that go together (teachers/adapter.py), and a
  student of its architecture only where that has no input the teacher lacks."""
  t, mode = config.teacher, config.loss.mode
  if config.loss.prediction == "velocity":
    told = [k for k, on in (("loss.anystep_counts", bool(config.loss.anystep_counts)),
                            ("model.guidance_cond", config.model.guidance_cond),
                            ("model.segment_cond", config.model.segment_cond != "none"),
                            ("teacher.student='teacher'", t.student == "teacher"),
                            ("loss.diffusion_weighting='snr'",
                             config.loss.diffusion_weighting != "snr_plus_one")) if on]
    if told:
      raise ConfigError(f"config.loss.prediction='velocity' (our network as a flow-matching "
                        f"one) does not go with config.{told[0]}")
  if t.kind == "run":
    defaults = config_base.base_config().teacher
    for key in _MODULE_KEYS:
      if t[key] != defaults[key]:
        raise ConfigError(f"config.teacher.{key} describes a teacher of your own and needs "
                          f"teacher.kind='module'; a run of ours (teacher.kind='run') is a "
                          f"v-predicting network on logSNR, got teacher.{key}={t[key]!r}")
    return
  if mode == "diffusion" and t.student != "teacher":
    raise ConfigError("config.teacher.kind='module' with loss.mode='diffusion' trains the "
                      "module itself and needs teacher.student='teacher' (teacher_checkpoint, "
                      "if given, is where it starts)")
  if mode not in ("cd", "direct", "pd", "diffusion"):
    raise ConfigError(f"config.teacher.kind='module' needs loss.mode 'cd', 'direct' or 'pd' "
                      f"(a loss that calls the teacher), or 'diffusion' to train the module "
                      f"itself, got {mode!r}")
  if not t.module:
    raise ConfigError("config.teacher.module must name the teacher's Flax module as "
                      "'package.module:name' or 'path/to/file.py:name' for teacher.kind="
                      "'module'")
  if (t.frame == "flow") != bool(t.flow_time):
    raise ConfigError(
        f"config.teacher.flow_time must be 'data_at_0' (SD3, Flux, Wan: t = 0 is the data) "
        f"or 'noise_at_0' (SiT) for a 'flow' teacher, got {t.flow_time!r}" if t.frame == "flow"
        else f"config.teacher.flow_time applies to teacher.frame='flow' only, got "
        f"{t.flow_time!r} for a {t.frame!r} teacher")
  schedule = None
  if t.schedule:
    try:
      schedule = schedules.get_schedule(t.schedule, **t.schedule_kwargs.to_dict())
    except ValueError as e:
      raise ConfigError(f"config.teacher.schedule_kwargs: {e}") from None
  elif t.schedule_kwargs.to_dict():
    raise ConfigError(f"config.teacher.schedule_kwargs needs teacher.schedule, got "
                      f"{t.schedule_kwargs.to_dict()}")
  try:
    teachers.check_conventions(t.frame, t.prediction, float(t.time_scale),
                               teacher_module.FLOW_TIMES.get(t.flow_time, False), schedule)
  except ValueError as e:
    raise ConfigError(f"config.teacher: {e}") from None
  try:
    teacher_module.load_module(t.module)
  except ValueError as e:
    raise ConfigError(f"config.teacher.module={t.module!r}: {e}") from None
  if t.student == "teacher":
    told = [k for k, on in (("loss.anystep_counts", bool(config.loss.anystep_counts)),
                            ("model.guidance_cond", config.model.guidance_cond),
                            ("model.segment_cond", config.model.segment_cond != "none")) if on]
    if told:
      raise ConfigError(f"config.teacher.student='teacher' trains the teacher's own module, "
                        f"which has no input for config.{told[0]}; use teacher.student="
                        f"'model' (our UViT) for that")
    if config.init_from:
      raise ConfigError(f"config.init_from must be empty with teacher.student='teacher' (the "
                        f"student starts from the teacher's weights), got "
                        f"{config.init_from!r}")


# What a feature metric of evaluation during training needs: its config keys, and the
# command that makes each file.
_DINOV2_WEIGHTS = ("dinov2_weights", "python -m multistep_cm.evaluation.convert_dinov2 "
                   "--src=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz")
_DINOV2_REFERENCE = ("python -m multistep_cm.evaluation.reference_stats --dataset=... "
                     "--features=dinov2 --weights=dinov2_vitl14.npz")
_EVAL_FILES = {
    "fid": (("inception_weights",
             "python -m multistep_cm.evaluation.convert_inception --src=pt_inception-2015-12-05-"
             "6726825d.pth --out=inception_fid.npz"),
            ("reference_stats",
             "python -m multistep_cm.evaluation.reference_stats --dataset=... "
             "--weights=inception_fid.npz --output=ref.npz")),
    "fd_dinov2": (_DINOV2_WEIGHTS, ("reference_stats", f"{_DINOV2_REFERENCE} --output=ref.npz")),
    "prdc": (_DINOV2_WEIGHTS,
             ("reference_stats", f"{_DINOV2_REFERENCE} --keep_features --output=ref.npz")),
}


def _check_evals(config):
  """Evaluation during training in a feature network's space (FID, FD-DINOv2, PRDC) needs
  the converted weights and reference statistics: refused here, before anything compiles,
  rather than when the evaluator is built after the step."""
  ec = config.evals
  if not ec.every_steps:
    return
  dataset = config.data.dataset
  if latents.latent_name(dataset) is not None:  # scored in pixels, as its source dataset
    try:
      dataset = latents.pixel_config(config).data.dataset
    except sources.DatasetError:
      return  # not prepared: opening the data says how to prepare it
  kind = config_base.auto_metric(dataset) if ec.metric == "auto" else ec.metric
  if kind not in _EVAL_FILES:
    return
  said = (f"config.evals.metric={ec.metric!r} is FID for data.dataset={config.data.dataset!r}"
          if ec.metric == "auto" else f"config.evals.metric={kind!r}")
  for key, command in _EVAL_FILES[kind]:
    value = ec[key]
    if not value:
      raise ConfigError(f"{said}, which needs config.evals.{key} ({command}); or set "
                        f"config.evals.metric='none' (grids and costs only) or "
                        f"evals.every_steps=0")
    if "://" not in value and not os.path.exists(value):
      raise ConfigError(f"config.evals.{key}={value!r} does not exist")


def _check_guidance_range(config, text: bool):
  """A range of guidance scales trains a student told w: it needs a guided
  teacher (cd or direct on conditional data) and a model with the guidance input."""
  lc = config.loss
  told = config.model.guidance_cond
  if not lc.guidance_range:
    if told:
      raise ConfigError("config.model.guidance_cond needs loss.guidance_range (the w the "
                        "student is told is drawn from it)")
    return
  if lc.mode not in ("cd", "direct"):
    raise ConfigError(f"config.loss.guidance_range needs loss.mode 'cd' or 'direct' (a "
                      f"guided teacher network), got {lc.mode!r}")
  if not (config.data.num_classes or text):
    raise ConfigError("config.loss.guidance_range needs a class- or text-conditional model "
                      "(config.data.num_classes > 0 or config.data.text_dim > 0)")
  if not told:
    raise ConfigError("config.loss.guidance_range needs model.guidance_cond=True (the "
                      "student is told each example's w)")
  if lc.guidance_scale:
    raise ConfigError(f"config.loss.guidance_scale must be 0 with loss.guidance_range (each "
                      f"example draws its w from the range), got {lc.guidance_scale}")


def _check_pd(config):
  """A Progressive Distillation student has one step count and N uniform steps (the teacher's
  2N halve them); it samples with DDIM on that grid."""
  lc = config.loss
  if lc.boundaries != "uniform":
    raise ConfigError(f"config.loss.boundaries must be 'uniform' for loss.mode='pd' (the "
                      f"student halves the teacher's uniform steps), got {lc.boundaries!r}")
  if lc.anystep_counts:
    raise ConfigError(f"config.loss.anystep_counts must be empty for loss.mode='pd' (one "
                      f"student per halving), got {tuple(lc.anystep_counts)}")
  if config.model.segment_cond != "none":
    raise ConfigError(f"config.model.segment_cond must be 'none' for loss.mode='pd' (its "
                      f"steps are not segments), got {config.model.segment_cond!r}")


def check_anystep_probs(lc):
  """Any-step draw probabilities: one per count, positive, summing to 1 (`validate` runs it;
  the toy, which builds its configs without `validate`, calls it itself)."""
  probs = tuple(lc.anystep_probs)
  if probs:
    if not lc.anystep_counts:
      raise ConfigError(f"config.loss.anystep_probs needs loss.anystep_counts (the counts "
                        f"they draw), got {probs} for a single step count")
    if len(probs) != len(lc.anystep_counts):
      raise ConfigError(f"config.loss.anystep_probs must give one probability per count of "
                        f"loss.anystep_counts {tuple(lc.anystep_counts)}, got {probs}")
    if abs(sum(probs) - 1.0) > 1e-6 or min(probs) <= 0:
      raise ConfigError(f"config.loss.anystep_probs must be positive and sum to 1, got {probs}")


def _check_segments(config, schedule):
  """Every segment of every step count holds whole teacher steps; the boundaries and the
  any-step counts fit the student."""
  lc = config.loss
  if lc.teacher_steps_start > lc.teacher_steps_end:
    raise ConfigError(f"config.loss.teacher_steps_start must be at most loss.teacher_steps_end "
                      f"({lc.teacher_steps_end}), got {lc.teacher_steps_start}")
  counts = config_build.step_counts(config)
  key = "loss.anystep_counts" if lc.anystep_counts else "loss.student_steps"
  for s in counts:
    if lc.teacher_steps_end % s or s > lc.teacher_steps_start:
      raise ConfigError(
          f"config.{key} must divide loss.teacher_steps_end ({lc.teacher_steps_end}) and be "
          f"at most loss.teacher_steps_start ({lc.teacher_steps_start}) so every segment "
          f"holds whole teacher steps, got {s}")
  if lc.anystep_counts:
    if len(set(counts)) != len(counts):
      raise ConfigError(f"config.loss.anystep_counts must not repeat a count, got {counts}")
    if config.model.segment_cond == "none":
      raise ConfigError("config.loss.anystep_counts needs model.segment_cond 'steps' or "
                        "'segment_start' (config_base.set_anystep sets both)")
    if lc.student_steps != max(counts):
      raise ConfigError(f"config.loss.student_steps must be the largest of "
                        f"loss.anystep_counts ({max(counts)}), got {lc.student_steps}")
  for s in counts:
    try:
      config_build.segment_boundaries(config, schedule, s)
    except ValueError as e:
      raise ConfigError(f"config.loss.boundaries: {e}") from None
