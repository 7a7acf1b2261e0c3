"""The host loop: `train_and_evaluate(config, workdir)` and staged runs, top to bottom.

1. Validate the config and resolve it once into the run's plan (config/plan.py); refuse a
   resume that changes what the workdir's checkpoints depend on (config/checks.py:
   `check_resume`); build the static step (training/step.py: StepBuilder: mesh, model,
   schedule, optimiser, the abstract state and its shardings); check the teacher
   checkpoint and the dataset before anything is allocated.
2. The train state: restored from the workdir (resume), or initialised from another
   run's parameters (`config.init_from`), or from scratch with a jitted init that
   creates it already sharded.
3. The teacher (modes cd, direct and pd) from `config.teacher_checkpoint` (a run of ours,
   or the weights file of a module of your own: config.teacher), sharded by the same
   rules: an input of the step, never optimised or checkpointed. Only now, every check
   passed, the workdir's record is written: `config.json` (atomically) and, for a
   resume that changed keys, an entry of `config_history.json`.
4. The step compiled once, ahead of time; its FLOPs counted on its jaxpr (runtime/flops.py).
5. The loop: input -> step; device values are fetched only at log steps; sample grids
   and evaluations (evaluation/in_training.py), checkpoints, the non-finite policy and
   SIGTERM/preemption handling at their intervals.

Only `main.py` imports this module: what is static about a step lives in
training/step.py, what a config means in config/plan.py.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import tempfile
import threading
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from multistep_cm.config import base as config_base
from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.evaluation import in_training
from multistep_cm.models import partitioning
from multistep_cm.runtime import checkpointing
from multistep_cm.runtime import hardware
from multistep_cm.runtime import metric_log
from multistep_cm.sampling import images
from multistep_cm.teachers import weights as teacher_weights
from multistep_cm.training import step as train_step_lib

TrainState = train_step_lib.TrainState


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: where it stopped and why."""
  step: int
  preempted: bool = False
  final_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class NonFiniteError(FloatingPointError):
  """The run stopped on a non-finite loss or gradient (config.nonfinite = 'stop')."""


# --- staged runs -------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains a single-run config, or each stage of a staged one in `<workdir>/<stage>`.

  A stage's `stage:<name>` references stay so in its recorded `config.json`, so a staged
  root copied elsewhere resumes, and its stages replay, from where it is now: a single
  run's `stage:<name>` (a stage's `config.json` replayed) is `<name>` beside its workdir.
  """
  if "stages" not in config:
    root = os.path.dirname(str(workdir).rstrip("/"))  # not normpath: it mangles gs://
    return train_and_evaluate(resolve_stage(config, root), workdir,
                              stage_refs=stage_refs(config))
  # Every stage now: a mistake in the last one must not wait for the first to train.
  config_checks.validate_run(config, jax.device_count(), jax.process_count())
  result = None
  for name in config.stage_order:
    stage_dir = os.path.join(workdir, name)
    logging.info("Stage %s in %s", name, stage_dir)
    result = train_and_evaluate(resolve_stage(config.stages[name], workdir), stage_dir,
                                stage_refs=stage_refs(config.stages[name]))
    if result.preempted:
      break
  return result


STAGE_KEYS = ("teacher_checkpoint", "init_from")


def stage_refs(config) -> dict[str, str]:
  """The `stage:<name>` references of `config` (a stage, or a run replaying one's record),
  `{key: "stage:<name>"}`."""
  return {key: config[key] for key in STAGE_KEYS
          if isinstance(config.get(key), str) and config[key].startswith("stage:")}


def resolve_stage(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`stage:<name>` in teacher_checkpoint / init_from -> that stage's workdir under the root
  `workdir`."""
  config = config_base.with_defaults(config)
  for key, value in stage_refs(config).items():
    config[key] = os.path.join(workdir, value[len("stage:"):])
  return config


def _as_recorded(config, refs: dict[str, str]):
  """`config` as its workdir records it: the stage references as written (relative to the
  staged root), not the paths they resolved to here."""
  if not refs:
    return config
  recorded = ml_collections.ConfigDict(config.to_dict())
  for key, value in refs.items():
    recorded[key] = value
  return recorded


# --- one run -----------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None,
                       stage_refs: dict[str, str] | None = None) -> TrainResult:
  """Trains (or resumes) the run in `workdir` until `config.num_train_steps`.

  `stop_after` ends this invocation after that step with a checkpoint, as a
  preemption would; running again resumes exactly. SIGTERM/SIGINT do the same at
  the step they arrive (the result says `preempted`). `stage_refs` (`run`'s): the keys
  resolved from `stage:<name>`, recorded and compared as that reference.
  """
  # Multi-process: no handler (see StopSignal); a stop on one process alone would hang.
  signals = () if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  with StopSignal(signals) as stop, contextlib.ExitStack() as held:
    return _train_and_evaluate(config, workdir, stop_after, stop, stage_refs or {}, held)


def _train_and_evaluate(config, workdir, stop_after, stop, refs, held) -> TrainResult:
  # 1. Config and the static step: nothing allocated yet.
  config_checks.validate(config, num_devices=jax.device_count(),
                         num_processes=jax.process_count())
  plan = plan_lib.RunPlan.from_config(config)
  config = plan.config  # every default filled, read-only
  # The config the workdir's checkpoints were trained with: a resume may change some keys
  # (each recorded once the run starts), never what the checkpoints' arrays depend on.
  previous = _previous_config(workdir)
  recorded = _as_recorded(config, refs)
  changes = config_checks.config_changes(previous, recorded) if previous is not None else {}
  if _has_checkpoints(workdir):
    config_checks.check_resume(changes, workdir,
                               student_is_teacher=config.teacher.student == "teacher")
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    # A read-only workdir fails here, before anything is built.
    checkpointing.probe_writable(workdir)
  builder = train_step_lib.StepBuilder(plan)
  logging.info("Mesh %s over %d devices (%d processes): %s", dict(builder.mesh.shape),
               jax.device_count(), jax.process_count(), jax.devices()[0].device_kind)
  # The inputs that can be wrong, checked before anything is allocated or compiled: the
  # teacher checkpoint (its metadata) and the dataset (one example).
  module_weights = None  # a teacher of your own's weights, read and checked once
  if _trains_the_module(plan):
    if config.teacher_checkpoint:  # the module trained as a diffusion model starts there
      module_weights = _module_weights(config, builder.layout.abstract.params)
  elif builder.teacher_abstract is not None:
    if config.teacher.kind == "module":
      module_weights = _module_weights(config, builder.teacher_abstract)
    else:
      checkpointing.check_params(config.teacher_checkpoint, builder.teacher_abstract,
                                 config.teacher_weights, key="config.teacher_checkpoint")
      _check_teacher_objective(plan)
  source = open_source(plan)
  # One trainer per workdir (WorkdirInUseError), held until this run returns: taken after
  # the checks above, so a run they refuse leaves no lock behind, and before the first write
  # (opening the checkpoints deletes an unfinished save).
  held.enter_context(checkpointing.workdir_lock(workdir))

  # 2. The train state, sharded.
  ckpt = checkpointing.Checkpointer(
      checkpointing.checkpoint_dir(workdir), max_to_keep=config.checkpoint_keep,
      keep_period=config.checkpoint_keep_period or None, async_save=config.async_checkpoints)
  try:
    state = _initial_state(config, builder, ckpt, module_weights)
  except BaseException:
    ckpt.close()
    raise
  start_step = int(jax.device_get(state.step))
  if start_step >= config.num_train_steps:
    logging.info("%s is already trained to step %d.", workdir, start_step)
    ckpt.close()
    return TrainResult(step=start_step)

  # 3. The teacher: an input of the step, sharded like the student.
  teacher_params = None
  try:
    if builder.teacher_abstract is not None:
      teacher_params = (_load_teacher(plan, builder.teacher_abstract) if module_weights is None
                        else _placed(module_weights, builder.teacher_abstract))
  except BaseException:
    ckpt.close()
    raise
  # Every check that can refuse the run has passed: now the workdir records its config.
  _record_config(recorded, workdir, start_step, changes)
  writer = metric_log.create_writer(workdir, just_logging=jax.process_index() > 0)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(builder.layout.abstract.params))
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config_checks.leaves(config.to_dict())
                          if isinstance(v, (int, float, str, bool))})
  logging.info("Model %s: %.2fM parameters; starting at step %d of %d.", plan.model_name,
               num_params / 1e6, start_step, config.num_train_steps)

  # 4. Input, and the step compiled once.
  shard_index, shard_count = pipeline_lib.batch_shard(builder.batch_sharding, config.batch_size)
  data = pipeline_lib.Pipeline(
      source, config.batch_size, config.seed, shard_index, shard_count,
      random_flip=bool(config.data.random_flip), num_threads=config.data.num_threads or None,
      prefetch=config.data.prefetch, workers=config.data.workers)
  t0 = time.time()
  traced = builder.trace()
  model_flops, _ = builder.flops(traced)
  compiled = builder.compile(traced)
  scalar_log = _ScalarLog(writer, config, start_step, model_flops.flops / builder.mesh.size,
                          hardware.peak_flops_per_device())
  logging.info("Compiled the train step in %.1fs: %.3g model FLOPs per device per step.",
               time.time() - t0, scalar_log.flops_per_device)
  grid = in_training.make_sample_grid(plan, builder.mesh)
  # Built at its first evaluation, not here: its setup (the teacher's ODE solve of every
  # evaluation sample) can take minutes, and a stop signal must not wait for it.
  evaluator = None
  evaluate = in_training.enabled(plan)

  # 5. The loop.
  hooks = (metric_log.progress_hooks(config, workdir, start_step)
           if jax.process_index() == 0 else [])
  result = TrainResult(step=start_step)
  step = start_step
  ids_log = (pipeline_lib.ExampleIdLog(workdir, jax.process_index(), start_step)
             if config.record_example_ids else None)
  last_step = (config.num_train_steps if stop_after is None
               else min(stop_after, config.num_train_steps))
  try:
    for step, local in zip(range(start_step + 1, last_step + 1), data.iterate(start_step)):
      if ids_log:
        ids_log.write(step, local["index"])
      batch = pipeline_lib.to_global({k: local[k] for k in builder.abstract_batch},
                                     builder.batch_sharding, config.batch_size)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled(state, batch, teacher_params)
      scalar_log.add(metrics)
      for hook in hooks:
        hook(step)
      final = step == config.num_train_steps
      if _due(step, config.log_every_steps) or final:
        result.final_metrics = scalar_log.write(step, state, ckpt)
      if grid is not None and (_due(step, config.sample_every_steps) or final):
        samples = grid(state.ema["ema0"])
        writer.write_images(step, {"samples": samples[None]})
        if jax.process_index() == 0 and final:
          images.save_png(samples, os.path.join(workdir, f"samples_step{step}.png"))
      # A requested stop skips the evaluation: a preemption's grace period is short.
      if evaluate and (_due(step, config.evals.every_steps) or final) and not stop.requested():
        if evaluator is None:
          evaluator = in_training.TrainingEvaluator(
              plan, builder.mesh,
              in_training.evaluation_teacher(plan, teacher_params,
                                             builder.sharded_teacher_params()),
              builder.teacher_model)
        writer.write_scalars(step, evaluator(state.ema["ema0"]))

      preempted = stop.requested() or (jax.process_count() > 1 and
                                       ckpt.reached_preemption(step))
      if _due(step, config.checkpoint_every_steps) or preempted:
        _save_checkpoint(ckpt, plan, step, state, scalar_log.first_nonfinite())
      if preempted:
        logging.warning("Stopping at step %d after saving a checkpoint.", step)
        result.preempted = True
        break
    result.step = step
    if not result.preempted and ckpt.latest_step() != step:
      _save_checkpoint(ckpt, plan, step, state, scalar_log.first_nonfinite())
    ckpt.wait_until_finished()  # a save that failed in the background fails the run
    if stop.requested() and not result.preempted:
      # The signal came after the last step (during the final save): this run is complete,
      # but a staged run must not start its next stage.
      logging.warning("Stopping after the final step %d: a stop was requested.", step)
      result.preempted = True
  finally:
    # Also on errors: no checkpoint or decoding thread left running, and a close that
    # fails (a full disk fails them all) is logged without hiding the error being raised.
    _close_quietly(ckpt.wait_until_finished, ckpt.close, data.close, writer.close,
                   *([ids_log.close] if ids_log else []))
  logging.info("Finished at step %d%s. TensorBoard: tensorboard --logdir %s", result.step,
               " (preempted)" if result.preempted else "", workdir)
  return result


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


# --- inputs: config, dataset, state, teacher ---------------------------------------------------


CONFIG_FILE, HISTORY_FILE = "config.json", "config_history.json"


def _previous_config(workdir: str) -> dict | None:
  """The workdir's `config.json` (the config of its last start), or None if it has none."""
  path = epath.Path(workdir, CONFIG_FILE)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    logging.warning("%s is not valid JSON (%s): it will be replaced.", path, e)
    return None


def _has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a complete checkpoint (a step directory)."""
  directory = epath.Path(checkpointing.checkpoint_dir(workdir))
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def write_atomically(path: str, text: str):
  """Writes `text` to `path` through a temporary file beside it and a rename, so a reader
  (or a kill) sees the old file or the new one, never a part; remote paths (`://`) are
  written directly (a GCS object appears whole)."""
  if "://" in path:
    epath.Path(path).write_text(text)
    return
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(path) or ".")
  try:
    with os.fdopen(fd, "w") as fh:
      fh.write(text)
      fh.flush()
      os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)  # as an open() would have made it (mkstemp's file is private)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _record_config(config, workdir: str, step: int, changes: dict):
  """Once the run is known to start: logs every key changed since the workdir's last start,
  appends them to `<workdir>/config_history.json` (`[{"step", "date", "changes": {key:
  [old, new]}}]`), and writes `config.json` (process 0; both atomically)."""
  for key, (old, new) in changes.items():
    logging.warning("Starting at step %d with config.%s changed: %r -> %r (recorded in %s).",
                    step, key, old, new, HISTORY_FILE)
  if jax.process_index() != 0:
    return
  if changes:
    path = epath.Path(workdir, HISTORY_FILE)
    history = []
    if path.exists():
      try:
        history = json.loads(path.read_text())
      except ValueError as e:
        logging.warning("%s is not valid JSON (%s): starting it again.", path, e)
    history.append({"step": step,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                    "changes": {k: list(v) for k, v in changes.items()}})
    write_atomically(str(path), json.dumps(history, indent=2) + "\n")
  _write_config(config, workdir)


def _write_config(config, workdir: str):
  """`<workdir>/config.json`, atomically (process 0): what the sampling commands read and
  `--config=<workdir>/config.json` replays."""
  if jax.process_index() == 0:
    write_atomically(os.path.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True))


def open_source(plan: plan_lib.RunPlan):
  """The plan's data source, then one example read to check it against the config.

  Raises:
    DatasetError: the dataset is missing, unprepared, or its first record is corrupt.
    ConfigError: its examples do not have the shape the config describes.
  """
  try:
    source = plan.make_source()
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  probe = source.get([0])
  key, shape, config = plan.data_key, plan.example_shape, plan.config
  if key not in probe or tuple(probe[key].shape[1:]) != shape:
    found = {k: tuple(v.shape[1:]) for k, v in probe.items()}
    raise config_checks.ConfigError(
        f"config.data: dataset {config.data.dataset!r} yields {found}, but the config "
        f"describes {key!r} of shape {shape} (check data.image_size, data.num_channels, "
        f"data.data_dim)")
  return source


def _initial_state(config, builder, ckpt, module_weights=None) -> TrainState:
  """Resume from the workdir, else initialise from `config.init_from` (or a student of the
  teacher's own module from the teacher's weights, `module_weights`), else from scratch."""
  layout = builder.layout
  restored = _restore_newest_verified(ckpt, layout.abstract)
  if restored is not None:
    state, meta = restored
    for key in ("batch_size", "seed"):
      if meta.get(key) != config[key]:
        logging.warning("Resuming with %s=%s but the checkpoint was written with %s: the "
                        "data order differs from an uninterrupted run.", key, config[key],
                        meta.get(key))
    logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    return state
  init_rng = jax.random.PRNGKey(config.seed)
  create = lambda p: train_step_lib.create_state(p, builder.tx, jax.random.fold_in(init_rng, 1),
                                                 len(config.ema_decays))
  fresh = lambda rng: partitioning.unbox(train_step_lib.init_params(builder.model, rng))
  if config.init_from:
    # Arrays the diffusion checkpoint lacks (an any-step student's zero-initialised
    # segment conditioning) keep their fresh initialisation.
    loaded, _, missing = checkpointing.load_params(
        config.init_from, layout.abstract.params, config.init_weights, key="config.init_from",
        allow_missing=True)
    if missing:
      loaded = train_step_lib.merge_params(
          jax.jit(fresh, out_shardings=layout.param_shardings)(init_rng), loaded)
    logging.info("Student initialised from %s (%s).", config.init_from, config.init_weights)
    return jax.jit(create, out_shardings=layout.shardings)(loaded)
  if config.teacher.student == "teacher" and module_weights is not None:
    # The student is the teacher's module (checked to have the teacher's shapes): it starts
    # as the teacher. (The module trained as a diffusion model without weights to start
    # from is initialised afresh, below.)
    loaded = _placed(module_weights, layout.abstract.params)
    logging.info("Student initialised from the teacher's weights %s.", config.teacher_checkpoint)
    return jax.jit(create, out_shardings=layout.shardings)(loaded)
  return jax.jit(lambda rng: create(fresh(rng)), out_shardings=layout.shardings)(init_rng)


def _restore_newest_verified(ckpt, abstract):
  """`(state, meta)` of the newest checkpoint that reads back and verifies, or None if the
  workdir has none.

  A checkpoint whose arrays do not match their checksums is corrupt. One that cannot be
  read at all is corrupt if an older one of the same run can (else the config, not the
  bytes, is the likelier cause, and the error is raised as it is). Corrupt checkpoints
  are moved aside (`Checkpointer.quarantine`), each with one warning naming its step and
  array, and the run goes on from the newest good one.

  Raises:
    CheckpointError: the checkpoints do not fit the config, or none of them restores.
  """
  failed = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      restored = ckpt.restore_state(step, abstract)
    except checkpointing.CorruptCheckpointError as e:
      failed.append((step, e))
      continue
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(
          f"{e}. Resume this workdir with the config it was trained with, or train this "
          "config in a new workdir.") from None
    for bad_step, error in failed:
      where = ckpt.quarantine(bad_step)
      logging.warning("%s; moved it to %s and resuming from step %d instead.", error, where,
                      step)
    return restored
  if failed:
    step, error = failed[0]
    hint = ("no older checkpoint reads either: if the config changed since, resume with the "
            "one it was trained with, else start again in a new workdir"
            if error.unreadable else "and no older checkpoint verifies: start again in a "
            "new workdir")
    raise checkpointing.CheckpointError(f"{error}; {hint}.")
  return None


def _trains_the_module(plan) -> bool:
  """A teacher of your own's module trained (or fine-tuned) as a diffusion model itself."""
  return (not plan.objective.is_student and plan.config.teacher.kind == "module"
          and plan.config.teacher.student == "teacher")


def _module_weights(config, abstract) -> dict:
  """The weights of a teacher of your own (`config.teacher_checkpoint`), as numpy arrays of
  `abstract`'s dtypes, checked against its shapes: a weights file or directory
  (teachers/weights.py), or a run of ours that trained the module (`_trains_the_module`),
  whose `teacher_weights` parameters are read.

  Raises:
    ConfigError: the file is missing or unreadable, or does not fit the module (naming the
      first mismatched parameter): the config names a module and weights that disagree.
    CheckpointError: a run's checkpoint that does not fit the module.
  """
  path = config.teacher_checkpoint
  if checkpointing.is_run_dir(path):
    params, _ = checkpointing.load_params(path, abstract, config.teacher_weights,
                                          key="config.teacher_checkpoint")
    tree = jax.device_get(params)
  else:
    try:
      tree = teacher_weights.read(path)
      teacher_weights.check_fits(path, tree, abstract["net"])
    except teacher_weights.WeightsError as e:
      raise config_checks.ConfigError(f"config.teacher_checkpoint: {e}") from None
    tree = {"net": tree}
  tree = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), tree, abstract)
  logging.info("Teacher: %s (%s frame, %s prediction) with the weights %s.",
               config.teacher.module, config.teacher.frame, config.teacher.prediction, path)
  return tree


def _placed(tree, abstract):
  """Host arrays `tree` on the devices with the shardings of `abstract` (every process
  holds the whole tree and gives each device its part)."""
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(a.shape, a.sharding, lambda i: x[i]),
      tree, abstract)


def _check_teacher_objective(plan: plan_lib.RunPlan):
  """Refuses a teacher run trained with an objective this student cannot distil (a CD
  student given another student), from its metadata alone. A PD halving's teacher may be the
  previous halving's student; checkpoints older than the metadata's mode say nothing."""
  config = plan.config
  ckpt, step = checkpointing.resolve(config.teacher_checkpoint)
  try:
    mode = (ckpt.restore_meta(step) or {}).get("mode")
  finally:
    ckpt.close()
  allowed = tuple(o.value for o in plan.objective.teacher_objectives)
  if mode is not None and mode not in allowed:
    raise config_checks.ConfigError(
        f"config.teacher_checkpoint={config.teacher_checkpoint!r} was trained with "
        f"loss.mode={mode!r}; the teacher of a loss.mode={plan.objective.value!r} student must "
        f"be a {' or '.join(repr(a) for a in allowed)} run (a student distils a diffusion "
        f"model, not another student)")


def _load_teacher(plan: plan_lib.RunPlan, abstract):
  config = plan.config
  params, _ = checkpointing.load_params(config.teacher_checkpoint, abstract,
                                        config.teacher_weights, key="config.teacher_checkpoint")
  return params


# --- metrics -----------------------------------------------------------------------------------


class _ScalarLog:
  """The step's metrics stay on the device until a log step; then one host transfer, their
  means since the last log, the speed, and the non-finite policy."""

  def __init__(self, writer, config, start_step: int, flops_per_device: float,
               peak: float | None):
    self.writer, self.config = writer, config
    self.flops_per_device, self.peak = flops_per_device, peak
    self.pending: list[dict[str, jax.Array]] = []
    self.last_time, self.last_step = time.time(), start_step

  def add(self, metrics: dict[str, jax.Array]):
    self.pending.append(metrics)

  def first_nonfinite(self) -> int | None:
    """The first step since the last log whose update was skipped, if any."""
    if not self.pending:
      return None
    flags = np.asarray(jax.device_get([m["nonfinite"] for m in self.pending]))
    bad = np.flatnonzero(flags)
    return self.last_step + 1 + int(bad[0]) if bad.size else None

  def write(self, step: int, state: TrainState, ckpt) -> dict[str, float]:
    """Writes the scalars of the steps since the last log; raises or warns on skipped
    updates (config.nonfinite)."""
    first_bad = self.first_nonfinite()
    scalars = fetch_metrics(self.pending)
    self.pending = []
    now = time.time()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    scalars.update(steps_per_sec=steps_per_sec,
                   examples_per_sec=steps_per_sec * self.config.batch_size,
                   tflops_per_device=self.flops_per_device * steps_per_sec / 1e12)
    if self.peak:
      scalars["mfu"] = self.flops_per_device * steps_per_sec / self.peak
    counters = jax.device_get(state.counters())
    scalars["skipped_updates"] = float(counters["num_skipped"])
    self.writer.write_scalars(step, scalars)
    if first_bad is not None:
      if self.config.nonfinite == "stop":
        raise _nonfinite_stop(first_bad, ckpt)
      logging.warning("Skipped non-finite updates since the last log, the first at step %d "
                      "(%d skipped in all).", first_bad, int(counters["num_skipped"]))
    return scalars


def fetch_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the steps since the last log: one host transfer per log step."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
  out = {}
  for key, value in stacked.items():
    value = np.asarray(value, np.float64)
    if value.ndim == 2:  # per-segment vectors
      for i, v in enumerate(value.mean(0)):
        out[f"{key}/{i}"] = float(v)
    else:
      out[key] = float(value.mean())
  return out


# --- checkpoints and the non-finite policy -----------------------------------------------------


@jax.jit
def _state_is_finite(state: TrainState) -> jax.Array:
  return train_step_lib.all_finite((state.params, state.ema, state.opt_state))


def _nonfinite_stop(step: int, ckpt) -> NonFiniteError:
  return NonFiniteError(
      f"non-finite loss or gradient at step {step} (config.nonfinite='stop'): its update was "
      f"skipped and nothing after it saved; the last checkpoint (step {ckpt.latest_step()}) "
      "is intact. Lower optimizer.learning_rate, check the data, or use nonfinite='skip'.")


def _save_checkpoint(ckpt, plan: plan_lib.RunPlan, step: int, state: TrainState, first_bad: int | None):
  """Saves `state` at `step`; never a state past a non-finite step (`first_bad`, with
  nonfinite='stop') and never one holding a non-finite value (whatever produced it)."""
  if plan.config.nonfinite == "stop" and first_bad is not None:
    raise _nonfinite_stop(first_bad, ckpt)
  if not bool(jax.device_get(_state_is_finite(state))):
    raise NonFiniteError(f"the train state at step {step} holds non-finite values, so it was "
                         f"not saved; the last checkpoint (step {ckpt.latest_step()}) is intact.")
  ckpt.save(step, state, plan.checkpoint_meta(step))


def _close_quietly(*closers):
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("While shutting down: %s: %s", type(e).__name__,
                    (str(e) or "?").splitlines()[0])


# --- preemption --------------------------------------------------------------------------------


class StopSignal:
  """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the current step and stops.

  Installed for the whole run (restore, compile, loop), so a signal that comes
  before the first step still ends the run cleanly after one step. A second signal
  gets the previous handler's behaviour (Ctrl-C twice interrupts a hung save).
  Multi-process jobs leave SIGTERM to JAX's preemption notifier, whose sync point
  (`Checkpointer.reached_preemption`) makes every process stop at the same step; a
  handler here would replace the notifier's, and a signal seen by one process only
  would stop it alone at a step the others pass (a hang in the next collective).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self._event.is_set():
      self.restore()
      previous = signal.getsignal(signum)
      if callable(previous):
        previous(signum, frame)
        return
      os.kill(os.getpid(), signum)  # the default action, e.g. terminate
      return
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def requested(self) -> bool:
    return self._event.is_set()

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.restore()
