"""The trainer: `train_and_evaluate(config, workdir)`, readable top to bottom.

1. Validate the config; build the mesh, the model, the schedule and the optimiser.
2. Build the train state abstractly (`jax.eval_shape`), derive its shardings from the
   models' logical axis rules, then restore it from the workdir (resume), or initialise
   it from another run's parameters (`config.init_from`), or from scratch with a jitted
   init that creates it already sharded.
3. Load the teacher (modes cd and direct) from `config.teacher_checkpoint`, sharded by
   the same rules; it is an input of the step, never optimised or checkpointed.
4. Compile the train step once, ahead of time, with explicit shardings and the state
   donated; read its FLOPs from XLA's cost analysis.
5. The loop: input -> step; device values are fetched only at log steps; sample grids,
   checkpoints, SIGTERM/preemption handling at their intervals.
"""
import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from multistep_cm import checkpointing
from multistep_cm import config_checks
from multistep_cm import denoiser
from multistep_cm import generation
from multistep_cm import hardware
from multistep_cm import models
from multistep_cm import optim
from multistep_cm import sharding as sharding_lib
from multistep_cm import train_state as train_state_lib
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments
from multistep_cm.evaluation import in_training
from multistep_cm.models import partitioning

TrainState = train_state_lib.TrainState


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: where it stopped and why."""
  step: int
  preempted: bool = False
  final_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class NonFiniteError(FloatingPointError):
  """The run stopped on a non-finite loss or gradient (config.nonfinite = 'stop')."""


# --- building blocks ---------------------------------------------------------------------------


def get_schedule(config) -> schedules.Schedule:
  return schedules.get_schedule(config.schedule.name, **config.schedule.kwargs.to_dict())


def get_model(config):
  return models.get_model_for_config(config)


def make_source(config) -> pipeline_lib.Source:
  """The training data source; the toy mixture is drawn once from a fixed seed."""
  if config.data.dataset == "mixture":
    mix = mixture_lib.default_mixture(dim=config.data.data_dim, seed=config.seed)
    x, _ = mix.sample(jax.random.PRNGKey(config.seed + 1), config.data.mixture_size)
    return pipeline_lib.ArraySource({"x": np.asarray(x)}, num_classes=0)
  return pipeline_lib.make_source(config.data)


def open_source(config, key: str) -> pipeline_lib.Source:
  """`make_source`, then one example read to check its `key` against the config.

  Raises:
    DatasetError: the dataset is missing, unprepared, or its first record is corrupt.
    ConfigError: its examples do not have the shape the config describes.
  """
  source = make_source(config)
  probe = source.get([0])
  if key not in probe or tuple(probe[key].shape[1:]) != example_shape(config):
    found = {k: tuple(v.shape[1:]) for k, v in probe.items()}
    raise config_checks.ConfigError(
        f"config.data: dataset {config.data.dataset!r} yields {found}, but the config "
        f"describes {key!r} of shape {example_shape(config)} (check data.image_size, "
        f"data.num_channels, data.data_dim)")
  return source


def data_key(batch: dict[str, Any]) -> str:
  return "image" if "image" in batch else "x"


def init_params(model, rng):
  """Fresh (boxed) parameters of `model`."""
  return model.init({"params": rng}, *models.dummy_inputs(model, 1), train=False,
                    **models.init_kwargs(model, 1))["params"]


def teacher_architecture(model):
  """The diffusion model a student was (or is) initialised from: no segment conditioning."""
  if getattr(model, "segment_cond", "none") == "none":
    return model
  return model.clone(segment_cond="none", num_step_values=0)


def merge_params(fresh, loaded):
  """`fresh` with every array that `loaded` has replaced by `loaded`'s (same paths)."""
  flat = traverse_util.flatten_dict(fresh)
  flat.update(traverse_util.flatten_dict(loaded))
  return traverse_util.unflatten_dict(flat)


def abstract_params(model):
  """Boxed abstract parameters (with logical axis names): nothing allocated."""
  return models.abstract_variables(model)["params"]


@dataclasses.dataclass
class StateLayout:
  """The abstract train state and the shardings of every part of it."""
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: TrainState
  param_shardings: Any


def state_layout(model, tx, mesh, num_ema: int) -> StateLayout:
  boxed = abstract_params(model)
  param_shardings = partitioning.param_shardings(boxed, mesh)
  params = partitioning.unbox(boxed)
  abstract = jax.eval_shape(
      lambda p: train_state_lib.create(p, tx, jax.random.PRNGKey(0), num_ema), params)
  rep = sharding_lib.replicated(mesh)
  shardings = TrainState(
      step=rep, rng=rep, params=param_shardings,
      opt_state=sharding_lib.optimizer_state_shardings(tx, abstract.opt_state,
                                                       param_shardings, mesh),
      ema={k: param_shardings for k in abstract.ema}, num_skipped=rep, first_nonfinite_step=rep)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return StateLayout(abstract=abstract, shardings=shardings, param_shardings=param_shardings)


# --- the train step ----------------------------------------------------------------------------


def segment_boundaries(config, schedule, student_steps: int):
  """The configured boundaries of S segments (diffusion/segments.py), as floats."""
  kind = config.loss.boundaries
  kind = kind if isinstance(kind, str) else tuple(kind)
  return segments.boundaries(kind, student_steps, schedule)


def segment_grid_fn(config, schedule):
  """`grid_fn(n_teacher, key, batch) -> (grid, step-count index per example or None)`.

  The boundaries are static: computed here, once, outside the traced step.
  """
  lc = config.loss
  if lc.anystep_counts:
    counts = tuple(lc.anystep_counts)
    bounds = [segment_boundaries(config, schedule, s) for s in counts]

    def anystep(n_teacher, key, batch):
      choice = jax.random.randint(key, (batch,), 0, len(counts), jnp.int32)
      return losses.make_anystep_grid(n_teacher, counts, bounds, choice), choice

    return anystep
  bounds = (None if lc.boundaries == "uniform"
            else segment_boundaries(config, schedule, lc.student_steps))
  return lambda n_teacher, key, batch: (losses.make_grid(n_teacher, lc.student_steps, bounds),
                                        None)


def trained_boundaries(config, schedule) -> dict[str, list[float]]:
  """`{str(S): boundaries}` on the final teacher grid: what sampling must use."""
  lc = config.loss
  counts = tuple(lc.anystep_counts) or (lc.student_steps,)
  s_max = max(counts)
  num_steps = int(losses.steps_per_segment(lc.teacher_steps_end, s_max)) * s_max
  kind = lc.boundaries if isinstance(lc.boundaries, str) else tuple(lc.boundaries)
  return {str(s): segments.trained_boundaries(kind, s, schedule, num_steps) for s in counts}


def make_loss_fn(config, model, schedule, teacher_model=None, teacher_fn_factory=None):
  """`loss_fn(params, teacher_params, batch, step, rng) -> (loss, metrics)` for config.loss.mode.

  The teacher is `teacher_model` with `teacher_params`, or, when given,
  `teacher_fn_factory(teacher_params, labels) -> teacher_fn` (the toy experiment's exact
  denoiser).
  """
  lc = config.loss
  mode = lc.mode
  num_classes = model.num_classes
  grid_fn = segment_grid_fn(config, schedule) if mode != "diffusion" else None

  def loss_fn(params, teacher_params, batch, step, rng):
    x = batch[data_key(batch)]
    labels = batch.get("label") if num_classes else None
    k_eps, k_time, k_drop, k_label = jax.random.split(rng, 4)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    metrics = {}
    if mode == "diffusion":
      if labels is not None and lc.label_dropout > 0:
        drop = jax.random.bernoulli(k_label, lc.label_dropout, labels.shape)
        labels = jnp.where(drop, num_classes, labels)
      t = losses.sample_diffusion_times(k_time, x.shape[0])
      student = lambda z, t: denoiser.apply_x(model, params, z, t, schedule, labels, k_drop)
      per_example = losses.diffusion_loss(student, x, eps, t, schedule)
    else:
      n_teacher = losses.teacher_steps(step, lc.teacher_steps_start, lc.teacher_steps_end,
                                       lc.anneal_steps)
      k_time, k_count = jax.random.split(k_time)
      grid, count_index = grid_fn(n_teacher, k_count, x.shape[0])
      segment, n_rel = losses.sample_segments(k_time, x.shape[0], grid)
      teacher_fn = None
      if mode in ("cd", "direct") and teacher_fn_factory is not None:
        teacher_fn = teacher_fn_factory(teacher_params, labels)
      elif mode in ("cd", "direct"):
        teacher_fn = denoiser.make_denoise_fn(
            teacher_model, teacher_params, schedule, labels, guidance_scale=lc.guidance_scale,
            return_conditional=True)
      # Any-step students are told their segment layout; both student calls share it.
      t_step = losses.segment_times(segment, n_rel, grid)[0]
      seg_input = denoiser.segment_input(model, schedule, t_step, count_index)
      student = lambda z, t, r: denoiser.apply_x(model, params, z, t, schedule, labels, r,
                                                 segment=seg_input)
      per_example, aux = losses.mcm_loss(
          student, x, eps, segment, n_rel, k_drop, schedule=schedule, mode=mode,
          grid=grid, teacher_fn=teacher_fn,
          eta=lc.eta, teacher_solver=lc.teacher_solver, huber_epsilon=lc.huber_epsilon,
          huber_reduction=lc.huber_reduction, weighting=lc.weighting,
          direct_x_var=lc.direct_x_var)
      # Loss per segment; for any-step runs, per step count instead.
      groups, num_groups, name = aux["segment"], lc.student_steps, "loss_per_segment"
      if lc.anystep_counts:
        groups, num_groups, name = count_index, len(lc.anystep_counts), "loss_per_step_count"
      group_sum = jax.ops.segment_sum(per_example, groups, num_groups)
      group_count = jax.ops.segment_sum(jnp.ones_like(per_example), groups, num_groups)
      metrics[name] = group_sum / jnp.maximum(group_count, 1.0)
      metrics["teacher_steps"] = n_teacher
    loss = jnp.mean(per_example)
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_train_step(config, loss_fn, tx, lr_schedule):
  """`train_step(state, batch, teacher_params) -> (state, metrics)`, pure and jit-able."""
  decays = tuple(config.ema_decays)

  def train_step(state: TrainState, batch, teacher_params):
    rng = jax.random.fold_in(state.rng, state.step)  # a resumed run draws the same numbers
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, teacher_params, batch, state.step, rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or updated parameter never reaches the state: the
    # update is skipped (counted), and with nonfinite='stop' the host stops at the next
    # log step or checkpoint, whichever comes first.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state.params)
    new_opt_state = keep(new_opt_state, state.opt_state)
    new_ema = optim.update_ema(state.ema, new_params, decays, state.step, config.ema_warmup)
    new_ema = keep(new_ema, state.ema)
    # Counted like the logs count steps: the update that would make state.step + 1.
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1,
                          state.first_nonfinite_step)
    new_state = state.replace(
        step=state.step + 1, params=new_params, opt_state=new_opt_state, ema=new_ema,
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        first_nonfinite_step=first_bad)
    metrics.update(grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   nonfinite=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


def all_finite(tree) -> jax.Array:
  """A boolean scalar: every element of every array in `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def example_shape(config) -> tuple[int, ...]:
  """The shape of one training example, from the config: [H, W, C] images or [D] vectors."""
  if config.data.dataset == "mixture":
    return (int(config.data.data_dim),)
  return (int(config.data.image_size), int(config.data.image_size),
          int(config.data.num_channels))


@dataclasses.dataclass
class StepBuilder:
  """Everything static about a run's train step, built from the config alone.

  No data, no checkpoint and no parameter is touched, so the same object serves
  the trainer, the TPU compile report (compile for a topology this host does not
  have) and the benchmarks. `mesh` defaults to the config's mesh over `devices`.
  """
  config: ml_collections.ConfigDict
  devices: Any = None

  def __post_init__(self):
    config = self.config
    self.mesh = sharding_lib.make_mesh(config.mesh, self.devices)
    self.model = get_model(config)
    # The student has the teacher's architecture (§7.1), less an any-step student's
    # segment conditioning, which a diffusion teacher does not have.
    self.teacher_model = teacher_architecture(self.model)
    self.schedule = get_schedule(config)
    self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
    self.layout = state_layout(self.model, self.tx, self.mesh, len(config.ema_decays))
    # One leading-axis sharding serves every key (images, vectors, labels).
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, 1)
    self.data_key = "x" if config.data.dataset == "mixture" else "image"
    self.abstract_batch = {
        self.data_key: jax.ShapeDtypeStruct((config.batch_size,) + example_shape(config),
                                            jnp.float32, sharding=self.batch_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                      sharding=self.batch_sharding)}
    self.teacher_abstract = (self.sharded_teacher_params()
                             if config.loss.mode in ("cd", "direct") else None)
    teacher_shardings = (None if self.teacher_abstract is None
                         else jax.tree.map(lambda a: a.sharding, self.teacher_abstract))
    loss_fn = make_loss_fn(config, self.model, self.schedule, self.teacher_model)
    self.step_fn = jax.jit(
        make_train_step(config, loss_fn, self.tx, self.lr_schedule),
        in_shardings=(self.layout.shardings, {k: self.batch_sharding
                                              for k in self.abstract_batch},
                      teacher_shardings),
        out_shardings=(self.layout.shardings, sharding_lib.replicated(self.mesh)),
        donate_argnums=(0,))

  def sharded_teacher_params(self):
    """Abstract teacher parameters carrying the shardings of the models' rules."""
    boxed = abstract_params(self.teacher_model)
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        partitioning.unbox(boxed),
                        partitioning.param_shardings(boxed, self.mesh))

  @contextlib.contextmanager
  def _rules(self):
    """The mesh and the logical rules, so the models' batch-axis activation constraints
    take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
      yield

  def trace(self):
    """The traced step (its jaxpr: the compile report counts FLOPs on it, flops.py)."""
    with self._rules():
      return self.step_fn.trace(self.layout.abstract, self.abstract_batch,
                                self.teacher_abstract)

  def lower(self, traced=None):
    """The lowered step (of `traced`, a `trace()` result, to save tracing again)."""
    with self._rules():
      return (self.trace() if traced is None else traced).lower()

  def compile(self):
    """`(compiled step, FLOPs per device per step)`.

    XLA's cost analysis counts a loop body once, so a scanned mid stack would count
    one of its blocks: the missing iterations are added, as the difference between
    this step lowered unrolled and as built (global counts, split over the devices).
    """
    lowered = self.lower()
    compiled = lowered.compile()
    flops = cost_flops(compiled)
    if getattr(self.model, "scan_blocks", False) and self.model.mid_blocks > 1:
      unrolled = ml_collections.ConfigDict(self.config.to_dict())
      unrolled.model.scan_blocks = False
      missing = cost_flops(StepBuilder(unrolled, self.devices).lower()) - cost_flops(lowered)
      flops += missing / self.mesh.size
    return compiled, flops


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


# --- the main job ------------------------------------------------------------------------------


def _checkpoint_meta(config, state_step: int) -> dict[str, Any]:
  return {"step": state_step, "input_position": state_step, "batch_size": config.batch_size,
          "seed": config.seed, "ema_decays": list(config.ema_decays),
          "model": config.model.preset, "mode": config.loss.mode,
          "student_steps": config.loss.student_steps if config.loss.mode != "diffusion" else None,
          "anystep_counts": list(config.loss.anystep_counts),
          "segment_boundaries": (trained_boundaries(config, get_schedule(config))
                                 if config.loss.mode != "diffusion" else None),
          "schedule": config.schedule.to_dict(), "dataset": config.data.dataset}


@jax.jit
def _state_is_finite(state: TrainState) -> jax.Array:
  return all_finite((state.params, state.ema, state.opt_state))


def _first_nonfinite(pending: list[dict[str, jax.Array]], first_step: int) -> int | None:
  """The first step whose update was skipped, among `pending` (steps first_step, ...)."""
  if not pending:
    return None
  flags = np.asarray(jax.device_get([m["nonfinite"] for m in pending]))
  bad = np.flatnonzero(flags)
  return first_step + int(bad[0]) if bad.size else None


def _nonfinite_stop(step: int, ckpt) -> NonFiniteError:
  return NonFiniteError(
      f"non-finite loss or gradient at step {step} (config.nonfinite='stop'): its update was "
      f"skipped and nothing after it saved; the last checkpoint (step {ckpt.latest_step()}) "
      "is intact. Lower optimizer.learning_rate, check the data, or use nonfinite='skip'.")


def _save_checkpoint(ckpt, config, step: int, state: TrainState, pending, first_pending: int):
  """Saves `state` at `step`; never a state past a non-finite step (nonfinite='stop') and
  never one holding a non-finite value (whatever produced it)."""
  if config.nonfinite == "stop":
    bad = _first_nonfinite(pending, first_pending)
    if bad is not None:
      raise _nonfinite_stop(bad, ckpt)
  if not bool(jax.device_get(_state_is_finite(state))):
    raise NonFiniteError(f"the train state at step {step} holds non-finite values, so it was "
                         f"not saved; the last checkpoint (step {ckpt.latest_step()}) is intact.")
  ckpt.save(step, state, _checkpoint_meta(config, step))


def cost_flops(compiled) -> float:
  """FLOPs per device of a compiled SPMD program (XLA's cost analysis is per partition);
  of a lowered one, the global FLOPs."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _fetch_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
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


def _write_config(config, workdir: str):
  if jax.process_index() == 0:  # epath: local paths and gs:// alike
    epath.Path(workdir, "config.json").write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))


def _initial_state(config, model, tx, layout, ckpt):
  """Resume from the workdir, else initialise from `config.init_from`, else from scratch."""
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      state, meta = ckpt.restore_state(latest, layout.abstract)
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(
          f"{e}. Resume this workdir with the config it was trained with, or train this "
          "config in a new workdir.") from None
    for key in ("batch_size", "seed"):
      if meta.get(key) != config[key]:
        logging.warning("Resuming with %s=%s but the checkpoint was written with %s: the "
                        "data order differs from an uninterrupted run.", key, config[key],
                        meta.get(key))
    logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    return state
  init_rng = jax.random.PRNGKey(config.seed)
  create = lambda p: train_state_lib.create(p, tx, jax.random.fold_in(init_rng, 1),
                                            len(config.ema_decays))
  if config.init_from:
    # Arrays the diffusion checkpoint lacks (an any-step student's zero-initialised
    # segment conditioning) keep their fresh initialisation.
    loaded, _, missing = checkpointing.load_params(
        config.init_from, layout.abstract.params, config.init_weights, key="config.init_from",
        allow_missing=True)
    if missing:
      fresh = jax.jit(lambda rng: partitioning.unbox(init_params(model, rng)),
                      out_shardings=layout.param_shardings)(init_rng)
      loaded = merge_params(fresh, loaded)
    logging.info("Student initialised from %s (%s).", config.init_from, config.init_weights)
    return jax.jit(create, out_shardings=layout.shardings)(loaded)
  init = lambda rng: create(partitioning.unbox(init_params(model, rng)))
  return jax.jit(init, out_shardings=layout.shardings)(init_rng)


def _load_teacher(config, abstract):
  params, meta = checkpointing.load_params(config.teacher_checkpoint, abstract,
                                           config.teacher_weights,
                                           key="config.teacher_checkpoint")
  if meta.get("mode") not in (None, "diffusion"):
    logging.warning("The teacher checkpoint %s was trained with mode %r, not diffusion.",
                    config.teacher_checkpoint, meta.get("mode"))
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> TrainResult:
  """Trains (or resumes) the run in `workdir` until `config.num_train_steps`.

  `stop_after` ends this invocation after that step with a checkpoint, as a
  preemption would; running again resumes exactly. SIGTERM/SIGINT do the same at
  the step they arrive (the result says `preempted`).
  """
  # Multi-process: no handler (see StopSignal); a stop on one process alone would hang.
  signals = () if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  with StopSignal(signals) as stop:
    return _train_and_evaluate(config, workdir, stop_after, stop)


def _train_and_evaluate(config, workdir, stop_after, stop) -> TrainResult:
  # 1. Config, mesh, model, optimiser and the abstract step: nothing allocated yet.
  config_checks.validate(config, num_devices=jax.device_count(),
                         num_processes=jax.process_count())
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)
  builder = StepBuilder(config)
  mesh, model, schedule, layout = builder.mesh, builder.model, builder.schedule, builder.layout
  logging.info("Mesh %s over %d devices (%d processes): %s", dict(mesh.shape),
               jax.device_count(), jax.process_count(), jax.devices()[0].device_kind)
  # The inputs that can be wrong, checked before anything is allocated or compiled: the
  # teacher checkpoint (its metadata) and the dataset (one example).
  if builder.teacher_abstract is not None:
    checkpointing.check_params(config.teacher_checkpoint, builder.teacher_abstract,
                               config.teacher_weights, key="config.teacher_checkpoint")
  source = open_source(config, builder.data_key)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=True)

  # 2. The train state, sharded.
  ckpt = checkpointing.Checkpointer(
      checkpointing.checkpoint_dir(workdir), max_to_keep=config.checkpoint_keep,
      keep_period=config.checkpoint_keep_period or None, async_save=config.async_checkpoints)
  state = _initial_state(config, model, builder.tx, layout, ckpt)
  start_step = int(jax.device_get(state.step))
  if start_step >= config.num_train_steps:
    logging.info("%s is already trained to step %d.", workdir, start_step)
    ckpt.close()
    writer.close()
    return TrainResult(step=start_step)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(layout.abstract.params))
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  logging.info("Model %s: %.2fM parameters; starting at step %d of %d.", config.model.preset,
               num_params / 1e6, start_step, config.num_train_steps)

  # 3. The teacher: an input of the step, sharded like the student.
  teacher_params = None
  if builder.teacher_abstract is not None:
    teacher_params = _load_teacher(config, builder.teacher_abstract)

  # 4. Input, and the step compiled once.
  shard_index, shard_count = pipeline_lib.batch_shard(builder.batch_sharding, config.batch_size)
  data = pipeline_lib.Pipeline(
      source, config.batch_size, config.seed, shard_index, shard_count,
      random_flip=bool(config.data.random_flip), num_threads=config.data.num_threads or None,
      prefetch=config.data.prefetch)
  t0 = time.time()
  compiled, flops_per_device = builder.compile()
  peak = hardware.peak_flops_per_device()
  logging.info("Compiled the train step in %.1fs: %.3g FLOPs per device per step%s.",
               time.time() - t0, flops_per_device,
               f" (peak {peak:.3g} FLOP/s per device)" if peak else "")

  sample_fn = None
  if config.sample_every_steps and len(example_shape(config)) == 3:
    # Replicated output: every process can read the grid, also when the batch spans hosts.
    sample_fn = jax.jit(generation.make_sample_fn(model, schedule,
                                                  generation.spec_for_config(config)),
                        out_shardings=sharding_lib.replicated(mesh))
    k_z, k_l = jax.random.split(jax.random.PRNGKey(config.seed + 7))
    sample_z = jax.random.normal(k_z, (config.sample_num,) + example_shape(config))
    sample_labels = (jnp.arange(config.sample_num, dtype=jnp.int32) % model.num_classes
                     if model.num_classes else None)

  evaluator = None
  if in_training.enabled(config):
    eval_teacher = teacher_params
    if eval_teacher is None and config.loss.mode == "ct" and config.evals.ode_error:
      # CT needs no teacher to train; its ODE error is measured against the diffusion run
      # it started from.
      path = config.teacher_checkpoint or config.init_from
      if path:
        eval_teacher = checkpointing.load_params(path, builder.sharded_teacher_params(),
                                                 config.teacher_weights,
                                                 key="config.init_from")[0]
    evaluator = in_training.TrainingEvaluator(config, model, schedule, mesh, eval_teacher,
                                              builder.teacher_model)

  # 5. The loop.
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                 writer=writer,
                                                 every_steps=config.log_every_steps))
    if config.profile_steps:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=workdir, first_profile=start_step + 10))
  due = lambda step, every: every > 0 and step % every == 0
  pending, last_log_time, last_log_step = [], time.time(), start_step
  result = TrainResult(step=start_step)
  step = start_step
  ids_log = (pipeline_lib.ExampleIdLog(workdir, jax.process_index(), start_step)
             if config.get("record_example_ids") else None)
  try:
    last_step = config.num_train_steps if stop_after is None else min(stop_after,
                                                                      config.num_train_steps)
    for step, local in zip(range(start_step + 1, last_step + 1), data.iterate(start_step)):
      if ids_log:
        ids_log.write(step, local["index"])
      batch = pipeline_lib.to_global({k: local[k] for k in builder.abstract_batch},
                                     builder.batch_sharding, config.batch_size)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled(state, batch, teacher_params)
      pending.append(metrics)
      for hook in hooks:
        hook(step)

      if due(step, config.log_every_steps) or step == config.num_train_steps:
        first_bad = _first_nonfinite(pending, last_log_step + 1)
        scalars = _fetch_metrics(pending)
        pending = []
        now = time.time()
        steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        scalars.update(steps_per_sec=steps_per_sec,
                       examples_per_sec=steps_per_sec * config.batch_size,
                       tflops_per_device=flops_per_device * steps_per_sec / 1e12)
        if peak:
          scalars["mfu"] = flops_per_device * steps_per_sec / peak
        counters = jax.device_get(state.counters())
        scalars["skipped_updates"] = float(counters["num_skipped"])
        writer.write_scalars(step, scalars)
        result.final_metrics = scalars
        if first_bad is not None:
          if config.nonfinite == "stop":
            raise _nonfinite_stop(first_bad, ckpt)
          logging.warning("Skipped non-finite updates since the last log, the first at step %d "
                          "(%d skipped in all).", first_bad, int(counters["num_skipped"]))

      if sample_fn is not None and (due(step, config.sample_every_steps)
                                    or step == config.num_train_steps):
        images = jax.device_get(sample_fn(state.ema["ema0"], sample_z, sample_labels))
        grid = generation.image_grid(images)
        writer.write_images(step, {"samples": grid[None]})
        if jax.process_index() == 0 and step == config.num_train_steps:
          generation.save_png(grid, os.path.join(workdir, f"samples_step{step}.png"))

      if evaluator is not None and (due(step, config.evals.every_steps)
                                    or step == config.num_train_steps):
        writer.write_scalars(step, evaluator(state.ema["ema0"]))

      preempted = stop.requested() or (jax.process_count() > 1 and
                                       ckpt.reached_preemption(step))
      if due(step, config.checkpoint_every_steps) or preempted:
        _save_checkpoint(ckpt, config, step, state, pending, last_log_step + 1)
      if preempted:
        logging.warning("Stopping at step %d after saving a checkpoint.", step)
        result.preempted = True
        break
    result.step = step
    if not result.preempted and ckpt.latest_step() != step:
      _save_checkpoint(ckpt, config, step, state, pending, last_log_step + 1)
    ckpt.wait_until_finished()  # a save that failed in the background fails the run
  finally:
    # Also on errors: no checkpoint or decoding thread left running, and a close that
    # fails (a full disk fails them all) is logged without hiding the error being raised.
    _close_quietly(ckpt.wait_until_finished, ckpt.close, data.close, writer.close,
                   *([ids_log.close] if ids_log else []))
  logging.info("Finished at step %d%s. TensorBoard: tensorboard --logdir %s", result.step,
               " (preempted)" if result.preempted else "", workdir)
  return result


def _close_quietly(*closers):
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("While shutting down: %s: %s", type(e).__name__,
                    (str(e) or "?").splitlines()[0])


def resolve_stage(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`stage:<name>` in teacher_checkpoint / init_from -> that stage's workdir."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key in ("teacher_checkpoint", "init_from"):
    value = config.get(key, "")
    if isinstance(value, str) and value.startswith("stage:"):
      config[key] = os.path.join(workdir, value[len("stage:"):])
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains a single-run config, or each stage of a staged one in `<workdir>/<stage>`."""
  if "stages" not in config:
    return train_and_evaluate(config, workdir)
  # Every stage now: a mistake in the last one must not wait for the first to train.
  config_checks.validate_run(config, jax.device_count(), jax.process_count())
  result = None
  for name in config.stage_order:
    stage_dir = os.path.join(workdir, name)
    logging.info("Stage %s in %s", name, stage_dir)
    result = train_and_evaluate(resolve_stage(config.stages[name], workdir), stage_dir)
    if result.preempted:
      break
  return result


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
