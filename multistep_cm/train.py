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
import functools
import os
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from multistep_cm import checkpointing
from multistep_cm import config_checks
from multistep_cm import denoiser
from multistep_cm import flops
from multistep_cm import hardware
from multistep_cm import models
from multistep_cm import optim
from multistep_cm import sharding as sharding_lib
from multistep_cm import train_state as train_state_lib
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
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


def data_key(batch: dict[str, Any]) -> str:
  return "image" if "image" in batch else "x"


def _init_params(model, rng):
  z, logsnr, labels = models.input_specs(model, 1)
  variables = model.init({"params": rng}, jnp.zeros(z.shape, z.dtype),
                         jnp.zeros(logsnr.shape, logsnr.dtype),
                         jnp.zeros(labels.shape, labels.dtype) if model.num_classes else None,
                         train=False)
  return variables["params"]


def abstract_params(model):
  """Boxed abstract parameters (with logical axis names) from `jax.eval_shape`."""
  return jax.eval_shape(functools.partial(_init_params, model), jax.random.PRNGKey(0))


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


def make_loss_fn(config, model, schedule, teacher_model=None):
  """`loss_fn(params, teacher_params, batch, step, rng) -> (loss, metrics)` for config.loss.mode."""
  lc = config.loss
  mode = lc.mode
  num_classes = model.num_classes

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
      nps = losses.steps_per_segment(n_teacher, lc.student_steps)
      segment, n_rel = losses.sample_segments(k_time, x.shape[0], lc.student_steps, nps)
      teacher_fn = None
      if mode in ("cd", "direct"):
        teacher_fn = denoiser.make_denoise_fn(
            teacher_model, teacher_params, schedule, labels, guidance_scale=lc.guidance_scale,
            return_conditional=True)
      student = lambda z, t, r: denoiser.apply_x(model, params, z, t, schedule, labels, r)
      per_example, aux = losses.mcm_loss(
          student, x, eps, segment, n_rel, k_drop, schedule=schedule, mode=mode,
          student_steps=lc.student_steps, n_per_segment=nps, teacher_fn=teacher_fn,
          eta=lc.eta, teacher_solver=lc.teacher_solver, huber_epsilon=lc.huber_epsilon,
          huber_reduction=lc.huber_reduction, weighting=lc.weighting,
          direct_x_var=lc.direct_x_var)
      seg_sum = jax.ops.segment_sum(per_example, aux["segment"], lc.student_steps)
      seg_count = jax.ops.segment_sum(jnp.ones_like(per_example), aux["segment"],
                                      lc.student_steps)
      metrics["loss_per_segment"] = seg_sum / jnp.maximum(seg_count, 1.0)
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
    # A non-finite loss or gradient never reaches the parameters: the update is skipped
    # (counted), and with nonfinite='stop' the host stops at the next log step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state.params)
    new_opt_state = keep(new_opt_state, state.opt_state)
    new_ema = optim.update_ema(state.ema, new_params, decays, state.step, config.ema_warmup)
    new_ema = keep(new_ema, state.ema)
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                          state.first_nonfinite_step)
    new_state = state.replace(
        step=state.step + 1, params=new_params, opt_state=new_opt_state, ema=new_ema,
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        first_nonfinite_step=first_bad)
    metrics.update(grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   nonfinite=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


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
    self.teacher_model = self.model  # the student has the teacher's architecture (§7.1)
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
    self.teacher_abstract = None
    if config.loss.mode in ("cd", "direct"):
      boxed = abstract_params(self.teacher_model)
      shardings = partitioning.param_shardings(boxed, self.mesh)
      self.teacher_abstract = jax.tree.map(
          lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
          partitioning.unbox(boxed), shardings)
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

  @contextlib.contextmanager
  def _rules(self):
    """The mesh and the logical rules, so the models' batch-axis activation constraints
    take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
      yield

  def trace(self):
    with self._rules():
      return self.step_fn.trace(self.layout.abstract, self.abstract_batch,
                                self.teacher_abstract)

  def lower(self, traced=None):
    """The lowered step (of `traced`, a `trace()` result, to save tracing again)."""
    with self._rules():
      return (self.trace() if traced is None else traced).lower()

  def compile(self):
    """`(compiled step, FLOPs per device per step)`.

    FLOPs of matmuls and convolutions counted on the jaxpr (flops.py: XLA's cost
    analysis counts the scanned mid stack once); with remat, recomputation included.
    """
    traced = self.trace()
    compiled = self.lower(traced).compile()
    return compiled, flops.count_flops(traced.jaxpr).flops / self.mesh.size


# --- sampling for the logs ---------------------------------------------------------------------


def make_sample_fn(config, model, schedule):
  """`sample(params, z, labels) -> x` with the student's sampler (MCM) or the diffusion one."""
  def sample(params, z, labels):
    f = denoiser.make_denoise_fn(model, params, schedule, labels)
    if config.loss.mode == "diffusion":
      return sampling.sample(f, z, schedule, config.sample_steps, config.sample_sampler)
    return sampling.sample_mcm(f, z, schedule, config.loss.student_steps)
  return sample


def image_grid(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, cols*W, C] grid."""
  images = np.clip((np.asarray(images) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return grid


# --- preemption --------------------------------------------------------------------------------


class StopSignal:
  """Set by SIGTERM/SIGINT; multi-host jobs also ask JAX's preemption notifier."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    return self._event.is_set()


# --- the main job ------------------------------------------------------------------------------


def _checkpoint_meta(config, state_step: int) -> dict[str, Any]:
  return {"step": state_step, "input_position": state_step, "batch_size": config.batch_size,
          "seed": config.seed, "ema_decays": list(config.ema_decays),
          "model": config.model.preset, "mode": config.loss.mode,
          "student_steps": config.loss.student_steps if config.loss.mode != "diffusion" else None,
          "schedule": config.schedule.to_dict(), "dataset": config.data.dataset}


def cost_flops(compiled) -> float:
  """FLOPs per device of a compiled SPMD program (XLA's cost analysis is per partition)."""
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
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _initial_state(config, model, tx, layout, ckpt):
  """Resume from the workdir, else initialise from `config.init_from`, else from scratch."""
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore_state(latest, layout.abstract)
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
    params, _ = checkpointing.load_params(config.init_from, layout.abstract.params,
                                          config.init_weights)
    logging.info("Student initialised from %s (%s).", config.init_from, config.init_weights)
    return jax.jit(create, out_shardings=layout.shardings)(params)
  init = lambda rng: create(partitioning.unbox(_init_params(model, rng)))
  return jax.jit(init, out_shardings=layout.shardings)(init_rng)


def _load_teacher(config, abstract):
  params, meta = checkpointing.load_params(config.teacher_checkpoint, abstract,
                                           config.teacher_weights)
  if meta.get("mode") not in (None, "diffusion"):
    logging.warning("The teacher checkpoint %s was trained with mode %r, not diffusion.",
                    config.teacher_checkpoint, meta.get("mode"))
  return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> TrainResult:
  """Trains (or resumes) the run in `workdir` until `config.num_train_steps`.

  `stop_after` ends this invocation after that step with a checkpoint, as a
  preemption would; running again resumes exactly.
  """
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
  source = make_source(config)
  probe = source.get([0])
  key = builder.data_key
  if key not in probe or tuple(probe[key].shape[1:]) != example_shape(config):
    found = {k: tuple(v.shape[1:]) for k, v in probe.items()}
    raise config_checks.ConfigError(
        f"config.data: dataset {config.data.dataset!r} yields {found}, but the config "
        f"describes {key!r} of shape {example_shape(config)} (check data.image_size, "
        f"data.num_channels, data.data_dim)")
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
    sample_fn = jax.jit(make_sample_fn(config, model, schedule),
                        out_shardings=sharding_lib.replicated(mesh))
    k_z, k_l = jax.random.split(jax.random.PRNGKey(config.seed + 7))
    sample_z = jax.random.normal(k_z, (config.sample_num,) + example_shape(config))
    sample_labels = (jnp.arange(config.sample_num, dtype=jnp.int32) % model.num_classes
                     if model.num_classes else None)

  # 5. The loop.
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                 writer=writer,
                                                 every_steps=config.log_every_steps))
    if config.profile_steps:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=workdir, first_profile=start_step + 10))
  stop = StopSignal().install()
  due = lambda step, every: every > 0 and step % every == 0
  pending, last_log_time, last_log_step = [], time.time(), start_step
  result = TrainResult(step=start_step)
  step = start_step
  try:
    last_step = config.num_train_steps if stop_after is None else min(stop_after,
                                                                      config.num_train_steps)
    for step, local in zip(range(start_step + 1, last_step + 1), data.iterate(start_step)):
      batch = pipeline_lib.to_global({k: local[k] for k in builder.abstract_batch},
                                     builder.batch_sharding, config.batch_size)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled(state, batch, teacher_params)
      pending.append(metrics)
      for hook in hooks:
        hook(step)

      if due(step, config.log_every_steps) or step == config.num_train_steps:
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
        if counters["first_nonfinite_step"] >= 0 and config.nonfinite == "stop":
          raise NonFiniteError(
              f"non-finite loss or gradient at step {int(counters['first_nonfinite_step'])} "
              f"(update skipped; config.nonfinite='stop'). The last checkpoint is intact.")

      if sample_fn is not None and (due(step, config.sample_every_steps)
                                    or step == config.num_train_steps):
        grid = image_grid(jax.device_get(sample_fn(state.ema["ema0"], sample_z, sample_labels)))
        writer.write_images(step, {"samples": grid[None]})
        if jax.process_index() == 0 and step == config.num_train_steps:
          _save_png(grid, os.path.join(workdir, f"samples_step{step}.png"))

      preempted = stop.requested() or (jax.process_count() > 1 and
                                       ckpt.reached_preemption(step))
      if due(step, config.checkpoint_every_steps) or preempted:
        ckpt.save(step, state, _checkpoint_meta(config, step))
      if preempted:
        logging.warning("Stopping at step %d after saving a checkpoint.", step)
        result.preempted = True
        break
    result.step = step
    if not result.preempted and ckpt.latest_step() != step:
      ckpt.save(step, state, _checkpoint_meta(config, step))
  finally:
    stop.restore()
    ckpt.wait_until_finished()
    ckpt.close()
    data.close()
    writer.flush()
  logging.info("Finished at step %d%s. TensorBoard: tensorboard --logdir %s", result.step,
               " (preempted)" if result.preempted else "", workdir)
  return result


def _save_png(grid: np.ndarray, path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as fh:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(fh, format="PNG")
  logging.info("Wrote %s", path)


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
  result = None
  for name in config.stage_order:
    if name not in config.stages:
      raise config_checks.ConfigError(f"config.stage_order names {name!r}, which is not in "
                                      f"config.stages ({sorted(config.stages)})")
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
